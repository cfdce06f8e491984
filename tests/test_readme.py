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
