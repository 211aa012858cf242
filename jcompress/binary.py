"""Binary neural networks: sign with relaxed gradients, activation quantizers, bit packing.

BNN training (Courbariaux et al. 2016; seed article 001) keeps latent float
weights. The forward pass sees `sign(w)` (threshold 0, `sign(0) = +1`) or a
stochastic binarization; the backward pass goes through a relaxed sign onto the
latent weights; after each optimizer step the latent weights are clipped to
[-1, 1]; after training they are converted once and for all to +1/-1 and packed
32 to a `uint32` word.

Quantizers (every one a `jax.custom_vjp`; forward values are exactly -1/+1 in
the input's dtype):

  binarize(x)              sign(x);  dx = g * 1{|x| <= 1}            (straight-through, STE)
  approx_sign(x)           sign(x);  dx = g * F'(x)                 (Bi-Real Net)
      F(x) = -1 (x < -1), 2x + x^2 (-1 <= x < 0), 2x - x^2 (0 <= x < 1), 1 (x >= 1)
      F'(x) = 2 + 2x on [-1, 0), 2 - 2x on [0, 1), 0 elsewhere
  swish_sign(x, beta)      sign(x);  dx = g * d/dx[2 s (1 + beta x (1 - s)) - 1]
                             = g * beta (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x)),
                           s = sigmoid(beta x)
                                                                    (BNN+, Larq's SwishSign)
  stochastic_binarize(x, key)  +1 with probability hard_sigmoid(x) = clip((x + 1) / 2, 0, 1);
                           dx = g * 1{|x| <= 1}
  xnor_binarize_weights(w) alpha * sign(w), alpha = mean |w| per output channel (last axis);
                           STE through sign, the true gradient through alpha (XNOR-Net)
  ternarize(w)             sign(w) 1{|w| > delta} in {-1, 0, +1}, delta = 0.7 mean |w| per
                           output channel (TWN's threshold, unscaled so that integer products
                           stay exact); dw = g * 1{|w| <= 1} (straight-through)

Bit packing: `pack_signs` stores bit 1 for +1 (x >= 0) and bit 0 for -1, 32 signs a
word along one axis; `binary_dot(a, b, n) = n - 2 popcount(a xor b)` is the exact
integer dot product of the two +-1 vectors.
"""

from __future__ import annotations

import functools
from typing import Any
from typing import Callable
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import transforms
from jcompress.errors import ConfigError

PyTree = Any

#: Signs per packed word.
WORD_BITS = 32


def _sign(x: jax.Array) -> jax.Array:
  """sign with sign(0) = +1, exactly +1/-1 in x's dtype."""
  one = jnp.ones((), x.dtype)
  return jnp.where(x >= 0, one, -one)


def _ste_mask(x: jax.Array, g: jax.Array) -> jax.Array:
  """g * 1{|x| <= 1}, in g's dtype."""
  return jnp.where(jnp.abs(x) <= 1, g, jnp.zeros_like(g))


# ----------------------------------------------------------------------------- sign quantizers


@jax.custom_vjp
def binarize(x: jax.Array) -> jax.Array:
  """sign(x) in {-1, +1} with sign(0) = +1; gradient g * 1{|x| <= 1} (straight-through)."""
  return _sign(x)


def _binarize_fwd(x):
  return _sign(x), x


def _binarize_bwd(x, g):
  return (_ste_mask(x, g),)


binarize.defvjp(_binarize_fwd, _binarize_bwd)


def approx_sign_grad(x: jax.Array) -> jax.Array:
  """F'(x) of Bi-Real Net's piecewise polynomial: 2 + 2x on [-1, 0), 2 - 2x on [0, 1), else 0."""
  return jnp.where((x >= -1) & (x < 0), 2 + 2 * x,
                   jnp.where((x >= 0) & (x < 1), 2 - 2 * x, jnp.zeros_like(x)))


@jax.custom_vjp
def approx_sign(x: jax.Array) -> jax.Array:
  """sign(x) forward; backward the derivative of Bi-Real Net's ApproxSign (module docstring)."""
  return _sign(x)


def _approx_sign_fwd(x):
  return _sign(x), x


def _approx_sign_bwd(x, g):
  return ((g * approx_sign_grad(x)).astype(g.dtype),)


approx_sign.defvjp(_approx_sign_fwd, _approx_sign_bwd)


def swish_sign_grad(x: jax.Array, beta: float = 5.0) -> jax.Array:
  """d/dx [2 s (1 + beta x (1 - s)) - 1] with s = sigmoid(beta x).

  Equals 2 beta s (1 - s) (2 + beta x (1 - 2 s)) = beta (2 - beta x tanh(beta x / 2)) /
  (1 + cosh(beta x)). Computed as 2 beta sigmoid(bx) sigmoid(-bx) (2 - bx tanh(bx / 2)),
  which neither overflows (cosh) nor cancels (1 - s) in float32.
  """
  bx = beta * x
  return 2 * beta * jax.nn.sigmoid(bx) * jax.nn.sigmoid(-bx) * (2 - bx * jnp.tanh(bx / 2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _swish_sign(x, beta):
  return _sign(x)


def _swish_sign_fwd(x, beta):
  return _sign(x), x


def _swish_sign_bwd(beta, x, g):
  return ((g * swish_sign_grad(x, beta)).astype(g.dtype),)


_swish_sign.defvjp(_swish_sign_fwd, _swish_sign_bwd)


def swish_sign(x: jax.Array, beta: float = 5.0) -> jax.Array:
  """sign(x) forward; backward the SwishSign relaxation of BNN+ / Larq (module docstring).

  `beta` (a Python float) sets the sharpness; the relaxation tends to sign as beta grows.
  """
  return _swish_sign(x, float(beta))


@jax.custom_vjp
def _straight_through(x, y):
  """Returns y; the gradient g * 1{|x| <= 1} goes to x and nothing to y."""
  return y


def _straight_through_fwd(x, y):
  return y, x


def _straight_through_bwd(x, g):
  return _ste_mask(x, g).astype(x.dtype), jnp.zeros_like(g)


_straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


def hard_sigmoid(x: jax.Array) -> jax.Array:
  """clip((x + 1) / 2, 0, 1)."""
  return jnp.clip((x + 1) / 2, 0, 1)


def stochastic_binarize(x: jax.Array, key: jax.Array) -> jax.Array:
  """+1 with probability hard_sigmoid(x), else -1 (in x's dtype); STE gradient as `binarize`.

  The draw is `u < hard_sigmoid(x)` with `u ~ U[0, 1)` from `key`, so it is a pure
  function of (x, key): x >= 1 always gives +1 and x <= -1 always -1.
  """
  u = jax.random.uniform(key, x.shape, jnp.float32)
  one = jnp.ones((), x.dtype)
  y = jnp.where(u < hard_sigmoid(x.astype(jnp.float32)), one, -one)
  return _straight_through(x, y)


def xnor_binarize_weights(w: jax.Array) -> jax.Array:
  """XNOR-Net weights: alpha * sign(w), alpha = mean |w| over every axis but the last.

  The last axis is the output channel for HWIO conv kernels and (in, out) Dense
  kernels, so alpha has one value per output channel. Gradient: straight-through
  through sign (g * 1{|w| <= 1}) and the true gradient through alpha, i.e. for
  output channel c with N = w.size / w.shape[-1] weights,

    dL/dw_i = alpha_c g_i 1{|w_i| <= 1} + sign(w_i) / N * sum_j g_j sign(w_j)   (j in channel c)

  where the second sign is d|w|/dw (what `jnp.abs` differentiates to).
  """
  axes = tuple(range(w.ndim - 1))
  alpha = jnp.mean(jnp.abs(w), axis=axes, keepdims=True)
  return alpha * binarize(w)


#: TWN's threshold: delta = TERNARY_DELTA * mean |w| (Li et al. 2016, the approximately optimal
#: threshold for Gaussian or uniform weights).
TERNARY_DELTA = 0.7


def ternary_nonzero(w: jax.Array) -> jax.Array:
  """1{|w| > delta}, delta = TERNARY_DELTA * mean |w| per output channel (the last axis)."""
  axes = tuple(range(w.ndim - 1))
  delta = TERNARY_DELTA * jnp.mean(jnp.abs(w), axis=axes, keepdims=True)
  return jnp.abs(w) > delta


@jax.custom_vjp
def ternarize(w: jax.Array) -> jax.Array:
  """Ternary weights: sign(w) where |w| > delta (`ternary_nonzero`), else 0; values -1, 0, +1
  (no scale: the following BatchNorm absorbs one, and integer products stay exact).
  Gradient: straight-through, g * 1{|w| <= 1}."""
  return jnp.where(ternary_nonzero(w), _sign(w), jnp.zeros((), w.dtype))


def _ternarize_fwd(w):
  return ternarize(w), w


def _ternarize_bwd(w, g):
  return (_ste_mask(w, g),)


ternarize.defvjp(_ternarize_fwd, _ternarize_bwd)


def xnor_scale(w: jax.Array) -> jax.Array:
  """alpha of `xnor_binarize_weights`: mean |w| per output channel (last axis), shape (out,)."""
  return jnp.mean(jnp.abs(w), axis=tuple(range(w.ndim - 1)))


BINARIZERS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "ste_sign": binarize,
    "approx_sign": approx_sign,
    "swish_sign": swish_sign,
    "xnor": xnor_binarize_weights,
    "ternary": ternarize,
}


def get_binarizer(name: str) -> Callable[[jax.Array], jax.Array]:
  """The weight binarizer called `name` (the value of config key `binary.method`)."""
  try:
    return BINARIZERS[name]
  except (KeyError, TypeError):
    raise ConfigError(f"config key 'binary.method': unknown binarizer {name!r}; "
                      f"known: {', '.join(BINARIZERS)}") from None


# ----------------------------------------------------------------------------- activations


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _uniform_ste(x, levels, signed):
  if signed:
    y = jnp.round(jnp.clip(x, -1, 1) * levels) / levels
  else:
    y = jnp.round(jnp.clip(x, 0, 1) * levels) / levels
  return y.astype(x.dtype)


def _uniform_ste_fwd(x, levels, signed):
  return _uniform_ste(x, levels, signed), x


def _uniform_ste_bwd(levels, signed, x, g):
  lo = -1 if signed else 0
  return (jnp.where((x >= lo) & (x <= 1), g, jnp.zeros_like(g)),)


_uniform_ste.defvjp(_uniform_ste_fwd, _uniform_ste_bwd)


def quantize_activation(x: jax.Array, num_bits: int, signed: bool = False,
                        key: str = "num_bits") -> jax.Array:
  """Quantizes activations to `num_bits` with straight-through gradients.

  - num_bits = 1: `binarize(x)` (sign, gradient g * 1{|x| <= 1}); `signed` is ignored.
  - num_bits = k in 2..8, unsigned (default; DoReFa-Net): round(clip(x, 0, 1) * (2^k - 1)) /
    (2^k - 1), 2^k levels in [0, 1]; gradient g * 1{0 <= x <= 1}.
  - signed: round(clip(x, -1, 1) * (2^(k-1) - 1)) / (2^(k-1) - 1), the symmetric 2^k - 1
    levels in [-1, 1] (zero exact, e.g. codes -7..7 for k = 4); gradient g * 1{|x| <= 1}.

  Any other num_bits raises ConfigError naming `key`.
  """
  if isinstance(num_bits, bool) or not isinstance(num_bits, (int, np.integer)) \
      or not 1 <= num_bits <= 8:
    raise ConfigError(f"config key '{key}': activation bits must be an integer in 1..8, "
                      f"got {num_bits!r}")
  num_bits = int(num_bits)
  if num_bits == 1:
    return binarize(x)
  levels = 2 ** (num_bits - 1) - 1 if signed else 2 ** num_bits - 1
  return _uniform_ste(x, float(levels), bool(signed))


# ----------------------------------------------------------------------------- bit packing


def num_words(n: int) -> int:
  """ceil(n / 32): words holding n signs."""
  return -(-n // WORD_BITS)


def pack_signs(w: jax.Array, axis: int = -2) -> jax.Array:
  """Packs the signs of `w` along `axis` into uint32 words, 32 a word.

  Bit i of word k holds element 32 k + i: 1 for +1 (w >= 0, so sign(0) = +1), 0 for -1.
  The axis is padded to a multiple of 32 with 0 bits (read as -1 by `unpack_signs`
  and dropped there). The result has w's shape with that axis of length ceil(n / 32).
  `binary_dot` is unaffected by the padding as long as both operands are padded
  alike: equal bits xor to 0 and add nothing to the popcount. `axis=-2` is the
  input-channel axis of HWIO conv and (in, out) Dense kernels.
  """
  w = jnp.asarray(w)
  axis = axis % w.ndim
  n = w.shape[axis]
  nw = num_words(n)
  bits = (w >= 0).astype(jnp.uint32)
  pad = [(0, 0)] * w.ndim
  pad[axis] = (0, nw * WORD_BITS - n)
  # The axis splits in place into (words, 32 bits), so the words keep w's layout (no transpose).
  bits = jnp.pad(bits, pad).reshape(w.shape[:axis] + (nw, WORD_BITS) + w.shape[axis + 1:])
  shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32).reshape(
      (WORD_BITS,) + (1,) * (w.ndim - 1 - axis))
  return jnp.sum(bits << shifts, axis=axis + 1, dtype=jnp.uint32)


def unpack_signs(words: jax.Array, n: int, axis: int = -2, dtype=jnp.float32) -> jax.Array:
  """Inverse of `pack_signs`: the first `n` signs along `axis` as +1/-1 in `dtype`."""
  words = jnp.moveaxis(jnp.asarray(words, jnp.uint32), axis, -1)
  bits = (words[..., None] >> jnp.arange(WORD_BITS, dtype=jnp.uint32)) & jnp.uint32(1)
  bits = bits.reshape(words.shape[:-1] + (words.shape[-1] * WORD_BITS,))[..., :n]
  one = jnp.ones((), dtype)
  return jnp.moveaxis(jnp.where(bits == 1, one, -one), -1, axis)


def binary_dot(packed_a: jax.Array, packed_b: jax.Array, n: int) -> jax.Array:
  """Dot products of +-1 vectors from their packed words (words along the last axis).

  n - 2 popcount(a xor b), summed over the words; leading axes broadcast. Exact,
  int32, equal to sum_i a_i b_i over the n (unpadded) signs.
  """
  a = jnp.asarray(packed_a, jnp.uint32)
  b = jnp.asarray(packed_b, jnp.uint32)
  diff = jnp.sum(jax.lax.population_count(a ^ b).astype(jnp.int32), axis=-1)
  return jnp.int32(n) - 2 * diff


def binary_matmul(x_words: jax.Array, w_words: jax.Array, n: int) -> jax.Array:
  """x @ w for +-1 x (..., n) packed along its last axis and w (n, out) packed along axis 0.

  `w_words` is what `pack_signs(w, axis=-2)` gives for a Dense kernel; returns int32 (..., out).
  """
  return binary_dot(jnp.asarray(x_words)[..., None, :], jnp.asarray(w_words).T, n)


# ----------------------------------------------------------------------------- ParamTransform


def binary_weights(params_like: PyTree,
                   method: str = "ste_sign",
                   include: str | Sequence[str] = (r".*",),
                   exclude: str | Sequence[str] = transforms.DEFAULT_EXCLUDE,
                   key: str = "binary.include",
                   float_steps: int = 0) -> transforms.ParamTransform:
  """BNN weights: the forward pass sees binarized kernels, the optimizer moves latent floats.

  `params_like` (params or their shapes) fixes the selection: kernels (ndim >= 2)
  whose path matches `include` and not `exclude` (`transforms.select`; a selection
  of nothing raises ConfigError naming `key`). `method` names the binarizer
  (`get_binarizer`, config key `binary.method`).

  `float_steps` > 0 trains in two stages in one run, as ReActNet's two-step schedule does
  (binary activations first, then binary weights too): for the first `float_steps` optimizer
  steps the selected kernels stay float (clipped to [-1, 1] like the latents), then they are
  binarized for the rest of the run; the optimizer and its schedule carry on across the switch.

  - init: no state (`{}`); with `float_steps` > 0, `{"binary_on": bool}` (False until the
    `float_steps`-th step).
  - apply: selected leaves -> binarizer(w) (+1/-1, alpha * sign(w) for "xnor", -1/0/+1 for
    "ternary"),
    gradients through the binarizer's relaxation onto the latent w; others untouched.
    (Stage one: the selected leaves as they are.)
  - update: clips the selected latent weights to [-1, 1]; returns (params, state), the state
    switched on once `step` (steps done) reaches `float_steps`.
  - export: {"params": tree} where each selected leaf is {"bits": pack_signs(w, axis=-2),
    "shape": w.shape} (plus "scale": the per-output-channel alpha for "xnor"; "nonzero": the
    packed nonzero plane for "ternary") and the
    other leaves are kept as they are; `unpack_export` turns it back into the weights
    that `apply` gives.
  """
  binarizer = get_binarizer(method)
  mask = transforms.select(params_like, include, exclude, kernels_only=True, key=key)
  float_steps = int(float_steps)

  def init(params, rng):
    del params, rng
    return {"binary_on": jnp.asarray(False)} if float_steps > 0 else {}

  def apply(params, state):
    if float_steps > 0:
      on = state["binary_on"]
      return jax.tree.map(lambda m, w: jnp.where(on, binarizer(w), w) if m else w, mask, params)
    return jax.tree.map(lambda m, w: binarizer(w) if m else w, mask, params)

  def update(params, state, step):
    if float_steps > 0:
      state = {"binary_on": jnp.asarray(step) >= float_steps}
    return jax.tree.map(lambda m, w: jnp.clip(w, -1, 1) if m else w, mask, params), state

  def export_leaf(m, w):
    if not m:
      return w
    out = {"bits": pack_signs(w, axis=-2), "shape": tuple(w.shape)}
    if method == "xnor":
      out["scale"] = xnor_scale(w)
    if method == "ternary":   # a second plane: which weights are not 0
      one = jnp.ones((), w.dtype)
      out["nonzero"] = pack_signs(jnp.where(ternary_nonzero(w), one, -one), axis=-2)
    return out

  def export(params, state):
    del state
    return {"params": jax.tree.map(export_leaf, mask, params)}

  return transforms.ParamTransform(init, apply, update, export)


def transform_from_config(cfg, params_like: PyTree, config=None) -> transforms.ParamTransform:
  """The `binary` sub-config's transform (`experiment.build_transform`): `binary_weights` with
  `cfg.method`, `cfg.include`, `cfg.exclude` and `cfg.float_steps` (optional, default 0: an int
  in [0, total_steps), else ConfigError naming `binary.float_steps`)."""
  float_steps = cfg.get("float_steps", 0)
  total = None if config is None else config.get("total_steps")
  if (isinstance(float_steps, bool) or not isinstance(float_steps, int) or float_steps < 0
      or (total and float_steps >= total)):
    raise ConfigError(f"config key 'binary.float_steps': the number of steps before the weights "
                      f"are binarized must be an int in [0, total_steps={total}), got "
                      f"{float_steps!r}")
  return binary_weights(params_like, method=cfg.method, include=tuple(cfg.include),
                        exclude=tuple(cfg.exclude), key="binary.include",
                        float_steps=float_steps)


def _is_packed(x) -> bool:
  return isinstance(x, dict) and "bits" in x and "shape" in x


def unpack_export(artifact: PyTree, dtype=jnp.float32) -> PyTree:
  """The weights a `binary_weights(...).export` artifact stands for (+1/-1, times scale)."""

  def leaf(x):
    if not _is_packed(x):
      return x
    shape = tuple(int(s) for s in x["shape"])
    w = unpack_signs(x["bits"], shape[-2], axis=-2, dtype=dtype)
    if "nonzero" in x:
      w = w * (unpack_signs(x["nonzero"], shape[-2], axis=-2, dtype=dtype) > 0)
    if "scale" in x:
      w = w * jnp.asarray(x["scale"], dtype)
    return w

  return jax.tree.map(leaf, artifact["params"], is_leaf=_is_packed)
