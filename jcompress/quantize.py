r"""Weight quantization as pure functions of arrays and parameter trees.

Uniform (affine) quantization of `x` with `b` bits, scale `s` and integer zero point `z`:

  q = clip(round(x / s) + z, q_min, q_max),      x_hat = (q - z) * s

* symmetric: `z = 0`, `s = max|x| / (2^(b-1) - 1)`, codes in `[-2^(b-1), 2^(b-1) - 1]`, or in
  `[-(2^(b-1) - 1), 2^(b-1) - 1]` with `narrow_range` (4 bits -> [-7, 7]); stored as int8.
* asymmetric: codes in `[0, 2^b - 1]` (`[1, 2^b - 1]` with `narrow_range`); the range `[lo, hi]`
  is widened to contain 0, `s = (hi - lo) / (q_max - q_min)` and `z = round(q_min - lo / s)` is an
  integer code, so 0.0 is represented exactly; stored as uint8.

The range `[lo, hi]` comes from `compute_range`: "minmax", "percentile" (clip outliers) or "mse"
(the clip ratio of a 100-point grid that minimises the quantization MSE). Per-channel ranges
reduce over every axis but the channel axis, the LAST axis for HWIO conv and (in, out) Dense
kernels.

Non-uniform quantizers share the `QTensor` container: `kmeans_quantize` (a codebook of `2^b`
centroids found by k-means++ and Lloyd iterations) and `power_of_two_quantize` (levels
`{0, +-2^e}`).

`fake_quant` is quantize-dequantize with straight-through gradients, numerically equal to
`tf.quantization.fake_quant_with_min_max_vars` (min/max nudged so that 0.0 is exact).

`quantize_tree` / `dequantize_tree` act on whole parameter trees, selecting leaves with
`transforms.select` (first conv and classifier excluded by default).
"""

from __future__ import annotations

import functools
import re
import time
from typing import Any
from typing import NamedTuple
from typing import Sequence

from absl import logging
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from jcompress import packing
from jcompress import transforms
from jcompress.errors import ConfigError
from jcompress.quantize_core import RANGE_METHODS  # noqa: F401
from jcompress.quantize_core import TREE_METHODS  # noqa: F401
from jcompress.quantize_core import QTensor  # noqa: F401
from jcompress.quantize_core import _assign  # noqa: F401
from jcompress.quantize_core import _check_bits  # noqa: F401
from jcompress.quantize_core import _check_choice  # noqa: F401
from jcompress.quantize_core import _check_finite  # noqa: F401
from jcompress.quantize_core import _compute_range  # noqa: F401
from jcompress.quantize_core import _fake_quant  # noqa: F401
from jcompress.quantize_core import _fake_quant_bwd  # noqa: F401
from jcompress.quantize_core import _fake_quant_fwd  # noqa: F401
from jcompress.quantize_core import _fake_quant_fwd_value  # noqa: F401
from jcompress.quantize_core import _from_groups  # noqa: F401
from jcompress.quantize_core import _kmeans  # noqa: F401
from jcompress.quantize_core import _kmeans_pp_init  # noqa: F401
from jcompress.quantize_core import _kmeans_row  # noqa: F401
from jcompress.quantize_core import _norm_axis  # noqa: F401
from jcompress.quantize_core import _nudge  # noqa: F401
from jcompress.quantize_core import _pow2  # noqa: F401
from jcompress.quantize_core import _qparams  # noqa: F401
from jcompress.quantize_core import _quant_codes  # noqa: F401
from jcompress.quantize_core import _rows_range  # noqa: F401
from jcompress.quantize_core import _sum_to_shape  # noqa: F401
from jcompress.quantize_core import _to_rows  # noqa: F401
from jcompress.quantize_core import _uniform  # noqa: F401
from jcompress.quantize_core import _uniform_qparams  # noqa: F401
from jcompress.quantize_core import code_range  # noqa: F401
from jcompress.quantize_core import compute_range  # noqa: F401
from jcompress.quantize_core import dequantize  # noqa: F401
from jcompress.quantize_core import dequantize_tree  # noqa: F401
from jcompress.quantize_core import fake_quant  # noqa: F401
from jcompress.quantize_core import is_qtensor  # noqa: F401
from jcompress.quantize_core import kmeans_quantize  # noqa: F401
from jcompress.quantize_core import power_of_two_quantize  # noqa: F401
from jcompress.quantize_core import quantize  # noqa: F401
from jcompress.quantize_core import quantize_tree  # noqa: F401

PyTree = Any


# ----------------------------------------------------------------------------- QAT / PTQ transform


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5, 6))
def _qat_uniform(w, bits, symmetric, narrow_range, axis, method, percentile):
  return _qat_uniform_fwd(w, bits, symmetric, narrow_range, axis, method, percentile)[0]


def _qat_uniform_fwd(w, bits, symmetric, narrow_range, axis, method, percentile):
  scale, zero_point = _uniform_qparams(jax.lax.stop_gradient(w), bits=bits, symmetric=symmetric,
                                       narrow_range=narrow_range, axis=axis, method=method,
                                       percentile=percentile)
  q_min, q_max = code_range(bits, symmetric, narrow_range)
  codes = _quant_codes(w, scale, zero_point, q_min, q_max)
  return ((codes - zero_point) * scale).astype(w.dtype), (w, scale, zero_point)


def _qat_uniform_bwd(bits, symmetric, narrow_range, axis, method, percentile, res, g):
  del axis, method, percentile
  w, scale, zero_point = res
  q_min, q_max = code_range(bits, symmetric, narrow_range)
  v = w / scale + zero_point
  inside = (v >= q_min - 0.5) & (v <= q_max + 0.5)       # where the clip is inactive
  return (jnp.where(inside, g, jnp.zeros_like(g)),)


_qat_uniform.defvjp(_qat_uniform_fwd, _qat_uniform_bwd)


def fake_quant_weight(w: jax.Array, bits: int, *, symmetric: bool = True,
                      narrow_range: bool = True, per_channel: bool = True,
                      range_method: str = "minmax", percentile: float = 99.99) -> jax.Array:
  r"""Quantize-dequantize of a weight with a straight-through gradient (uniform QAT).

  The value is exactly `dequantize(quantize(w, bits, ...))` (the same scale, zero point and
  rounding as the stored artifact), with the range of the current `w` (per output channel,
  the last axis, by default). The gradient is the clipped straight-through estimate: g where
  the clip is inactive, `q_min - 1/2 <= w / s + z <= q_max + 1/2`, else 0 (with minmax ranges
  that is every weight); the range itself gets no gradient.
  """
  axis = w.ndim - 1 if per_channel else None
  return _qat_uniform(w, int(bits), bool(symmetric), bool(narrow_range), axis, range_method,
                      float(percentile))


@jax.custom_vjp
def straight_through(w: jax.Array, value: jax.Array) -> jax.Array:
  """`value` in the forward pass; the gradient goes to `w` unchanged (and none to `value`)."""
  return value


def _st_fwd(w, value):
  return value, None


def _st_bwd(res, g):
  del res
  return g, jnp.zeros_like(g)


straight_through.defvjp(_st_fwd, _st_bwd)


#: Keys of the `quant` sub-config and their defaults (None: depends on the method).
QUANT_DEFAULTS = {
    "enabled": True,
    "method": "uniform",          # uniform | kmeans | pow2 | none (float weights)
    "bits": 8,
    "bits_by_path": (),           # ("pattern=bits", ...) or ((pattern, bits), ...): first wins
    "per_channel": None,          # None: uniform / pow2 per output channel, k-means per tensor
    "symmetric": True,
    "narrow_range": None,         # None: = symmetric
    "range_method": "minmax",     # minmax | percentile | mse (uniform)
    "percentile": 99.99,
    "include": (r".*",),
    "exclude": transforms.DEFAULT_EXCLUDE,
    "mode": "qat",                # qat (fine-tune through the quantizer) | ptq (no training)
    "kmeans_iters": 100,          # Lloyd iterations (20 left 4-bit ResNet-20 digits PTQ at 98.6%,
                                  # 100 gives 99.4%: 1-D Lloyd converges slowly)
    "kmeans_grad": "sum",         # sum (Deep Compression) | mean of the members' changes
    "seed": 0,
    "adaround": False,            # uniform minmax: learned rounding at calibration (AdaRound)
    "adaround_iters": 500,        # Adam steps per layer
    "brecq": False,               # uniform minmax: learned rounding per residual block (BRECQ)
    "brecq_iters": 1500,          # Adam steps per block (2-bit digits_hard: 500 86.9%, 1500 88.6%)
    "brecq_fisher": False,        # BRECQ: Fisher-weighted block output error (the paper's)
    "brecq_depth": 1,             # BRECQ: a block is the module at the first N path components
    "bias_correction": False,     # calibrate: remove the quantized layers' output mean shift
    "equalize": False,            # calibrate: cross-layer equalization first (DFQ; ReLU nets)
    # Mixed precision (`jcompress.methods.quant.prepare`, `jcompress.bitalloc`): with a budget,
    # a fresh run picks per-layer bits from `bit_candidates` minimising the summed
    # `sensitivity` before it starts, and runs with them as `bits_by_path`.
    "budget_bytes": 0,            # the most model_bytes (manifest.json + weights.bin); 0: none
    "budget_avg_bits": 0.0,       # the most mean code bits per quantized weight; 0: none
    "bit_candidates": (2, 3, 4, 8),
    "sensitivity": "gauss_newton",  # gauss_newton | quadratic | hawq | mse (hessian.py)
    "hessian_probes": 16,         # hawq: at most this many Hutchinson probes
}
#: The keys the mixed-precision allocation reads (not the quantizer's own).
BUDGET_KEYS = ("budget_bytes", "budget_avg_bits", "bit_candidates", "sensitivity",
               "hessian_probes")
QUANT_METHODS = ("uniform", "kmeans", "pow2", "none")
QUANT_MODES = ("qat", "ptq")
KMEANS_GRADS = ("sum", "mean")


class _Leaf(NamedTuple):
  bits: int
  per_channel: bool
  shape: tuple[int, ...]
  index: int                      # position among the params' leaves (k-means seeds)


def _config_bits(bits: Any, method: str, key: str) -> int:
  lo = 1 if method == "kmeans" else 2
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not lo <= bits <= 8:
    raise ConfigError(f"config key '{key}': bits must be an int in {lo}..8 for method "
                      f"'{method}'{' (1 only for kmeans)' if lo == 2 else ''}, got {bits!r}")
  return int(bits)


def parse_bits_by_path(entries: Any, method: str,
                       key: str = "quant.bits_by_path") -> list[tuple[str, int]]:
  """[(pattern, bits)] from "pattern=bits" strings, (pattern, bits) pairs or a dict."""
  if entries is None:
    return []
  if isinstance(entries, str):
    entries = [entries]
  elif hasattr(entries, "items"):
    entries = list(entries.items())
  out = []
  for entry in entries:
    if isinstance(entry, str):
      pattern, sep, bits = entry.rpartition("=")
      if not sep or not pattern:
        raise ConfigError(f"config key '{key}': entry {entry!r} is not 'pattern=bits'")
      try:
        bits = int(bits)
      except ValueError:
        raise ConfigError(f"config key '{key}': entry {entry!r}: bits {bits!r} is not an "
                          "int") from None
    else:
      try:
        pattern, bits = entry
      except (TypeError, ValueError):
        raise ConfigError(f"config key '{key}': entry {entry!r} is neither 'pattern=bits' nor "
                          "a (pattern, bits) pair") from None
    try:
      re.compile(pattern)
    except re.error as e:
      raise ConfigError(f"config key '{key}': pattern {pattern!r} is not a regular expression "
                        f"({e})") from None
    out.append((str(pattern), _config_bits(bits, method, key)))
  return out


def _get(tree: Any, path: str) -> Any:
  for p in path.split("/"):
    tree = tree[p]
  return tree


def _is_concrete(x: Any) -> bool:
  return isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, jax.core.Tracer)


def _kmeans_value(st: dict, per_channel: bool, dtype) -> jax.Array:
  return dequantize(QTensor(codes=st["codes"], codebook=st["codebook"], kind="kmeans",
                            per_channel=per_channel, bits=8, symmetric=False), dtype)


def _kmeans_segments(codes: jax.Array, k: int, per_channel: bool) -> jax.Array:
  """Index of each weight's centroid in the flattened codebook ((C, k) per channel)."""
  c = codes.astype(jnp.int32)
  if per_channel:
    c = c + k * jnp.arange(codes.shape[-1], dtype=jnp.int32)
  return c.reshape(-1)


def quant_weights(params_like: PyTree, *, method: str = "uniform", bits: int = 8,
                  bits_by_path: Any = (), per_channel: bool | None = None,
                  symmetric: bool = True, narrow_range: bool | None = None,
                  range_method: str = "minmax", percentile: float = 99.99,
                  include: str | Sequence[str] = (r".*",),
                  exclude: str | Sequence[str] = transforms.DEFAULT_EXCLUDE,
                  mode: str = "qat", kmeans_iters: int = 100, kmeans_grad: str = "sum",
                  seed: int = 0, act_quant: Any = None, adaround: bool = False,
                  adaround_iters: int = 500, brecq: bool = False, brecq_iters: int = 1500,
                  brecq_fisher: bool = False, brecq_depth: int = 1,
                  bias_correction: bool = False,
                  equalize: bool = False,
                  prefix: str = "quant") -> transforms.ParamTransform:
  r"""Weight quantization as a ParamTransform: QAT (fine-tuning through the quantizer) or PTQ.

  `params_like` (params or their shapes) fixes the selection: kernels whose path matches
  `include` and not `exclude` (first conv and classifier excluded by default). Each selected
  leaf gets `bits`, or the bits of the first `bits_by_path` pattern its path matches (mixed
  precision). Error messages name the config keys `<prefix>.<key>` and the leaf.

  method "uniform": `apply` gives `fake_quant_weight(w)`: the weights quantized with ranges
    of the current latent weights, every step (per output channel by default; symmetric,
    narrow range by default: 4 bits -> codes -7..7), straight-through gradient onto w.
  method "pow2": `apply` gives `power_of_two_quantize(w)` dequantized, gradient straight
    through onto w (identity).
  method "kmeans": codebooks of `2^bits` centroids (per tensor by default, Deep Compression's
    weight sharing), found by k-means in `init` and again in `calibrate` from the starting
    weights (e.g. `init_from`'s); the codes (cluster assignments) stay fixed. `apply` gives
    `C[codes]`, the gradient going straight through onto the latent w. With mode "qat", the
    centroids are trained as Deep Compression does, dL/dC_k = sum_{i: a_i = k} dL/dW_i:
    `update` moves each centroid by the summed change of its members' latent weights since
    the last step (the optimizer moved them from C[codes]),

      C_k <- C_k + sum_{i: a_i = k} (w_i' - C_k[a_i]),     then w_i <- C[a_i],

    which for plain SGD is exactly C_k <- C_k - lr sum_i dL/dW_i (`kmeans_grad="mean"`
    averages the changes instead: a step independent of the cluster size, for Adam-like
    optimizers whose per-weight steps do not add up). With mode "ptq" the codebooks stay as
    calibrated and `update` changes nothing.
  method "none": weights stay float (for activation-only quantization).
  `adaround` (uniform, range_method "minmax"): `calibrate` moves the selected weights onto
    the grid points AdaRound chooses (`jcompress.adaround.adaround_tree`, `adaround_iters`
    Adam steps per layer on the calibration batches) instead of the nearest ones; the
    quantizer then gives those codes (PTQ: the exported codes; QAT: the starting point).
  `brecq` (uniform, range_method "minmax"; instead of `adaround`): the same learned rounding,
    optimised jointly for all the quantized layers of each block (a ResNet's residual block) on
    the block output's error (`jcompress.brecq.brecq_tree`, `brecq_iters` Adam steps per
    block; `brecq_fisher`: the error weighted per output value by the paper's diagonal Fisher
    information, from the gradient of the KL divergence to the float model's predictions;
    `brecq_depth`: a kernel at `a/b/.../conv/kernel` belongs to the block at its first
    `brecq_depth` path components, `a` by default: a ResNet's `stage1_block0`).
  `equalize`: `calibrate` first applies cross-layer equalization to the float weights
    (`jcompress.equalize`: exact in float; for per-tensor quantization of depthwise networks
    with ReLU), before any quantizer sees them.
  `bias_correction`: `calibrate` ends with empirical bias correction
    (`jcompress.bias_correction`): each quantized layer's mean output shift on the calibration
    batches is removed through its bias or the following BatchNorm's beta (any method).
  Both need calibration batches; their figures (and AdaRound's) go into `metrics`.

  The state is `{}` (uniform, pow2), or `{leaf path nested as dicts: {"codebook", "codes"}}`
  (k-means; its shapes follow from the params' shapes). `calibrate(params, state, ctx)`
  checks the selected weights for NaN / Inf (ConfigError naming the leaf), recomputes the
  k-means codebooks from `params` (QAT: the latent weights are set to C[codes] so the first
  update is exact), and initialises the activation quantizers of `act_quant` that need data
  (`actquant.calibrate`: LSQ steps, PACT alpha with `calibrate`). `export` gives
  `{"params": tree}` where each quantized leaf is a dict of the stored arrays: "codes" packed at
  their real width (`packing.pack`; signed codes offset), "scale" (float32, one per channel or
  one), "zero_point" (uint8, asymmetric only) or "codebook" (float32), plus "shape", "bits",
  "kind" and flags as Python values (not counted as stored bytes); `dequantize_export` turns it
  back into the weights `apply` gives, bit for bit. `metrics` gives `weight_bits` (mean code
  bits per quantized weight), `weight_storage_bits` (stored bits per quantized weight, scales
  and codebooks included), `quantized_weights`, `act_bits` and the mean activation clip
  (`act_alpha_mean` for PACT, `act_step_mean` for LSQ). The given params are never modified.
  """
  _check_choice(method, QUANT_METHODS, f"{prefix}.method", "params")
  if mode not in QUANT_MODES:
    raise ConfigError(f"config key '{prefix}.mode': must be one of {list(QUANT_MODES)}, got "
                      f"{mode!r}")
  if range_method not in RANGE_METHODS:
    raise ConfigError(f"config key '{prefix}.range_method': must be one of "
                      f"{list(RANGE_METHODS)}, got {range_method!r}")
  if kmeans_grad not in KMEANS_GRADS:
    raise ConfigError(f"config key '{prefix}.kmeans_grad': must be one of {list(KMEANS_GRADS)}, "
                      f"got {kmeans_grad!r}")
  if not 0.0 < percentile <= 100.0:
    raise ConfigError(f"config key '{prefix}.percentile': must be in (0, 100], got "
                      f"{percentile!r}")
  if not isinstance(kmeans_iters, (int, np.integer)) or kmeans_iters < 1:
    raise ConfigError(f"config key '{prefix}.kmeans_iters': must be an int >= 1, got "
                      f"{kmeans_iters!r}")
  if adaround and (method != "uniform" or range_method != "minmax"):
    raise ConfigError(f"config key '{prefix}.adaround': AdaRound needs method 'uniform' with "
                      f"range_method 'minmax', got {method!r} / {range_method!r}")
  if isinstance(adaround_iters, bool) or not isinstance(adaround_iters, (int, np.integer)) \
      or adaround_iters < 1:
    raise ConfigError(f"config key '{prefix}.adaround_iters': must be an int >= 1, got "
                      f"{adaround_iters!r}")
  if isinstance(brecq_iters, bool) or not isinstance(brecq_iters, (int, np.integer)) \
      or brecq_iters < 1:
    raise ConfigError(f"config key '{prefix}.brecq_iters': must be an int >= 1, got "
                      f"{brecq_iters!r}")
  for k, v in (("bias_correction", bias_correction), ("equalize", equalize), ("brecq", brecq),
               ("brecq_fisher", brecq_fisher)):
    if not isinstance(v, (bool, np.bool_)):
      raise ConfigError(f"config key '{prefix}.{k}': must be true or false, got {v!r}")
  if brecq and (method != "uniform" or range_method != "minmax"):
    raise ConfigError(f"config key '{prefix}.brecq': BRECQ needs method 'uniform' with "
                      f"range_method 'minmax', got {method!r} / {range_method!r}")
  if brecq and adaround:
    raise ConfigError(f"config keys '{prefix}.brecq' and '{prefix}.adaround': both choose the "
                      "rounding (per block / per layer); set one of them")
  if isinstance(brecq_depth, bool) or not isinstance(brecq_depth, (int, np.integer)) \
      or brecq_depth < 1:
    raise ConfigError(f"config key '{prefix}.brecq_depth': must be an int >= 1, got "
                      f"{brecq_depth!r}")
  if brecq_fisher and not brecq:
    raise ConfigError(f"config key '{prefix}.brecq_fisher': weights BRECQ's block error; set "
                      f"'{prefix}.brecq' too")
  if bias_correction and method == "none":
    raise ConfigError(f"config key '{prefix}.bias_correction': method 'none' quantizes no "
                      "weights, there is no shift to correct")
  from jcompress import actquant  # noqa: PLC0415

  act_spec = actquant.check_spec(act_quant)
  narrow_range = bool(symmetric) if narrow_range is None else bool(narrow_range)
  if per_channel is None:
    per_channel = method != "kmeans"
  per_channel = bool(per_channel)
  leaves: dict[str, _Leaf] = {}
  if method != "none":
    bits = _config_bits(bits, method, f"{prefix}.bits")
    rules = parse_bits_by_path(bits_by_path, method, f"{prefix}.bits_by_path")
    sel = transforms.select(params_like, include, exclude, kernels_only=True,
                            key=f"{prefix}.include")
    used = [False] * len(rules)
    flat = jax.tree_util.tree_flatten_with_path(params_like)[0]
    chosen = jax.tree.leaves(sel)
    for i, ((path, leaf), picked) in enumerate(zip(flat, chosen)):
      if not picked:
        continue
      name = transforms.path_str(path)
      matched = [j for j, (pattern, _) in enumerate(rules) if re.search(pattern, name)]
      for j in matched:
        used[j] = True
      b = rules[matched[0]][1] if matched else bits          # the first match wins
      shape = tuple(leaf.shape)
      if method == "kmeans":
        n = int(np.prod(shape)) // (shape[-1] if per_channel else 1)
        if 2 ** b > n:
          raise ConfigError(
              f"config key '{prefix}.bits': cannot k-means quantize '{name}' {shape} with "
              f"{b} bits: a codebook of {2 ** b} entries is larger than the {n} values it "
              f"would code{' per channel' if per_channel else ''}")
      if _is_concrete(leaf):
        _check_finite(leaf, name)
      leaves[name] = _Leaf(b, per_channel, shape, i)
    for (pattern, _), hit in zip(rules, used):
      if not hit:
        raise ConfigError(f"config key '{prefix}.bits_by_path': pattern {pattern!r} matches no "
                          f"quantized leaf; quantized leaves are: {', '.join(list(leaves)[:12])}")
  n_quant = sum(int(np.prod(lf.shape)) for lf in leaves.values())
  base_key = jax.random.key(int(seed))

  def kmeans_state(params):
    flat = {}
    for name, lf in leaves.items():
      w = _get(params, name)
      axis = len(lf.shape) - 1 if lf.per_channel else None
      cents, codes = _kmeans(w, jax.random.fold_in(base_key, lf.index), k=2 ** lf.bits,
                             iters=int(kmeans_iters), axis=axis)
      flat[name] = {"codebook": cents.astype(jnp.float32), "codes": codes}
    return traverse_util.unflatten_dict(flat, sep="/")

  def init(params, rng):
    del rng   # k-means seeds come from `seed`: the codebooks are a function of the weights
    return kmeans_state(params) if method == "kmeans" else {}

  def quantize_leaf(name, w, state):
    lf = leaves[name]
    if method == "uniform":
      return fake_quant_weight(w, lf.bits, symmetric=symmetric, narrow_range=narrow_range,
                               per_channel=lf.per_channel, range_method=range_method,
                               percentile=percentile)
    if method == "pow2":
      axis = w.ndim - 1 if lf.per_channel else None
      codes, scale = _pow2(jax.lax.stop_gradient(w), bits=lf.bits, axis=axis)
      value = dequantize(QTensor(codes=codes, scale=scale, kind="pow2", bits=lf.bits), w.dtype)
      return straight_through(w, value)
    st = jax.lax.stop_gradient(_get(state, name))
    return straight_through(w, _kmeans_value(st, lf.per_channel, w.dtype))

  def apply(params, state):
    if not leaves:
      return params
    return transforms.map_with_path(
        lambda name, w: quantize_leaf(name, w, state) if name in leaves else w, params)

  def update(params, state, step):
    del step
    if method != "kmeans" or mode != "qat":
      return params, state
    new_params, flat = {}, {}
    for name, lf in leaves.items():
      st = _get(state, name)
      cb, codes = st["codebook"], st["codes"]
      w = _get(params, name)
      delta = (w - _kmeans_value(st, lf.per_channel, w.dtype)).astype(jnp.float32)
      seg = _kmeans_segments(codes, cb.shape[-1], lf.per_channel)
      sums = jax.ops.segment_sum(delta.reshape(-1), seg, num_segments=cb.size)
      if kmeans_grad == "mean":
        counts = jax.ops.segment_sum(jnp.ones_like(seg, jnp.float32), seg, num_segments=cb.size)
        sums = sums / jnp.maximum(counts, 1.0)
      new = {"codebook": cb + sums.reshape(cb.shape), "codes": codes}
      flat[name] = new
      new_params[name] = _kmeans_value(new, lf.per_channel, w.dtype)
    params = transforms.map_with_path(lambda name, w: new_params.get(name, w), params)
    return params, traverse_util.unflatten_dict(flat, sep="/")

  calibration_figures: dict = {}   # scalar figures of the last calibrate, for `metrics`

  def calibration_images(ctx, key):
    if ctx is None or not ctx.batches:
      raise ConfigError(f"config key '{prefix}.{key}': needs calibration batches "
                        "(config key 'calibration_batches')")
    return jnp.concatenate([jnp.asarray(b["image"]) for b in ctx.batches])

  def calibrate(params, state, ctx):
    for name in leaves:
      w = _get(params, name)
      if _is_concrete(w):
        _check_finite(w, name)
    if bias_correction:        # where each correction goes: checked before any work
      if not leaves:
        raise ConfigError(f"config key '{prefix}.bias_correction': no quantized layer to "
                          f"correct ({prefix}.include / {prefix}.exclude select none)")
      from jcompress import bias_correction as bias_lib  # noqa: PLC0415
      bias_lib.plan(ctx.model if ctx else None, params, ctx.batch_stats if ctx else None,
                    calibration_images(ctx, "bias_correction"),
                    [name[:-len("/kernel")] for name in leaves], f"{prefix}.bias_correction")
    if equalize:
      from jcompress import equalize as equalize_lib  # noqa: PLC0415
      params, report = equalize_lib.equalize(params, ctx.batch_stats if ctx else None,
                                             ctx.model if ctx else None,
                                             calibration_images(ctx, "equalize"),
                                             key=f"{prefix}.equalize")
      calibration_figures.update(equalize_lib.report_summary(report))
      logging.info("equalized %d layer pairs in %d sweeps (mean channel / tensor range %.3f -> "
                   "%.3f)", len(report["pairs"]), report["sweeps"],
                   report["range_ratio_before"], report["range_ratio_after"])
    float_params = params
    if method == "kmeans":
      state = kmeans_state(params)
      if mode == "qat":
        params = transforms.map_with_path(
            lambda name, w: (_kmeans_value(_get(state, name), leaves[name].per_channel, w.dtype)
                             if name in leaves else w), params)
    if ctx is not None and actquant.needs_calibration(act_spec):
      params = actquant.calibrate(ctx.model, params, ctx.batch_stats, ctx.batches)
    if adaround and leaves:
      if ctx is None or not ctx.batches:
        raise ConfigError(f"config key '{prefix}.adaround': needs calibration batches "
                          "(config key 'calibration_batches')")
      from jcompress import adaround as adaround_lib  # noqa: PLC0415
      images = jnp.concatenate([jnp.asarray(b["image"]) for b in ctx.batches])
      t0 = time.time()
      params, report = adaround_lib.adaround_tree(
          ctx.model, params, ctx.batch_stats, images,
          {name: lf.bits for name, lf in leaves.items()}, seed=seed, symmetric=symmetric,
          narrow_range=narrow_range, per_channel=per_channel, iters=int(adaround_iters),
          log=logging.info)
      calibration_figures.update(
          adaround_lib.report_summary(report, images.shape[0], time.time() - t0))
    if brecq and leaves:
      from jcompress import brecq as brecq_lib  # noqa: PLC0415
      images = calibration_images(ctx, "brecq")
      t0 = time.time()
      params, report = brecq_lib.brecq_tree(
          ctx.model, params, ctx.batch_stats, images,
          {name: lf.bits for name, lf in leaves.items()}, fisher=bool(brecq_fisher),
          seed=seed, symmetric=symmetric, narrow_range=narrow_range,
          per_channel=per_channel, iters=int(brecq_iters), depth=brecq_depth,
          log=logging.info)
      calibration_figures.update(
          brecq_lib.report_summary(report, images.shape[0], time.time() - t0))
    if bias_correction:
      images = calibration_images(ctx, "bias_correction")
      params, report = bias_lib.correct(
          ctx.model, float_params, apply(params, state), ctx.batch_stats, images,
          [name[:-len("/kernel")] for name in leaves], target=params,
          key=f"{prefix}.bias_correction")
      calibration_figures.update(bias_lib.report_summary(report))
      logging.info("bias correction: %d layers, mean |shift| %.4g", len(report),
                   calibration_figures["bias_correction_mean_abs_shift"])
    return params, state

  def leaf_qtensor(name, w, state) -> QTensor:
    lf = leaves[name]
    if method == "uniform":
      return quantize(w, lf.bits, symmetric=symmetric, narrow_range=narrow_range,
                      per_channel=lf.per_channel, range_method=range_method,
                      percentile=percentile, name=name)
    if method == "pow2":
      return power_of_two_quantize(w, lf.bits, per_channel=lf.per_channel, name=name)
    _check_finite(w, name)
    st = _get(state, name)
    return QTensor(codes=st["codes"], codebook=st["codebook"], bits=lf.bits, kind="kmeans",
                   symmetric=False, per_channel=lf.per_channel)

  def export(params, state):
    return {"params": transforms.map_with_path(
        lambda name, w: pack_qtensor(leaf_qtensor(name, w, state)) if name in leaves else w,
        params)}

  act_kind = act_spec.get("kind", "none")

  def metrics(params, state):
    del state
    out = {k: jnp.asarray(v) for k, v in calibration_figures.items()}
    if leaves:
      code_bits = sum(lf.bits * int(np.prod(lf.shape)) for lf in leaves.values())
      stored = sum(8 * _stored_nbytes(lf, method, symmetric) for lf in leaves.values())
      out["weight_bits"] = jnp.float32(code_bits / n_quant)
      out["weight_storage_bits"] = jnp.float32(stored / n_quant)
      out["quantized_weights"] = jnp.int32(n_quant)
    if act_kind != "none":
      out["act_bits"] = jnp.int32(act_spec["bits"])
      name = {"pact": "alpha", "lsq": "step"}.get(act_kind)
      if name is not None:
        values = [v for p, v in actquant.quantizer_params(params).items()
                  if p.endswith("/" + name)]
        if values:
          out[f"act_{name}_mean"] = jnp.mean(jnp.stack([jnp.asarray(v, jnp.float32).reshape(())
                                                        for v in values]))
    return out

  return transforms.ParamTransform(init, apply, update, export, calibrate, metrics)


def _stored_nbytes(lf: _Leaf, method: str, symmetric: bool) -> int:
  """Bytes `export` stores for a quantized leaf (as `packing.qtensor_nbytes`), from its shape."""
  n = int(np.prod(lf.shape))
  groups = lf.shape[-1] if lf.per_channel else 1
  nbytes = packing.packed_nbytes(n, lf.bits)
  if method == "kmeans":
    return nbytes + 4 * groups * 2 ** lf.bits
  nbytes += 4 * groups                                     # float32 scales
  if method == "uniform" and not symmetric:
    nbytes += groups                                       # uint8 zero points
  return nbytes


def _signed_codes(q: QTensor) -> bool:
  return q.kind == "pow2" or (q.kind == "uniform" and q.symmetric)


def pack_qtensor(q: QTensor) -> dict:
  """The stored form of a QTensor: codes packed at `q.bits` bits (`packing.pack`) and the
  float32 scales (flattened, one per channel or one), uint8 zero points (asymmetric uniform
  only) or float32 codebook; shape, bits, kind and flags as Python values."""
  out = {"codes": packing.pack(np.asarray(q.codes), q.bits, signed=_signed_codes(q)),
         "shape": tuple(int(d) for d in q.codes.shape), "bits": int(q.bits), "kind": q.kind,
         "per_channel": bool(q.per_channel), "symmetric": bool(q.symmetric),
         "narrow_range": bool(q.narrow_range)}
  if q.kind in ("uniform", "pow2"):
    out["scale"] = np.asarray(q.scale, np.float32).reshape(-1)
  if q.kind == "uniform" and not q.symmetric:
    out["zero_point"] = np.asarray(q.zero_point, np.uint8).reshape(-1)
  if q.kind == "kmeans":
    out["codebook"] = np.asarray(q.codebook, np.float32)
  return out


def _is_packed(x: Any) -> bool:
  return isinstance(x, dict) and "codes" in x and "kind" in x and "shape" in x


def unpack_qtensor(d: dict) -> QTensor:
  """The QTensor a `pack_qtensor` dict stores."""
  shape = tuple(d["shape"])
  n = int(np.prod(shape))
  signed = d["kind"] == "pow2" or (d["kind"] == "uniform" and d["symmetric"])
  codes = packing.unpack(d["codes"], d["bits"], n, signed=signed).reshape(shape)
  bshape = [1] * len(shape)
  if d["per_channel"]:
    bshape[-1] = shape[-1]

  def per(v, dtype):
    v = np.asarray(v, dtype)
    return v.reshape(bshape) if d["per_channel"] else v.reshape(())

  scale = zero_point = codebook = None
  if d["kind"] in ("uniform", "pow2"):
    scale = per(d["scale"], np.float32)
  if d["kind"] == "uniform":
    zero_point = (per(d["zero_point"], np.uint8) if not d["symmetric"]
                  else np.zeros(np.shape(scale), np.int8))
  if d["kind"] == "kmeans":
    codebook = np.asarray(d["codebook"], np.float32)
  return QTensor(codes=jnp.asarray(codes), scale=None if scale is None else jnp.asarray(scale),
                 zero_point=None if zero_point is None else jnp.asarray(zero_point),
                 codebook=None if codebook is None else jnp.asarray(codebook), bits=d["bits"],
                 kind=d["kind"], symmetric=d["symmetric"], narrow_range=d["narrow_range"],
                 per_channel=d["per_channel"])


def dequantize_export(artifact: dict, dtype=jnp.float32) -> PyTree:
  """The weights a `quant_weights(...).export` artifact stands for (those `apply` gives)."""
  return jax.tree.map(lambda x: dequantize(unpack_qtensor(x), dtype) if _is_packed(x) else x,
                      artifact["params"], is_leaf=_is_packed)


def transform_from_config(cfg, params_like: PyTree, config=None) -> transforms.ParamTransform:
  """The `quant` sub-config's transform (`experiment.build_transform`): `quant_weights` with the
  keys of `QUANT_DEFAULTS` (an unknown key is a ConfigError naming it), and the activation
  quantizer of `config.model_kwargs.act_quant` for calibration and metrics."""
  keys = list(cfg.keys())
  for k in keys:
    if k not in QUANT_DEFAULTS:
      raise ConfigError(f"config key 'quant.{k}': unknown key; the quant sub-config takes "
                        f"{', '.join(QUANT_DEFAULTS)}")
  opts = {k: cfg[k] if k in keys else v for k, v in QUANT_DEFAULTS.items()}
  del opts["enabled"]
  for k in BUDGET_KEYS:     # used before the run (methods/quant.py), not by the quantizer
    del opts[k]
  for k in ("include", "exclude"):
    opts[k] = (opts[k],) if isinstance(opts[k], str) else tuple(opts[k])
  if isinstance(opts["bits_by_path"], (list, tuple)):
    opts["bits_by_path"] = [tuple(e) if isinstance(e, list) else e for e in opts["bits_by_path"]]
  act_quant = None
  if config is not None and "model_kwargs" in config:
    act_quant = config.model_kwargs.get("act_quant")
  return quant_weights(params_like, act_quant=act_quant, **opts)
