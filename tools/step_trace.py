"""A step's device ops in a `jax.profiler` trace: count, busy time, gaps.

`analyse(trace, module)` reads the ``*.trace.json.gz`` that
``jax.profiler.trace(DIR)`` writes (the Chrome trace format: ``ph: "X"``
events with ``ts`` and ``dur`` in μs, processes and threads named by
``ph: "M"`` events) for steps that each ran inside a
``jax.profiler.StepTraceAnnotation(STEP_NAME)`` and were synchronised
before it closed, so that a step's ops all lie inside its annotation, whose
interval is the step's wall time. Per step: the device-op events that start
in it (clipped to it), their summed duration, their union (busy: ops may
overlap on several streams or threads), the idle time between the first
op's start and the last op's end (gaps), and the rest of the wall time
(outside: dispatch before the first op, synchronisation after the last).
Busy + gaps + outside is the wall time.

How device ops are found, per backend:

* GPU: every event on the threads of a ``/device:GPU:N`` process whose name
  contains "Stream" (one per CUDA stream: kernels, memcpys, memsets). Other
  lines of the device (derived "XLA Ops" or "Steps" lines, where the
  converter adds them) repeat those events and are left out. Not yet
  checked against a real GPU trace; the tests read a hand-made one.
* TPU: the ``/device:TPU:N`` process's "XLA Ops" thread.
* CPU (as jaxlib 0.10 writes it): the device is the host, ``/host:CPU``.
  XLA's CPU runtime records one event per thunk it executes (a fusion, a
  copy, a library dot, a small call, a conditional) named after the HLO
  instruction, with ``hlo_op`` and ``hlo_module`` arguments, on the thread
  that ran it (``tf_XLAEigen/...`` or ``tf_XLAPjRtCpuClient/...``), each
  followed by an "end: ..." marker without those arguments, which is not
  an op; the thunks of a branch taken are recorded too, a small call's
  inner loop is not. Each event costs the runtime a little, so a traced
  CPU step is slower than an untraced one.

Events carrying an ``hlo_module`` argument count only if it begins with
``module`` (another program's, if any ran in a step, are not the step's).
A trace where some step has no op event is reported as having no per-op
events, with no busy or gap numbers.
"""

from __future__ import annotations

import glob
import gzip
import json
import os

import numpy as np

STEP_NAME = "profile_step"  # The host annotation around each traced step.


def _names(trace: dict) -> tuple[dict, dict]:
  """pid -> process name, (pid, tid) -> thread name."""
  processes, threads = {}, {}
  for e in trace.get("traceEvents", []):
    if e.get("ph") == "M" and e.get("name") == "process_name":
      processes[e.get("pid")] = e["args"]["name"]
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e.get("pid"), e.get("tid"))] = e["args"]["name"]
  return processes, threads


def _device_ops(trace: dict) -> tuple[list, str, list]:
  """(device-op events, how they were found, their threads' names)."""
  processes, threads = _names(trace)
  spans = [e for e in trace.get("traceEvents", [])
           if e.get("ph") == "X" and "dur" in e]
  on_device = {k: name for k, name in threads.items()
               if processes.get(k[0], "").startswith("/device:")}
  for how, chosen in (
      ("GPU: events on the device's stream threads",
       {k for k, name in on_device.items() if "stream" in name.lower()}),
      ("TPU: events on the device's XLA Ops thread",
       {k for k, name in on_device.items() if name == "XLA Ops"})):
    if chosen:
      return ([e for e in spans if (e.get("pid"), e.get("tid")) in chosen],
              how, sorted({threads[k] for k in chosen}))
  host = [e for e in spans if "hlo_op" in e.get("args", {})]
  return (host, "CPU: host events with an hlo_op argument (one per thunk)",
          sorted({threads.get((e.get("pid"), e.get("tid")), "?")
                  for e in host}))


def _union(intervals) -> float:
  total, end = 0.0, -np.inf
  for start, stop in sorted(intervals):
    if stop > end:
      total += stop - max(start, end)
      end = stop
  return total


def analyse(trace: dict, module: str) -> dict:
  """Per-step op counts, busy time, gaps and wall time of a trace whose
  steps are each inside a `STEP_NAME` annotation; times in ms."""
  ops, how, threads = _device_ops(trace)
  ops = [e for e in ops  # Another program's ops, if any ran, are not ours.
         if e.get("args", {}).get("hlo_module", module).startswith(module)]
  processes, _ = _names(trace)
  windows = sorted(  # The host's annotations, not a device's copy of them.
      (e["ts"], e["ts"] + e["dur"]) for e in trace.get("traceEvents", [])
      if e.get("ph") == "X" and e.get("name") == STEP_NAME
      and not processes.get(e.get("pid"), "").startswith("/device:"))
  steps = []
  for start, stop in windows:
    inside = [(max(e["ts"], start), min(e["ts"] + e["dur"], stop))
              for e in ops if start <= e["ts"] < stop]
    busy = _union(inside)
    span = (max(b for _, b in inside) - min(a for a, _ in inside)
            if inside else 0.0)
    steps.append({"ops": len(inside),
                  "op_time_ms": sum(b - a for a, b in inside) / 1e3,
                  "busy_ms": busy / 1e3, "gaps_ms": (span - busy) / 1e3,
                  "outside_ms": (stop - start - span) / 1e3,
                  "wall_ms": (stop - start) / 1e3})
  result = {"source": how, "threads": threads, "steps": steps,
            "per_op_events": bool(steps) and all(s["ops"] for s in steps)}
  if not steps:
    result["note"] = f"no {STEP_NAME!r} annotations in the trace"
  elif not result["per_op_events"]:
    result["note"] = (f"the trace has no per-op events for {module} in"
                      " every step (looked for: " + how + "); no busy/gap"
                      " numbers are given")
  else:
    result["median"] = {k: float(np.median([s[k] for s in steps]))
                        for k in steps[0]}
    # Per step, then the median: one slow step (a branch's first run, the
    # profiler starting) would otherwise weigh in the whole.
    result["idle_fraction"] = float(np.median(
        [1 - s["busy_ms"] / max(s["wall_ms"], 1e-9) for s in steps]))
  return result


def load(directory: str) -> tuple[str, dict]:
  """(path, contents) of the newest ``*.trace.json.gz`` under ``directory``
  (what `jax.profiler.trace` writes, once per host)."""
  paths = sorted(glob.glob(os.path.join(directory, "**", "*.trace.json.gz"),
                           recursive=True), key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"the profiler wrote no *.trace.json.gz under"
                            f" {directory}")
  with gzip.open(paths[-1]) as f:
    return paths[-1], json.load(f)
