r"""Size of the exported artifact against the float model and its training checkpoint.

  python benchmarks/export_size.py                      # bnn_resnet18_cifar, 8-bit resnet18_cifar
  python benchmarks/export_size.py --which=bnn,q8_resnet20 --workdir=/tmp/export_size

For each model, a run on digits at 32x32x3 (CIFAR's input shape; the sizes depend on the
architecture only, so a few steps, or none, do): the binary ResNet-18 (`bnn_resnet18_cifar`,
1-bit weights and activations, `binary` sub-config, trained `--steps` steps), and 8-bit uniform
PTQ of a float `resnet18_cifar` / `resnet20` (a float run of one step, then `init_from` it).
Each is exported with `--mode=export`'s `jcompress.export.export_run`, and the script prints

  artifact     bytes of DIR/export/manifest.json + weights.bin (= results.json's model_bytes)
  float32      4 x the number of params: the float model's weights as float32
  checkpoint   bytes of the float run's latest orbax checkpoint step on disk (params, BatchNorm
               statistics, optimizer state: what a training run keeps)

and the ratios float32 / artifact and checkpoint / artifact. Targets (issue 7): a binary
ResNet-18 at least 20x smaller than the float checkpoint, an 8-bit model at least 3.8x.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jcompress import runtime  # noqa: E402

runtime.configure_cpu()   # XLA:CPU tuning before jax starts a backend, as launch.py does


import ml_collections  # noqa: E402

from jcompress import config as config_lib  # noqa: E402
from jcompress import export  # noqa: E402
from jcompress import train  # noqa: E402
from jcompress import transforms  # noqa: E402

TARGETS = {"bnn": 20.0, "q8_resnet18": 3.8, "q8_resnet20": 3.8}


def _config(model: str, steps: int, data_dir: str) -> ml_collections.ConfigDict:
  c = config_lib.base_config()
  c.data = "digits"
  c.data_dir = data_dir
  c.image_size = 32
  c.model = model
  c.batch_size = 16
  c.eval_batch_size = 120
  c.total_steps = steps
  c.log_every = 1
  c.eval_every = 0
  c.checkpoint_every = max(steps, 1)
  c.keep_checkpoints = 1
  return c


def dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def checkpoint_bytes(workdir: str) -> int:
  """Bytes of the latest orbax checkpoint step of `workdir`."""
  ckpt = os.path.join(workdir, "checkpoints")
  step = max(int(d) for d in os.listdir(ckpt) if d.isdigit())
  return dir_bytes(os.path.join(ckpt, str(step)))


def _row(workdir: str, float_workdir: str, check_examples: int) -> dict:
  summary = export.export_run(workdir, check_examples=check_examples)
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  artifact = summary["artifact_bytes"]
  ckpt = checkpoint_bytes(float_workdir)
  return {"model": summary["model"], "kind": summary["kind"], "params": results["params"],
          "artifact_bytes": artifact, "results_model_bytes": results["model_bytes"],
          "float32_bytes": 4 * results["params"], "checkpoint_bytes": ckpt,
          "ratio_vs_float32": 4 * results["params"] / artifact,
          "ratio_vs_checkpoint": ckpt / artifact,
          "stablehlo_bytes": summary["stablehlo"]["bytes"],
          "check": summary.get("check")}


def measure(workdir: str, which=("bnn", "q8_resnet18"), steps: int = 2,
            check_examples: int = 32) -> dict:
  """{name: row} for the models in `which` (see the module docstring), runs under `workdir`."""
  data_dir = os.path.join(workdir, "tfds")
  rows = {}
  if "bnn" in which:
    c = _config("bnn_resnet18_cifar", steps, data_dir)
    c.model_kwargs.num_bits = 1
    c.binary = ml_collections.ConfigDict({"method": "ste_sign", "include": (".*",),
                                          "exclude": transforms.DEFAULT_EXCLUDE})
    w = os.path.join(workdir, "bnn_resnet18_cifar")
    train.train_and_evaluate(c, w)
    # its own checkpoint holds the latent float weights: the float model of the same shape
    rows["bnn"] = _row(w, w, check_examples)
    print(json.dumps({"bnn": rows["bnn"]}), flush=True)
  for name, model in (("q8_resnet18", "resnet18_cifar"), ("q8_resnet20", "resnet20")):
    if name not in which:
      continue
    fw = os.path.join(workdir, f"float_{model}")
    train.train_and_evaluate(_config(model, 1, data_dir), fw)   # one step: a float checkpoint
    c = _config(model, 0, data_dir)
    c.init_from = fw
    c.quant = ml_collections.ConfigDict({"method": "uniform", "bits": 8, "mode": "ptq"})
    w = os.path.join(workdir, f"{name}")
    train.train_and_evaluate(c, w)
    rows[name] = _row(w, fw, check_examples)
    print(json.dumps({name: rows[name]}), flush=True)
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default="/tmp/jcompress_export_size")
  p.add_argument("--which", default="bnn,q8_resnet18",
                 help="comma-separated: bnn, q8_resnet18, q8_resnet20")
  p.add_argument("--steps", type=int, default=2, help="training steps of the binary run")
  args = p.parse_args(argv)
  rows = measure(args.workdir, tuple(args.which.split(",")), steps=args.steps)
  print(f"{'run':12s} {'params':>10s} {'artifact':>10s} {'float32':>10s} {'checkpoint':>11s} "
        f"{'x float32':>9s} {'x ckpt':>7s} {'target':>6s}")
  for name, r in rows.items():
    print(f"{name:12s} {r['params']:10d} {r['artifact_bytes']:10d} {r['float32_bytes']:10d} "
          f"{r['checkpoint_bytes']:11d} {r['ratio_vs_float32']:9.2f} "
          f"{r['ratio_vs_checkpoint']:7.2f} {TARGETS[name]:6.1f}")
  print(json.dumps(rows, indent=1))
  return rows


if __name__ == "__main__":
  main()
