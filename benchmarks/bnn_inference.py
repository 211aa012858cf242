r"""Inference speed of a packed binary ResNet against the same network in float32.

  python benchmarks/bnn_inference.py
  python benchmarks/bnn_inference.py --num_bits=1,2 --compute=int8,bf16,xnor --json=out.json

For each --num_bits, builds `bnn_resnet18_cifar` (32x32x3, 10 classes) with random params and
non-trivial random BatchNorm statistics, then times at --batch_size (median and best of
--repeats calls after --warmup calls, results blocked on):

* `latent_f32`: the latent model, `model.apply` with the +1/-1 weights of
  `binarize.binary_weights(...).apply` (binarized once, outside the timed call) through
  ordinary float32 convolutions, train=False;
* `packed_<compute>`: `bnn_infer.packed_apply` on the `load`ed artifact (bits unpacked once at
  load time into the compute dtype; `xnor`, 1 and 2 bits only, packs the kernel's signs along
  its input channels in the graph and computes by XNOR-popcount, `fastconv.xnor_conv`);
* `packed_bits_auto`: `packed_apply` on the stored artifact itself (bits unpacked inside the
  compiled graph at every call; compute "auto", `bnn_infer.fastest_compute`: xnor on a CPU);

and once the plain float ResNet-18 (`resnet18_cifar`, same stem, stages and head, float convs,
1x1 projection shortcuts). Prints images/s, the first call's time (compile + run), the ratios
packed / latent_f32 and packed / resnet18_cifar, the max logit difference and argmax agreement
with the latent model, and the artifact's sizes (binary layers vs float32). --json writes it all.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from jcompress import runtime  # noqa: E402

runtime.configure_cpu()   # XLA:CPU tuning before jax starts a backend, as launch.py does


from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jcompress import binary as binarize  # noqa: E402
from jcompress import bnn_infer  # noqa: E402
from jcompress import transforms  # noqa: E402
from jcompress.models import get_model  # noqa: E402

_MODEL = flags.DEFINE_string("model", "bnn_resnet18_cifar", "A BNN ResNet from the registry.")
_FLOAT_MODEL = flags.DEFINE_string("float_model", "resnet18_cifar",
                                   "The plain float model to compare with ('' to skip).")
_BITS = flags.DEFINE_list("num_bits", ["1", "2"], "Activation bits to benchmark.")
_COMPUTE = flags.DEFINE_list("compute", ["int8"],
                             f"Binary conv kinds to time, from {bnn_infer.COMPUTE}.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_SIZE = flags.DEFINE_integer("image_size", 32, "Image height and width.")
_CLASSES = flags.DEFINE_integer("num_classes", 10, "Classes.")
_WIDTH = flags.DEFINE_float("width", 1.0, "Width multiplier of both models.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls after the first (compiling) one.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls (median and best reported).")
_JSON = flags.DEFINE_string("json", "", "Also write the figures to this JSON file.")


def device_name() -> str:
  d = jax.devices()[0]
  if d.platform == "cpu":
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
  return f"{d.platform} ({getattr(d, 'device_kind', '')}) x{jax.device_count()}"


def time_fn(fn, warmup: int, repeats: int) -> dict:
  """First call (compile + run), then `warmup` untimed and `repeats` timed calls."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return {"first_call_s": first, "median_s": statistics.median(times), "best_s": min(times),
          "out": out}


def randomize_batch_norm(params, batch_stats, key):
  """BN scales in +-[0.5, 1.5], biases and means N(0, 0.3^2) (means x 3), vars in [0.5, 2]."""
  leaves = {"n": 0}

  def draw(path, x, kind):
    leaves["n"] += 1
    k = jax.random.fold_in(key, leaves["n"])
    if kind == "var":
      return jax.random.uniform(k, x.shape, minval=0.5, maxval=2.0)
    if kind == "mean":
      return 0.9 * jax.random.normal(k, x.shape)
    if kind == "bias":
      return 0.3 * jax.random.normal(k, x.shape)
    mag = jax.random.uniform(k, x.shape, minval=0.5, maxval=1.5)
    return jnp.where(jax.random.bernoulli(jax.random.fold_in(k, 1), 0.8, x.shape), mag, -mag)

  def p_leaf(path, x):
    name = path.rsplit("/", 1)[-1]
    if "bn" in path and name in ("scale", "bias"):
      return draw(path, x, name)
    return x

  def s_leaf(path, x):
    return draw(path, x, path.rsplit("/", 1)[-1])

  return transforms.map_with_path(p_leaf, params), transforms.map_with_path(s_leaf, batch_stats)


def bench_bits(nb: int, images, float_ips) -> dict:
  """Times the latent model and the packed variants at `nb` activation bits."""
  batch = images.shape[0]
  model = get_model(_MODEL.value, _CLASSES.value, width=_WIDTH.value, num_bits=nb)
  variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), images[:1])
  params, stats = randomize_batch_norm(variables["params"], variables["batch_stats"],
                                       jax.random.key(2))
  bw = binarize.binary_weights(params)
  binary_params = jax.jit(bw.apply)(params, {})
  latent = jax.jit(lambda p, s, x: model.apply({"params": p, "batch_stats": s}, x,
                                               train=False)[0])
  r = time_fn(lambda: latent(binary_params, stats, images), _WARMUP.value, _REPEATS.value)
  ref = np.asarray(r["out"])
  lat_ips = batch / r["median_s"]
  run = {"num_bits": nb, "latent_f32": {"images_per_s": lat_ips,
                                         "best_images_per_s": batch / r["best_s"],
                                         "first_call_s": r["first_call_s"]}}
  print(f"--- {_MODEL.value}, num_bits={nb}", flush=True)
  print(f"{'latent_f32':>22s}                  {lat_ips:9.1f} img/s  "
        f"(best {batch / r['best_s']:.1f})  first call {r['first_call_s']:.2f} s", flush=True)

  t0 = time.perf_counter()
  frozen = bnn_infer.freeze(params, stats, model)
  freeze_s = time.perf_counter() - t0
  sizes = bnn_infer.artifact_nbytes(frozen)
  run["freeze_s"] = freeze_s
  run["sizes"] = {k: v for k, v in sizes.items() if k != "per_leaf"}
  variants = [(f"packed_{c}", c, True) for c in _COMPUTE.value]
  variants.append(("packed_bits_auto", "auto", False))
  for label, compute, loaded in variants:
    if compute == "xnor" and nb > 2:
      continue
    t0 = time.perf_counter()
    art = bnn_infer.load(frozen, model, compute=compute) if loaded else frozen
    art = jax.block_until_ready(art)
    load_s = time.perf_counter() - t0
    r = time_fn(lambda art=art: bnn_infer.packed_apply(art, images), _WARMUP.value,
                _REPEATS.value)
    out = np.asarray(r["out"])
    ips = batch / r["median_s"]
    entry = {"compute": compute, "loaded": loaded, "images_per_s": ips,
             "best_images_per_s": batch / r["best_s"], "first_call_s": r["first_call_s"],
             "load_s": load_s, "ratio_vs_latent_f32": ips / lat_ips,
             "max_abs_logit_diff": float(np.abs(out - ref).max()),
             "argmax_equal": float(np.mean(out.argmax(-1) == ref.argmax(-1)))}
    if float_ips:
      entry["ratio_vs_float_model"] = ips / float_ips
    run[label] = entry
    vs_float = f", x{ips / float_ips:.2f} vs {_FLOAT_MODEL.value}" if float_ips else ""
    print(f"{label:>22s}                  {ips:9.1f} img/s  (best {batch / r['best_s']:.1f})"
          f"  first call {r['first_call_s']:.2f} s  x{ips / lat_ips:.2f} vs latent_f32"
          f"{vs_float}; max |dlogit| {entry['max_abs_logit_diff']:.2e}, argmax equal "
          f"{entry['argmax_equal']:.3f}", flush=True)
  print(f"{'sizes':>22s}  artifact {sizes['total'] / 2**20:.2f} MiB; binary layers "
        f"{sizes['binary_bytes'] / 2**20:.2f} MiB vs {sizes['binary_float32_bytes'] / 2**20:.2f}"
        f" MiB float32 (x{sizes['binary_ratio']:.2f}, {sizes['binary_bits_per_weight']:.3f}"
        f" bits/weight); freeze {freeze_s:.2f} s", flush=True)
  return run


def main(argv):
  del argv
  size, batch = _SIZE.value, _BATCH.value
  images = jax.random.normal(jax.random.key(1), (batch, size, size, 3), jnp.float32)
  report = {"device": device_name(), "model": _MODEL.value, "batch_size": batch,
            "image_size": size, "width": _WIDTH.value, "warmup": _WARMUP.value,
            "repeats": _REPEATS.value, "runs": []}
  print(f"device: {report['device']}; batch {batch}, {size}x{size}x3; median (best) of "
        f"{_REPEATS.value} calls after {_WARMUP.value} warmup calls", flush=True)

  float_ips = None
  if _FLOAT_MODEL.value:
    fmodel = get_model(_FLOAT_MODEL.value, _CLASSES.value, width=_WIDTH.value)
    fvars = jax.jit(fmodel.init)(jax.random.key(0, impl="rbg"), images[:1])
    fapply = jax.jit(lambda v, x: fmodel.apply(v, x, train=False)[0])
    r = time_fn(lambda: fapply(fvars, images), _WARMUP.value, _REPEATS.value)
    float_ips = batch / r["median_s"]
    report["float_model"] = {"name": _FLOAT_MODEL.value, "images_per_s": float_ips,
                             "best_images_per_s": batch / r["best_s"],
                             "first_call_s": r["first_call_s"]}
    print(f"{_FLOAT_MODEL.value:>22s} (float32)        {float_ips:9.1f} img/s  "
          f"(best {batch / r['best_s']:.1f})  first call {r['first_call_s']:.2f} s", flush=True)

  for nb in (int(b) for b in _BITS.value):
    report["runs"].append(bench_bits(nb, images, float_ips))

  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  app.run(main)
