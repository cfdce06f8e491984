"""tools/history_digest.py: per-method fingerprints of training histories.

The digest must be a function of the histories alone (the same run twice,
the same digest; one number changed in its last bit, another), and the
comparison must name exactly the arms that changed, with exit status 1.
"""

import contextlib
import io
import json

import numpy as np
import pytest

from tests.helpers import tiny_study
from tools import history_digest

_STUDY_FILE = """
import sys
sys.path.insert(0, {root!r})
from tests.helpers import tiny_study

def get_config(arg=None):
  return tiny_study()
"""


@pytest.fixture(scope="module")
def study_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("digest") / "tiny.py"
  path.write_text(_STUDY_FILE.format(root=history_digest.ROOT))
  return str(path)


def test_the_digest_sees_the_last_bit_and_nothing_else():
  histories = [{"train/loss": [2.25, 1.5]}, {"train/loss": [2.5, 1.25]}]
  same = json.loads(json.dumps(histories))
  assert history_digest.digest(same) == history_digest.digest(histories)
  nudged = json.loads(json.dumps(histories))
  nudged[1]["train/loss"][1] = float(np.nextafter(1.25, 2.0))
  assert history_digest.digest(nudged) != history_digest.digest(histories)


def test_fingerprints_repeat_and_tell_arms_apart():
  study = tiny_study()
  first = history_digest.fingerprints(study, members=2, epochs=1)
  again = history_digest.fingerprints(study, ["sam"], members=2, epochs=1)
  assert set(first) == {"plain", "sam"} and set(again) == {"sam"}
  assert again["sam"] == first["sam"]
  assert first["plain"]["digest"] != first["sam"]["digest"]
  assert history_digest.differing(first, again) == []
  changed = {"sam": {**first["sam"], "digest": "0" * 16}}
  assert history_digest.differing(first, changed) == ["sam"]


def _main(args):
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    status = history_digest.main(args)
  return status, printed.getvalue()


def test_the_command_compares_with_another_commits_file(study_file, tmp_path):
  out = tmp_path / "digest.json"
  status, printed = _main([f"--config={study_file}", "--members=2",
                           "--epochs=1", f"--out={out}"])
  assert status == 0
  written = json.loads(out.read_text())
  assert written["setting"]["members"] == 2
  assert set(written["arms"]) == {"plain", "sam"}
  assert f"| sam | {written['arms']['sam']['digest']} |" in printed
  status, printed = _main([f"--config={study_file}", "--members=2",
                           "--epochs=1", f"--compare={out}"])
  assert status == 0 and "Differ from" in printed and ": none" in printed
  written["arms"]["plain"]["digest"] = "f" * 16
  out.write_text(json.dumps(written))
  status, printed = _main([f"--config={study_file}", "--members=2",
                           "--epochs=1", "--arms=plain", f"--compare={out}"])
  assert status == 1
  assert printed.rstrip().endswith(f"Differ from {out}: plain")


@pytest.mark.parametrize("args,message", [
    (["--members=0"], "--members and --epochs must be at least 1"),
    (["--arms=nope"], "no arm named nope"),
    (["--compare=/nonexistent.json"], "not a digest file"),
])
def test_bad_input_is_one_line_and_exit_2(study_file, capsys, args, message):
  with pytest.raises(SystemExit) as exit_info:
    history_digest.main([f"--config={study_file}", "--epochs=1", *args])
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


def test_a_file_written_with_another_setting_is_refused(study_file, capsys,
                                                        tmp_path):
  # Other members or epochs give other digests whatever the code: comparing
  # them would name every arm, so the command says so before training.
  out = tmp_path / "digest.json"
  setting = {"config": "x.py", "members": 2, "epochs": 1}
  out.write_text(json.dumps({"setting": setting, "arms": {}}))
  with pytest.raises(SystemExit) as exit_info:
    history_digest.main([f"--config={study_file}", "--members=3",
                         "--epochs=1", f"--compare={out}"])
  assert exit_info.value.code == 2
  assert "was written with" in capsys.readouterr().err
