"""The quantizers as pure functions: `QTensor` (integer codes + what dequantizes them), range
estimation, uniform affine quantization and its straight-through fake-quant (TensorFlow's
`fake_quant_with_min_max_vars` semantics), k-means (Deep Compression) and power-of-two codes,
and `quantize_tree` / `dequantize_tree` over parameter pytrees. `jcompress.quantize` builds the
training-time transform (QAT / PTQ) and the export encoding on them."""

from __future__ import annotations

import functools
from typing import Any
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jcompress import transforms
from jcompress.errors import ConfigError

PyTree = Any

RANGE_METHODS = ("minmax", "percentile", "mse")
TREE_METHODS = ("uniform", "kmeans", "pow2")


@flax.struct.dataclass
class QTensor:
  """A quantized array: integer codes plus what is needed to dequantize them.

  kind "uniform": `x_hat = (codes - zero_point) * scale`; `scale` / `zero_point` are scalars
    (per-tensor) or broadcast against `codes` (per-channel: size 1 on every axis but the channel
    axis).
  kind "kmeans": `x_hat = codebook[codes]` (per-tensor, codebook `(2^b,)`) or
    `codebook[c, codes[..., c]]` along the channel axis (per-channel, codebook `(C, 2^b)`,
    channel axis last). Codebooks are sorted ascending.
  kind "pow2": `x_hat = sign(codes) * scale * 2^(|codes| - 1)` for `codes != 0`, else 0;
    `scale` is the smallest nonzero magnitude (a power of two).
  """
  codes: jax.Array
  scale: jax.Array | None = None
  zero_point: jax.Array | None = None
  codebook: jax.Array | None = None
  bits: int = flax.struct.field(pytree_node=False, default=8)
  kind: str = flax.struct.field(pytree_node=False, default="uniform")
  symmetric: bool = flax.struct.field(pytree_node=False, default=True)
  narrow_range: bool = flax.struct.field(pytree_node=False, default=False)
  per_channel: bool = flax.struct.field(pytree_node=False, default=False)

  @property
  def shape(self):
    return self.codes.shape


def is_qtensor(x: Any) -> bool:
  return isinstance(x, QTensor)


# ----------------------------------------------------------------------------- checks


def _check_bits(bits: Any, name: str, lo: int = 2, hi: int = 8) -> int:
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not lo <= bits <= hi:
    raise ConfigError(f"`bits` must be an int in {lo}..{hi}, got {bits!r} (quantizing '{name}')")
  return int(bits)


def _check_finite(x: jax.Array, name: str) -> None:
  if not bool(jnp.all(jnp.isfinite(x))):
    raise ConfigError(f"cannot quantize '{name}': it holds NaN or Inf values")


def _check_choice(value: str, choices: Sequence[str], key: str, name: str) -> None:
  if value not in choices:
    raise ConfigError(f"`{key}` must be one of {list(choices)}, got {value!r} (quantizing "
                      f"'{name}')")


def code_range(bits: int, symmetric: bool, narrow_range: bool) -> tuple[int, int]:
  """The integer codes `(q_min, q_max)` of a uniform quantizer."""
  if symmetric:
    q_max = 2 ** (bits - 1) - 1
    return (-q_max if narrow_range else -(2 ** (bits - 1))), q_max
  return (1 if narrow_range else 0), 2 ** bits - 1


# ----------------------------------------------------------------------------- ranges


def _to_rows(x: jax.Array, axis: int | None) -> jax.Array:
  """`x` as `(groups, n)`: one row per channel of `axis`, or a single row."""
  if axis is None:
    return x.reshape(1, -1)
  return jnp.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)


def _from_groups(v: jax.Array, shape: tuple[int, ...], axis: int | None) -> jax.Array:
  """A `(groups,)` vector as a scalar (per-tensor) or broadcastable against `shape`."""
  if axis is None:
    return v.reshape(())
  bshape = [1] * len(shape)
  bshape[axis] = shape[axis]
  return v.reshape(bshape)


def _norm_axis(axis: int | None, ndim: int, name: str) -> int | None:
  if axis is None:
    return None
  if not -ndim <= axis < ndim:
    raise ConfigError(f"channel axis {axis} out of range for '{name}' of rank {ndim}")
  return axis % ndim


def _div(a, b):
  """`a / b` as IEEE float division, elementwise after broadcasting.

  XLA rewrites a division by a broadcast or a constant into a multiplication by its reciprocal,
  which rounds differently (x / s = 143.5 can become x * (1/s) = 143.49998, one code lower after
  rounding), and whether it does depends on the shapes. Hiding the divisor behind an
  optimization barrier keeps the division as written, so that per-tensor and per-channel
  arithmetic agree, and agree with TensorFlow's kernels.
  """
  a, b = jnp.broadcast_arrays(a, b)
  return a / jax.lax.optimization_barrier(b)


def _qparams(lo, hi, bits, symmetric, narrow_range):
  """Scale and zero point of a uniform quantizer of the range [lo, hi] (arrays).

  Elementwise in (lo, hi), with IEEE divisions (`_div`): the same range gives the same scale
  and zero point whatever the array's shape (per tensor or per channel).
  """
  q_min, q_max = code_range(bits, symmetric, narrow_range)
  if symmetric:
    m = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    scale = _div(m, float(q_max))
    zero_point = jnp.zeros_like(scale)
  else:
    lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    scale = _div(hi - lo, float(q_max - q_min))
  scale = jnp.where(scale > 0, scale, 1.0)   # an all-zero tensor: any scale represents it
  if not symmetric:
    zero_point = jnp.clip(jnp.round(q_min - _div(lo, scale)), q_min, q_max)
  return scale, zero_point


def _quant_codes(x, scale, zero_point, q_min, q_max):
  """`clip(round(x / scale) + zero_point, q_min, q_max)`: IEEE division, ties to even."""
  return jnp.clip(jnp.round(_div(x, scale)) + zero_point, q_min, q_max)


def _rows_range(rows, method, percentile, symmetric, bits, narrow_range, num_candidates):
  """(lo, hi) of shape (groups, 1) for `rows` of shape (groups, n)."""
  if symmetric:
    a = jnp.abs(rows)
    if method == "percentile":
      m = jnp.percentile(a, percentile, axis=1, keepdims=True)
    else:
      m = jnp.max(a, axis=1, keepdims=True)
    lo, hi = -m, m
  else:
    if method == "percentile":
      lo = jnp.percentile(rows, 100.0 - percentile, axis=1, keepdims=True)
      hi = jnp.percentile(rows, percentile, axis=1, keepdims=True)
    else:
      lo = jnp.min(rows, axis=1, keepdims=True)
      hi = jnp.max(rows, axis=1, keepdims=True)
  if method != "mse":
    return lo, hi
  # MSE-optimal clip: shrink [lo, hi] by the ratio r of a grid that minimises the error.
  q_min, q_max = code_range(bits, symmetric, narrow_range)
  ratios = jnp.arange(1, num_candidates + 1, dtype=rows.dtype) / num_candidates

  def err(r):
    s, z = _qparams(r * lo, r * hi, bits, symmetric, narrow_range)
    x_hat = (_quant_codes(rows, s, z, q_min, q_max) - z) * s
    return jnp.mean(jnp.square(x_hat - rows), axis=1)          # (groups,)

  errs = jax.lax.map(err, ratios)                               # (candidates, groups)
  best = ratios[jnp.argmin(errs, axis=0)][:, None]              # first minimum on ties
  return best * lo, best * hi


@functools.partial(jax.jit, static_argnames=("method", "axis", "percentile", "symmetric", "bits",
                                             "narrow_range", "num_candidates"))
def _compute_range(x, *, method, axis, percentile, symmetric, bits, narrow_range,
                   num_candidates):
  rows = _to_rows(x, axis)
  lo, hi = _rows_range(rows, method, percentile, symmetric, bits, narrow_range, num_candidates)
  return _from_groups(lo[:, 0], x.shape, axis), _from_groups(hi[:, 0], x.shape, axis)


def compute_range(x: jax.Array, *, method: str = "minmax", axis: int | None = None,
                  percentile: float = 99.99, symmetric: bool = True, bits: int = 8,
                  narrow_range: bool = False, num_candidates: int = 100,
                  name: str = "x") -> tuple[jax.Array, jax.Array]:
  """The quantization range `(lo, hi)` of `x`, per tensor or per channel.

  Args:
    x: a float array.
    method: "minmax" (min and max, or -max|x| and max|x| when symmetric); "percentile" (the
      `percentile`-th percentile of |x| when symmetric, else the (100 - p)-th and p-th
      percentiles of x); "mse" (the minmax range times the ratio r in
      {1/K, 2/K, ..., 1}, K = `num_candidates`, minimising mean((Q_r(x) - x)^2) for the
      `bits`-bit quantizer; evaluated for all channels at once, one candidate at a time).
    axis: None for one range over the whole tensor; the channel axis for one range per channel
      (the last axis for HWIO conv and (in, out) Dense kernels).
    symmetric: a range symmetric about 0.
  Returns:
    Scalars (per-tensor), or arrays of size 1 on every axis but `axis` (per-channel).
  """
  _check_choice(method, RANGE_METHODS, "range_method", name)
  bits = _check_bits(bits, name)
  if not 0.0 < percentile <= 100.0:
    raise ConfigError(f"`percentile` must be in (0, 100], got {percentile!r} (quantizing "
                      f"'{name}')")
  x = jnp.asarray(x)
  axis = _norm_axis(axis, x.ndim, name)
  return _compute_range(x, method=method, axis=axis, percentile=float(percentile),
                        symmetric=bool(symmetric), bits=bits, narrow_range=bool(narrow_range),
                        num_candidates=int(num_candidates))


# ----------------------------------------------------------------------------- uniform


def _uniform_qparams(x, *, bits, symmetric, narrow_range, axis, method, percentile):
  """(scale, zero_point) of `x`, scalars or broadcastable against `x` (size 1 but on `axis`).

  "minmax" reduces `x` in place over every axis but `axis` (no transpose: the QAT weight
  transform calls this every step); the other methods go through `_rows_range`. Either way the
  range is a `(groups,)` vector (one group per tensor) when `_qparams` turns it into a scale
  and zero point, so one channel gives the same numbers per tensor and per channel.
  """
  if method == "minmax":
    axes = tuple(i for i in range(x.ndim) if i != axis)
    if symmetric:
      m = jnp.max(jnp.abs(x), axis=axes).reshape(-1)
      lo, hi = -m, m
    else:
      lo = jnp.min(x, axis=axes).reshape(-1)
      hi = jnp.max(x, axis=axes).reshape(-1)
  else:
    rows = _to_rows(x, axis)
    lo, hi = _rows_range(rows, method, percentile, symmetric, bits, narrow_range, 100)
    lo, hi = lo[:, 0], hi[:, 0]
  scale, zero_point = _qparams(lo, hi, bits, symmetric, narrow_range)
  scale = _from_groups(scale, x.shape, axis).astype(x.dtype)
  return scale, _from_groups(zero_point, x.shape, axis)


@functools.partial(jax.jit, static_argnames=("bits", "symmetric", "narrow_range", "axis",
                                             "method", "percentile"))
def _uniform(x, *, bits, symmetric, narrow_range, axis, method, percentile):
  scale, zero_point = _uniform_qparams(x, bits=bits, symmetric=symmetric,
                                       narrow_range=narrow_range, axis=axis, method=method,
                                       percentile=percentile)
  q_min, q_max = code_range(bits, symmetric, narrow_range)
  dtype = jnp.int8 if symmetric else jnp.uint8
  codes = _quant_codes(x, scale, zero_point, q_min, q_max).astype(dtype)
  return codes, scale, zero_point.astype(dtype)


def quantize(x: jax.Array, bits: int, *, symmetric: bool = True, narrow_range: bool = False,
             per_channel: bool = False, axis: int = -1, range_method: str = "minmax",
             percentile: float = 99.99, name: str = "x") -> QTensor:
  """Uniform quantization of `x` to `bits` (2..8) bits (the module docstring has the math).

  Args:
    per_channel: one scale (and zero point) per channel of `axis` (default: the last axis).
    range_method: how the range is found, see `compute_range`.
    name: the leaf's name, used in error messages.
  Raises:
    ConfigError: `bits` outside 2..8, an unknown `range_method`, or `x` holding NaN / Inf
      (the message names `name`).
  """
  bits = _check_bits(bits, name)
  _check_choice(range_method, RANGE_METHODS, "range_method", name)
  x = jnp.asarray(x)
  _check_finite(x, name)
  ax = _norm_axis(axis, x.ndim, name) if per_channel else None
  codes, scale, zero_point = _uniform(x, bits=bits, symmetric=bool(symmetric),
                                      narrow_range=bool(narrow_range), axis=ax,
                                      method=range_method, percentile=float(percentile))
  return QTensor(codes=codes, scale=scale, zero_point=zero_point, bits=bits, kind="uniform",
                 symmetric=bool(symmetric), narrow_range=bool(narrow_range),
                 per_channel=bool(per_channel))


def dequantize(q: QTensor, dtype=jnp.float32) -> jax.Array:
  """The float array that `q` stands for."""
  if q.kind == "uniform":
    return ((q.codes.astype(jnp.int32) - q.zero_point.astype(jnp.int32)) * q.scale).astype(dtype)
  if q.kind == "kmeans":
    if q.codebook.ndim == 1:
      return q.codebook[q.codes.astype(jnp.int32)].astype(dtype)
    channels = jnp.arange(q.codebook.shape[0])
    return q.codebook[channels, q.codes.astype(jnp.int32)].astype(dtype)
  if q.kind == "pow2":
    c = q.codes.astype(jnp.int32)
    mag = jnp.ldexp(q.scale, jnp.maximum(jnp.abs(c) - 1, 0))    # exact, unlike exp2
    return jnp.where(c == 0, 0.0, jnp.sign(c) * mag).astype(dtype)
  raise ValueError(f"unknown QTensor kind {q.kind!r}")


# ----------------------------------------------------------------------------- fake quant


def _round_half_away(v):
  """C's `round` (half away from zero) of `v >= 0`, exactly: floor, plus one where the
  fraction (exact in floating point) is at least 1/2. `floor(v + 0.5)` is not the same: the
  sum rounds up at v = 0.49999997."""
  t = jnp.floor(v)
  return jnp.where(v - t >= 0.5, t + 1.0, t)


def _nudge(lo, hi, bits, narrow_range):
  """TF's `Nudge` of [lo, hi] so that 0.0 falls exactly on a quantization level, in its float
  arithmetic: `(nudged_min, nudged_max, scale, inv_scale)`."""
  q_min = 1.0 if narrow_range else 0.0
  q_max = float(2 ** bits - 1)
  scale = _div(hi - lo, q_max - q_min)
  inv_scale = _div(q_max - q_min, hi - lo)           # TF recomputes it, not 1 / scale
  zp_from_min = q_min - _div(lo, scale)
  zp = jnp.where(zp_from_min < q_min, q_min,
                 jnp.where(zp_from_min > q_max, q_max, _round_half_away(zp_from_min)))
  return (q_min - zp) * scale, (q_max - zp) * scale, scale, inv_scale


def _fake_quant_fwd_value(x, bits, lo, hi, narrow_range):
  n_lo, n_hi, scale, inv_scale = _nudge(lo, hi, bits, narrow_range)
  quant_zero = jnp.floor(-n_lo * inv_scale + 0.5)
  shifted = jnp.maximum(jnp.minimum(x, n_hi), n_lo) - n_lo
  if jnp.ndim(lo) == 0 and jnp.ndim(hi) == 0:       # FakeQuantWithMinMaxVars: a division
    v = _div(shifted, scale)
  else:                                              # ...PerChannel: times the inverse
    v = shifted * inv_scale
  y = jnp.floor(v - quant_zero + 0.5) * scale
  return jnp.where((lo == 0) & (hi == 0), jnp.zeros_like(y), y)   # TF: [0, 0] gives 0


def _sum_to_shape(g, shape):
  """Sums `g` down to `shape` (undoing broadcasting)."""
  if g.shape == tuple(shape):
    return g
  lead = g.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(
      i + lead for i, d in enumerate(shape) if d == 1 and g.shape[i + lead] != 1)
  return jnp.sum(g, axis=axes, keepdims=True).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 4))
def _fake_quant(x, bits, lo, hi, narrow_range):
  return _fake_quant_fwd_value(x, bits, lo, hi, narrow_range)


def _fake_quant_fwd(x, bits, lo, hi, narrow_range):
  return _fake_quant_fwd_value(x, bits, lo, hi, narrow_range), (x, lo, hi)


def _fake_quant_bwd(bits, narrow_range, res, g):
  x, lo, hi = res
  n_lo, n_hi, _, _ = _nudge(lo, hi, bits, narrow_range)
  empty = (lo == 0) & (hi == 0)                      # TF: everything passes to x
  inside = ((x >= n_lo) & (x <= n_hi)) | empty
  n_lo, n_hi = jnp.where(empty, -jnp.inf, n_lo), jnp.where(empty, jnp.inf, n_hi)
  zero = jnp.zeros_like(g)
  dx = jnp.where(inside, g, zero)
  dlo = _sum_to_shape(jnp.where(x < n_lo, g, zero), jnp.shape(lo)).astype(lo.dtype)
  dhi = _sum_to_shape(jnp.where(x > n_hi, g, zero), jnp.shape(hi)).astype(hi.dtype)
  return dx, dlo, dhi


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(x: jax.Array, bits: int, lo: jax.Array | float, hi: jax.Array | float,
               narrow_range: bool = False) -> jax.Array:
  r"""Quantize-dequantize of `x` on [lo, hi] with straight-through gradients.

  Bit for bit `tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, bits, narrow_range)`
  for scalar `lo`, `hi`, and `..._per_channel` for `lo`, `hi` along the last axis, ties
  included: TF's float32 arithmetic in TF's order (TensorFlow 2.x `fake_quant_ops_functor.h`).
  With `q_min = narrow_range ? 1 : 0`, `q_max = 2^b - 1`,

    s = (hi - lo) / (q_max - q_min),    s_inv = (q_max - q_min) / (hi - lo)   (not 1 / s),
    z = clip(round(q_min - lo / s), q_min, q_max)       (round half away from zero),
    [lo', hi'] = [(q_min - z) s, (q_max - z) s]         (the nudged range: 0.0 is exact),
    q_0 = floor(-lo' s_inv + 0.5),
    y = floor(v - q_0 + 0.5) s,    v = (clip(x, lo', hi') - lo') / s        (scalar range),
                                   v = (clip(x, lo', hi') - lo') s_inv      (per channel),

  and `y = 0` where `lo = hi = 0`. Divisions are IEEE divisions (`_div`), which XLA would
  otherwise turn into multiplications by a reciprocal.

  Gradients (as TF's fake_quant_with_min_max_vars_gradient):
    dy/dx = 1 where lo' <= x <= hi', else 0;
    dL/dlo = sum of dL/dy where x < lo';  dL/dhi = sum of dL/dy where x > hi'
  (for lo = hi = 0: dy/dx = 1, no gradient to lo, hi).
  `lo` and `hi` may be scalars or broadcast against `x` (per-channel); their gradients are
  summed to their shapes. `bits` may be 2..16 as in TF.
  """
  bits = _check_bits(bits, "fake_quant", 2, 16)
  x = jnp.asarray(x)
  lo = jnp.asarray(lo, x.dtype)
  hi = jnp.asarray(hi, x.dtype)
  return _fake_quant(x, bits, lo, hi, bool(narrow_range))


# ----------------------------------------------------------------------------- k-means

# Rows of at most this many values are clustered exactly (dynamic programming, O(k n^2) work and
# O(n^2) memory per row); longer rows by the best of several k-means++ / Lloyd starts.
_KMEANS_EXACT_MAX = 256
_KMEANS_STARTS = 10
_KMEANS_GROUPS = 128


def _kmeans_pp_init(rows_key, row, k):
  """Greedy k-means++ seeds of a 1-D `row` (as scikit-learn): the first uniformly; then, k - 1
  times, `2 + floor(ln k)` candidates drawn with probability ~ D^2 (the squared distance to the
  nearest seed so far) and the one leaving the least total D^2 kept. Sorted ascending."""
  n = row.shape[0]
  trials = 2 + int(np.log(k))
  k0, rest = jax.random.split(rows_key)
  first = row[jax.random.randint(k0, (), 0, n)]
  cents = jnp.full((k,), first, row.dtype)
  d2 = jnp.square(row - first)

  def body(i, carry):
    cents, d2 = carry
    cdf = jnp.cumsum(d2)                                        # inverse-CDF sampling
    u = jax.random.uniform(jax.random.fold_in(rest, i), (trials,), row.dtype) * cdf[-1]
    idx = jnp.minimum(jnp.searchsorted(cdf, u, side="right"), n - 1)
    cand = jnp.minimum(d2[None, :], jnp.square(row[None, :] - row[idx][:, None]))
    best = jnp.argmin(jnp.sum(cand, axis=1))                   # the first best on ties
    return cents.at[i].set(row[idx[best]]), cand[best]

  cents, _ = jax.lax.fori_loop(1, k, body, (cents, d2))
  return jnp.sort(cents)


def _assign(row, cents):
  """Index of the nearest of the sorted centroids `cents` (ties to the lower one): the number
  of midpoints `(c_j + c_{j+1}) / 2` strictly below each value."""
  mids = (cents[1:] + cents[:-1]) / 2
  return jnp.searchsorted(mids, row, side="left").astype(jnp.int32)


def _segment_means(xs, starts, ends, fallback):
  """Means of the runs `xs[starts[j]:ends[j]]` of the sorted `xs`, `fallback[j]` where empty.

  Each mean is taken as `xs[s] + mean(xs[s:e] - xs[s])`: exact for a run of equal values, and
  free of the cancellation of a global prefix sum.
  """
  n = xs.shape[0]
  seg = jnp.searchsorted(ends, jnp.arange(n), side="right")     # run of each sorted position
  first = xs[jnp.minimum(starts, n - 1)]
  sums = jax.ops.segment_sum(xs - first[seg], seg, num_segments=starts.shape[0])
  counts = ends - starts
  return jnp.where(counts > 0, first + sums / jnp.maximum(counts, 1).astype(xs.dtype), fallback)


def _kmeans_exact_sorted(xs, k, w=None):
  r"""Optimal 1-D k-means of the sorted `xs` (n >= k, weights `w`, default 1) by dynamic
  programming.

  Optimal clusters of sorted values are runs. With `cost(j, i)` the weighted squared error of
  the run `xs[j..i]` about its weighted mean and `D_m(i)` the least error of `xs[0..i]` in
  `m + 1` runs,

    D_0(i) = cost(0, i),      D_m(i) = min_{m <= j <= i} D_{m-1}(j - 1) + cost(j, i),

  and backtracking the minimising `j` (the smallest on ties) from `D_{k-1}(n - 1)` gives the
  runs (Wang & Song, Ckmeans.1d.dp). `cost(j, i) = Q2 - Q1^2 / W` with `W` the run's weight and
  `Q_p` the weighted sums of `(xs[t] - xs[j])^p` over it (shifted sums: 0 for equal values).
  O(k n^2) work, O(n^2) memory. Returns the sorted centroids `xs[j] + Q1 / W`, the runs' means.
  """
  n = xs.shape[0]
  w = jnp.ones_like(xs) if w is None else w
  idx = jnp.arange(n)
  valid = idx[None, :] >= idx[:, None]                          # [j, i]: a run j..i
  y = jnp.where(valid, xs[None, :] - xs[:, None], 0.0)
  wy = w[None, :] * y
  q1, q2 = jnp.cumsum(wy, axis=1), jnp.cumsum(wy * y, axis=1)
  wsum = jnp.maximum(jnp.cumsum(jnp.where(valid, w[None, :], 0.0), axis=1), 1e-30)
  cost = jnp.where(valid, jnp.maximum(q2 - q1 * q1 / wsum, 0.0), jnp.inf)
  cost_t = cost.T                                               # [i, j]: rows reduce fast

  def layer(d_prev, _):
    before = jnp.concatenate([jnp.full((1,), jnp.inf, xs.dtype), d_prev[:-1]])
    total = cost_t + before[None, :]                            # [i, j]
    best = jnp.min(total, axis=1)
    # The first minimising j (argmin's variadic reduction is several times slower on CPU).
    return best, jnp.argmax(total == best[:, None], axis=1).astype(jnp.int32)

  _, back = jax.lax.scan(layer, cost[0], None, length=k - 1)    # back: (k - 1, n)

  def trace(i, b):                                              # i: last index of the run
    j = b[i]
    return j - 1, j

  _, starts = jax.lax.scan(trace, jnp.asarray(n - 1, back.dtype), back, reverse=True)
  starts = jnp.concatenate([jnp.zeros((1,), starts.dtype), starts])
  lasts = jnp.concatenate([starts[1:] - 1, jnp.full((1,), n - 1, starts.dtype)])
  return xs[starts] + q1[starts, lasts] / wsum[starts, lasts]


def _lloyd_sorted(xs, cents, iters):
  """Lloyd iterations on the sorted `xs` from the sorted `cents`, until no value changes cluster
  or after `iters`. Clusters are runs cut at the centroid midpoints (`searchsorted`), their sums
  differences of one prefix sum: O(k log n) per iteration. Returns the runs' ends (k,)."""
  n = xs.shape[0]
  mu = jnp.mean(xs)
  csum = jnp.concatenate([jnp.zeros((1,), xs.dtype), jnp.cumsum(xs - mu)])

  def ends_of(c):
    mids = (c[1:] + c[:-1]) / 2
    return jnp.concatenate([jnp.searchsorted(xs, mids, side="right"),
                            jnp.full((1,), n, jnp.int32)]).astype(jnp.int32)

  def step(c, ends):
    starts = jnp.concatenate([jnp.zeros((1,), ends.dtype), ends[:-1]])
    counts = ends - starts
    # An empty cluster keeps its centroid (deterministic).
    new = jnp.where(counts > 0, mu + (csum[ends] - csum[starts]) / jnp.maximum(counts, 1), c)
    return jnp.sort(new)

  def cond(carry):
    i, _, ends, prev = carry
    return (i < iters) & jnp.any(ends != prev)

  def body(carry):
    i, c, ends, _ = carry
    c = step(c, ends)
    return i + 1, c, ends_of(c), ends

  ends = ends_of(cents)
  _, c, ends, _ = jax.lax.while_loop(cond, body, (0, cents, ends, ends - 1))
  starts = jnp.concatenate([jnp.zeros((1,), ends.dtype), ends[:-1]])
  return _segment_means(xs, starts, ends, c)


def _kmeans_row(key, row, k, iters, starts=_KMEANS_STARTS):
  """Sorted centroids (k,) and codes of one row; see `kmeans_quantize`."""
  xs = jnp.sort(row)
  n, m = xs.shape[0], _KMEANS_GROUPS
  if n <= _KMEANS_EXACT_MAX:
    cents = _kmeans_exact_sorted(xs, k)
    return cents, _assign(row, cents)

  def sse(c):
    return jnp.sum(jnp.square(xs - c[_assign(xs, c)]))

  def start(kk):
    c = _lloyd_sorted(xs, _kmeans_pp_init(kk, xs, k), iters)
    return c, sse(c)

  cands, errs = jax.vmap(start)(jax.random.split(key, starts))
  if 4 * k <= m:
    # One more start: the exact solution over about m groups of sorted values, each a point of
    # its count's weight at its mean, then Lloyd on all values. The groups are cut at m/2
    # quantiles and at m/2 equally spaced values (so a tail's few far values are not lumped
    # together); a group may be empty (weight 0).
    h = m // 2
    quantiles = jnp.asarray(-(-np.arange(h + 1) * n // h), jnp.int32)   # ceil(g n / h)
    levels = xs[0] + (xs[-1] - xs[0]) * jnp.arange(1, h, dtype=xs.dtype) / h
    cuts = jnp.sort(jnp.concatenate([quantiles, jnp.searchsorted(xs, levels).astype(jnp.int32)]))
    g_lo, g_hi = cuts[:-1], cuts[1:]
    means = _segment_means(xs, g_lo, g_hi, xs[jnp.minimum(g_lo, n - 1)])
    c = _lloyd_sorted(xs, _kmeans_exact_sorted(means, k, (g_hi - g_lo).astype(xs.dtype)), iters)
    cands = jnp.concatenate([c[None], cands])
    errs = jnp.concatenate([sse(c)[None], errs])
  cents = cands[jnp.argmin(errs)]                               # the first best on ties
  return cents, _assign(row, cents)


@functools.partial(jax.jit, static_argnames=("k", "iters", "axis"))
def _kmeans(x, key, *, k, iters, axis):
  rows = _to_rows(x, axis)
  keys = jax.random.split(key, rows.shape[0])
  one = lambda kr: _kmeans_row(kr[0], kr[1], k, iters)
  if rows.shape[1] <= _KMEANS_EXACT_MAX:   # O(n^2) memory per row: a few rows at a time
    cents, codes = jax.lax.map(one, (keys, rows), batch_size=8)
  else:
    cents, codes = jax.vmap(one)((keys, rows))
  if axis is None:
    return cents[0], codes.reshape(x.shape).astype(jnp.uint8)
  moved = (x.shape[axis],) + tuple(d for i, d in enumerate(x.shape) if i != axis)
  codes = jnp.moveaxis(codes.reshape(moved), 0, axis)
  return cents, codes.astype(jnp.uint8)


def kmeans_quantize(x: jax.Array, bits: int, *, per_channel: bool = False, iters: int = 20,
                    seed: int | jax.Array = 0, name: str = "x") -> QTensor:
  """Non-uniform quantization with a codebook of `2^bits` centroids (k-means on the values).

  Minimises the squared error sum_i (x_i - c_{a(i)})^2 over the sorted codebook c, each value
  going to its nearest centroid (a comparison with the midpoints (c_j + c_{j+1}) / 2, ties to
  the lower one). Values are 1-D, so optimal clusters are runs of the sorted values:
  * a row (the tensor, or one channel) of at most 256 values is clustered exactly, by dynamic
    programming over the runs (`_kmeans_exact_sorted`, O(2^bits n^2));
  * a longer row keeps the best, by squared error, of 10 greedy k-means++ starts (scikit-learn's
    seeding: 2 + ln k candidates drawn ~ D^2 per centroid, the one leaving the least D^2 kept)
    and, for 2^bits <= 32, one more start from the exact solution over ~128 groups of sorted
    values (cut at quantiles and at equally spaced values); each start runs Lloyd iterations
    (clusters cut at the midpoints by `searchsorted`, centroids moved to their means from a
    prefix sum, an empty cluster keeps its centroid) until no value changes cluster or after
    `iters`. Centroids are each cluster's mean, taken as `x_first + mean(x - x_first)`, so a
    cluster of equal values is reproduced exactly.
  The squared error is then at most scikit-learn's `KMeans(n_init=10)` for rows of at most 256
  values, within a fraction of a percent of it for longer rows and up to 16 centroids, and
  within a few percent for 64..256 centroids. Jit compiled; the result is a function of
  (x, bits, iters, seed) only.

  Per-channel: one codebook per channel of the LAST axis (codebook shape (C, 2^bits)).

  Raises:
    ConfigError: `bits` outside 1..8 (1 bit: two centroids), NaN / Inf in `x`, or a codebook
      larger than the values it codes (2^bits > elements per tensor / channel); messages name
      `name`.
  """
  bits = _check_bits(bits, name, 1, 8)
  x = jnp.asarray(x)
  _check_finite(x, name)
  axis = x.ndim - 1 if per_channel else None
  n = x.size // (x.shape[axis] if axis is not None else 1)
  k = 2 ** bits
  if k > n:
    raise ConfigError(f"cannot k-means quantize '{name}' with bits={bits}: a codebook of {k} "
                      f"entries is larger than the {n} values it would code"
                      f"{' per channel' if per_channel else ''}")
  key = seed if isinstance(seed, jax.Array) else jax.random.key(int(seed))
  cents, codes = _kmeans(x, key, k=k, iters=int(iters), axis=axis)
  return QTensor(codes=codes, codebook=cents.astype(x.dtype), bits=bits, kind="kmeans",
                 symmetric=False, narrow_range=False, per_channel=bool(per_channel))


# ----------------------------------------------------------------------------- power of two


@functools.partial(jax.jit, static_argnames=("bits", "axis"))
def _pow2(x, *, bits, axis):
  levels = 2 ** (bits - 1) - 1                                  # nonzero magnitudes
  rows = _to_rows(x, axis)
  m = jnp.max(jnp.abs(rows), axis=1)
  m = jnp.where(m > 0, m, 1.0)
  e_max = jnp.floor(jnp.log2(4.0 * m / 3.0))                   # 2^e_max nearest to max|x|
  e_min = e_max - (levels - 1)
  e_max, e_min = _from_groups(e_max, x.shape, axis), _from_groups(e_min, x.shape, axis)
  a = jnp.abs(x)
  e = jnp.floor(jnp.log2(jnp.where(a > 0, a, 1.0)))
  pow2 = lambda e: jnp.ldexp(jnp.ones((), x.dtype), e.astype(jnp.int32))   # exact, unlike exp2
  e = jnp.where(a >= 1.5 * pow2(e), e + 1, e)                  # nearest power of two
  e = jnp.clip(e, e_min, e_max)
  zero = a < 0.5 * pow2(e_min)                                  # nearer to 0 than to 2^e_min
  mag = jnp.where(zero, 0, e - e_min + 1)
  codes = (jnp.sign(x) * mag).astype(jnp.int8)
  return codes, pow2(e_min)


def power_of_two_quantize(x: jax.Array, bits: int, *, per_channel: bool = False,
                          name: str = "x") -> QTensor:
  """Logarithmic quantization to the levels {0} and {+-2^e : e_min <= e <= e_max}.

  One bit holds the sign; the other `bits - 1` code `L + 1` magnitudes, L = 2^(bits-1) - 1:
  0 and 2^e_max, ..., 2^(e_max - L + 1), with e_max = floor(log2(4 max|x| / 3)) (the power
  of two nearest to max|x|, as INQ). Each value goes to its nearest level. Codes are signed
  ints in [-L, L]: `x_hat = sign(c) 2^(e_min + |c| - 1)`, `c = 0` for 0.
  """
  bits = _check_bits(bits, name)
  x = jnp.asarray(x)
  _check_finite(x, name)
  axis = x.ndim - 1 if per_channel else None
  codes, scale = _pow2(x, bits=bits, axis=axis)
  return QTensor(codes=codes, scale=scale, bits=bits, kind="pow2", symmetric=True,
                 narrow_range=True, per_channel=bool(per_channel))


# ----------------------------------------------------------------------------- trees


def quantize_tree(params: PyTree, bits: int, *, method: str = "uniform",
                  include: str | Sequence[str] = (r".*",),
                  exclude: str | Sequence[str] = transforms.DEFAULT_EXCLUDE,
                  per_channel: bool = True, symmetric: bool = True, narrow_range: bool = True,
                  range_method: str = "minmax", percentile: float = 99.99,
                  kmeans_iters: int = 20, seed: int = 0,
                  key: str = "quant.include") -> PyTree:
  """Quantizes the selected leaves of `params`: a QTensor there, the float leaf elsewhere.

  Leaves are selected by `transforms.select(params, include, exclude, key=key)` (kernels only;
  the first conv and the classifier excluded by default). `method` is "uniform" (`quantize`),
  "kmeans" (`kmeans_quantize`, leaf i seeded with fold_in(key(seed), i)) or "pow2"
  (`power_of_two_quantize`). Per-channel means per output channel (the last axis). The input
  tree is not modified.
  """
  _check_choice(method, TREE_METHODS, "method", "params")
  bits = _check_bits(bits, "params", 1 if method == "kmeans" else 2)
  sel = transforms.select(params, include, exclude, kernels_only=True, key=key)
  base = jax.random.key(int(seed))
  counter = iter(range(10 ** 9))

  def one(path, leaf, chosen):
    i = next(counter)
    if not chosen:
      return leaf
    if method == "uniform":
      return quantize(leaf, bits, symmetric=symmetric, narrow_range=narrow_range,
                      per_channel=per_channel, range_method=range_method,
                      percentile=percentile, name=path)
    if method == "kmeans":
      return kmeans_quantize(leaf, bits, per_channel=per_channel, iters=kmeans_iters,
                             seed=jax.random.fold_in(base, i), name=path)
    return power_of_two_quantize(leaf, bits, per_channel=per_channel, name=path)

  return transforms.map_with_path(one, params, sel)


def dequantize_tree(qtree: PyTree, dtype=jnp.float32) -> PyTree:
  """The float tree (the structure of the original params) that `qtree` stands for."""
  return jax.tree.map(lambda x: dequantize(x, dtype) if is_qtensor(x) else x, qtree,
                      is_leaf=is_qtensor)
