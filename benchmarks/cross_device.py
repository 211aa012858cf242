r"""An exported run, made on one machine and run on another: does it predict the same there?

  python benchmarks/cross_device.py --workdir=runs/bnn --out=DIR   # here: export + reference
  python benchmarks/cross_device.py --check=DIR [--json=F]        # there (a GPU, say): compare

The first form exports the run (`export.export_run`: the artifact and its StableHLO, lowered
for `export.PLATFORMS`) and writes to DIR the export's files, `--examples` test images of the
run's dataset with their labels, and the logits this machine's backend gives for them through
the StableHLO (`export.load_stablehlo`) and through the artifact (`export.inference_fn`). The
second form, on the other machine, runs both on its default backend and reports the argmax
agreement with the exporting machine's logits, the largest logit difference, the test accuracy
and which platforms the module was lowered for. A packed BNN's StableHLO carries each platform's
compute (`lax.platform_dependent`: XNOR-popcount on a CPU, bf16 products elsewhere), so the
loading device runs its own; the check mode reads no dataset and needs no TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write(workdir: str, out: str, examples: int) -> dict:
  import jax  # noqa: PLC0415

  from jcompress import data as data_lib  # noqa: PLC0415
  from jcompress import experiment  # noqa: PLC0415
  from jcompress import export  # noqa: PLC0415

  summary = export.export_run(workdir)
  exp = experiment.load_workdir_run(workdir, "export")[0]
  c = exp.config
  batch = next(iter(data_lib.eval_iterator(c.data, batch_size=examples,
                                           image_size=c.image_size or None,
                                           data_dir=c.data_dir or None)))
  keep = batch["mask"].astype(bool)
  images, labels = batch["image"][keep], batch["label"][keep]
  src = summary["export_dir"]
  os.makedirs(out, exist_ok=True)
  for f in os.listdir(src):
    shutil.copy(os.path.join(src, f), os.path.join(out, f))
  fn = export.inference_fn(src)
  call = export.load_stablehlo(os.path.join(src, export.STABLEHLO))
  np.savez(os.path.join(out, "reference.npz"), images=images, labels=labels,
           artifact_logits=np.asarray(fn(images)),
           stablehlo_logits=np.asarray(call(fn.arrays, images)),
           backend=jax.default_backend())
  return {"exported": summary["stablehlo"], "backend": jax.default_backend(),
          "examples": int(images.shape[0])}


def check(directory: str) -> dict:
  import jax  # noqa: PLC0415
  from jax import export as jax_export  # noqa: PLC0415

  from jcompress import export  # noqa: PLC0415

  ref = np.load(os.path.join(directory, "reference.npz"))
  images, labels = ref["images"], ref["labels"]
  with open(os.path.join(directory, export.STABLEHLO), "rb") as f:
    exported = jax_export.deserialize(bytearray(f.read()))
  manifest, arrays = export.load_artifact(directory)
  fn = export.inference_fn((manifest, arrays))
  got = {"stablehlo": np.asarray(exported.call(fn.arrays, images)),
         "artifact": np.asarray(fn(images))}
  out = {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
         "exported_on": str(ref["backend"]), "lowered_for": list(exported.platforms),
         "model": manifest["model"]["name"], "kind": manifest["kind"],
         "examples": int(images.shape[0])}
  for name, logits in got.items():
    theirs = ref[f"{name}_logits"]
    out[name] = {"argmax_agreement_with_exporting_machine":
                 float(np.mean(logits.argmax(-1) == theirs.argmax(-1))),
                 "max_abs_logit_diff": float(np.max(np.abs(logits - theirs))),
                 "accuracy": float(np.mean(logits.argmax(-1) == labels)),
                 "accuracy_on_exporting_machine": float(np.mean(theirs.argmax(-1) == labels))}
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--workdir", help="the run to export (first form)")
  ap.add_argument("--out", help="where the export and the reference go (first form)")
  ap.add_argument("--examples", type=int, default=360, help="test images in the reference")
  ap.add_argument("--check", help="a directory the first form wrote (second form)")
  ap.add_argument("--json", default="", help="also write the report here")
  args = ap.parse_args(argv)
  if bool(args.check) == bool(args.workdir):
    raise SystemExit("give either --workdir and --out (export here) or --check=DIR (compare)")
  if args.workdir and not args.out:
    raise SystemExit("--workdir needs --out: the directory to write the export and reference to")
  report = check(args.check) if args.check else write(args.workdir, args.out, args.examples)
  print(json.dumps(report, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
