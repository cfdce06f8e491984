"""tools/conv_in_loops.py refuses a run too short to time, in one line."""

from tests.helpers import run


def test_too_few_steps_is_one_line():
  result = run(["tools/conv_in_loops.py", "--steps=2"], timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      "conv_in_loops: error: --steps must be at least 5."]
