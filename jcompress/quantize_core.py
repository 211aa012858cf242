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


def _qparams(lo, hi, bits, symmetric, narrow_range):
  """Scale and zero point of a uniform quantizer of the range [lo, hi] (arrays)."""
  q_min, q_max = code_range(bits, symmetric, narrow_range)
  if symmetric:
    m = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    scale = m / q_max
    zero_point = jnp.zeros_like(scale)
  else:
    lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    scale = (hi - lo) / (q_max - q_min)
  scale = jnp.where(scale > 0, scale, 1.0)   # an all-zero tensor: any scale represents it
  if not symmetric:
    zero_point = jnp.clip(jnp.round(q_min - lo / scale), q_min, q_max)
  return scale, zero_point


def _quant_codes(x, scale, zero_point, q_min, q_max):
  return jnp.clip(jnp.round(x / scale) + zero_point, q_min, q_max)


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
  transform calls this every step); the other methods go through `_rows_range`.
  """
  if method == "minmax":
    axes = tuple(i for i in range(x.ndim) if i != axis)
    if symmetric:
      m = jnp.max(jnp.abs(x), axis=axes, keepdims=axis is not None)
      lo, hi = -m, m
    else:
      lo = jnp.min(x, axis=axes, keepdims=axis is not None)
      hi = jnp.max(x, axis=axes, keepdims=axis is not None)
    scale, zero_point = _qparams(lo, hi, bits, symmetric, narrow_range)
    return scale.astype(x.dtype), zero_point
  rows = _to_rows(x, axis)
  lo, hi = _rows_range(rows, method, percentile, symmetric, bits, narrow_range, 100)
  scale, zero_point = _qparams(lo[:, 0], hi[:, 0], bits, symmetric, narrow_range)
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


def _nudge(lo, hi, bits, narrow_range):
  """TF's nudging of [lo, hi] so that 0.0 falls exactly on a quantization level."""
  q_min = 1.0 if narrow_range else 0.0
  q_max = float(2 ** bits - 1)
  scale = (hi - lo) / (q_max - q_min)
  zp_from_min = q_min - lo / scale
  # std::round (half away from zero) of a value >= q_min >= 0 is floor(v + 0.5).
  zp = jnp.where(zp_from_min < q_min, q_min,
                 jnp.where(zp_from_min > q_max, q_max, jnp.floor(zp_from_min + 0.5)))
  return (q_min - zp) * scale, (q_max - zp) * scale, scale


def _fake_quant_fwd_value(x, bits, lo, hi, narrow_range):
  n_lo, n_hi, scale = _nudge(lo, hi, bits, narrow_range)
  clamped = jnp.clip(x, n_lo, n_hi)
  inv_scale = 1.0 / scale
  return jnp.floor((clamped - n_lo) * inv_scale + 0.5) * scale + n_lo


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
  n_lo, n_hi, _ = _nudge(lo, hi, bits, narrow_range)
  inside = (x >= n_lo) & (x <= n_hi)
  zero = jnp.zeros_like(g)
  dx = jnp.where(inside, g, zero)
  dlo = _sum_to_shape(jnp.where(x < n_lo, g, zero), jnp.shape(lo)).astype(lo.dtype)
  dhi = _sum_to_shape(jnp.where(x > n_hi, g, zero), jnp.shape(hi)).astype(hi.dtype)
  return dx, dlo, dhi


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(x: jax.Array, bits: int, lo: jax.Array | float, hi: jax.Array | float,
               narrow_range: bool = False) -> jax.Array:
  r"""Quantize-dequantize of `x` on [lo, hi] with straight-through gradients.

  Equal to `tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, bits, narrow_range)`:
  with `q_min = narrow_range ? 1 : 0`, `q_max = 2^b - 1`, `s = (hi - lo) / (q_max - q_min)`,
  the zero point `z = clip(round(q_min - lo / s), q_min, q_max)` and the nudged range
  `[lo', hi'] = [(q_min - z) s, (q_max - z) s]` (0.0 is exact),

    y = floor((clip(x, lo', hi') - lo') / s + 0.5) * s + lo'.

  Gradients (as TF's fake_quant_with_min_max_vars_gradient):
    dy/dx = 1 where lo' <= x <= hi', else 0;
    dL/dlo = sum of dL/dy where x < lo';  dL/dhi = sum of dL/dy where x > hi'.
  `lo` and `hi` may be scalars or broadcast against `x` (per-channel); their gradients are
  summed to their shapes. `bits` may be 2..16 as in TF.
  """
  bits = _check_bits(bits, "fake_quant", 2, 16)
  x = jnp.asarray(x)
  lo = jnp.asarray(lo, x.dtype)
  hi = jnp.asarray(hi, x.dtype)
  return _fake_quant(x, bits, lo, hi, bool(narrow_range))


# ----------------------------------------------------------------------------- k-means


def _kmeans_pp_init(rows_key, row, k):
  """k-means++ seeds of a 1-D `row`: the first uniformly, then with probability ~ D^2."""
  n = row.shape[0]
  k0, rest = jax.random.split(rows_key)
  first = row[jax.random.randint(k0, (), 0, n)]
  cents = jnp.full((k,), first, row.dtype)
  d2 = jnp.square(row - first)

  def body(i, carry):
    cents, d2 = carry
    total = jnp.sum(d2)
    logits = jnp.where(total > 0, jnp.log(d2), jnp.zeros_like(d2))   # all equal: uniform
    idx = jax.random.categorical(jax.random.fold_in(rest, i), logits)
    c = row[idx]
    return cents.at[i].set(c), jnp.minimum(d2, jnp.square(row - c))

  cents, _ = jax.lax.fori_loop(1, k, body, (cents, d2))
  return jnp.sort(cents)


def _assign(row, cents):
  """Index of the nearest of the sorted centroids `cents` (ties to the lower one)."""
  mids = (cents[1:] + cents[:-1]) / 2
  return jnp.sum(row[:, None] > mids[None, :], axis=1).astype(jnp.int32)


def _kmeans_row(key, row, k, iters):
  cents = _kmeans_pp_init(key, row, k)

  def body(_, cents):
    a = _assign(row, cents)
    sums = jax.ops.segment_sum(row, a, num_segments=k)
    counts = jax.ops.segment_sum(jnp.ones_like(row), a, num_segments=k)
    # An empty cluster keeps its centroid (deterministic).
    new = jnp.where(counts > 0, sums / jnp.maximum(counts, 1), cents)
    return jnp.sort(new)

  cents = jax.lax.fori_loop(0, iters, body, cents)
  return cents, _assign(row, cents)


@functools.partial(jax.jit, static_argnames=("k", "iters", "axis"))
def _kmeans(x, key, *, k, iters, axis):
  rows = _to_rows(x, axis)
  keys = jax.random.split(key, rows.shape[0])
  cents, codes = jax.vmap(lambda kk, r: _kmeans_row(kk, r, k, iters))(keys, rows)
  if axis is None:
    return cents[0], codes.reshape(x.shape).astype(jnp.uint8)
  moved = (x.shape[axis],) + tuple(d for i, d in enumerate(x.shape) if i != axis)
  codes = jnp.moveaxis(codes.reshape(moved), 0, axis)
  return cents, codes.astype(jnp.uint8)


def kmeans_quantize(x: jax.Array, bits: int, *, per_channel: bool = False, iters: int = 20,
                    seed: int | jax.Array = 0, name: str = "x") -> QTensor:
  """Non-uniform quantization with a codebook of `2^bits` centroids (k-means on the values).

  Seeds by k-means++ (the first centroid uniformly, each next with probability proportional
  to the squared distance to the nearest chosen one), then runs `iters` Lloyd iterations
  (assign each value to its nearest centroid, move each centroid to its cluster's mean), jit
  compiled with `lax.fori_loop`. Values are 1-D, so the assignment is a comparison with the
  midpoints of the sorted centroids. An empty cluster keeps its centroid. The result is a
  function of (x, bits, iters, seed) only.

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
