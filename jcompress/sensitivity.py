r"""Per-layer pruning sensitivity: prune one layer at a time and measure the accuracy.

For every prunable layer l (a kernel selected by include/exclude, as `prune.prune_mask_tree`
selects them) and every sparsity s in `sparsities`, the layer alone is magnitude-pruned to
exactly floor(s n_l) zeros, all other layers kept dense, and `eval_fn(params) -> accuracy`
is evaluated:

  acc(l, s) = eval_fn(params with W_l <- W_l * TopK_{n_l - floor(s n_l)}(|W_l|))
  drop(l, s) = acc(dense) - acc(l, s)

`pick_sparsities(table, max_drop)` then gives each layer the largest tested sparsity whose
drop stays <= max_drop (0 if none does), a mapping that `prune.prune_mask_tree(..., scope=
"layerwise")` accepts as `sparsity`. (Single-layer drops do not add up exactly when layers are
pruned together; the picked sparsities are a starting point, to be checked by evaluating.)
"""

from __future__ import annotations

import os
from typing import Any
from typing import Callable
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import prune
from jcompress import transforms
from jcompress.errors import ConfigError

PyTree = Any


def sensitivity(eval_fn: Callable[[PyTree], float],
                params: PyTree,
                sparsities: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98),
                *,
                include: str | Sequence[str] = (r".*",),
                exclude: str | Sequence[str] = transforms.DEFAULT_EXCLUDE,
                out_dir: str | None = None) -> list[dict]:
  """The sensitivity table: one row per (layer, sparsity) (module docstring).

  Rows: {"layer", "sparsity", "accuracy", "drop", "params"} (params: the layer's weights),
  preceded by a row {"layer": "dense", "sparsity": 0.0, "accuracy": acc(dense), "drop": 0}.
  With `out_dir`, also writes `sensitivity.md` (a markdown table: layers by sparsities,
  accuracy in %) and `sensitivity.png` (accuracy vs sparsity, a line per layer). `params`
  is not modified; `eval_fn` should be jit-compiled with params as an argument so that one
  compile serves every evaluation.
  """
  sparsities = [prune._check_sparsity(s, "sparsities") for s in sparsities]  # noqa: SLF001
  if not sparsities:
    raise ConfigError("config key 'sparsities': give at least one sparsity")
  sel = transforms.select(params, include, exclude, kernels_only=True)
  paths = transforms.leaf_paths(params)
  leaves, treedef = jax.tree.flatten(params)
  chosen = [i for i, s in enumerate(jax.tree.leaves(sel)) if s]
  base = float(eval_fn(params))
  rows = [{"layer": "dense", "sparsity": 0.0, "accuracy": base, "drop": 0.0, "params": 0}]
  for i in chosen:
    w = jnp.asarray(leaves[i])
    for s in sparsities:
      k = prune._floor_count(s, w.size)  # noqa: SLF001
      keep = prune._keep_rows(jnp.abs(w).reshape(1, -1), k).reshape(w.shape)  # noqa: SLF001
      trial = list(leaves)
      trial[i] = jnp.where(keep, w, jnp.zeros((), w.dtype))
      acc = float(eval_fn(jax.tree.unflatten(treedef, trial)))
      rows.append({"layer": paths[i], "sparsity": s, "accuracy": acc, "drop": base - acc,
                   "params": int(w.size)})
  if out_dir:
    write_report(rows, out_dir)
  return rows


def pick_sparsities(table: Sequence[dict], max_drop: float) -> dict[str, float]:
  """{layer: the largest tested sparsity s with drop <= max_drop at s and at every smaller
  tested sparsity (0.0 if the smallest already fails)}.

  Requiring the whole prefix to pass keeps a lucky high-sparsity point behind a failing
  lower one from being picked (single-layer curves on small eval sets are noisy).
  """
  if max_drop < 0:
    raise ConfigError(f"config key 'max_drop': must be >= 0, got {max_drop}")
  per_layer: dict[str, list[tuple[float, float]]] = {}
  for row in table:
    if row["layer"] != "dense":
      per_layer.setdefault(row["layer"], []).append((row["sparsity"], row["drop"]))
  out: dict[str, float] = {}
  for layer, points in per_layer.items():
    out[layer] = 0.0
    for s, drop in sorted(points):
      if drop > max_drop:
        break
      out[layer] = s
  return out


def _by_layer(rows):
  layers: dict[str, dict[float, float]] = {}
  for r in rows:
    if r["layer"] != "dense":
      layers.setdefault(r["layer"], {})[r["sparsity"]] = r["accuracy"]
  return layers


def markdown_table(rows: Sequence[dict]) -> str:
  """Accuracy (%) with one row per layer and one column per sparsity."""
  layers = _by_layer(rows)
  sparsities = sorted({s for v in layers.values() for s in v})
  base = next((r["accuracy"] for r in rows if r["layer"] == "dense"), None)
  lines = []
  if base is not None:
    lines.append(f"Dense accuracy: {100 * base:.2f}%\n")
  lines.append("| layer | params | " + " | ".join(f"{s:g}" for s in sparsities) + " |")
  lines.append("|---|---:|" + "---:|" * len(sparsities))
  sizes = {r["layer"]: r["params"] for r in rows}
  for layer, accs in layers.items():
    cells = [f"{100 * accs[s]:.2f}" if s in accs else "" for s in sparsities]
    lines.append(f"| {layer} | {sizes[layer]} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_report(rows: Sequence[dict], out_dir: str) -> tuple[str, str]:
  """Writes `sensitivity.md` and `sensitivity.png` into `out_dir`; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  md = os.path.join(out_dir, "sensitivity.md")
  with open(md, "w") as f:
    f.write(markdown_table(rows))
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, ax = plt.subplots(figsize=(8, 5))
  base = next((r["accuracy"] for r in rows if r["layer"] == "dense"), None)
  for layer, accs in _by_layer(rows).items():
    xs = sorted(accs)
    ax.plot(xs, [100 * accs[x] for x in xs], marker="o", markersize=3, linewidth=1, label=layer)
  if base is not None:
    ax.axhline(100 * base, color="k", linestyle="--", linewidth=1, label="dense")
  ax.set_xlabel("sparsity of the layer alone")
  ax.set_ylabel("accuracy (%)")
  ax.set_title("Per-layer pruning sensitivity (magnitude)")
  ax.legend(fontsize=6, ncol=2)
  fig.tight_layout()
  png = os.path.join(out_dir, "sensitivity.png")
  fig.savefig(png, dpi=120)
  plt.close(fig)
  return md, png


def np_accuracy(logits, labels) -> float:
  """Fraction of argmax(logits) == labels."""
  return float(np.mean(np.argmax(np.asarray(logits), -1) == np.asarray(labels)))
