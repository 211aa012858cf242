r"""Unstructured and N:M weight pruning: masks, schedules, masks in training, sparse storage.

Masks (`prune_mask_tree`) are a pytree of booleans beside the params (True = kept), as in
JaxPruner. A selected leaf (a kernel whose path matches `include` and not `exclude`, see
`transforms.select`; the first conv `stem_conv` and the classifier `head` are excluded by
default, biases and BatchNorm are never selected) is ranked by a score:

  magnitude   s_i = |w_i|
  saliency    s_i = |w_i g_i|        (SNIP, Lee et al. 2019: g = dL/dw at initialisation from
                                      a batch; `criterion="snip"` is the same thing)
  random      s_i ~ U[0, 1)          (from `rng`)

and the lowest-scored weights are removed. Counts are exact and ties deterministic: the
kept weights are the first n - k of the scores sorted in decreasing order by a stable sort,
so between equal scores the lower flat (row-major) index is kept (JaxPruner's top-k).

How many weights each tensor loses (`scope`), for a target sparsity s:

  layerwise  every selected tensor of n weights loses exactly k = floor(s n) (s computed as
             the decimal the float prints as, so floor(0.29 * 100) = 29). `sparsity` may
             also be a mapping {path or regex: s_l} giving each layer its own sparsity
             (unmatched selected layers: 0), e.g. what `sensitivity.pick_sparsities` returns.
  uniform    the same s on every selected tensor (layerwise with a single float).
  global     all selected weights ranked together; exactly floor(s N) of the N selected
             weights are removed. Each tensor's scores are first divided by their mean over
             the tensor's surviving weights, s_i / mean_{j kept} s_j, so every layer enters
             with mean score 1 and the ranking does not depend on each layer's scale (which
             BatchNorm after a conv makes arbitrary).
  erk        Erdos-Renyi-Kernel (Evci et al. 2020, RigL): layer l gets density
             d_l = min(1, eps r_l), r_l = (sum of the kernel's dims / product of its dims)^p
             (p = `erk_power`, 1 by default), with eps solving sum_l d_l n_l = (1 - s) N;
             a layer whose eps r_l exceeds 1 is kept dense and eps is solved again over the
             others, until none exceeds 1. Layer l then loses floor((1 - d_l) n_l), so the
             total misses floor(s N) by less than the number of layers.

N:M sparsity (`n_m=(N, M)`, e.g. 2:4) acts along the input dimension: for an HWIO conv
kernel, each group of M consecutive input channels at a fixed (h, w, out) keeps its N
largest scores; for an (in, out) Dense kernel, each group of M consecutive rows in a column.
The input dimension must be divisible by M. The sparsity is then exactly 1 - N/M.

Schedules (`pruning_schedule`): a list of pruning events (step, target sparsity):

  oneshot    [(begin_step, s_f)]
  gradual    Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3 at
             t = t0, t0 + dt, ..., t0 + n dt = end_step (t0 = begin_step, dt = frequency; the
             end step is an event even when dt does not divide end - begin).
  iterative  the seed's loop (rank, prune, fine-tune `frequency` steps, repeat): `rounds`
             events at t0 + r dt, r = 0..R-1, each pruning the same fraction of the
             surviving weights: s_r = 1 - (1 - s_f)^((r + 1) / R), so the last one hits s_f.

Masks only tighten: weights pruned at an event stay pruned (their scores are set below every
other score before ranking and the new mask is and-ed with the old one). Under N:M, an
event of target s_j < s_f removes floor(s_j / s_f (M - N)) weights of every group.

In training (`pruning`, `transform_from_config` for the `prune` sub-config), the transform's
state holds the masks (so they are checkpointed with the train state):

  apply(params, state)   w * m on the selected leaves (the gradient of a pruned weight is 0)
  update(params, state, t)   at the next due event (t >= its step; `t` may be traced: one
                         compiled step serves every step, via lax.cond) recompute the masks;
                         then set every pruned latent weight to exactly 0, so that momentum or
                         Adam's moments cannot bring it back. With `rewind_step` >= 0 the state
                         keeps a copy of all params taken after `rewind_step` optimizer steps
                         (lottery tickets, Frankle & Carbin 2019; Frankle et al. 2020) and
                         each event resets the surviving weights to it.
  calibrate(params, state, ctx)   once before step 0: SNIP scores |w * g| with g the mean
                         gradient of `ctx.loss_fn` over `ctx.batches`, and the events at step 0
                         (one-shot pruning before training).
  metrics(params, state) {"sparsity": fraction of zeros among the selected weights that the
                         forward pass sees, "target_sparsity": the last event's target}
  export(params, state)  {"params": tree}: each selected tensor as a bitmask (np.packbits,
                         1 bit a weight) plus its non-zero values (float32), or CSR (rows =
                         output channels) where that is smaller; other leaves as float arrays.
                         Runs on the host with numpy (the number of non-zeros is data
                         dependent); `decode_export` / `sparse_decode` invert it.
"""

from __future__ import annotations

import fractions
import functools
import math
import re
from typing import Any
from typing import Mapping
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jcompress import transforms
from jcompress.errors import ConfigError

PyTree = Any

CRITERIA = ("magnitude", "random", "saliency", "snip")
SCOPES = ("layerwise", "uniform", "global", "erk")
SCHEDULES = ("oneshot", "gradual", "iterative")


# ----------------------------------------------------------------------------- checks


def _check_sparsity(s, key: str) -> float:
  if isinstance(s, bool) or not isinstance(s, (int, float, np.floating, np.integer)) \
      or not 0.0 <= float(s) < 1.0:
    raise ConfigError(f"config key '{key}': sparsity must be a number in [0, 1), got {s!r}")
  return float(s)


def _check_choice(value, choices, key: str) -> str:
  if value not in choices:
    raise ConfigError(f"config key '{key}': unknown value {value!r}; known: {', '.join(choices)}")
  return value


def parse_n_m(value, key: str = "n_m") -> tuple[int, int] | None:
  """`"2:4"`, `(2, 4)` -> (2, 4); `""` or None -> None. Needs 1 <= N < M."""
  if value is None or (isinstance(value, str) and not value.strip()):
    return None
  try:
    if isinstance(value, str):
      n, m = (int(v) for v in value.split(":"))
    else:
      n, m = (int(v) for v in value)
  except (TypeError, ValueError):
    raise ConfigError(f"config key '{key}': expected 'N:M' (e.g. '2:4'), got {value!r}") from None
  if not 1 <= n < m:
    raise ConfigError(f"config key '{key}': N:M needs 1 <= N < M, got {n}:{m}")
  return n, m


def _floor_count(s: float, n: int) -> int:
  """floor(s n) with s read as the decimal it prints as (floor(0.29 * 100) = 29)."""
  return int(math.floor(fractions.Fraction(repr(float(s))) * n))


# ----------------------------------------------------------------------------- distributions


def erk_sparsities(shapes: Sequence[Sequence[int]], sparsity: float,
                   power: float = 1.0) -> list[float]:
  """Per-layer sparsities of the Erdos-Renyi-Kernel distribution (module docstring).

  r_l = (sum(shape_l) / prod(shape_l))^power; d_l = min(1, eps r_l) with
  sum_l d_l n_l = (1 - s) sum_l n_l. Layers whose eps r_l > 1 are made dense and eps is
  solved again over the rest (eps only grows when a layer is made dense, so marking all
  the layers over 1 at once gives RigL's one-at-a-time answer).
  """
  n = np.array([math.prod(s) for s in shapes], np.float64)
  raw = np.array([(sum(s) / math.prod(s)) ** power for s in shapes], np.float64)
  dense = np.zeros(len(shapes), bool)
  eps = 0.0
  for _ in range(len(shapes) + 1):
    rhs = np.sum(n[~dense]) * (1 - sparsity) - np.sum(n[dense]) * sparsity
    divisor = np.sum(raw[~dense] * n[~dense])
    if divisor <= 0:
      break
    eps = rhs / divisor
    over = ~dense & (eps * raw > 1)
    if not over.any():
      break
    dense |= over
  density = np.clip(np.where(dense, 1.0, eps * raw), 0.0, 1.0)
  return [float(1 - d) for d in density]


def _layer_sparsities(paths, shapes, sparsity, scope, erk_power=1.0) -> list[float]:
  """Per selected layer sparsity for the non-global scopes."""
  if isinstance(sparsity, Mapping):
    if scope != "layerwise":
      raise ConfigError(f"config key 'scope': per-layer sparsities need scope 'layerwise', "
                        f"got {scope!r}")
    out = []
    for p in paths:
      s = 0.0
      if p in sparsity:
        s = sparsity[p]
      else:
        for pattern, v in sparsity.items():
          if re.search(pattern, p):
            s = v
            break
      out.append(_check_sparsity(s, f"sparsity[{p}]"))
    return out
  s = _check_sparsity(sparsity, "sparsity")
  if scope == "erk":
    return erk_sparsities(shapes, s, erk_power)
  return [s] * len(paths)


# ----------------------------------------------------------------------------- masks


def _keep_rows(scores: jax.Array, k) -> jax.Array:
  """Per row of `scores` (G, n): True for all but the k lowest; ties keep lower indices.

  `k` (an int or a traced scalar) may be per-row broadcastable. Exactly n - k Trues a row.
  """
  n = scores.shape[-1]
  order = jnp.argsort(-scores, axis=-1, stable=True)    # best first, ties by index
  rank = jnp.argsort(order, axis=-1, stable=True)       # inverse permutation
  return rank < (n - jnp.asarray(k, jnp.int32))


def _nm_keep(score: jax.Array, n_m: tuple[int, int], k_group) -> jax.Array:
  """Keeps all but `k_group` of each group of M consecutive entries along axis -2."""
  _, m = n_m
  x = jnp.moveaxis(score, -2, -1)
  shape = x.shape
  keep = _keep_rows(x.reshape(-1, m), k_group)
  return jnp.moveaxis(keep.reshape(shape), -1, -2)


def _masks_from_scores(scores: list, counts, scope: str, n_m, old: list | None) -> list:
  """New masks of the selected leaves from their scores.

  `counts`: per-leaf removals (list, layerwise scopes), the total removal (global), or the
  per-group removal (N:M). Entries pruned in `old` are ranked below everything and stay off.
  """
  scores = [jnp.asarray(s, jnp.float32) for s in scores]
  if old is not None:
    scores = [jnp.where(o, s, -1.0) for s, o in zip(scores, old)]
  if n_m is not None:
    masks = [_nm_keep(s, n_m, counts) for s in scores]
  elif scope == "global":
    normed = []
    for s, o in zip(scores, old if old is not None else [None] * len(scores)):
      alive = jnp.ones(s.shape, bool) if o is None else o
      mean = jnp.sum(jnp.where(alive, s, 0.0)) / jnp.maximum(jnp.sum(alive), 1)
      mean = jnp.where(mean > 0, mean, 1.0)
      normed.append(jnp.where(alive, s / mean, -1.0))
    flat = jnp.concatenate([s.reshape(-1) for s in normed])
    keep = _keep_rows(flat[None], counts)[0]
    sizes = np.cumsum([s.size for s in scores])[:-1]
    masks = [k.reshape(s.shape) for k, s in zip(jnp.split(keep, sizes), scores)]
  else:
    masks = [_keep_rows(s.reshape(1, -1), c).reshape(s.shape) for s, c in zip(scores, counts)]
  if old is not None:
    masks = [m & o for m, o in zip(masks, old)]
  return masks


def _check_n_m_shapes(paths, shapes, n_m) -> None:
  if n_m is None:
    return
  _, m = n_m
  for p, shape in zip(paths, shapes):
    if shape[-2] % m:
      raise ConfigError(f"layer '{p}': N:M sparsity {n_m[0]}:{m} needs an input dimension "
                        f"(axis -2 of shape {tuple(shape)}) divisible by {m}, got {shape[-2]}")


def _removal_counts(paths, shapes, sparsity, scope, n_m, erk_power=1.0, final_sparsity=None):
  """How many entries an event of target `sparsity` removes (see `_masks_from_scores`)."""
  if n_m is not None:
    n, m = n_m
    s_f = 1 - n / m if final_sparsity is None else final_sparsity
    if s_f <= 0 or sparsity >= s_f - 1e-9:
      return m - n
    return min(m - n, int(math.floor(sparsity / s_f * (m - n) + 1e-9)))
  if scope == "global":
    s = _check_sparsity(sparsity, "sparsity")
    return _floor_count(s, sum(math.prod(x) for x in shapes))
  layer_s = _layer_sparsities(paths, shapes, sparsity, scope, erk_power)
  return [_floor_count(s, math.prod(x)) for s, x in zip(layer_s, shapes)]


def _scores(criterion, leaves, grads, rng) -> list:
  if criterion == "magnitude":
    return [jnp.abs(w) for w in leaves]
  if criterion in ("saliency", "snip"):
    if grads is None:
      raise ConfigError("config key 'criterion': saliency (SNIP) scores |w * g| need `grads`")
    return [jnp.abs(w * g) for w, g in zip(leaves, grads)]
  if rng is None:
    raise ConfigError("config key 'criterion': random pruning needs `rng`")
  # One draw for all leaves (one threefry program to compile), split in tree order.
  u = jax.random.uniform(rng, (sum(math.prod(w.shape) for w in leaves),))
  out, start = [], 0
  for w in leaves:
    n = math.prod(w.shape)
    out.append(u[start:start + n].reshape(w.shape))
    start += n
  return out


@functools.partial(jax.jit, static_argnames=("criterion", "counts", "scope", "n_m"))
def _compute_masks(leaves, grads, rng, old, *, criterion, counts, scope, n_m):
  """`prune_mask_tree`'s masks of the selected leaves, as one compiled program."""
  counts = list(counts) if isinstance(counts, tuple) else counts
  return _masks_from_scores(_scores(criterion, leaves, grads, rng), counts, scope, n_m, old)


def _selected(tree, sel) -> list:
  return [x for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(sel)) if s]


def prune_mask_tree(params: PyTree,
                    sparsity: float | Mapping[str, float] | None,
                    *,
                    criterion: str = "magnitude",
                    scope: str = "layerwise",
                    grads: PyTree | None = None,
                    rng: jax.Array | None = None,
                    include: str | Sequence[str] = (r".*",),
                    exclude: str | Sequence[str] = transforms.DEFAULT_EXCLUDE,
                    n_m: tuple[int, int] | str | None = None,
                    masks: PyTree | None = None,
                    erk_power: float = 1.0) -> PyTree:
  """Boolean masks shaped like `params` (True = kept; unselected leaves all True).

  See the module docstring for the criteria, scopes, N:M groups and tie-breaking. `grads`
  (a tree like `params`) is needed by `criterion="saliency"`, `rng` by `"random"`. With
  `n_m`, `sparsity` must be None, 0 or 1 - N/M. `masks` (earlier masks) makes the new masks
  a tightening of them. The inputs are not modified.
  """
  _check_choice(criterion, CRITERIA, "criterion")
  _check_choice(scope, SCOPES, "scope")
  n_m = parse_n_m(n_m)
  sel = transforms.select(params, include, exclude, kernels_only=True)
  paths = [p for p, s in zip(transforms.leaf_paths(params), jax.tree.leaves(sel)) if s]
  leaves = _selected(params, sel)
  shapes = [tuple(w.shape) for w in leaves]
  if n_m is not None:
    s_nm = 1 - n_m[0] / n_m[1]
    if sparsity not in (None, 0) and (isinstance(sparsity, Mapping)
                                      or abs(float(sparsity) - s_nm) > 1e-6):
      raise ConfigError(f"config key 'sparsity': with n_m {n_m[0]}:{n_m[1]} the sparsity is "
                        f"{s_nm:g}; got {sparsity!r}")
    _check_n_m_shapes(paths, shapes, n_m)
    sparsity = s_nm
  counts = _removal_counts(paths, shapes, sparsity, scope, n_m, erk_power)
  counts = tuple(counts) if isinstance(counts, list) else counts
  g = None if grads is None else _selected(grads, sel)
  if criterion in ("saliency", "snip") and g is None:
    _scores(criterion, leaves, g, rng)   # raises ConfigError
  if criterion == "random" and rng is None:
    _scores(criterion, leaves, g, rng)   # raises ConfigError
  old = None if masks is None else [jnp.asarray(m, bool) for m in _selected(masks, sel)]
  new = iter(_compute_masks(leaves, g, rng, old, criterion=criterion, counts=counts,
                            scope=scope, n_m=n_m))
  return jax.tree.map(lambda s, w: next(new) if s else jnp.ones(jnp.shape(w), bool), sel, params)


# ----------------------------------------------------------------------------- schedules


def cubic_sparsity(t, sparsity: float, begin_step: int, end_step: int,
                   initial_sparsity: float = 0.0):
  """Zhu & Gupta: s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3, clipped to [t0, t1]."""
  if end_step == begin_step:
    return sparsity if t >= begin_step else initial_sparsity
  frac = min(max((t - begin_step) / (end_step - begin_step), 0.0), 1.0)
  return sparsity + (initial_sparsity - sparsity) * (1.0 - frac) ** 3


def pruning_schedule(schedule: str, sparsity: float, *, begin_step: int = 0,
                     end_step: int = 0, frequency: int = 100, initial_sparsity: float = 0.0,
                     rounds: int = 5, prefix: str = "") -> list[tuple[int, float]]:
  """The pruning events [(step, target sparsity)] of a schedule (module docstring).

  Config keys in error messages are `prefix + name` (e.g. `prune.end_step`).
  """
  _check_choice(schedule, SCHEDULES, prefix + "schedule")
  s_f = _check_sparsity(sparsity, prefix + "sparsity")
  if isinstance(begin_step, bool) or int(begin_step) != begin_step or begin_step < 0:
    raise ConfigError(f"config key '{prefix}begin_step': must be an integer >= 0, "
                      f"got {begin_step!r}")
  if schedule == "oneshot":
    return [(int(begin_step), s_f)]
  if frequency < 1:
    raise ConfigError(f"config key '{prefix}frequency': must be >= 1, got {frequency!r}")
  if schedule == "gradual":
    s_i = _check_sparsity(initial_sparsity, prefix + "initial_sparsity")
    if s_i > s_f:
      raise ConfigError(f"config key '{prefix}initial_sparsity': {s_i} exceeds the target "
                        f"sparsity {s_f}")
    if end_step < begin_step:
      raise ConfigError(f"config key '{prefix}end_step': the schedule ends ({end_step}) "
                        f"before it begins ({prefix}begin_step={begin_step})")
    steps = list(range(int(begin_step), int(end_step) + 1, int(frequency)))
    if steps[-1] != end_step:
      steps.append(int(end_step))
    events = [(t, cubic_sparsity(t, s_f, begin_step, end_step, s_i)) for t in steps]
    events[-1] = (events[-1][0], s_f)
    return events
  if rounds < 1:
    raise ConfigError(f"config key '{prefix}rounds': must be >= 1, got {rounds!r}")
  events = [(int(begin_step + r * frequency), 1 - (1 - s_f) ** ((r + 1) / rounds))
            for r in range(rounds)]
  events[-1] = (events[-1][0], s_f)
  return events


# ----------------------------------------------------------------------------- sparse storage


def _uint_for(n: int):
  for dt in (np.uint8, np.uint16, np.uint32):
    if n <= np.iinfo(dt).max:
      return dt
  return np.uint64


def sparse_encode(w) -> dict:
  """A dense tensor as {"bitmask", "values", "shape"} or CSR, whichever has fewer bytes.

  bitmask: np.packbits of (w != 0) in row-major order (uint8, ceil(n / 8) bytes) and the
  non-zero values in that order (float32). CSR: the tensor as a matrix (out, n / out) with
  rows the output channels (last axis moved first), `indptr` (rows + 1) and column
  `indices` in the smallest unsigned type that holds them, and float32 `values`. `shape` is
  an int32 array. Host-side numpy; not jittable.
  """
  w = np.asarray(jax.device_get(w), np.float32)
  shape = np.asarray(w.shape, np.int32)
  nz = w != 0
  bitmask = {"bitmask": np.packbits(nz.reshape(-1)), "values": w[nz], "shape": shape}
  if w.ndim >= 2:
    mat = np.moveaxis(w, -1, 0).reshape(w.shape[-1], -1)
    rows, cols = np.nonzero(mat)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=mat.shape[0]))])
    csr = {"indptr": indptr.astype(_uint_for(len(rows))),
           "indices": cols.astype(_uint_for(max(mat.shape[1] - 1, 0))),
           "values": mat[rows, cols].astype(np.float32), "shape": shape}
    if sparse_bytes(csr) < sparse_bytes(bitmask):
      return csr
  return bitmask


def sparse_bytes(encoded: PyTree) -> int:
  """Bytes of the array leaves of an encoded tensor (or any tree)."""
  return int(sum(x.nbytes for x in jax.tree.leaves(encoded) if hasattr(x, "nbytes")))


def is_sparse(x) -> bool:
  return isinstance(x, dict) and "shape" in x and "values" in x and (
      "bitmask" in x or "indptr" in x)


def sparse_decode(encoded: dict) -> np.ndarray:
  """The dense float32 tensor of a `sparse_encode` result."""
  shape = tuple(int(s) for s in np.asarray(encoded["shape"]))
  values = np.asarray(encoded["values"], np.float32)
  if "bitmask" in encoded:
    n = math.prod(shape)
    nz = np.unpackbits(np.asarray(encoded["bitmask"], np.uint8), count=n).astype(bool)
    out = np.zeros(n, np.float32)
    out[nz] = values
    return out.reshape(shape)
  rows_n = shape[-1]
  cols_n = math.prod(shape[:-1])
  indptr = np.asarray(encoded["indptr"]).astype(np.int64)
  rows = np.repeat(np.arange(rows_n), np.diff(indptr))
  mat = np.zeros((rows_n, cols_n), np.float32)
  mat[rows, np.asarray(encoded["indices"]).astype(np.int64)] = values
  return np.moveaxis(mat.reshape((rows_n,) + shape[:-1]), 0, -1)


def decode_export(artifact: dict) -> PyTree:
  """The dense params of a pruning transform's `export` artifact ({"params": tree})."""
  return jax.tree.map(lambda x: sparse_decode(x) if is_sparse(x) else np.asarray(x),
                      artifact["params"], is_leaf=is_sparse)


# ----------------------------------------------------------------------------- transform


def _as_raw_key(rng):
  rng = jnp.asarray(rng)
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(rng)
  return rng


def pruning(params_like: PyTree,
            sparsity: float | Mapping[str, float] = 0.9,
            *,
            criterion: str = "magnitude",
            scope: str = "layerwise",
            schedule: str = "oneshot",
            begin_step: int = 0,
            end_step: int = 0,
            frequency: int = 100,
            initial_sparsity: float = 0.0,
            rounds: int = 5,
            n_m: tuple[int, int] | str | None = None,
            rewind_step: int = -1,
            erk_power: float = 1.0,
            include: str | Sequence[str] = (r".*",),
            exclude: str | Sequence[str] = transforms.DEFAULT_EXCLUDE,
            prefix: str = "") -> transforms.ParamTransform:
  """Pruning during training as a ParamTransform (module docstring: apply, update, ...).

  `params_like` may be abstract (ShapeDtypeStructs): the selection, the event table (steps
  and exact per-layer removal counts of every event, computed here on the host) and the
  state's shapes follow from the shapes alone. Config keys in errors are `prefix + name`.
  `sparsity` may be a mapping {path or regex: s_l} (scope "layerwise", e.g. from
  `sensitivity.pick_sparsities`): the schedule then runs on max_l s_l and an event of target
  s_j gives layer l the sparsity s_l s_j / max_l s_l (exactly s_l at the last event).

  State: {"masks": bool tree like params (selected leaves full-shaped, the others a scalar
  True), "next_event": int32, "target": float32 (the last event's target), "rng": uint32[2],
  "scores": SNIP scores (saliency only), "rewind": a copy of the params (rewind_step >= 0)}.
  """
  criterion = _check_choice(criterion, CRITERIA, prefix + "criterion")
  scope = _check_choice(scope, SCOPES, prefix + "scope")
  n_m = parse_n_m(n_m, prefix + "n_m")
  sel = transforms.select(params_like, include, exclude, kernels_only=True,
                          key=prefix + "include")
  sel_leaves = jax.tree.leaves(sel)
  paths = [p for p, s in zip(transforms.leaf_paths(params_like), sel_leaves) if s]
  shapes = [tuple(w.shape) for w in _selected(params_like, sel)]
  if n_m is not None:
    s_nm = 1 - n_m[0] / n_m[1]
    if sparsity and abs(float(sparsity) - s_nm) > 1e-6:
      raise ConfigError(f"config key '{prefix}sparsity': with {prefix}n_m {n_m[0]}:{n_m[1]} "
                        f"the sparsity is {s_nm:g}; set it to 0 or {s_nm:g}, got {sparsity!r}")
    _check_n_m_shapes(paths, shapes, n_m)
    sparsity = s_nm
  if isinstance(rewind_step, bool) or int(rewind_step) != rewind_step:
    raise ConfigError(f"config key '{prefix}rewind_step': must be an integer, got {rewind_step!r}")
  layer_map = None
  if isinstance(sparsity, Mapping) and n_m is None:
    # Per-layer targets: the schedule runs on the largest, each layer scaled along with it.
    try:
      layer_map = _layer_sparsities(paths, shapes, sparsity, scope, erk_power)
    except ConfigError as e:
      raise ConfigError(str(e).replace("config key '", f"config key '{prefix}")) from None
    sparsity = max(layer_map)
  events = pruning_schedule(schedule, sparsity, begin_step=begin_step, end_step=end_step,
                            frequency=frequency, initial_sparsity=initial_sparsity,
                            rounds=rounds, prefix=prefix)
  if rewind_step >= 0 and rewind_step > events[0][0]:
    raise ConfigError(f"config key '{prefix}rewind_step': {rewind_step} comes after the first "
                      f"pruning event (step {events[0][0]}); weights can only be rewound to "
                      "an earlier step")
  try:
    if layer_map is not None:
      table = [[_floor_count(ls if s >= sparsity else ls * s / sparsity, math.prod(x))
                for ls, x in zip(layer_map, shapes)] for _, s in events]
    else:
      table = [_removal_counts(paths, shapes, s, scope, n_m, erk_power, final_sparsity=sparsity)
               for _, s in events]
  except ConfigError as e:
    raise ConfigError(str(e).replace("config key '", f"config key '{prefix}")) from None
  table = np.maximum.accumulate(np.asarray(table, np.int32), axis=0)   # masks only tighten
  steps = np.asarray([t for t, _ in events], np.int32)
  targets = np.asarray([s for _, s in events], np.float32)
  if n_m is not None:   # what an N:M event reaches: k of every M removed
    targets = (table / n_m[1]).astype(np.float32)
  num_events = len(events)
  use_scores = criterion in ("saliency", "snip")

  def masked(params, masks):
    return jax.tree.map(lambda s, m, w: jnp.where(m, w, jnp.zeros((), w.dtype)) if s else w,
                        sel, masks, params)

  def init(params, rng):
    state = {
        "masks": jax.tree.map(lambda s, w: jnp.ones(w.shape if s else (), bool), sel, params),
        "next_event": jnp.zeros((), jnp.int32),
        "target": jnp.zeros((), jnp.float32),
        "rng": _as_raw_key(rng),
    }
    if use_scores:
      state["scores"] = jax.tree.map(
          lambda s, w: jnp.zeros(w.shape if s else (), jnp.float32), sel, params)
    if rewind_step >= 0:
      state["rewind"] = jax.tree.map(jnp.asarray, params)
    return state

  def apply(params, state):
    return masked(params, state["masks"])

  def prune_event(params, state):
    idx = jnp.minimum(state["next_event"], num_events - 1)
    counts = jnp.asarray(table)[idx]
    counts = counts if (n_m is not None or scope == "global") else list(counts)
    leaves = _selected(params, sel)
    if criterion == "magnitude":
      scores = _scores("magnitude", leaves, None, None)
    elif use_scores:
      scores = _selected(state["scores"], sel)
    else:
      scores = _scores("random", leaves, None, jax.random.fold_in(state["rng"], idx))
    old = _selected(state["masks"], sel)
    new = iter(_masks_from_scores(scores, counts, scope, n_m, old))
    masks = jax.tree.map(lambda s, m: next(new) if s else m, sel, state["masks"])
    if rewind_step >= 0:
      params = jax.tree.map(lambda r, w: r.astype(w.dtype), state["rewind"], params)
    state = {**state, "masks": masks, "next_event": idx + 1, "target": jnp.asarray(targets)[idx]}
    return masked(params, masks), state

  def maybe_prune(params, state, step):
    idx = state["next_event"]
    due = (idx < num_events) & (jnp.asarray(steps)[jnp.minimum(idx, num_events - 1)] <= step)
    return jax.lax.cond(due, prune_event, lambda p, s: (p, s), params, state)

  def update(params, state, step):
    step = jnp.asarray(step, jnp.int32)
    if rewind_step >= 0:
      state = {**state, "rewind": jax.tree.map(
          lambda r, w: jnp.where(step == rewind_step, w, r), state["rewind"], params)}
    params, state = maybe_prune(params, state, step)
    return masked(params, state["masks"]), state

  def calibrate(params, state, ctx):
    if use_scores:
      grad_fn = jax.jit(jax.grad(ctx.loss_fn))
      total = None
      for batch in ctx.batches:
        g = grad_fn(params, batch)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
      if total is None:
        raise ConfigError("config key 'calibration_batches': SNIP needs at least one batch")
      grads = jax.tree.map(lambda g: g / len(ctx.batches), total)
      state = {**state, "scores": jax.tree.map(
          lambda s, w, g, old: jnp.abs(w * g).astype(jnp.float32) if s else old,
          sel, params, grads, state["scores"])}
    if steps[0] == 0:
      params, state = maybe_prune(params, state, jnp.zeros((), jnp.int32))
    return params, state

  def metrics(params, state):
    eff = _selected(apply(params, state), sel)
    zeros = sum(jnp.sum(w == 0) for w in eff)
    total = sum(w.size for w in eff)
    return {"sparsity": zeros / total, "target_sparsity": state["target"]}

  def export(params, state):
    eff = jax.device_get(apply(params, state))
    return {"params": jax.tree.map(lambda s, w: sparse_encode(w) if s else np.asarray(w),
                                   sel, eff)}

  return transforms.ParamTransform(init, apply, update, export, calibrate, metrics)


#: Keys of the `prune` sub-config (`default_config`).
CONFIG_KEYS = ("enabled", "sparsity", "criterion", "scope", "schedule", "begin_step", "end_step",
               "frequency", "initial_sparsity", "rounds", "n_m", "rewind_step", "erk_power",
               "include", "exclude")


def default_config() -> ml_collections.ConfigDict:
  """The `prune` sub-config with its defaults (90% magnitude, layer-wise, one-shot at 0)."""
  c = ml_collections.ConfigDict()
  c.sparsity = 0.9            # target fraction of zeros in the selected kernels, in [0, 1)
  c.criterion = "magnitude"   # magnitude, random, saliency (= snip)
  c.scope = "layerwise"       # layerwise, uniform, global, erk
  c.schedule = "oneshot"      # oneshot, gradual, iterative
  c.begin_step = 0            # first pruning event (0: at calibration, before step 0)
  c.end_step = 0              # gradual: last event
  c.frequency = 100           # gradual: steps between events; iterative: fine-tune steps
  c.initial_sparsity = 0.0    # gradual: s_i
  c.rounds = 5                # iterative: pruning rounds
  c.n_m = ""                  # "2:4": N:M along the input dimension (sparsity 1 - N/M)
  c.rewind_step = -1          # >= 0: rewind surviving weights to this step at each event
  c.erk_power = 1.0
  c.include = (r".*",)
  c.exclude = transforms.DEFAULT_EXCLUDE
  return c


def transform_from_config(cfg, params_like: PyTree, config=None) -> transforms.ParamTransform:
  """The `prune` sub-config's transform (`experiment.build_transform`); keys: `default_config`.

  Refuses unknown keys and, given the whole `config`, events after `total_steps`.
  """
  unknown = sorted(set(cfg.keys()) - set(CONFIG_KEYS))
  if unknown:
    raise ConfigError(f"config key 'prune.{unknown[0]}' is unknown; the prune sub-config has: "
                      f"{', '.join(CONFIG_KEYS)}")
  d = default_config()
  get = lambda k: cfg.get(k, d[k])  # noqa: E731
  include, exclude = get("include"), get("exclude")
  t = pruning(
      params_like, get("sparsity"), criterion=get("criterion"), scope=get("scope"),
      schedule=get("schedule"), begin_step=get("begin_step"), end_step=get("end_step"),
      frequency=get("frequency"), initial_sparsity=get("initial_sparsity"),
      rounds=get("rounds"), n_m=get("n_m"), rewind_step=get("rewind_step"),
      erk_power=get("erk_power"),
      include=(include,) if isinstance(include, str) else tuple(include),
      exclude=(exclude,) if isinstance(exclude, str) else tuple(exclude), prefix="prune.")
  if config is not None and "total_steps" in config:
    last = pruning_schedule(get("schedule"), 0.0, begin_step=get("begin_step"),
                            end_step=get("end_step"), frequency=get("frequency"),
                            rounds=get("rounds"), prefix="prune.")[-1][0]
    if last > config.total_steps:
      key = "end_step" if get("schedule") == "gradual" else "begin_step"
      raise ConfigError(f"config key 'prune.{key}': the last pruning event is at step {last}, "
                        f"after total_steps={config.total_steps}: the target sparsity would "
                        "never be reached")
  return t
