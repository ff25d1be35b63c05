"""Where a compiled step's time goes: one jax.profiler trace, grouped.

`summarise(trace_dir, hlo_text)` reads the trace's per-op events (XLA:CPU
names them after the HLO instructions), finds each instruction's op_name
metadata in the compiled HLO and adds the time up by model component (the
first module in the op_name: `layers`, `mot_text`, `moe`, ...; `bwd` for
the transposed pass) and by op kind (the instruction name without its
number: `dot`, `convert_reduce_fusion`, ...). On XLA:CPU the Eigen matmuls
run asynchronously and mostly do not show as op events: `traced_op_ms` is
then well below the step time and the gap is roughly the matmul time.
Ops that run side by side on different threads each count in full.
"""
import collections
import glob
import gzip
import json
import re

# Python and executor spans, and control-flow ops whose events enclose their
# bodies' ops (counting both would count the body twice).
_SKIP = ("$", "ThunkExecutor", "PjitFunction", "CommonPjRt", "while", "conditional", "call")


def op_times(trace_dir):
  """{event name: total microseconds} of the trace's complete ('X') events."""
  path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
  times = collections.Counter()
  for e in json.load(gzip.open(path))["traceEvents"]:
    if e.get("ph") == "X" and not e["name"].startswith(_SKIP):
      times[e["name"]] += e["dur"]
  return times


def component(op_name):
  """'jit(train_step)/transpose(jvp(RemoteModel))/mot_text_3/...' -> 'bwd mot_text'."""
  direction = "bwd" if "transpose(" in op_name else "fwd"
  parts = [p for p in op_name.split("/") if p and not p.startswith(("jit(", "jvp(", "transpose("))]
  parts = [p for p in parts if not p.startswith("RemoteModel")] or ["other"]
  module = re.sub(r"_\d+$", "", parts[0])   # layers_3 -> layers
  return f"{direction} {module}"


def summarise(trace_dir, hlo_text, top=15):
  lines = dict(re.findall(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$", hlo_text, re.M))
  bodies = {m.group(1): m.group(2)
            for m in re.finditer(r"^%([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo_text, re.M | re.S)}
  by_component, by_kind = collections.Counter(), collections.Counter()
  times = op_times(trace_dir)
  for name, us in times.items():
    line = lines.get(name, "")
    called = re.search(r"calls=%([\w.\-]+)", line)
    names = re.findall(r'op_name="([^"]*)"', line + (bodies.get(called.group(1), "") if called else ""))
    by_component[component(collections.Counter(names).most_common(1)[0][0]) if names else "?"] += us
    by_kind[re.sub(r"\.\d+$", "", name)] += us
  ms = lambda c: {k: round(v / 1e3, 1) for k, v in c.most_common(top)}
  return dict(traced_op_ms=round(sum(times.values()) / 1e3, 1),
              op_ms_by_component=ms(by_component), op_ms_by_kind=ms(by_kind))
