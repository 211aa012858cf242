r"""Post-training quantization speed over a whole ResNet-50 parameter tree.

  python benchmarks/quantize_ptq.py
  python benchmarks/quantize_ptq.py --model=resnet18 --repeats=5 --json=out.json
  python benchmarks/quantize_ptq.py --workdir=runs/base    # PTQ accuracy table of a trained run

Builds the model's params (init with an "rbg" key, which compiles much faster on CPU than the
default threefry), then times `quantize_tree` with 8-bit per-channel symmetric uniform
quantization and with 4-bit per-tensor k-means (20 Lloyd iterations). The first call of each
compiles one program per distinct kernel shape; it is reported apart ("first call") from the
timed calls (median of --repeats, results blocked on). Also prints the stored sizes (packed codes
plus scales / codebooks) against float32.

--workdir: instead, the PTQ accuracy table of a trained float run. Restores the latest
checkpoint's params and BatchNorm statistics (the raw tree: any TrainState version), applies the
`quant` transform (`quantize.quant_weights`, mode ptq) for each of --methods (method:bits, e.g.
uniform:8), and prints, per row, the stored bytes of its export (packed codes, scales /
codebooks and the float stem, head and BatchNorm params, as results.json's model_bytes), the
ratio to float32, and the accuracy on the dataset's eval split beside the float model's.
"""

import json
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from jcompress import runtime  # noqa: E402

runtime.configure_cpu()   # XLA:CPU tuning before jax starts a backend, as launch.py does


from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from jcompress import checkpoint
from jcompress import experiment
from jcompress import models
from jcompress import packing
from jcompress import quantize as Q

_MODEL = flags.DEFINE_string("model", "resnet50", "Registered model name.")
_CLASSES = flags.DEFINE_integer("num_classes", 1000, "Classes.")
_SIZE = flags.DEFINE_integer("image_size", 224, "Image size for init.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls (the median is reported).")
_JSON = flags.DEFINE_string("json", "", "Also write the figures to this JSON file.")
_WORKDIR = flags.DEFINE_string("workdir", "", "A trained run: print its PTQ accuracy table.")
_METHODS = flags.DEFINE_list(
    "methods", ["uniform:8", "uniform:4", "kmeans:4", "pow2:4", "uniform:2", "kmeans:2"],
    "method:bits rows of the --workdir table.")


def device_name() -> str:
  d = jax.devices()[0]
  if d.platform == "cpu":
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
  return f"{d.platform} ({getattr(d, 'device_kind', '')}) x{jax.device_count()}"


def _block(tree):
  jax.block_until_ready(jax.tree.leaves(tree))
  return tree


def _time(fn, repeats):
  t0 = time.perf_counter()
  out = _block(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    _block(fn())
    times.append(time.perf_counter() - t0)
  return out, first, statistics.median(times)


def _sizes(qtree):
  q_bytes, f_bytes = 0, 0
  for leaf in jax.tree.leaves(qtree, is_leaf=Q.is_qtensor):
    if Q.is_qtensor(leaf):
      q_bytes += packing.qtensor_nbytes(leaf)
      f_bytes += int(np.prod(leaf.codes.shape)) * 4
    else:
      q_bytes += leaf.nbytes
      f_bytes += leaf.nbytes
  return f_bytes, q_bytes


def _tree_bytes(tree):
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                 for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def ptq_table(workdir, methods):
  """[{method, bits, model_bytes, float_bytes, ratio, accuracy}] of PTQ of `workdir`'s run."""
  import orbax.checkpoint as ocp  # noqa: PLC0415

  from jcompress import data as data_lib  # noqa: PLC0415

  config = checkpoint.load_workdir_config(workdir)
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  step = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  raw = ocp.StandardCheckpointer().restore(os.path.join(ckpt_dir, str(step), "state"))
  params, batch_stats = raw["params"], raw["batch_stats"]
  image_size = config.image_size or None
  info = data_lib.dataset_info(config.data, image_size=image_size,
                               data_dir=config.data_dir or None)
  model = experiment.build_model(config, info.num_classes)
  batches = list(data_lib.eval_iterator(config.data, batch_size=256, image_size=image_size,
                                        data_dir=config.data_dir or None))

  @jax.jit
  def correct(p, batch):
    logits, _ = model.apply({"params": p, "batch_stats": batch_stats}, batch["image"],
                            train=False)
    return jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * batch["mask"])

  def accuracy(p):
    n = sum(float(b["mask"].sum()) for b in batches)
    return sum(float(correct(p, b)) for b in batches) / n

  float_bytes = _tree_bytes(params)
  rows = [{"method": "float", "bits": 32, "model_bytes": float_bytes, "float_bytes": float_bytes,
           "ratio": 1.0, "accuracy": accuracy(params)}]
  for spec in methods:
    method, bits = spec.split(":")
    t = Q.quant_weights(params, method=method, bits=int(bits), mode="ptq")
    state = t.init(params, jax.random.key(0))
    p, state = t.calibrate(params, state, None)
    nbytes = _tree_bytes(t.export(p, state))
    rows.append({"method": method, "bits": int(bits), "model_bytes": nbytes,
                 "float_bytes": float_bytes, "ratio": float_bytes / nbytes,
                 "accuracy": accuracy(jax.jit(t.apply)(p, state)),
                 "weight_bits": float(t.metrics(p, state)["weight_bits"])})
  print(f"PTQ of {workdir} (step {step}, {config.model} on {config.data}, "
        f"{info.eval_size} eval examples), on {device_name()}")
  print(f"{'method':8s} {'bits':>4s} {'model_bytes':>11s} {'ratio':>6s} {'accuracy':>8s}")
  for r in rows:
    print(f"{r['method']:8s} {r['bits']:4d} {r['model_bytes']:11d} {r['ratio']:6.2f} "
          f"{100 * r['accuracy']:7.2f}%")
  return rows


def main(_):
  if _WORKDIR.value:
    rows = ptq_table(_WORKDIR.value, _METHODS.value)
    if _JSON.value:
      with open(_JSON.value, "w") as f:
        json.dump(rows, f, indent=2)
    return
  model = models.get_model(_MODEL.value, _CLASSES.value)
  x = jnp.zeros((1, _SIZE.value, _SIZE.value, 3), jnp.float32)
  t0 = time.perf_counter()
  variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(0, impl="rbg"))
  params = _block(variables["params"])
  init_s = time.perf_counter() - t0
  n = sum(p.size for p in jax.tree.leaves(params))
  print(f"{_MODEL.value}: {n / 1e6:.2f}M params, init {init_s:.1f} s, on {device_name()}")

  figures = {"model": _MODEL.value, "params": int(n), "device": device_name()}
  runs = {
      "uniform8_per_channel": lambda: Q.quantize_tree(params, 8, per_channel=True),
      "kmeans4_per_tensor": lambda: Q.quantize_tree(params, 4, method="kmeans",
                                                     per_channel=False),
  }
  for name, fn in runs.items():
    qtree, first, median = _time(fn, _REPEATS.value)
    f_bytes, q_bytes = _sizes(qtree)
    err = []
    deq = Q.dequantize_tree(qtree)
    for a, b in zip(jax.tree.leaves(deq), jax.tree.leaves(params)):
      if a.ndim >= 2:
        err.append(float(jnp.mean((a - b) ** 2) / (jnp.var(b) + 1e-12)))
    print(f"{name:22s} {median:7.3f} s  (first call, compiles included: {first:6.2f} s)  "
          f"size {f_bytes / 2**20:6.1f} MiB -> {q_bytes / 2**20:6.1f} MiB  "
          f"mean relative MSE of quantized kernels {np.mean(err):.2e}")
    figures[name] = {"seconds": median, "first_call_seconds": first, "float_bytes": f_bytes,
                     "bytes": q_bytes}
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(figures, f, indent=2)


if __name__ == "__main__":
  app.run(main)
