r"""Inference speed of a structurally pruned ResNet (or ViT) against the unpruned one.

  python benchmarks/structured_speed.py                  # ResNet-18 (CIFAR stem), 32x32, batch 64
  python benchmarks/structured_speed.py --model=resnet20 --batch_size=128 --json=out.json
  # a pruned run's model (its config.json's widths) against its init_from run's model
  python benchmarks/structured_speed.py --workdir=runs/vit_prune --image_size=32
  python benchmarks/structured_speed.py --model=vit_digits --cpu_threads=1   # one XLA thread

The unpruned model is initialised at random, its channels are planned with
`structured.plan_for_flops` (L1 filter norms, `--flops` of the MACs kept, `--method` global or
uniform, kept channels rounded up to multiples of `--round_to`) and physically removed with
`structured.prune_channels`; the pruned model is the same
architecture built with `channels=...` (narrower convs), so the speed-up is real, not masked.
Both jit-compiled eval forward passes (`model.apply(..., train=False)`) run on one fixed batch;
timed blocks of `--iters` calls alternate between the two models (so a load change on a shared
machine hits both alike) and the median over `--repeats` blocks is reported, as images/s and
their ratio, with params and MACs ("FLOPs") per image of both. `--cpu_threads=N` pins the
process to N CPUs before jax starts, so XLA's thread pool has N threads for both models: a
model as small as `vit_digits` (2.6M MACs per image) runs faster on one XLA thread than on two
on a 2-core CPU (measured with this script, float and pruned alike), so compare at each
model's fastest setting as well as at the default. With `--workdir` (a run of the
`structured` method) the two models are that run's pruned architecture and its `init_from`
run's, as their config.json files build them (random weights: speed does not depend on them).
"""

from __future__ import annotations

import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from jcompress import runtime  # noqa: E402

runtime.configure_cpu()   # XLA:CPU tuning before jax starts a backend, as launch.py does


from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jcompress import checkpoint  # noqa: E402
from jcompress import models  # noqa: E402
from jcompress import structured  # noqa: E402

_MODEL = flags.DEFINE_string("model", "resnet18_cifar", "Registered model name.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_SIZE = flags.DEFINE_integer("image_size", 32, "Image height and width.")
_FLOPS = flags.DEFINE_float("flops", 0.5, "Fraction of the MACs kept, in (0, 1].")
_METHOD = flags.DEFINE_enum("method", "uniform", list(structured.METHODS), "Planning method.")
_ROUND = flags.DEFINE_integer("round_to", 8, "Kept channels per group: a multiple of this.")
_ITERS = flags.DEFINE_integer("iters", 3, "Forward passes per timed block.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed blocks per model (median reported).")
_JSON = flags.DEFINE_string("json", "", "Also write the figures to this JSON file.")
_WORKDIR = flags.DEFINE_string("workdir", "", "A structured-pruning run: time its model against "
                               "its init_from run's model instead of planning at random.")
_CLASSES = flags.DEFINE_integer("num_classes", 10, "Classifier outputs.")
_THREADS = flags.DEFINE_integer(
    "cpu_threads", 0, "Pin this process to its first N allowed CPUs before jax starts its CPU "
    "backend (XLA sizes its thread pool from them); 0: all of them. Both models run pinned.")


def pin_cpus(n: int) -> list[int]:
  """Pins this process to the first `n` CPUs it may run on (0: leaves it alone); returns the
  CPUs it runs on. Must run before jax's CPU backend starts: XLA sizes its thread pool from
  this process's CPU affinity when the backend is created."""
  allowed = sorted(os.sched_getaffinity(0))
  if n < 0 or n > len(allowed):
    raise app.UsageError(f"--cpu_threads={n}: this process may run on {len(allowed)} CPUs "
                         f"({allowed}); choose 0 (all) to {len(allowed)}")
  if n:
    os.sched_setaffinity(0, allowed[:n])
  return sorted(os.sched_getaffinity(0))


def run_model(workdir: str):
  """(model name, the model a run's config.json builds) for --workdir and its init_from."""
  config = checkpoint.load_workdir_config(workdir)
  kwargs = dict(config.get("model_kwargs", {}))
  return config, models.get_model(config.model, _CLASSES.value, width=config.width, **kwargs)


def device_name() -> str:
  d = jax.devices()[0]
  if d.platform == "cpu":
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
  return getattr(d, "device_kind", d.platform)


def main(argv):
  del argv
  cpus = pin_cpus(_THREADS.value)
  shape = (_BATCH.value, _SIZE.value, _SIZE.value, 3)
  x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
  model_name = _MODEL.value
  if _WORKDIR.value:
    config, pruned = run_model(_WORKDIR.value)
    model_name = config.model
    _, model = run_model(config.init_from)
    v = model.init(jax.random.PRNGKey(0), x[:1])
    v2 = pruned.init(jax.random.PRNGKey(0), x[:1])
    p2, s2 = v2["params"], v2.get("batch_stats", {})
  else:
    model = models.get_model(model_name, _CLASSES.value)
    v = model.init(jax.random.PRNGKey(0), x[:1])
  params, stats = v["params"], v.get("batch_stats", {})
  if not _WORKDIR.value:
    graph = structured.build_graph(model, params, stats, (1, *shape[1:]))
    keep = structured.plan_for_flops(model, params, stats, flops_target=_FLOPS.value,
                                     method=_METHOD.value, graph=graph,
                                     round_to=_ROUND.value)
    override, p2, s2 = structured.prune_channels(model, params, stats, keep, graph=graph)
    pruned = structured.with_channels(model, override)
  runs = {"unpruned": (model, {"params": params, "batch_stats": stats}),
          "pruned": (pruned, {"params": p2, "batch_stats": s2})}
  fns, compile_s = {}, {}
  for name, (m, var) in runs.items():
    fn = jax.jit(lambda var, x, m=m: m.apply(var, x, train=False)[0])
    t = time.perf_counter()
    fn(var, x).block_until_ready()
    compile_s[name] = time.perf_counter() - t
    fn(var, x).block_until_ready()
    fns[name] = fn
  times: dict = {name: [] for name in runs}
  for _ in range(_REPEATS.value):
    for name, (_, var) in runs.items():
      t = time.perf_counter()
      for _ in range(_ITERS.value):
        y = fns[name](var, x)
      y.block_until_ready()
      times[name].append((time.perf_counter() - t) / _ITERS.value)
  ips = {name: _BATCH.value / float(np.median(ts)) for name, ts in times.items()}
  out = {
      "model": model_name,
      "workdir": _WORKDIR.value,
      "device": device_name(),
      "cpus": cpus,
      "batch_size": _BATCH.value,
      "image_size": _SIZE.value,
      "flops_target": _FLOPS.value,
      "method": _METHOD.value,
      "round_to": _ROUND.value,
      "flops_unpruned": structured.count_flops(model, (1, *shape[1:]), params, stats),
      "flops_pruned": structured.count_flops(pruned, (1, *shape[1:]), p2, s2),
      "params_unpruned": structured.count_params(params),
      "params_pruned": structured.count_params(p2),
      "images_per_s_unpruned": ips["unpruned"],
      "images_per_s_pruned": ips["pruned"],
      "speedup": ips["pruned"] / ips["unpruned"],
      "compile_s": compile_s,
  }
  out["flops_ratio"] = out["flops_pruned"] / out["flops_unpruned"]
  out["params_ratio"] = out["params_pruned"] / out["params_unpruned"]
  print(f"{out['model']} on {out['device']}, {len(cpus)} of them used, batch "
        f"{out['batch_size']}, {out['image_size']}x{out['image_size']}")
  print(f"  MACs/image  {out['flops_unpruned']:,} -> {out['flops_pruned']:,} "
        f"({out['flops_ratio']:.3f})")
  print(f"  params      {out['params_unpruned']:,} -> {out['params_pruned']:,} "
        f"({out['params_ratio']:.3f})")
  print(f"  images/s    {ips['unpruned']:.1f} -> {ips['pruned']:.1f}  "
        f"speed-up {out['speedup']:.2f}x")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  app.run(main)
