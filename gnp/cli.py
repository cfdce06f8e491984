"""Flag parsing shared by the command-line programs: a mistake is one line,
and ``--help`` lists every config key."""

from __future__ import annotations

import inspect
import os
import re
import sys
import traceback
from collections.abc import Callable

import ml_collections
from absl import flags
from absl import logging

from gnp import config as config_lib
from gnp.errors import UserError


def parse_config_flags(argv: list[str], *, program: str, example: str,
                       check_key: Callable[[str], None] | None = None,
                       flag_values: flags.FlagValues | None = None):
  """absl's flag parsing for a program with a ``--config`` file flag.

  Any mistake (an unknown flag, a missing or broken config file, a bad
  override) exits with ``"<program>: error: <what>"`` instead of a
  traceback; a config file that raises (or does not compile) is named with
  the line and the exception, ``"<program>: error: <file>:<line>: <type>:
  <message>"``. ``check_key`` vets each ``--config.<key>=`` override first,
  so that a misspelled key is named with the closest known one.
  ``flag_values`` defaults to ``absl.flags.FLAGS``; tests pass a fresh one.
  """
  flag_values = flags.FLAGS if flag_values is None else flag_values
  for arg in argv[1:]:
    if check_key is not None and arg.startswith("--config."):
      try:
        check_key(arg[len("--config."):].split("=", 1)[0])
      except UserError as e:
        sys.exit(f"{program}: error: {e}")
  path = _config_path(argv)
  # ml_collections logs its own warning for a get_config() that returns
  # None; the error below says it in one line.
  quiet = lambda record: "returned None" not in record.getMessage()
  logging.get_absl_logger().addFilter(quiet)
  try:
    argv = flag_values(argv)
    config = flag_values.config
    if config is None and not flag_values["config"].present:
      raise ValueError(f"--config is required, e.g. --config={example}")
    if config is not None:
      config.keys()  # The file loads lazily; fail here if it can't.
  except Exception as e:  # pylint: disable=broad-except
    # Whatever the config file raises is the user's to fix: one line.
    described = _describe_override(e, flag_values) or _describe(e, path)
    sys.exit(f"{program}: error: {described}")
  finally:
    logging.get_absl_logger().removeFilter(quiet)
  if not isinstance(config, ml_collections.ConfigDict):
    sys.exit(f"{program}: error: {path or '--config'}: get_config() returned"
             f" {type(config).__name__}; it must return an"
             " ml_collections.ConfigDict.")
  return argv


def _config_path(argv: list[str]) -> str | None:
  """The config file named by ``--config=FILE[:variant]`` (or ``--config
  FILE``), without the variant; None if there is none."""
  path = None
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith("--config="):
      path = arg[len("--config="):]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
  return None if path is None else path.split(":", 1)[0]


# What an override of each type of field must be, by the flag's parser.
_KINDS = {flags.IntegerParser: "an integer", flags.FloatParser: "a number",
          flags.BooleanParser: "true or false"}
_OVERRIDE = re.compile(r"flag --(config\.[\w.]+)=(.*?): ")


def _describe_override(error: BaseException,
                       flag_values: flags.FlagValues) -> str | None:
  """One line for an override its field's type refuses (``--config.
  batch_size=ten``), saying what the field takes; None for other errors.

  absl's own words are Python's ("invalid literal for int() with base 10").
  """
  match = _OVERRIDE.match(str(error))
  if not isinstance(error, flags.IllegalFlagValueError) or not match:
    return None
  name, value = match.groups()
  kind = (_KINDS.get(type(flag_values[name].parser))
          if name in flag_values else None)
  if kind is None:
    return None
  key = name[len("config."):]
  return f"--{name}={value}: {key} must be {kind}, got {value!r}."


def _describe(error: BaseException, path: str | None) -> str:
  """One line for an exception raised while parsing flags.

  An exception raised by the config file (or a syntax error in it) is named
  by the file's line and the original exception: ml_collections and absl
  wrap it in their own, whose text is a whole traceback. Anything else (flag
  and override errors) carries its message in its last line.
  """
  where = _in_config_file(error, path) if path else None
  if where is not None:
    line, original = where
    # A SyntaxError's str() repeats the file and line; its msg does not.
    text = (original.msg if isinstance(original, SyntaxError)
            else str(original))
    message = " ".join(l.strip() for l in text.splitlines() if l.strip())
    described = f"{path}:{line}: {type(original).__name__}"
    return f"{described}: {message}" if message else described
  lines = [l.strip() for l in str(error).splitlines()
           if l.strip() and not l.strip().startswith("Pass --help")]
  return lines[-1] if lines else type(error).__name__


def _in_config_file(error: BaseException, path: str):
  """``(line, exception)`` of the innermost exception in ``error``'s chain
  that the config file at ``path`` raised, or None.

  The line is where the file raised it, or called what raised it.
  """
  target = os.path.realpath(path)
  in_file = lambda filename: (filename is not None
                              and os.path.realpath(filename) == target)
  seen, chain = set(), []
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    chain.append(error)
    error = error.__cause__ or error.__context__
  # The innermost exception is the original one; the outer ones wrap it.
  for exc in reversed(chain):
    if isinstance(exc, SyntaxError) and in_file(exc.filename):
      return exc.lineno, exc
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if in_file(f.filename)]
    if frames:
      return frames[-1].lineno, exc
  return None


_ASSIGNMENT = re.compile(r"c\.([\w.]+)\s*=[^=].*?(?:#\s*(.*))?$")


def config_keys_help(config, defaults: Callable, *, prefix: str = "--config.",
                     skip: tuple[str, ...] = ()) -> str:
  """Every key of ``config`` as ``--config.KEY=DEFAULT``, with its comment.

  The comments are read from the source of ``defaults``, the function that
  builds the defaults as ``c.KEY = value  # comment`` (or with the comment
  on the lines right above). Keys under a section in ``skip`` are left out.
  """
  comments, above = {}, []
  for line in inspect.getsource(defaults).splitlines():
    text = line.strip()
    if text.startswith("#"):
      above.append(text.lstrip("#").strip())
      continue
    match = _ASSIGNMENT.match(text)
    if match and (match.group(2) or above):
      comments[match.group(1)] = match.group(2) or " ".join(above)
    above = []
  lines = []
  for key, value in config_lib.flatten(config).items():
    if key.split(".")[0] in skip:
      continue
    lines.append(f"  {prefix}{key}={value!r}")
    if key in comments:
      lines.append(f"      {comments[key]}")
  return "\n".join(lines)


def hide_config_default(flag_values: flags.FlagValues | None = None) -> None:
  """``--config`` has no default to show in ``--help`` ("None" misleads)."""
  flag_values = flags.FLAGS if flag_values is None else flag_values
  if "config" in flag_values:
    flag_values["config"].default_as_str = None


def out_of_memory_line(error: Exception) -> str:
  """XLA's "RESOURCE_EXHAUSTED: Out of memory ..." message, its first line."""
  message = str(error).strip().splitlines()[0]
  return message.split("RESOURCE_EXHAUSTED:", 1)[-1].strip()
