"""Errors that mean "the input is wrong", as opposed to a bug in gnp.

`gnp.main` prints such an error as one line and exits non-zero, without a
traceback. Library code raises them as early as it can: before a dataset is
loaded, before anything is compiled, before anything is written.
"""


class UserError(Exception):
  """A mistake in what the user asked for; the message says what to change."""


class ConfigError(UserError, ValueError):
  """A config value that is unknown, misspelled, out of range or inconsistent."""


class DatasetUnavailableError(UserError, RuntimeError):
  """A dataset that is neither on disk nor downloadable from here."""


class NonFiniteError(FloatingPointError):
  """A NaN or Inf in the loss or the update stopped the run.

  Not a `UserError`: the input may be valid and the run diverged. The
  message names the step and the quantity; no checkpoint holds the state.
  """


class Preempted(Exception):
  """SIGTERM or SIGINT stopped the run after it saved a checkpoint."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum
