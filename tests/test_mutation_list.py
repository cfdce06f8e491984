"""tools/mutation.py's mutants still apply to the code they mutate.

A refactor that moves a mutant's target text leaves the mutant unable to
apply, and the audit would silently lose it; ``--check`` finds that in a
fraction of a second (it copies nothing and runs no test).
"""

from tests.helpers import run


def test_every_mutant_applies():
  result = run(["tools/mutation.py", "--check"], timeout=120)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  assert "mutants apply." in result.stdout
