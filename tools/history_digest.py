"""Fingerprints of every method's training histories, to compare commits.

    python tools/history_digest.py --out=/tmp/digest_new.json
    git stash; python tools/history_digest.py --compare=/tmp/digest_new.json

Trains, for each arm of a study config (by default the all-methods study,
which has every method), a small population (``--members`` seeds at the
arm's middle setting) for ``--epochs`` epochs, and prints a digest of its
histories: every loss, accuracy and penalty, per epoch and member, to the
last bit. A change that claims to leave a study's numbers as they were
(a refactor, a fusion, a new default) can be checked for every method at
once: with ``--compare`` the command lists the arms whose histories
differ from a digest file written at another commit, and exits 1 if any
does. A difference at float rounding is enough to send a tuner down
another path, and then a study's tables change.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from gnp import population  # pylint: disable=g-import-not-at-top,wrong-import-position
from gnp import study as study_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from gnp.errors import UserError  # pylint: disable=g-import-not-at-top,wrong-import-position
from gnp.writers import write_atomically  # pylint: disable=g-import-not-at-top,wrong-import-position


def digest(histories) -> str:
  """The first 16 hex digits of the sha256 of ``histories`` as JSON."""
  text = json.dumps(histories, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprints(study, arms=None, *, members: int, epochs: int) -> dict:
  """``{arm: {"digest", "train_loss"}}`` for ``study``'s arms (or those
  named in ``arms``), each a population of ``members`` seeds."""
  names = [a.name for a in study.arms]
  unknown = sorted(set(arms or ()) - set(names))
  if unknown:
    raise UserError(f"no arm named {', '.join(unknown)} (the arms:"
                    f" {', '.join(names)})")
  out = {}
  for spec in study.arms:
    if arms and spec.name not in arms:
      continue
    point = study_lib.sample_point(spec) if spec.search else {}
    configs = [study_lib.arm_config(study, spec, point, seed=seed,
                                    num_epochs=epochs)
               for seed in range(members)]
    histories, _ = population.train(configs)
    out[spec.name] = {"digest": digest(histories),
                      "train_loss": histories[0]["train/loss"][-1]}
  return out


def differing(ours: dict, theirs: dict) -> list[str]:
  """The arms of both whose digests differ."""
  return [name for name in ours
          if name in theirs and ours[name]["digest"] != theirs[name]["digest"]]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python tools/history_digest.py",
      description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default=os.path.join(
      ROOT, "configs", "studies", "all_methods.py"),
                      help="A study config; its arms are fingerprinted.")
  parser.add_argument("--arms", default="",
                      help="Comma-separated arm names (default: all).")
  parser.add_argument("--members", type=int, default=3)
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--out", help="Write the digests here (JSON).")
  parser.add_argument("--compare", help="A digest file from another commit.")
  args = parser.parse_args(argv)
  if args.members < 1 or args.epochs < 1:
    parser.error("--members and --epochs must be at least 1.")
  setting = {"config": os.path.relpath(args.config, ROOT),
             "members": args.members, "epochs": args.epochs}
  theirs = None
  if args.compare:
    try:
      with open(args.compare) as f:
        written = json.load(f)
      theirs, their_setting = written["arms"], written["setting"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      parser.error(f"--compare {args.compare}: not a digest file ({e}).")
    if their_setting != setting:
      # Other members or epochs give other histories whatever the code.
      parser.error(f"--compare {args.compare} was written with {their_setting};"
                   f" this run is {setting}.")
  try:
    study = study_lib.load_config(args.config)
    arms = [a for a in args.arms.split(",") if a]
    ours = fingerprints(study, arms, members=args.members, epochs=args.epochs)
  except UserError as e:
    parser.error(str(e))
  if args.out:
    write_atomically(args.out, json.dumps({"setting": setting, "arms": ours},
                                          indent=1))
  print("| arm | digest | last train loss (member 0) |")
  print("|---|---|---|")
  for name, value in ours.items():
    print(f"| {name} | {value['digest']} | {value['train_loss']!r} |")
  if theirs is None:
    return 0
  changed = differing(ours, theirs)
  missing = sorted(set(ours) - set(theirs))
  print(f"\nDiffer from {args.compare}: {', '.join(changed) or 'none'}"
        + (f"; not in it: {', '.join(missing)}" if missing else ""))
  return 1 if changed else 0


if __name__ == "__main__":
  sys.exit(main())
