"""Flag parsing shared by the command-line programs: a mistake is one line."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import flags

from gnp.errors import UserError


def parse_config_flags(argv: list[str], *, program: str, example: str,
                       check_key: Callable[[str], None] | None = None):
  """absl's flag parsing for a program with a ``--config`` file flag.

  Any mistake (an unknown flag, a missing or broken config file, a bad
  override) exits with ``"<program>: error: <what>"`` instead of a
  traceback. ``check_key`` vets each ``--config.<key>=`` override first, so
  that a misspelled key is named with the closest known one.
  """
  for arg in argv[1:]:
    if check_key is not None and arg.startswith("--config."):
      try:
        check_key(arg[len("--config."):].split("=", 1)[0])
      except UserError as e:
        sys.exit(f"{program}: error: {e}")
  try:
    argv = flags.FLAGS(argv)
    if flags.FLAGS.config is None:
      raise ValueError(f"--config is required, e.g. --config={example}")
    flags.FLAGS.config.keys()  # The file loads lazily; fail here if it can't.
    return argv
  except (flags.Error, AttributeError, KeyError, OSError, ValueError) as e:
    # Flag and config-file errors carry a traceback as text; its last line
    # ("ValueError: unknown variant ...") is the message.
    lines = [l.strip() for l in str(e).splitlines()
             if l.strip() and not l.strip().startswith("Pass --help")]
    sys.exit(f"{program}: error: {lines[-1] if lines else type(e).__name__}")
