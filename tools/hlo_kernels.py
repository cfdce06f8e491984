"""The kernels a compiled XLA program launches, read from its optimized HLO.

`count_kernels(parse(hlo_text))` takes ``compiled.as_text()`` (what
``jitted.lower(...).compile()`` gives) and counts, per category, the
instructions that run as a kernel: fusions (by kind, and custom fusions by
their backend kind, e.g. ``__triton_gemm`` on a GPU), custom calls (by
target: cuBLAS, cuDNN), unfused dots and convolutions, copies, collectives,
sorts, and so on. Parameters, tuples, get-tuple-element, constants and
bitcasts are free, and so is the ``-done`` half of an async pair (a wait).
A ``while`` or ``conditional`` counts as one (on a GPU its predicate is
copied to the host; on a CPU it is a thunk of its own), and its bodies and
branches are counted once each and reported apart: a body runs once per
iteration, a branch only when taken. A ``call`` is counted inline, except
the small calls XLA:CPU compiles into one kernel; the kernels of a GPU
command buffer (a call to a computation named ``command_buffer``, launched
as one CUDA graph) are counted apart as well. On a CPU these counts are the
thunks the runtime executes, which a trace confirms one for one.

`attribute(...)` says which part of gnp's step each kernel computes, from
the stack frames XLA keeps in each instruction's metadata (``stack_frame_id``
and the module's ``StackFrames`` table: file, function and line of every
Python frame of gnp's code, jax's and optax's own frames left out). The
``op_name`` metadata alone cannot do it: it names jax transformations and
Flax scopes (``jit(train_step_on_device_data)/transpose(jvp(MLP))/Dense_1/
dot_general``) but not Python functions, so a metric's norm and the
optimiser's update both read ``jit(train_step_on_device_data)/sqrt``. A
kernel takes the phase of the `gnp.step.train_step` statement that its
result (the fusion's root) was traced from, read off the outermost
``train_step`` frame: input (keys, augmentation, the batch gather of
``train_step_on_device_data``), gradient (``grad_fn.with_stats``: loss,
backward pass, penalty), optimizer (``tx.update``, ``apply_updates``), or
metrics & bookkeeping (everything else: the metrics' norms, the finiteness
checks, the selects that keep a refused update out of the state). Kernels
without frames (the copies XLA adds around donated buffers) are
unattributed. XLA fuses freely across statements (the scalar "is this
update finite" test is recomputed inside each leaf's select), so a kernel
whose instructions come from several phases is also counted under "fused
across phases": dropping one phase's code would not remove such a kernel.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import functools
import json
import os
import re

# Instructions that launch nothing.
FREE = frozenset({
    "parameter", "constant", "tuple", "get-tuple-element", "bitcast",
    "after-all", "add-dependency", "opt-barrier", "domain",
})
PHASES = ("input", "gradient", "optimizer", "metrics & bookkeeping",
          "unattributed")

# A `train_step` statement's phase is that of the names it binds (the first
# found); a statement binding none of these (the metrics, the finiteness
# test, the new state) is metrics & bookkeeping.
_PHASE_OF_NAME = {
    **dict.fromkeys(("x", "y", "key", "augment_key", "loss_key"), "input"),
    **dict.fromkeys(("loss_fn", "grad_fn", "objective", "aux", "grads",
                     "stats", "batch_stats"), "gradient"),
    **dict.fromkeys(("learning_rate", "tx", "updates", "opt_state",
                     "params"), "optimizer"),
}

_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLED = re.compile(r"\b(calls|to_apply|body|condition|true_computation|"
                     r"false_computation|branch_computations|"
                     r"called_computations)=(\{[^}]*\}|%?[\w.\-]+)")


@dataclasses.dataclass
class Instruction:
  name: str
  opcode: str
  line: str
  called: dict  # attribute -> [computation names]

  def attr(self, pattern: str) -> str | None:
    match = re.search(pattern, self.line)
    return match.group(1) if match else None


@dataclasses.dataclass
class Module:
  name: str
  entry: str
  computations: dict  # name -> [Instruction]
  frames: dict  # stack frame id -> (file, function, line, parent id or 0)


def _split_shape(rest: str) -> str:
  """``rest`` after the result shape (which may be a nested tuple)."""
  if not rest.startswith("("):
    return rest.split(" ", 1)[1] if " " in rest else ""
  depth = 0
  for i, char in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if depth == 0:
      return rest[i + 1:].lstrip()
  return ""


def _table(lines, start: int) -> dict:
  """``N "text"`` or ``N {k=v ...}`` rows after a section title."""
  rows = {}
  for line in lines[start + 1:]:
    match = re.match(r"^(\d+) (.*)$", line)
    if not match:
      break
    body = match.group(2)
    if body.startswith('"'):
      try:
        rows[int(match.group(1))] = json.loads(body)
      except ValueError:  # An escape JSON lacks: the name is only shown.
        rows[int(match.group(1))] = body.strip('"')
    else:
      rows[int(match.group(1))] = {k: int(v) for k, v in
                                   re.findall(r"(\w+)=(-?\d+)", body)}
  return rows


def parse(hlo_text: str) -> Module:
  """The computations and the stack-frame table of an HLO module's text."""
  lines = hlo_text.splitlines()
  module = re.match(r"HloModule\s+([\w.\-]+)", lines[0] if lines else "")
  computations, entry, current = {}, None, None
  sections = {}
  for i, line in enumerate(lines):
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      sections[line] = _table(lines, i)
    elif current is None:
      header = _HEADER.match(line)
      if header:
        current = computations.setdefault(header.group(2), [])
        entry = header.group(2) if header.group(1) else entry
    elif line.startswith("}"):
      current = None
    else:
      match = _INSTRUCTION.match(line)
      if match:
        rest = _split_shape(match.group(2))
        opcode = re.match(r"[\w\-]+", rest)
        called = {key: re.findall(r"%?([\w.\-]+)", value.strip("{}"))
                  for key, value in _CALLED.findall(rest)}
        current.append(Instruction(match.group(1),
                                   opcode.group(0) if opcode else "", rest,
                                   called))
  return Module(module.group(1) if module else "", entry, computations,
                _frames(sections))


def _frames(sections: dict) -> dict:
  files = sections.get("FileNames", {})
  functions = sections.get("FunctionNames", {})
  locations = sections.get("FileLocations", {})
  stack = sections.get("StackFrames", {})
  # Roots print their parent as 0 when ids are 1-based; jaxlib 0.10's XLA
  # prints every parent one higher (a root is 1, its own id), so a table
  # without a 0 is read shifted (checked on a three-deep test function).
  shift = 0 if any(f.get("parent_frame_id") == 0 for f in stack.values()) \
      else 1
  frames = {}
  for frame_id, frame in stack.items():
    location = locations.get(frame.get("file_location_id"), {})
    frames[frame_id] = (files.get(location.get("file_name_id"), ""),
                        functions.get(location.get("function_name_id"), ""),
                        location.get("line", 0),
                        max(frame.get("parent_frame_id", 0) - shift, 0))
  return frames


# --- Counting ----------------------------------------------------------------


def category(inst: Instruction, module: Module) -> str | None:
  """The kernel category of one instruction, or None if it launches none."""
  op = inst.opcode
  if op in FREE or op.endswith("-done") or op.endswith("-update"):
    return None
  if op == "call":  # XLA:CPU compiles a small call into one kernel.
    return "call (small, CPU)" if 'xla_cpu_small_call="true"' in inst.line \
        else None
  if op == "fusion":
    kind = inst.attr(r"kind=(\w+)")
    if kind == "kCustom":
      kind = inst.attr(r'"kind":"([^"]+)"') or kind
    return f"fusion ({kind})"
  if op == "custom-call":
    target = inst.attr(r'custom_call_target="([^"]+)"')
    return f"custom-call ({target})"
  if op == "async-start":
    wrapped = module.computations.get((inst.called.get("calls") or [""])[0])
    return f"async ({wrapped[-1].opcode})" if wrapped else "async"
  return op


@dataclasses.dataclass
class Tally:
  """The kernels of one computation, with its calls counted inline."""

  name: str
  kind: str  # "entry", "while body", "while condition", "branch"
  kernels: list = dataclasses.field(default_factory=list)  # (inst, category)
  in_command_buffers: int = 0
  trip_count: int | None = None
  parent: str | None = None

  def categories(self) -> dict:
    return dict(collections.Counter(c for _, c in self.kernels)
                .most_common())


def count_kernels(module: Module) -> list[Tally]:
  """The entry's tally first, then one per while body/condition and branch."""
  tallies = []

  def visit(computation: str, tally: Tally, in_buffer: bool) -> None:
    for inst in module.computations.get(computation, []):
      kind = category(inst, module)
      if kind is not None:
        tally.kernels.append((inst, kind))
        tally.in_command_buffers += in_buffer
      if inst.opcode == "call" and kind is None:
        for callee in inst.called.get("to_apply", []):
          visit(callee, tally, in_buffer or "command_buffer" in callee)
      elif inst.opcode == "while":
        trips = inst.attr(r'"known_trip_count":\{"n":"(\d+)"')
        for key, role in (("condition", "while condition"),
                          ("body", "while body")):
          for callee in inst.called.get(key, []):
            new(callee, role, tally.name, int(trips) if trips else None)
      elif inst.opcode == "conditional":
        for key in ("branch_computations", "true_computation",
                    "false_computation"):
          for callee in inst.called.get(key, []):
            new(callee, "branch", tally.name)

  def new(computation, kind, parent=None, trips=None):
    tally = Tally(computation, kind, trip_count=trips, parent=parent)
    tallies.append(tally)
    visit(computation, tally, False)

  new(module.entry, "entry")
  return tallies


# --- Attribution -------------------------------------------------------------


def _bound_names(stmt: ast.stmt) -> list[str]:
  targets = getattr(stmt, "targets", None) or [getattr(stmt, "target", None)]
  return [n.id for t in targets if t is not None for n in ast.walk(t)
          if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)]


def statement_phases(source: str, function: str = "train_step") -> dict:
  """Line -> (first line of its statement, its text there, its phase), for
  the simple statements of ``function`` in ``source``."""
  lines = source.splitlines()
  table = {}
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.FunctionDef) and node.name == function:
      for stmt in ast.walk(node):
        if isinstance(stmt, ast.stmt) and not any(  # Simple statements.
            isinstance(c, ast.stmt) for c in ast.iter_child_nodes(stmt)):
          phase = next((_PHASE_OF_NAME[n] for n in _bound_names(stmt)
                        if n in _PHASE_OF_NAME), "metrics & bookkeeping")
          for line in range(stmt.lineno, stmt.end_lineno + 1):
            table[line] = (stmt.lineno, re.sub(
                r"\s+#\s.*$", "", lines[stmt.lineno - 1].strip()), phase)
  return table


def _frame_ids(inst: Instruction, module: Module, seen=None) -> set:
  """Stack frame ids of ``inst`` and of the instructions it runs as part of
  the same kernel (a fusion's, a small call's; not a loop's or branch's)."""
  ids = {int(i) for i in re.findall(r"stack_frame_id=(\d+)", inst.line)}
  seen = set() if seen is None else seen
  for key in ("calls", "to_apply", "called_computations"):
    for callee in inst.called.get(key, []):
      if callee not in seen:
        seen.add(callee)
        for inner in module.computations.get(callee, []):
          ids |= _frame_ids(inner, module, seen)
  return ids


@functools.cache
def _same_file(a: str, b: str) -> bool:
  return os.path.realpath(a) == os.path.realpath(b)


def _statement(frame_id: int, module: Module, step_file: str,
               statements: dict):
  """The `train_step` statement a frame was traced from, or "input" for
  the batch gather of `train_step_on_device_data`, or None."""
  chain, seen = [], set()
  while frame_id and frame_id in module.frames and frame_id not in seen:
    seen.add(frame_id)
    chain.append(module.frames[frame_id])
    frame_id = module.frames[frame_id][3]
  for path, function, line, _ in reversed(chain):  # Outermost first.
    if _same_file(path, step_file) and function == "train_step":
      return statements.get(line)
  if any(_same_file(path, step_file) and function.startswith(
      "train_step_on_device_data") for path, function, _, _ in chain):
    return (None, "batch gather (train_step_on_device_data)", "input")
  return None


def attribute(tally: Tally, module: Module, step_file: str,
              statements: dict) -> tuple[dict, dict, dict]:
  """Phase -> kernels, kernels fused across phases (by the phases they
  mix), and statement -> kernels, for ``tally``.

  A kernel's phase and statement are those of the instruction it produces
  (the fusion's root: the kernel exists to compute it); whatever else was
  fused into it is counted under "fused across phases" only.
  """
  phases = collections.Counter({p: 0 for p in PHASES})
  mixed, statements_hit = collections.Counter(), collections.Counter()
  for inst, _ in tally.kernels:
    def found(ids):
      return {_statement(i, module, step_file, statements) for i in ids} \
          - {None}
    inner = found(_frame_ids(inst, module))
    # XLA leaves some fusions it made itself (a reduce-window) without
    # metadata: those take their instructions' statement when they agree.
    own = found(int(i) for i in re.findall(r"stack_frame_id=(\d+)",
                                            inst.line)) or (
                                                inner if len(inner) == 1
                                                else set())
    kinds = {phase for _, _, phase in own}
    phases[kinds.pop() if len(kinds) == 1 else "unattributed"] += 1
    for line, text, _ in own:
      statements_hit[f"{line}: {text}" if line else text] += 1
    everything = {phase for _, _, phase in inner}
    if len(everything) > 1:
      mixed[" + ".join(p for p in PHASES if p in everything)] += 1
  return (dict(phases), dict(mixed.most_common()),
          dict(statements_hit.most_common()))
