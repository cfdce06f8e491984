"""The README's library example runs as written."""

import pathlib
import re

import jax.numpy as jnp

README = pathlib.Path(__file__).parent.parent / "README.md"


def test_readme_example_runs_and_trains():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
  assert blocks, "the README has no python example"
  example = blocks[0]
  assert sum(1 for line in example.splitlines() if line.strip()) <= 16
  namespace = {}
  exec(compile(example, str(README), "exec"), namespace)
  first_loss = namespace["loss"]
  step, batch = namespace["step"], (namespace["x"], namespace["y"])
  params, opt_state = namespace["params"], namespace["opt_state"]
  for i in range(20):
    params, opt_state, loss = step(params, opt_state, batch,
                                   namespace["jax"].random.key(i))
  assert jnp.isfinite(loss) and loss < first_loss


def test_readme_first_command_trains_the_default(tmp_path):
  from tests.helpers import run  # pylint: disable=g-import-not-at-top

  block = re.findall(r"```bash\n(.*?)```", README.read_text(), re.DOTALL)[0]
  install, command = block.strip().splitlines()
  assert install.startswith("pip install -e .")
  prefix = "python -m gnp.main --config=configs/mnist1d.py --workdir="
  assert command.startswith(prefix)
  result = run(["-m", "gnp.main", "--config=configs/mnist1d.py",
                f"--workdir={tmp_path}"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert "examples/s" in result.stderr and "test/accuracy" in result.stderr
  for name in ("metrics.jsonl", "summary.json", "config.json"):
    assert (tmp_path / name).exists()
  assert list((tmp_path / "tensorboard").iterdir())
  assert list((tmp_path / "checkpoints").iterdir())
