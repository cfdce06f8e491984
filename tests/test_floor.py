"""The declared dependency floors: what setup.py promises is what CI tests.

`ci/floor.sh` installs gnp with `ci/floor-constraints.txt` (``==`` pins of the
``>=`` floors in setup.py) and runs a subset of the suite there, this file
included. The tests here keep the two lists from drifting apart, and check the
one thing about JAX that a wrong floor would break silently rather than
loudly: the primitive names that gnp's jaxpr walks match by name.
"""

import ast
import pathlib
import re

import flax.linen as nn
import jax
from jax.extend.core import primitives as jex_primitives
import jax.numpy as jnp
import optax

from gnp.penalties import ghost_jaxpr

ROOT = pathlib.Path(__file__).resolve().parent.parent
# jaxlib is not named in setup.py (jax requires it); its pin is jax's floor.
PINNED_WITH_JAX = "jaxlib"


def _normalise(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _install_requires() -> list[str]:
  """The string literals of setup.py's ``install_requires`` list."""
  tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
  for node in ast.walk(tree):
    if isinstance(node, ast.keyword) and node.arg == "install_requires":
      return [ast.literal_eval(element) for element in node.value.elts]
  raise AssertionError("setup.py has no install_requires")


def _setup_floors() -> dict[str, str]:
  floors = {}
  for requirement in _install_requires():
    match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*(.*?)\s*", requirement)
    assert match, requirement
    name, spec = _normalise(match.group(1)), match.group(2)
    if not spec:
      continue
    # One plain floor per requirement: a `<`, `!=` or `~=` would not be what
    # the floor job tests.
    floor = re.fullmatch(r">=\s*([0-9][0-9A-Za-z.]*)", spec)
    assert floor, f"setup.py: {requirement!r} is not a plain `>=` floor"
    floors[name] = floor.group(1)
  return floors


def _constraint_pins() -> dict[str, str]:
  pins = {}
  text = (ROOT / "ci" / "floor-constraints.txt").read_text(encoding="utf-8")
  for line in text.splitlines():
    line = line.split("#", 1)[0].strip()
    if not line:
      continue
    pin = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*==\s*([0-9][0-9A-Za-z.]*)", line)
    assert pin, f"ci/floor-constraints.txt: {line!r} is not a `name==version`"
    name = _normalise(pin.group(1))
    assert name not in pins, f"ci/floor-constraints.txt pins {name} twice"
    pins[name] = pin.group(2)
  return pins


def test_floor_constraints_pin_exactly_the_setup_py_floors():
  floors = _setup_floors()
  pins = _constraint_pins()
  assert "jax" in floors, "setup.py must give jax a floor"
  assert pins.pop(PINNED_WITH_JAX, None) == floors["jax"], (
      "ci/floor-constraints.txt must pin jaxlib to jax's floor")
  assert pins == floors


def test_the_call_primitives_ghost_looks_inside_exist_in_this_jax():
  # ghost_jaxpr follows the examples and the parameters into these calls by
  # name; under a JAX that names them otherwise (before 0.7, `jax.jit` was
  # "pjit") it would refuse every model with a jitted or rematerialised
  # layer, and method="auto" would quietly take the vmap path.
  @jax.custom_jvp
  def custom(x):
    return x

  custom.defjvp(lambda primals, tangents: (primals[0], tangents[0]))
  calls = {
      jax.make_jaxpr(lambda x: jax.jit(jnp.sin)(x))(1.0).eqns[0].primitive.name,
      jax.make_jaxpr(jax.checkpoint(jnp.sin))(1.0).eqns[0].primitive.name,
      jex_primitives.closed_call_p.name,
  }
  assert calls <= ghost_jaxpr._CALLS, calls - ghost_jaxpr._CALLS
  custom_name = jax.make_jaxpr(custom)(1.0).eqns[0].primitive.name
  assert custom_name in ghost_jaxpr._CUSTOM


def test_ghost_looks_inside_a_jitted_helper():
  # What the names buy: the parameters enter a jitted call, but only an
  # output that the per-example losses do not use depends on them. Under
  # JAX 0.6 this model is refused (every input of the call counts as used).
  class MLP(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.relu(nn.Dense(5)(x)))

  model = MLP()
  x = jnp.ones((4, 2))
  y = jnp.array([0, 1, 2, 0])
  params = model.init(jax.random.key(0), x)["params"]

  @jax.jit
  def losses_and_norm(logits, labels, p):  # the norm for logging only
    return (optax.softmax_cross_entropy_with_integer_labels(logits, labels),
            optax.tree_utils.tree_norm(p))

  def loss_fn(p, batch, key):
    del key
    logits = model.apply({"params": p}, batch[0])
    losses, norm = losses_and_norm(logits, batch[1], p)
    return losses, {"param_norm": norm}

  plan = ghost_jaxpr.analyze(loss_fn, params, (x, y), None)
  assert sorted(plan.paths[site.leaf] for site in plan.sites) == [
      "Dense_0/bias", "Dense_0/kernel", "Dense_1/bias", "Dense_1/kernel"]
