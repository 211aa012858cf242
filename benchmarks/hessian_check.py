r"""Do Hessian traces rank ResNet-20's layers as 2-bit quantization hurts them?

  python benchmarks/hessian_check.py --workdir=/tmp/hc_float
  python benchmarks/hessian_check.py --workdir=/tmp/hc_float --images=256 --tol=0.1 --out=hc.json

--workdir: a float run (trained with `experiments/baseline_resnet.py`); without a checkpoint
there, one is trained first through the codebase's trainer (`train.train_and_evaluate` with
`baseline_resnet.py:data=<--data>`, ~3 min on a 2-core CPU for digits).

1. The per-layer Hessian traces Tr(H_ll) (`hessian.hutchinson_traces`, Rademacher probes, the
   selection quantization uses: kernels, stem and head excluded) of the eval-mode cross-entropy
   on the first --images training images (no augmentation; --augment: through the training
   augmentation), timed from the call to the last
   probe (compile included); target: all of ResNet-20's in at most 60 s on a 2-core CPU.
2. HAWQ-V2's Omega_l(b) = Tr(H_ll)/n_l ||Q_b(W_l) - W_l||^2 at --bits (`hessian.quant_sensitivity`).
3. The measured sensitivity: each layer alone quantized to --bits (per-channel symmetric uniform,
   as PTQ does: `hessian.ptq_weight`), the others float, and the accuracy (and mean
   cross-entropy) on the validation split (--drop_split: on the test split, or on both
   together, where the validation split is too small to tell layers apart: on digits 144
   images, a drop moves in steps of 0.69 points); drop = float - quantized (the loss increase
   too). The rank correlations against the drops on each split (validation, test, both) are
   printed as well, from the same quantized models.
4. Spearman's rank correlation (`scipy.stats.spearmanr`) of trace and of Omega with the accuracy
   drops (target >= 0.7) and with the loss increases; and of Omega with the increase of the
   loss whose Hessian it is (the --images training images), which Omega estimates to second
   order (a check of the estimate rather than of its use).
5. The exact per-layer Gauss-Newton traces Tr(G_ll) (`hessian.gauss_newton_traces`: per-example
   gradients, no probe noise; G = H where the model fits its data), timed, and HAWQ-V2's Omega
   with them (the sensitivity `hawq_gn`): the same correlations.
6. For comparison, the exact second-order term 1/2 dW_l^T H_ll dW_l at the first width
   (`hessian.quadratic_sensitivity`, one HVP per layer; --no_quadratic skips it) and its
   correlations.

Prints a table per layer and the figures; --out writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from jcompress import runtime  # noqa: E402

runtime.configure_cpu()   # XLA:CPU tuning before jax starts a backend, as launch.py does

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from scipy import stats  # noqa: E402

from jcompress import data as data_lib  # noqa: E402
from jcompress import experiment  # noqa: E402
from jcompress import hessian  # noqa: E402
from jcompress import transforms  # noqa: E402


def _has_checkpoint(workdir: str) -> bool:
  d = os.path.join(workdir, "checkpoints")
  return os.path.isdir(d) and any(x.isdigit() for x in os.listdir(d))


def _train(workdir: str, data: str) -> None:
  import importlib.util  # noqa: PLC0415

  from jcompress import train  # noqa: PLC0415

  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "experiments", "baseline_resnet.py")
  spec = importlib.util.spec_from_file_location("baseline_resnet", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config(f"data={data}")
  print(f"training a float {config.model} on {data} in {workdir} ...", flush=True)
  t0 = time.perf_counter()
  train.train_and_evaluate(config, workdir)
  print(f"trained in {time.perf_counter() - t0:.0f} s", flush=True)


def _spearman(x, y) -> float:
  r = stats.spearmanr(x, y).statistic
  return float(r) if np.isfinite(r) else float("nan")


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default="/tmp/hc_float", help="a float run (trained if absent)")
  p.add_argument("--data", default="digits", help="dataset of a run trained here")
  p.add_argument("--images", type=int, default=256, help="training images of the trace loss")
  p.add_argument("--augment", action="store_true",
                 help="the trace images through the training augmentation (a trained model fits "
                      "its un-augmented training images almost exactly: loss ~1e-3)")
  p.add_argument("--bits", default="2,3,4",
                 help="widths of the one-layer quantization, comma-separated; the first is the "
                      "headline (2: the target)")
  p.add_argument("--tol", type=float, default=0.1, help="relative standard error to stop at")
  p.add_argument("--min_probes", type=int, default=4)
  p.add_argument("--max_probes", type=int, default=16,
                 help="16 keeps ResNet-20's traces under 60 s on a loaded 2-core CPU")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no_quadratic", action="store_true",
                 help="skip the exact 1/2 dW^T H dW at the first width (one HVP per layer)")
  p.add_argument("--drop_split", default="validation", choices=("validation", "test", "both"),
                 help="the held-out images of the measured drops: the run's validation split, the "
                      "test split, or both")
  p.add_argument("--out", default="", help="write the figures to this JSON file")
  args = p.parse_args(argv)
  bits_list = [int(b) for b in args.bits.split(",") if b]

  if not _has_checkpoint(args.workdir):
    _train(args.workdir, args.data)
  exp, state, step, _, _ = experiment.load_workdir_run(args.workdir, "analyze")
  c = exp.config
  model = exp.model
  params = jax.device_get(state.params)
  batch_stats = jax.device_get(state.batch_stats)
  image_size = c.image_size or None
  data_dir = c.data_dir or None

  it = data_lib.train_iterator(c.data, batch_size=args.images, seed=c.seed, start_step=0,
                               image_size=image_size, augment=args.augment, data_dir=data_dir,
                               validation=c.eval_split == "validation")
  calib = next(it)
  images, labels = jnp.asarray(calib["image"]), jnp.asarray(calib["label"])

  def loss_fn(p):
    logits, _ = model.apply({"params": p, "batch_stats": batch_stats}, images, train=False)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels))

  t0 = time.perf_counter()
  ht = hessian.hutchinson_traces(loss_fn, params, tol=args.tol, min_probes=args.min_probes,
                                 max_probes=args.max_probes, seed=args.seed)
  trace_seconds = time.perf_counter() - t0
  omega = hessian.quant_sensitivity(ht, params, bits_list)

  def apply_fn(p, x):
    return model.apply({"params": p, "batch_stats": batch_stats}, x, train=False)[0]

  t0 = time.perf_counter()
  gn = hessian.gauss_newton_traces(apply_fn, params, images)
  gn_seconds = time.perf_counter() - t0
  omega_gn = hessian.quant_sensitivity(gn, params, bits_list)
  quad, quad_seconds = {}, 0.0
  if not args.no_quadratic:
    t0 = time.perf_counter()
    quad = hessian.quadratic_sensitivity(loss_fn, params, bits_list[:1])
    quad_seconds = time.perf_counter() - t0

  held_out = {"validation": exp.info.eval_split, "test": exp.info.test_split}
  batches = {name: list(data_lib.eval_iterator(c.data, batch_size=c.eval_batch_size,
                                               split=split, image_size=image_size,
                                               data_dir=data_dir))
             for name, split in held_out.items()}
  if exp.info.eval_split == exp.info.test_split:   # a run evaluated on its test split
    del batches["test"]
  choices = {"validation": ["validation"], "test": ["test"] if "test" in batches else [],
             "both": list(batches)}
  if not choices[args.drop_split]:
    raise SystemExit(f"--drop_split={args.drop_split}: the run {args.workdir} evaluates on its "
                     "test split (eval_split='test'); use --drop_split=validation")

  @jax.jit
  def sums(p, batch):
    logits, _ = model.apply({"params": p, "batch_stats": batch_stats}, batch["image"],
                            train=False)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         batch["label"])
    m = batch["mask"]
    return (jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * m), jnp.sum(ce * m),
            jnp.sum(m))

  def evaluate_all(p) -> dict:
    """{choice: (accuracy, mean cross-entropy, images)} for each --drop_split choice."""
    tot = {name: np.zeros(3) for name in batches}
    for name, bs in batches.items():
      for b in bs:
        tot[name] += np.asarray(jax.device_get(sums(p, b)), np.float64)
    out = {}
    for choice, names in choices.items():
      if names:
        t = sum(tot[n] for n in names)
        out[choice] = (t[0] / t[2], t[1] / t[2], int(t[2]))
    return out

  base_all = evaluate_all(params)
  base_acc, base_loss, n_val = base_all[args.drop_split]
  train_loss = jax.jit(loss_fn)
  base_train_loss = float(train_loss(params))
  paths = list(ht.traces)
  flat = dict(zip(transforms.leaf_paths(params), jax.tree.leaves(params)))
  rows = []
  t1 = time.perf_counter()
  for path in paths:
    row = {"layer": path, "params": ht.sizes[path], "trace": ht.traces[path],
           "trace_stderr": ht.stderr[path], "gn_trace": gn.traces[path]}
    for b in bits_list:
      wq = hessian.ptq_weight(flat[path], b, name=path)
      trial = transforms.map_with_path(
          lambda name, w, path=path, wq=wq: wq if name == path else w, params)
      acc_all = evaluate_all(trial)
      acc, loss, _ = acc_all[args.drop_split]
      for choice, (a, _, _) in acc_all.items():
        row[f"drop{b}_{choice}"] = base_all[choice][0] - a
      row[f"omega{b}"] = omega[path][b]
      row[f"omega_gn{b}"] = omega_gn[path][b]
      if b in quad.get(path, {}):
        row[f"quadratic{b}"] = quad[path][b]
      row[f"accuracy{b}"] = acc
      row[f"drop{b}"] = base_acc - acc
      row[f"loss_increase{b}"] = loss - base_loss
      row[f"train_loss_increase{b}"] = float(train_loss(trial)) - base_train_loss
    rows.append(row)
  drops_seconds = time.perf_counter() - t1

  tr = [r["trace"] for r in rows]
  out = {
      "workdir": args.workdir, "step": step, "model": c.model, "data": c.data,
      "device": f"{jax.devices()[0].platform} ({os.cpu_count()} cores)",
      "images": int(images.shape[0]), "augment": args.augment, "bits": bits_list, "tol": args.tol,
      "min_probes": args.min_probes, "max_probes": args.max_probes, "seed": args.seed,
      "layers": len(rows), "probes": ht.probes, "converged": ht.converged,
      "trace_seconds": trace_seconds, "drops_seconds": drops_seconds,
      "quadratic_seconds": quad_seconds, "gn_trace_seconds": gn_seconds,
      "max_rel_stderr": max(ht.stderr[q] / abs(ht.traces[q]) for q in paths),
      "drop_split": args.drop_split, "val_examples": n_val, "float_val_accuracy": base_acc,
      "float_val_loss": base_loss,
      "float_trace_images_loss": base_train_loss,
  }
  for b in bits_list:
    dr = [r[f"drop{b}"] for r in rows]
    li = [r[f"loss_increase{b}"] for r in rows]
    om = [r[f"omega{b}"] for r in rows]
    out[f"spearman_trace_drop{b}"] = _spearman(tr, dr)
    out[f"spearman_omega_drop{b}"] = _spearman(om, dr)
    out[f"spearman_trace_loss{b}"] = _spearman(tr, li)
    out[f"spearman_omega_loss{b}"] = _spearman(om, li)
    gt, og = [r["gn_trace"] for r in rows], [r[f"omega_gn{b}"] for r in rows]
    out[f"spearman_gn_trace_drop{b}"] = _spearman(gt, dr)
    out[f"spearman_omega_gn_drop{b}"] = _spearman(og, dr)
    out[f"spearman_gn_trace_loss{b}"] = _spearman(gt, li)
    out[f"spearman_omega_gn_loss{b}"] = _spearman(og, li)
    out[f"spearman_omega_train_loss{b}"] = _spearman(om, [r[f"train_loss_increase{b}"]
                                                          for r in rows])
    if quad and b == bits_list[0]:
      qd = [r[f"quadratic{b}"] for r in rows]
      out[f"spearman_quadratic_drop{b}"] = _spearman(qd, dr)
      out[f"spearman_quadratic_loss{b}"] = _spearman(qd, li)
      out[f"spearman_quadratic_train_loss{b}"] = _spearman(
          qd, [r[f"train_loss_increase{b}"] for r in rows])
  b0 = bits_list[0]
  by_split = {}
  for choice, (_, _, n) in base_all.items():
    dr = [r[f"drop{b0}_{choice}"] for r in rows]
    est = {"trace": tr, "omega": [r[f"omega{b0}"] for r in rows],
           "gn_trace": [r["gn_trace"] for r in rows],
           "omega_gn": [r[f"omega_gn{b0}"] for r in rows]}
    if quad:
      est["quadratic"] = [r[f"quadratic{b0}"] for r in rows]
    by_split[choice] = {"images": n, "float_accuracy": base_all[choice][0],
                        **{k: _spearman(v, dr) for k, v in est.items()}}
  out[f"spearman_drop{b0}_by_split"] = by_split
  out["rows"] = rows
  print(f"{c.model} on {c.data} (step {step}), {out['device']}: traces of {len(rows)} layers "
        f"on {out['images']} training images")
  print(f"{'layer':36s} {'params':>6s} {'trace':>7s} {'+-se':>6s} {'omega' + str(b0):>9s} "
        f"{'GN trace':>8s} {'val acc':>7s} {'drop':>6s} {'dloss':>7s}   (one layer at {b0} bits)")
  for r in rows:
    print(f"{r['layer']:36s} {r['params']:6d} {r['trace']:7.3f} {r['trace_stderr']:6.2f} "
          f"{r[f'omega{b0}']:9.3g} {r['gn_trace']:8.3f} {100 * r[f'accuracy{b0}']:6.2f}% "
          f"{100 * r[f'drop{b0}']:5.2f}% {r[f'loss_increase{b0}']:7.4f}")
  print(f"float accuracy on the drops' images ({args.drop_split}) {100 * base_acc:.2f}% "
        f"({n_val} images), loss {base_loss:.4f}")
  print(f"trace time {trace_seconds:.1f} s ({ht.probes} probes, converged={ht.converged}, "
        f"tol {args.tol}, max relative se {out['max_rel_stderr']:.3f}); exact Gauss-Newton "
        f"traces {gn_seconds:.1f} s; one-layer evaluations {drops_seconds:.1f} s")
  for b in bits_list:
    print(f"{b} bits: Spearman vs accuracy drop: trace {out[f'spearman_trace_drop{b}']:.3f}, "
          f"omega {out[f'spearman_omega_drop{b}']:.3f}; vs loss increase: trace "
          f"{out[f'spearman_trace_loss{b}']:.3f}, omega {out[f'spearman_omega_loss{b}']:.3f}; "
          f"omega vs the trace images' loss increase {out[f'spearman_omega_train_loss{b}']:.3f}")
    print(f"{b} bits, exact Gauss-Newton traces: Spearman vs accuracy drop: trace "
          f"{out[f'spearman_gn_trace_drop{b}']:.3f}, omega "
          f"{out[f'spearman_omega_gn_drop{b}']:.3f}; vs loss increase: trace "
          f"{out[f'spearman_gn_trace_loss{b}']:.3f}, omega "
          f"{out[f'spearman_omega_gn_loss{b}']:.3f}")
    if f"spearman_quadratic_drop{b}" in out:
      print(f"{b} bits, exact 1/2 dW^T H dW ({quad_seconds:.1f} s, one HVP per layer): Spearman "
            f"vs accuracy drop {out[f'spearman_quadratic_drop{b}']:.3f}, vs loss increase "
            f"{out[f'spearman_quadratic_loss{b}']:.3f}, vs the trace images' loss increase "
            f"{out[f'spearman_quadratic_train_loss{b}']:.3f}")
  print(f"{b0} bits, Spearman vs the accuracy drop on each held-out split:")
  for choice, v in by_split.items():
    print(f"  {choice:10s} ({v['images']} images, float {100 * v['float_accuracy']:.2f}%): "
          + ", ".join(f"{k} {v[k]:.3f}" for k in v if k not in ("images", "float_accuracy")))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)
    print(f"wrote {args.out}")
  return out


if __name__ == "__main__":
  main()
