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
