r"""Checkpoint analysis: per-layer tables, sizes, MACs by precision, plots (`--mode=analyze`).

  python launch.py --mode=analyze --workdir=DIR [--analyze_compare=OTHER_DIR]

`analyze(workdir)` reads the run's config from `DIR/config.json`, restores its newest readable
checkpoint (`checkpoint.restore_latest_valid`: a truncated or corrupted latest checkpoint is passed
over for the previous one, and the report says so), and writes into `DIR/analysis/`:

  report.md         the per-layer table, the totals and the re-evaluated test accuracy
  layers.json/.csv  the same rows, every figure exact
  weights.png       a histogram of every layer's effective weights (one small panel each)
  sparsity.png      per-layer sparsity: all zeros, and zero filters / input channels
  bits.png          per-layer weight and activation bit-widths

and prints the table on the terminal. One row per weight tensor of 2 or more dimensions (a conv
or dense kernel, named by its module path: `stage1_block0/conv1`), its bias counted with it; the
remaining params (BatchNorm, activation-quantizer params) and what the export stores beside the
layers (BatchNorm statistics) make the row `other`, so the columns add up to the totals.

Where each figure comes from
----------------------------

* weights `W`: the effective weights the forward pass sees, `transform.apply(params, state)`
  (pruned weights are 0, quantized ones on their grid, binary ones +-1).
* `sparsity` = #{W == 0} / |W|; `mask_sparsity` = 1 - mean(mask) from the pruning state's
  masks, where the run prunes. `distinct`: the number of distinct values of W;
  `distinct_per_filter`: its maximum over output channels (a per-channel quantizer has
  2^bits levels per channel, not per tensor).
* `bits` (weight bits): what the method stores per weight, read from the transform's export
  artifact: the code width of a quantized leaf (`quantize.pack_qtensor`, so `bits_by_path` is
  respected), 1 for a binarized leaf, log2(K) / d for a product-quantized one, the dtype's
  width (32) for a float one (pruned or not).
* `abits` (input activation bits): the model's activation quantizer, `model_kwargs.num_bits` of
  a BNN (`bnn_*` models) or `model_kwargs.act_quant.bits`, for every convolution but
  `stem_conv` (where `models/common.py` and the BNN blocks quantize); float (32, or 16 under
  `dtype=bfloat16`) elsewhere.
* MACs: per image, from the jaxpr of `model.apply` (`structured.build_graph`'s layers, whose
  total is `structured.count_flops`); MACs the tracer cannot attribute to a kernel (the second
  factor of a low-rank layer) are counted in the `other` row, so the total stays exact. As in
  Larq's model summary, a layer's MACs are counted at the precision max(bits, abits): "1-bit
  MACs" need binary weights *and* binary inputs.
  `binary_mac_share` = 1-bit MACs / all MACs.
* structured sparsity, as Distiller's sparsity summary, on W: `filters` (Distiller's 3D): the
  fraction of output channels whose weights are all 0; `channels` (Ch): of input channels all
  0 across every filter; `rows`: of rows all 0 in W viewed as a (fan_in, fan_out) matrix (an
  input position (kh, kw, c_in) no filter reads; = `channels` for a dense layer); `kernels_2d`
  (2D, convolutions): of the (c_in, c_out) pairs whose kh x kw kernel is all 0.
* `float_bytes` = the params' dtype bytes (4 per float32 param, as results.json);
  `stored_bytes`: what `--mode=export` writes, from `jcompress.artifact.artifact_arrays`,
  grouped by the layer path each array name starts with (until that module exists: the
  transform's own export artifact). `compression_ratio` = float_bytes / stored_bytes.
* `test_accuracy`: the restored state re-evaluated on the test (eval) split.

`--analyze_compare=OTHER` also analyzes the run in OTHER (read only) and writes
`DIR/analysis/compare_<name of OTHER>.md` (and `.json`): per layer present in both, params,
bits, sparsity and stored bytes side by side with their differences (OTHER - DIR); the layers
only one side has; both test accuracies, and the agreement of their predictions: the fraction
of test examples on which the two argmaxes are equal.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from jcompress import artifact as artifact_lib
from jcompress import binary as binarize
from jcompress import data as data_lib
from jcompress import experiment
from jcompress import metrics as metrics_lib
from jcompress import pq as pq_lib
from jcompress import prune
from jcompress import quantize
from jcompress import state as state_lib
from jcompress import structured
from jcompress import transforms

PyTree = Any

ANALYSIS_DIR = "analysis"

#: Columns of layers.csv, in order.
CSV_COLUMNS = ("layer", "kind", "shape", "params", "methods", "bits", "abits", "sparsity",
               "mask_sparsity", "distinct", "distinct_per_filter", "float_bytes", "stored_bytes",
               "macs", "mac_bits", "rows", "channels", "kernels_2d", "filters")


# ----------------------------------------------------------------------------- loading


@dataclasses.dataclass
class Run:
  """A run's experiment and the state of its newest readable checkpoint (host arrays)."""
  workdir: str
  exp: experiment.Experiment
  state: state_lib.TrainState
  step: int
  latest_step: int
  skipped: list          # "step N: reason" of newer checkpoints that could not be restored
  results: dict          # DIR/results.json, {} if the run has none


def load_run(workdir: str) -> Run:
  """The run in `workdir` (config from its config.json), restored from its newest readable
  checkpoint. WorkdirError when `workdir` holds no run or no checkpoint that restores."""
  exp, state, step, latest, skipped = experiment.load_workdir_run(workdir, "analyze")
  results = {}
  path = os.path.join(workdir, "results.json")
  if os.path.exists(path):
    try:
      with open(path) as f:
        results = json.load(f)
    except (OSError, json.JSONDecodeError):
      results = {}
  return Run(workdir, exp, jax.device_get(state), step, latest, list(skipped), results)


# ----------------------------------------------------------------------------- sources


def _packed_kind(x) -> str | None:
  """The method whose export wrote leaf `x`, or None for a stored-as-is array."""
  if quantize._is_packed(x):  # noqa: SLF001
    return "quant"
  if pq_lib.is_pq(x):
    return "pq"
  if prune.is_sparse(x):
    return "prune"
  if binarize._is_packed(x):  # noqa: SLF001
    return "binary"
  return None


def _is_artifact_leaf(x) -> bool:
  return _packed_kind(x) is not None


def _artifacts(exp: experiment.Experiment, state: state_lib.TrainState) -> list[dict]:
  """The transform's export artifacts as a list (a chain gives one per method, in order)."""
  out = jax.device_get(exp.transform.export(state.params, state.compression))
  return list(out) if isinstance(out, (list, tuple)) else [out]


def _artifact_entries(artifacts: list[dict]) -> list[dict[str, Any]]:
  """Per artifact: {leaf path: the packed entry} for the leaves a method encoded."""
  out = []
  for art in artifacts:
    tree = art.get("params", art) if isinstance(art, dict) else art
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_artifact_leaf)[0]
    out.append({transforms.path_str(p): x for p, x in flat if _is_artifact_leaf(x)})
  return out


def weight_bits(artifacts: list[dict], params: PyTree) -> dict[str, tuple[float, list[str]]]:
  """{leaf path: (stored bits per weight, [methods])} for every >= 2-D param leaf.

  The last method in the chain that changes a leaf's number format sets its bits (quantized:
  the code width; binary: 1; PQ: log2(K) / d); pruning alone keeps the float width.
  """
  entries = _artifact_entries(artifacts)
  out = {}
  for path, w in zip(transforms.leaf_paths(params), jax.tree.leaves(params)):
    if np.ndim(w) < 2:
      continue
    bits = float(np.dtype(w.dtype).itemsize * 8)
    methods = []
    for per in entries:
      x = per.get(path)
      if x is None:
        continue
      kind = _packed_kind(x)
      if kind == "quant":
        bits = float(x["bits"])
        methods.append(f"quant:{x['kind']}")
      elif kind == "binary":
        bits = 1.0
        methods.append("binary")
      elif kind == "pq":
        bits = float(x.bits) / x.subvector
        methods.append("pq")
      elif kind == "prune":
        methods.append("prune")
    out[path] = (bits, methods)
  return out


def prune_masks(compression: PyTree, params: PyTree) -> dict[str, np.ndarray]:
  """{leaf path: bool mask} of the pruning state(s) in `compression` (selected leaves only:
  the masks of unselected leaves are scalar True)."""
  states = compression if isinstance(compression, (tuple, list)) else (compression,)
  out: dict[str, np.ndarray] = {}
  for s in states:
    if isinstance(s, dict) and "masks" in s:
      masks = s["masks"]
      try:
        flat = dict(zip(transforms.leaf_paths(masks), jax.tree.leaves(masks)))
      except Exception:  # noqa: BLE001
        continue
      for path, w in zip(transforms.leaf_paths(params), jax.tree.leaves(params)):
        m = flat.get(path)
        if m is not None and np.shape(m) == np.shape(w):
          out[path] = np.asarray(m, bool) & out.get(path, True)
  return out


def stored_arrays(exp: experiment.Experiment, state: state_lib.TrainState,
                  artifacts: list[dict] | None = None) -> tuple[dict[str, np.ndarray], str, int]:
  """({array name: array}, source, manifest bytes): what `--mode=export` writes, from
  `jcompress.artifact.artifact_arrays(exp, state)` (names start with the param path they belong
  to). `artifacts` is accepted for callers that computed the transform's export already."""
  del artifacts
  arrays, manifest = artifact_lib.artifact_arrays(exp, state)
  return ({str(k): np.asarray(v) for k, v in arrays.items()},
          "jcompress.artifact.artifact_arrays", len(artifact_lib.manifest_bytes(manifest)))


def activation_bits(config, layer: str, kind: str) -> int:
  """Bits of a layer's input activations (module docstring: `abits`)."""
  float_bits = 16 if config.get("dtype", "float32") == "bfloat16" else 32
  if kind not in ("conv", "depthwise", "other") or layer.split("/")[-1] == "stem_conv":
    return float_bits
  kwargs = config.get("model_kwargs", {}) or {}
  if str(config.model).startswith("bnn_"):
    return int(kwargs.get("num_bits", 1))
  spec = kwargs.get("act_quant")
  if spec and dict(spec).get("kind", "none") != "none":
    return int(dict(spec).get("bits", float_bits))
  return float_bits


def layer_macs(exp: experiment.Experiment, params: PyTree,
               batch_stats: PyTree) -> tuple[dict[str, tuple[str, int]], int]:
  """({kernel leaf path: (kind, MACs per image)}, total MACs per image), from the jaxpr of the
  model (`structured.build_graph`; the total is `structured.count_flops`)."""
  shape = (1, *exp.info.image_shape)
  total = structured.count_flops(exp.model, shape, params, batch_stats)
  try:
    graph = structured.build_graph(exp.model, params, batch_stats, shape)
  except Exception as e:  # noqa: BLE001  (a model the channel tracer cannot follow)
    logging.warning("per-layer MACs unavailable (%s: %s); only the total is reported",
                    type(e).__name__, e)
    return {}, total
  return {"/".join(layer.leaf[1]): (layer.kind, int(layer.macs()))
          for layer in graph.layers.values()}, total


def structured_sparsity(w: np.ndarray) -> dict[str, float | None]:
  """Distiller-style structured sparsity of a kernel (module docstring)."""
  z = np.asarray(w) == 0
  cout = z.shape[-1]
  out = {
      "filters": float(np.mean(z.reshape(-1, cout).all(axis=0))),
      "channels": float(np.mean(np.moveaxis(z, -2, 0).reshape(z.shape[-2], -1).all(axis=1))),
      "rows": float(np.mean(z.reshape(-1, cout).all(axis=1))),
      "kernels_2d": None,
  }
  if z.ndim >= 3:
    out["kernels_2d"] = float(np.mean(z.reshape(-1, z.shape[-2], cout).all(axis=0)))
  return out


def distinct_values(w: np.ndarray) -> tuple[int, int]:
  """(distinct values of w, their maximum count within one output channel)."""
  w = np.asarray(w)
  cols = w.reshape(-1, w.shape[-1])
  per = max(int(np.unique(cols[:, j]).size) for j in range(cols.shape[1]))
  return int(np.unique(w).size), per


# ----------------------------------------------------------------------------- the table


def _layer_name(path: str) -> str:
  return path[: -len("/kernel")] if path.endswith("/kernel") else path


def _is_layer(row: dict) -> bool:
  """A row of a weight tensor (not `other` nor `manifest`)."""
  return row["layer"] not in ("other", "manifest")


def _owner(name: str, layers: list[str]) -> str:
  """The longest layer name that `name` starts with (as a path prefix), or "other"."""
  best = "other"
  for layer in layers:
    if (name == layer or name.startswith(layer + "/")) and (best == "other"
                                                             or len(layer) > len(best)):
      best = layer
  return best


def analyze_state(run: Run) -> tuple[list[dict], dict]:
  """(rows, totals) of a run's restored state (module docstring, "Where each figure comes
  from"). Rows: one per >= 2-D param leaf, then `other`."""
  exp, state = run.exp, run.state
  params = jax.device_get(state.params)
  eff = jax.device_get(jax.jit(exp.transform.apply)(state.params, state.compression))
  artifacts = _artifacts(exp, state)
  bits = weight_bits(artifacts, params)
  masks = prune_masks(state.compression, params)
  arrays, stored_source, manifest_nbytes = stored_arrays(exp, state, artifacts)
  macs, total_macs = layer_macs(exp, params, state.batch_stats)
  paths = transforms.leaf_paths(params)
  latent = dict(zip(paths, jax.tree.leaves(params)))
  effective = dict(zip(transforms.leaf_paths(eff), jax.tree.leaves(eff)))
  # Rows in the order the model runs its layers; a kernel the tracer did not attribute MACs
  # to (the second factor of a low-rank layer) right after its module's first one.
  order = {p: i for i, p in enumerate(macs)}
  module_order: dict[str, int] = {}
  for p, i in order.items():
    module_order.setdefault(p.rsplit("/", 1)[0], i)
  kernel_paths = sorted(
      (p for p in paths if np.ndim(latent[p]) >= 2),
      key=lambda p: (order.get(p, module_order.get(p.rsplit("/", 1)[0], len(order))),
                     p not in order, p))
  names = [_layer_name(p) for p in kernel_paths]
  float_bits = 16 if exp.config.get("dtype", "float32") == "bfloat16" else 32

  # params and stored bytes of each row: leaves and arrays grouped by layer prefix
  n_params = {n: 0 for n in names + ["other"]}
  f_bytes = {n: 0 for n in names + ["other"]}
  for p, w in latent.items():
    if p in kernel_paths:
      owner = _layer_name(p)
    elif p.endswith("/bias") and p[: -len("/bias")] in n_params:
      owner = p[: -len("/bias")]   # a layer's bias counts with it
    else:
      owner = "other"
    n_params[owner] += int(np.size(w))
    f_bytes[owner] += int(np.size(w)) * np.dtype(w.dtype).itemsize
  s_bytes = {n: 0 for n in names + ["other"]}
  for name, a in arrays.items():
    s_bytes[_owner(name, names)] += int(a.nbytes)

  rows = []
  for path, name in zip(kernel_paths, names):
    w = np.asarray(effective[path])
    b, methods = bits[path]
    kind, m = macs.get(path, ("dense" if w.ndim == 2 else "conv", None))
    abits = activation_bits(exp.config, name, kind)
    distinct, per_filter = distinct_values(w)
    row = {
        "layer": name, "kind": kind, "shape": list(w.shape), "params": n_params[name],
        "methods": "+".join(methods) or "float", "bits": b, "abits": abits,
        "sparsity": float(np.mean(w == 0)),
        "mask_sparsity": (float(1.0 - masks[path].mean()) if path in masks else None),
        "distinct": distinct, "distinct_per_filter": per_filter,
        "float_bytes": f_bytes[name], "stored_bytes": s_bytes[name],
        "macs": m, "mac_bits": (max(int(math.ceil(b)), abits) if m is not None else None),
        **structured_sparsity(w),
    }
    rows.append(row)
  other_macs = total_macs - sum(r["macs"] or 0 for r in rows)
  rows.append({"layer": "other", "kind": "bn/bias/other", "shape": [],
               "params": n_params["other"], "methods": "float", "bits": float(float_bits),
               "abits": None, "sparsity": None, "mask_sparsity": None, "distinct": None,
               "distinct_per_filter": None, "float_bytes": f_bytes["other"],
               "stored_bytes": s_bytes["other"], "macs": other_macs or None,
               "mac_bits": float_bits if other_macs else None, "rows": None, "channels": None,
               "kernels_2d": None, "filters": None})

  if manifest_nbytes:
    rows.append({**{k: None for k in CSV_COLUMNS}, "layer": "manifest", "kind": "metadata",
                 "shape": [], "params": 0, "methods": "", "float_bytes": 0,
                 "stored_bytes": manifest_nbytes})
  by_bits: dict[str, int] = {}
  for r in rows:
    if r["macs"]:
      key = str(r["mac_bits"])
      by_bits[key] = by_bits.get(key, 0) + int(r["macs"])
  kernels = [np.asarray(effective[p]) for p in kernel_paths]
  zeros = sum(int(np.sum(k == 0)) for k in kernels)
  size = sum(k.size for k in kernels)
  float_total = sum(f_bytes.values())
  stored_total = sum(s_bytes.values()) + manifest_nbytes
  totals = {
      "params": sum(n_params.values()),
      "float_bytes": float_total,
      "stored_bytes": stored_total,
      "stored_bytes_source": stored_source,
      "manifest_bytes": manifest_nbytes,
      "compression_ratio": float_total / max(stored_total, 1),
      "macs": int(total_macs),
      "macs_by_bits": dict(sorted(by_bits.items(), key=lambda kv: int(kv[0]))),
      "binary_mac_share": by_bits.get("1", 0) / max(total_macs, 1),
      "kernel_sparsity": zeros / max(size, 1),
      "layers": len(kernel_paths),
  }
  return rows, totals


# ----------------------------------------------------------------------------- predictions


def predictions(run: Run) -> tuple[np.ndarray, np.ndarray]:
  """(argmax predictions, labels) of the restored state on the test (eval) split."""
  exp = run.exp
  c = exp.config
  eff = jax.jit(exp.transform.apply)(run.state.params, run.state.compression)
  variables = {"params": eff, "batch_stats": run.state.batch_stats}

  @jax.jit
  def predict(variables, images):
    logits, _ = exp.model.apply(variables, images, train=False)
    return jnp.argmax(logits, -1)

  preds, labels = [], []
  for batch in data_lib.eval_iterator(c.data, batch_size=c.eval_batch_size,
                                      image_size=c.image_size or None,
                                      data_dir=c.data_dir or None):
    keep = np.asarray(batch["mask"]) > 0
    preds.append(np.asarray(predict(variables, batch["image"]))[keep])
    labels.append(np.asarray(batch["label"])[keep])
  return np.concatenate(preds), np.concatenate(labels)


# ----------------------------------------------------------------------------- formatting


def _h(n) -> str:
  """A count in K / M / G (base 1000 for counts, as the table's byte columns too)."""
  if n is None:
    return "-"
  n = float(n)
  for unit, f in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= f:
      return f"{n / f:.3g}{unit}"
  return f"{n:.0f}"


def _pct(x) -> str:
  return "-" if x is None else f"{100 * x:.1f}%"


def _bits(b) -> str:
  if b is None:
    return "-"
  return f"{b:g}" if float(b) == int(b) else f"{b:.3g}"


def table_lines(rows: list[dict], totals: dict) -> tuple[list[str], list[list[str]]]:
  """(header, cells) of the per-layer table, with a total row."""
  precisions = list(totals["macs_by_bits"])
  header = (["layer", "kind", "shape", "params", "bits", "abits", "sparsity", "distinct",
             "/filter", "float B", "stored B", "MACs"] + [f"{p}-bit MACs" for p in precisions]
            + ["rows", "chan", "filt"])
  cells = []
  for r in rows:
    per = [(_h(r["macs"]) if r["macs"] and str(r["mac_bits"]) == p else "-") for p in precisions]
    cells.append([r["layer"], r["kind"], "x".join(map(str, r["shape"])) or "-", _h(r["params"]),
                  _bits(r["bits"]), _bits(r["abits"]), _pct(r["sparsity"]),
                  _h(r["distinct"]), _h(r["distinct_per_filter"]), _h(r["float_bytes"]),
                  _h(r["stored_bytes"]), _h(r["macs"])]
                 + per + [_pct(r["rows"]), _pct(r["channels"]), _pct(r["filters"])])
  cells.append(["total", "", "", _h(totals["params"]), "", "", _pct(totals["kernel_sparsity"]),
                "", "", _h(totals["float_bytes"]), _h(totals["stored_bytes"]), _h(totals["macs"])]
               + [_h(totals["macs_by_bits"][p]) for p in precisions] + ["", "", ""])
  return header, cells


def text_table(header: list[str], cells: list[list[str]]) -> str:
  """Aligned plain-text columns (the first left-aligned, the others right-aligned)."""
  widths = [max(len(str(x)) for x in col) for col in zip(header, *cells)]

  def line(row):
    return "  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w)
                     for i, (x, w) in enumerate(zip(row, widths)))

  sep = "  ".join("-" * w for w in widths)
  return "\n".join([line(header), sep] + [line(r) for r in cells[:-1]] + [sep, line(cells[-1])])


def markdown_table(header: list[str], cells: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
  for r in cells:
    lines.append("| " + " | ".join(str(x) for x in r) + " |")
  return "\n".join(lines)


def _short(reason: str) -> str:
  """A restore error without TensorStore's repr of its spec."""
  return reason.split(" See full TensorStore details")[0].strip()


def _restore_note(run: Run) -> str | None:
  if not run.skipped:
    return None
  return (f"the latest checkpoint (step {run.latest_step}) could not be restored; analyzed "
          f"step {run.step} instead ({'; '.join(_short(r) for r in run.skipped)})")


def summary_lines(run: Run, totals: dict, accuracy: float) -> list[str]:
  c = run.exp.config
  lines = [
      f"run: {run.workdir} ({c.model} on {c.data}), checkpoint step {run.step}",
      f"params {totals['params']:,}; float {totals['float_bytes']:,} B; stored "
      f"{totals['stored_bytes']:,} B ({totals['stored_bytes_source']}); compression ratio "
      f"{totals['compression_ratio']:.2f}x",
      f"MACs per image {totals['macs']:,}: " + ", ".join(
          f"{p}-bit {n:,} ({100 * n / max(totals['macs'], 1):.1f}%)"
          for p, n in totals["macs_by_bits"].items())
      + f"; binary MAC share {100 * totals['binary_mac_share']:.1f}%",
      f"kernel sparsity {100 * totals['kernel_sparsity']:.2f}% over {totals['layers']} layers",
      f"test accuracy (re-evaluated) {100 * accuracy:.2f}%"
      + (f"; results.json: {100 * run.results['test_accuracy']:.2f}%"
         if "test_accuracy" in run.results else ""),
  ]
  note = _restore_note(run)
  if note:
    lines.insert(1, "WARNING: " + note)
  return lines


# ----------------------------------------------------------------------------- plots


def _plt():
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  return plt


def plot_weights(run: Run, rows: list[dict], path: str) -> None:
  """A grid of histograms, one panel per layer, of the non-zero effective weights (the zeros'
  share in the panel title); a layer of few distinct values gets one bar per value."""
  plt = _plt()
  eff = jax.device_get(jax.jit(run.exp.transform.apply)(run.state.params,
                                                        run.state.compression))
  effective = dict(zip(transforms.leaf_paths(eff), jax.tree.leaves(eff)))
  layers = [r for r in rows if _is_layer(r)]
  ncols = min(4, max(len(layers), 1))
  nrows = max(math.ceil(len(layers) / ncols), 1)
  fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 2.5 * nrows + 0.4),
                           squeeze=False, layout="constrained")
  for ax in axes.flat[len(layers):]:
    ax.axis("off")
  for ax, r in zip(axes.flat, layers):
    key = next(p for p in (r["layer"] + "/kernel", r["layer"]) if p in effective)
    w = np.asarray(effective[key], np.float64).reshape(-1)
    nz = w[w != 0]
    if nz.size and r["bits"] < 16 and r["distinct"] <= 64:   # coded: one bar per value
      vals, counts = np.unique(nz, return_counts=True)
      width = (np.min(np.diff(vals)) * 0.5) if vals.size > 1 else max(abs(vals[0]) * 0.1, 1e-3)
      ax.bar(vals, counts, width=width, color="tab:blue")
    elif nz.size:
      ax.hist(nz, bins=60, color="tab:blue")
    ax.set_title(f"{r['layer']}\n{_bits(r['bits'])} bit, {r['distinct']} values, "
                 f"{_pct(r['sparsity'])} zero", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.yaxis.get_offset_text().set_fontsize(6)
  fig.suptitle(f"Effective weights of {os.path.basename(os.path.abspath(run.workdir))} "
               f"(step {run.step}; zeros left out)", fontsize=9)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _bar_axes(plt, n):
  fig, ax = plt.subplots(figsize=(max(7.0, 0.42 * n + 3.5), 4.6))
  return fig, ax


def _label_layers(ax, names):
  ax.set_xticks(np.arange(len(names)))
  ax.set_xticklabels(names, rotation=60, ha="right", rotation_mode="anchor", fontsize=7)
  ax.set_xlim(-0.6, len(names) - 0.4)


def _finish_layer_bars(plt, fig, ax, names, ylabel: str, title: str, path: str) -> None:
  """Layer names under the bars, labels, legend outside the axes; saves and closes `fig`."""
  _label_layers(ax, names)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)


def plot_sparsity(rows: list[dict], path: str, title: str) -> None:
  """Per-layer bars: the zeros' share, and the share of all-zero filters and input channels."""
  plt = _plt()
  layers = [r for r in rows if _is_layer(r)]
  names = [r["layer"] for r in layers]
  x = np.arange(len(layers))
  fig, ax = _bar_axes(plt, len(layers))
  series = [("sparsity", "all weights", "tab:blue"), ("filters", "zero filters", "tab:orange"),
            ("channels", "zero input channels", "tab:green")]
  width = 0.8 / len(series)
  for i, (key, label, color) in enumerate(series):
    ax.bar(x + (i - 1) * width, [100 * (r[key] or 0) for r in layers], width, label=label,
           color=color)
  ax.set_ylim(0, 105)
  _finish_layer_bars(plt, fig, ax, names, "zeros (%)", title, path)


def plot_bits(rows: list[dict], path: str, title: str) -> None:
  """Per-layer bars of weight bits and input activation bits (log2 axis)."""
  plt = _plt()
  layers = [r for r in rows if _is_layer(r)]
  names = [r["layer"] for r in layers]
  x = np.arange(len(layers))
  fig, ax = _bar_axes(plt, len(layers))
  wb = [r["bits"] for r in layers]
  ab = [r["abits"] for r in layers]
  ax.bar(x - 0.2, wb, 0.4, label="weights", color="tab:blue")
  ax.bar(x + 0.2, ab, 0.4, label="input activations", color="tab:gray")
  for xi, b in zip(x, wb):
    ax.text(xi - 0.2, b * 1.08, _bits(b), ha="center", va="bottom", fontsize=6)
  ax.set_yscale("log", base=2)
  ax.set_yticks([1, 2, 4, 8, 16, 32])
  ax.set_yticklabels(["1", "2", "4", "8", "16", "32"])
  ax.set_ylim(0.7, 64)
  _finish_layer_bars(plt, fig, ax, names, "bits", title, path)


# ----------------------------------------------------------------------------- outputs


def _write_csv(rows: list[dict], path: str) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(CSV_COLUMNS)
    for r in rows:
      writer.writerow(["x".join(map(str, r["shape"])) if k == "shape" else
                       ("" if r[k] is None else r[k]) for k in CSV_COLUMNS])


def write_report(run: Run, rows: list[dict], totals: dict, accuracy: float,
                 out_dir: str, plots: bool = True) -> dict:
  """report.md, layers.json, layers.csv and (with `plots`) the PNGs in `out_dir`; returns
  their paths."""
  os.makedirs(out_dir, exist_ok=True)
  name = os.path.basename(os.path.abspath(run.workdir))
  files = {"report": os.path.join(out_dir, "report.md"),
           "layers_json": os.path.join(out_dir, "layers.json"),
           "layers_csv": os.path.join(out_dir, "layers.csv"),
           "weights_png": os.path.join(out_dir, "weights.png"),
           "sparsity_png": os.path.join(out_dir, "sparsity.png"),
           "bits_png": os.path.join(out_dir, "bits.png")}
  if plots:
    plot_weights(run, rows, files["weights_png"])
    plot_sparsity(rows, files["sparsity_png"], f"Per-layer sparsity of {name} (step {run.step})")
    plot_bits(rows, files["bits_png"], f"Per-layer bit-widths of {name} (step {run.step})")
  else:
    files = {k: v for k, v in files.items() if not k.endswith("_png")}
  header, cells = table_lines(rows, totals)
  md = [f"# Analysis of {name}", ""]
  md += [f"- {line}" for line in summary_lines(run, totals, accuracy)]
  md += ["", "## Layers", "",
         "Weights are the effective ones (the compression transform applied). bits: stored bits "
         "per weight; abits: input activation bits; MACs per image, at max(bits, abits) "
         "(as Larq's summary); rows / chan / filt: all-zero rows of the (fan_in, fan_out) "
         "matrix, input channels and filters (as Distiller's summary). Sizes in bytes "
         "(K = 1000).", "", markdown_table(header, cells), "",
         *(["## Plots", "", "![weights](weights.png)", "", "![sparsity](sparsity.png)", "",
            "![bits](bits.png)", ""] if plots else [])]
  with open(files["report"], "w") as f:
    f.write("\n".join(md))
  metrics_lib.write_json(files["layers_json"], {"rows": rows, "totals": totals})
  _write_csv(rows, files["layers_csv"])
  return files


def _summary(run: Run, totals: dict, accuracy: float) -> dict:
  out = {"workdir": run.workdir, "step": run.step, "latest_step": run.latest_step,
         "test_accuracy": accuracy, **{k: v for k, v in totals.items()}}
  note = _restore_note(run)
  if note:
    out["fallback"] = note
    out["skipped_checkpoints"] = [_short(r) for r in run.skipped]
  if "test_accuracy" in run.results:
    out["results_test_accuracy"] = run.results["test_accuracy"]
  return out


# ----------------------------------------------------------------------------- compare


def _safe_name(path: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.=-]+", "_", os.path.basename(os.path.abspath(path))) or "other"


def compare_runs(a: Run, rows_a: list[dict], preds_a, b: Run, rows_b: list[dict],
                 preds_b) -> dict:
  """Per-layer differences (b - a) of the layers both runs have, the layers only one has, both
  accuracies and the agreement of their predictions (`preds_*` = (predictions, labels))."""
  by_a = {r["layer"]: r for r in rows_a if _is_layer(r)}
  by_b = {r["layer"]: r for r in rows_b if _is_layer(r)}
  common = [n for n in by_a if n in by_b]
  layers = []
  for n in common:
    ra, rb = by_a[n], by_b[n]
    layers.append({
        "layer": n, "shape_a": ra["shape"], "shape_b": rb["shape"],
        **{f"{k}_{s}": r[k] for k in ("params", "bits", "sparsity", "stored_bytes")
           for s, r in (("a", ra), ("b", rb))},
        "d_params": rb["params"] - ra["params"], "d_bits": rb["bits"] - ra["bits"],
        "d_sparsity": rb["sparsity"] - ra["sparsity"],
        "d_stored_bytes": rb["stored_bytes"] - ra["stored_bytes"],
    })
  (pa, la), (pb, lb) = preds_a, preds_b
  ca, cb = a.exp.config, b.exp.config
  agreement, reason = None, ""
  if (ca.data, tuple(a.exp.info.image_shape)) != (cb.data, tuple(b.exp.info.image_shape)):
    reason = (f"different test sets ({ca.data} {tuple(a.exp.info.image_shape)} and {cb.data} "
              f"{tuple(b.exp.info.image_shape)})")
  elif pa.shape != pb.shape or not np.array_equal(la, lb):
    reason = "the test sets differ in their examples"
  else:
    agreement = float(np.mean(pa == pb))
  return {
      "a": a.workdir, "b": b.workdir, "layers": layers,
      "only_a": [n for n in by_a if n not in by_b], "only_b": [n for n in by_b if n not in by_a],
      "test_accuracy_a": float(np.mean(pa == la)), "test_accuracy_b": float(np.mean(pb == lb)),
      "agreement": agreement, "agreement_examples": int(pa.size) if agreement is not None else 0,
      **({"agreement_unavailable": reason} if reason else {}),
  }


def compare_markdown(cmp: dict, totals_a: dict, totals_b: dict) -> str:
  na, nb = os.path.basename(os.path.abspath(cmp["a"])), os.path.basename(os.path.abspath(cmp["b"]))
  lines = [f"# {na} (A) against {nb} (B)", ""]
  lines.append(f"- test accuracy: A {100 * cmp['test_accuracy_a']:.2f}%, "
               f"B {100 * cmp['test_accuracy_b']:.2f}%")
  if cmp["agreement"] is not None:
    lines.append(f"- prediction agreement (same argmax): {100 * cmp['agreement']:.2f}% of "
                 f"{cmp['agreement_examples']} test examples")
  else:
    lines.append(f"- prediction agreement: unavailable ({cmp['agreement_unavailable']})")
  for key, label in (("params", "params"), ("float_bytes", "float bytes"),
                     ("stored_bytes", "stored bytes"), ("macs", "MACs per image")):
    lines.append(f"- {label}: A {totals_a[key]:,}, B {totals_b[key]:,} "
                 f"(B/A {totals_b[key] / max(totals_a[key], 1):.3f})")
  lines.append(f"- compression ratio: A {totals_a['compression_ratio']:.2f}x, "
               f"B {totals_b['compression_ratio']:.2f}x; binary MAC share: A "
               f"{100 * totals_a['binary_mac_share']:.1f}%, B "
               f"{100 * totals_b['binary_mac_share']:.1f}%")
  lines += ["", "## Layers in both (differences: B - A)", ""]
  header = ["layer", "shape A", "shape B", "params A", "params B", "d params", "bits A",
            "bits B", "d bits", "sparsity A", "sparsity B", "d sparsity", "stored A",
            "stored B", "d stored"]
  cells = []
  for r in cmp["layers"]:
    cells.append([r["layer"], "x".join(map(str, r["shape_a"])), "x".join(map(str, r["shape_b"])),
                  f"{r['params_a']:,}", f"{r['params_b']:,}", f"{r['d_params']:+,}",
                  _bits(r["bits_a"]), _bits(r["bits_b"]), f"{r['d_bits']:+g}",
                  _pct(r["sparsity_a"]), _pct(r["sparsity_b"]),
                  f"{100 * r['d_sparsity']:+.1f}%", f"{r['stored_bytes_a']:,}",
                  f"{r['stored_bytes_b']:,}", f"{r['d_stored_bytes']:+,}"])
  lines.append(markdown_table(header, cells) if cells else "(no layer in common)")
  lines += ["", "## Layers in one run only", "",
            f"- only in A: {', '.join(cmp['only_a']) or '(none)'}",
            f"- only in B: {', '.join(cmp['only_b']) or '(none)'}", ""]
  return "\n".join(lines)


# ----------------------------------------------------------------------------- entry point


def analyze(workdir: str, compare: str | None = None, *, plots: bool = True) -> dict:
  """`--mode=analyze`: the report of `workdir`'s newest readable checkpoint (module
  docstring); with `compare`, also the comparison with the run in that workdir. Prints the
  per-layer table; returns a JSON-able summary (totals, accuracy, output paths). `plots=False`
  leaves the PNGs out (they take seconds per model)."""
  run = load_run(workdir)
  if run.skipped:
    logging.warning("%s", _restore_note(run))
  rows, totals = analyze_state(run)
  preds = predictions(run)
  accuracy = float(np.mean(preds[0] == preds[1]))
  out_dir = os.path.join(workdir, ANALYSIS_DIR)
  files = write_report(run, rows, totals, accuracy, out_dir, plots=plots)
  header, cells = table_lines(rows, totals)
  print("\n".join(summary_lines(run, totals, accuracy)))
  print(text_table(header, cells), flush=True)
  summary = _summary(run, totals, accuracy)
  summary["files"] = files
  if compare:
    other = load_run(compare)
    if other.skipped:
      logging.warning("%s: %s", compare, _restore_note(other))
    rows_b, totals_b = analyze_state(other)
    preds_b = predictions(other)
    cmp = compare_runs(run, rows, preds, other, rows_b, preds_b)
    name = _safe_name(compare)
    md_path = os.path.join(out_dir, f"compare_{name}.md")
    with open(md_path, "w") as f:
      f.write(compare_markdown(cmp, totals, totals_b))
    json_path = os.path.join(out_dir, f"compare_{name}.json")
    metrics_lib.write_json(json_path, {**cmp, "totals_a": totals, "totals_b": totals_b})
    print(f"compared with {compare}: accuracy {100 * cmp['test_accuracy_a']:.2f}% vs "
          f"{100 * cmp['test_accuracy_b']:.2f}%, agreement "
          + (f"{100 * cmp['agreement']:.2f}%" if cmp["agreement"] is not None
             else cmp["agreement_unavailable"]) + f"; {md_path}", flush=True)
    summary["compare"] = {
        "workdir": compare, "step": other.step, "test_accuracy": cmp["test_accuracy_b"],
        "agreement": cmp["agreement"], "common_layers": len(cmp["layers"]),
        "only_here": cmp["only_a"], "only_there": cmp["only_b"],
        "stored_bytes": totals_b["stored_bytes"],
        "compression_ratio": totals_b["compression_ratio"], "files": [md_path, json_path],
        **({"fallback": _restore_note(other)} if other.skipped else {}),
    }
  return summary
