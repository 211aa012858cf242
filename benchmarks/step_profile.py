r"""Where a compiled train step's time goes, op by op, from XLA's own trace.

  python benchmarks/step_profile.py                          # float resnet18_cifar, batch 64
  python benchmarks/step_profile.py --binary_bits=1          # the BNN W1A1 step
  python benchmarks/step_profile.py --conv_impl=xla --top=40

Runs `--steps` steps of jcompress's train step (the runner of benchmarks/suite.py) under
`jax.profiler.trace` with XLA:CPU's per-operation trace events on
(`--xla_cpu_enable_xprof_traceme`, added to XLA_FLAGS here, before jax starts), reads the trace
back with `jax.profiler.ProfileData` and prints milliseconds per step by operation kind (the HLO
name without its number: `transpose_copy_fusion`, `wrapped_reduce-window`, `dot`, ...) and the
`--top` single operations, then the same time by the JAX operation each came from (the op_name
XLA keeps in the optimized HLO, which it dumps to a temporary directory: "backward:
dw_conv/while/body/closed_call/reduce_sum" sums every block's depthwise kernel-gradient
reductions). What XLA emits itself (fusions, copies, transposes, reductions) is
timed whole; a convolution or matmul handed to a library (Eigen, YNNPACK) shows only while it is
dispatched, so the step's wall time minus the traced operations is printed as "library calls
and gaps": mostly the convolutions.

This is how the BatchNorm reductions (XLA:CPU's windowed reductions, 0.35 s of a 2.5 s step)
and the fused transposes before the kernel gradients (0.5 s) were found; see README "Speed".
"""

from __future__ import annotations

import collections
import os
import shutil
import sys
import tempfile

TRACE_FLAG = "--xla_cpu_enable_xprof_traceme=true"
#: XLA writes each compiled module's optimized HLO here: its op names lead back to the JAX
#: operations (and the model's layers) that each traced operation came from (`source_times`).
DUMP_DIR = tempfile.mkdtemp(prefix="step_profile_hlo_")
os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} {TRACE_FLAG} "
                           f"--xla_dump_to={DUMP_DIR} --xla_dump_hlo_as_text").strip()

from jcompress import runtime  # noqa: E402

runtime.configure_cpu()   # XLA:CPU tuning before jax starts a backend, as launch.py does


from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

_MODEL = flags.DEFINE_string("model", None, "Model (default resnet18_cifar, or "
                             "bnn_resnet18_cifar with --binary_bits).")
_BINARY = flags.DEFINE_integer("binary_bits", 0, "BNN activation bits (0: no BNN).")
_QAT = flags.DEFINE_integer("qat_bits", 0, "QAT weight and activation bits (0: none).")
_IMPL = flags.DEFINE_string("conv_impl", None, "Model field conv_impl (default: the model's).")
_WIDTH = flags.DEFINE_float("width", 1.0, "Width multiplier (config.width).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_STEPS = flags.DEFINE_integer("steps", 2, "Traced steps (after one untraced).")
_TOP = flags.DEFINE_integer("top", 20, "Single operations listed.")


def op_times(trace_dir: str) -> tuple[collections.Counter, collections.Counter]:
  """Nanoseconds by operation name and by kind (name up to its first '.') of the XLA trace
  events in `trace_dir` (the thunk executor's own events and Python's are left out)."""
  by_op, by_kind = collections.Counter(), collections.Counter()
  paths = [os.path.join(d, f) for d, _, fs in os.walk(trace_dir) for f in fs
           if f.endswith(".xplane.pb")]
  for path in paths:
    data = jax.profiler.ProfileData.from_file(path)
    for plane in data.planes:
      for line in plane.lines:
        if not line.name.startswith("tf_XLA"):
          continue
        for event in line.events:
          name = event.name
          if name.startswith(("ThunkExecutor", "end: ", "$")):
            continue
          by_op[name] += event.duration_ns
          by_kind[name.split(".")[0]] += event.duration_ns
  return by_op, by_kind


def source_times(by_op: collections.Counter, hlo_text: str) -> collections.Counter:
  """Nanoseconds of the traced operations `by_op` summed by the JAX operation each came from:
  the op_name of its HLO instruction in `hlo_text` (an optimized module's text), with the jit
  name left out, the layer's stage / block indices dropped (one line for every block's
  depthwise kernel gradient) and "jvp(...)" / "transpose(jvp(...))" read as forward / backward.
  An operation without an op_name is listed under its kind ("copy", "while", ...)."""
  import re  # noqa: PLC0415

  names = dict(re.findall(r'%([\w.\-]+) = [^\n]*?metadata=\{op_name="([^"]+)"', hlo_text))
  out = collections.Counter()
  for op, ns in by_op.items():
    name = names.get(op)
    if name is None:
      out[f"({op.split('.')[0]})"] += ns
      continue
    name = re.sub(r"^jit\([^)]*\)/", "", name)
    name = re.sub(r"stage\d+_block\d+/", "", name)
    name = re.sub(r"^transpose\(jvp\(\w+\)\)/", "backward: ", name)
    name = re.sub(r"^jvp\(\w+\)/", "forward: ", name)
    out[name] += ns
  return out


def _train_step_hlo() -> str:
  """The optimized HLO text of the largest train-step module XLA dumped (DUMP_DIR)."""
  files = [os.path.join(DUMP_DIR, f) for f in os.listdir(DUMP_DIR)
           if "train_step" in f and f.endswith("cpu_after_optimizations.txt")]
  if not files:
    return ""
  with open(max(files, key=os.path.getsize)) as f:
    return f.read()


def main(argv):
  del argv
  model = _MODEL.value or ("bnn_resnet18_cifar" if _BINARY.value else "resnet18_cifar")
  kwargs = {"conv_impl": _IMPL.value} if _IMPL.value else None
  config = common.train_config(model, binary_bits=_BINARY.value, qat_bits=_QAT.value,
                               model_kwargs=kwargs)
  config.width = _WIDTH.value
  run, _ = common.make_train_runner(config, batch_size=_BATCH.value)
  run(1)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    seconds = run(_STEPS.value)
    jax.profiler.stop_trace()
    by_op, by_kind = op_times(trace_dir)
  n = _STEPS.value
  step_ms = 1e3 * seconds / n
  traced_ms = sum(by_kind.values()) / 1e6 / n
  width = f" x{_WIDTH.value:g}" if _WIDTH.value != 1.0 else ""
  print(f"{model}{width}, batch {_BATCH.value}, {common.device_name()}; XLA_FLAGS "
        f"`{os.environ.get('XLA_FLAGS', '')}`")
  print(f"step {step_ms:.0f} ms under the trace ({_BATCH.value / step_ms * 1e3:.1f} images/s); "
        f"traced operations {traced_ms:.0f} ms; library calls and gaps "
        f"{step_ms - traced_ms:.0f} ms\n")
  print("| operation kind | ms per step |\n|---|---|")
  for kind, ns in by_kind.most_common():
    if ns / 1e6 / n >= 1.0:
      print(f"| {kind} | {ns / 1e6 / n:.1f} |")
  print(f"\n| top {_TOP.value} operations | ms per step |\n|---|---|")
  for op, ns in by_op.most_common(_TOP.value):
    print(f"| {op} | {ns / 1e6 / n:.1f} |")
  by_source = source_times(by_op, _train_step_hlo())
  shutil.rmtree(DUMP_DIR, ignore_errors=True)
  print(f"\n| top {_TOP.value} JAX operations (every block's together) | ms per step |\n|---|---|")
  for name, ns in by_source.most_common(_TOP.value):
    print(f"| {name} | {ns / 1e6 / n:.1f} |")


if __name__ == "__main__":
  app.run(main)
