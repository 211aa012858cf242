r"""AdaRound: post-training quantization that learns, weight by weight, whether to round up or down.

Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization" (ICML 2020). For a
layer with weights W, the uniform quantizer's scale s and zero point z (as `quantize_core.quantize`
finds them: per output channel, min/max range), round-to-nearest is one choice among 2^n; AdaRound
learns a continuous variable V per weight and quantizes

  W~(V) = s * (clip(floor(W / s) + h(V) + z, q_min, q_max) - z),
  h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1),    zeta = 1.1, gamma = -0.1

(the rectified sigmoid), minimizing the layer's output error on calibration data plus a
regularizer that drives every h to 0 or 1:

  min_V  mean_x || f(W~(V); x_q) - f(W; x) ||^2 + lambda * sum_i (1 - |2 h(V_i) - 1|^beta)

with beta annealed from 20 to 2 after a warm-up without the regularizer (the paper's schedule).
x is the layer's input in the float model and x_q its input in the model whose earlier layers
are already quantized (`asymmetric=True`, the paper's "asymmetric reconstruction", which lets a
layer correct the error of those before it); f is the layer itself (a convolution or a Dense
layer), captured from the model with `flax.linen.intercept_methods`. V starts where h(V) equals
the fractional part of W / s, so the first iterate is W itself. At the end each weight rounds up
where h(V) >= 0.5; the weights holding each channel's range (its min and max) keep their
round-to-nearest codes, so quantizing the result again with the same quantizer gives back the
scales and exactly the chosen codes (`adaround_tree` returns weights on the grid, which the
`quant` method's uniform quantizer and export store as those codes).

The output error is a quadratic form in the weights, so each step need not run the layer
(`Quadratic`, the "quadratic route"): with the patch rows P~ of x_q (`jax.lax.
conv_general_dilated_patches` for a convolution, any stride, padding "SAME" / "VALID" / explicit,
input and kernel dilation, feature groups with one Gram matrix per group for depthwise and
grouped convolutions; the input itself for a Dense layer), D = W~ - W and E0 = P~ W - (y - bias),

  sum (f(W~; x_q) - f(W; x))^2 = tr(Dᵀ G D) + 2 tr(Dᵀ c) + ||E0||^2,  G = P~ᵀ P~,  c = P~ᵀ E0

(c = G W - B with the cross term B = P~ᵀ (P W) of the asymmetric reconstruction), so G and c are
computed once per layer, chunk by chunk, and a step costs O(K^2 C_out) (K = C_in / groups x kernel
area) instead of O(N K C_out): each step sees the error over all calibration images, not a
minibatch, and equals the direct computation within float32 rounding. A layer the patches do not
reproduce (a circular / causal padding, a mask, a compute dtype below float32, a custom
convolution: checked on the first chunk) takes the "direct route", the layer run forward and
backward on minibatches of `batch` images each step (`route="direct"` forces it).

Layers run in forward order, one jit-compiled optimization per layer shape, on the calibration
images (at most a few hundred images; the paper uses 1024 for ImageNet).
"""

from __future__ import annotations

import functools
import time
from typing import Any
from typing import Callable
from typing import NamedTuple
from typing import Sequence

import flax.linen as nn
from flax.linen import linear as flax_linear
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jcompress import quantize_core
from jcompress import transforms
from jcompress.errors import ConfigError

PyTree = Any

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: jax.Array) -> jax.Array:
  """h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)."""
  return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_v(frac: jax.Array) -> jax.Array:
  """V with h(V) = frac (frac in [0, 1): the fractional part of W / s)."""
  p = jnp.clip((frac - GAMMA) / (ZETA - GAMMA), 1e-4, 1 - 1e-4)
  return jnp.log(p) - jnp.log1p(-p)


def round_reg(v: jax.Array, beta: jax.Array) -> jax.Array:
  """sum_i 1 - |2 h(V_i) - 1|^beta: 0 when every h is 0 or 1."""
  return jnp.sum(1.0 - jnp.abs(2.0 * rectified_sigmoid(v) - 1.0) ** beta)


def beta_schedule(step: jax.Array, iters: int, warmup: float, start: float = 20.0,
                  end: float = 2.0) -> jax.Array:
  """beta: `start` during the warm-up (when the regularizer is off), then linear to `end`."""
  t0 = warmup * iters
  frac = jnp.clip((step - t0) / jnp.maximum(iters - t0, 1.0), 0.0, 1.0)
  return start + (end - start) * frac


# ----------------------------------------------------------------------------- capture


def capture(model: nn.Module, variables: dict, images: jax.Array,
            paths: Sequence[str]) -> dict[str, tuple[nn.Module, jax.Array, jax.Array]]:
  """{path: (layer, input, output)} of the `nn.Conv` / `nn.Dense` layers whose kernel path is
  `path + "/kernel"`, from one forward pass (train=False) of `model` on `images`. `layer` is
  an unbound copy: `layer.apply({"params": {"kernel": W, ...}}, input)`."""
  wanted = set(paths)
  found: dict[str, tuple] = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    mod = context.module
    if context.method_name == "__call__" and isinstance(mod, (nn.Conv, nn.Dense)):
      path = "/".join(str(p) for p in mod.scope.path)
      if path in wanted:
        found[path] = (mod.clone(parent=None, name=None), args[0], out)
    return out

  with nn.intercept_methods(interceptor):
    model.apply(variables, images, train=False)
  missing = wanted - set(found)
  if missing:
    raise ConfigError(f"adaround: no Conv or Dense layer computes with kernel "
                      f"'{sorted(missing)[0]}/kernel' in the model's forward pass")
  return found


class Call(NamedTuple):
  """One layer call of a forward pass (`trace_calls`)."""
  path: str              # module path, "stage1_block0/conv1"
  kind: str              # "conv" (nn.Conv), "dense" (nn.Dense) or "bn" (a BatchNorm)
  module: nn.Module      # an unbound copy
  source: int | None     # index of the call whose output is this call's input, if any
  in_shape: tuple
  out_shape: tuple


def _kind(mod: nn.Module) -> str | None:
  if isinstance(mod, nn.Conv):
    return "conv"
  if isinstance(mod, nn.Dense):
    return "dense"
  if hasattr(mod, "use_running_average") and hasattr(mod, "epsilon"):
    return "bn"        # flax's nn.BatchNorm and jcompress.models.common.BatchNorm
  return None


def trace_calls(model: nn.Module, variables: dict, images: jax.Array) -> list[Call]:
  """The Conv, Dense and BatchNorm calls of `model.apply(variables, images, train=False)` in
  forward order, each with the call whose output it takes as it is (`source`: a BatchNorm
  right after a convolution has that convolution as source). Traced abstractly: nothing is
  computed or compiled."""
  calls: list[Call] = []
  outs: list[Any] = []        # the traced outputs, alive for the identity tests below

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    mod = context.module
    kind = _kind(mod)
    if context.method_name == "__call__" and kind is not None and args:
      src = next((i for i, o in enumerate(outs) if o is args[0]), None)
      calls.append(Call("/".join(str(p) for p in mod.scope.path), kind,
                        mod.clone(parent=None, name=None), src, tuple(args[0].shape),
                        tuple(out.shape)))
      outs.append(out)
    return out

  def run(v, x):
    with nn.intercept_methods(interceptor):
      return model.apply(v, x, train=False)

  jax.eval_shape(run, variables, images)
  return calls


# ----------------------------------------------------------------------------- quadratic form


class Geometry(NamedTuple):
  """How a layer turns its input into patch rows (hashable: one compile per geometry).

  kind "conv": `nn.Conv` with shared weights; rows are `lax.conv_general_dilated_patches`
  (features ordered (C_in, *kernel), split into `groups` of C_in / groups channels).
  kind "dense": `nn.Dense`; rows are the input's last axis."""
  kind: str
  kernel_size: tuple = ()
  strides: tuple = ()
  padding: Any = "VALID"
  input_dilation: tuple = ()
  kernel_dilation: tuple = ()
  groups: int = 1


def layer_geometry(layer: nn.Module) -> Geometry | None:
  """The layer's `Geometry`, or None where the patch route does not apply (a masked, unshared,
  circular / reflect / causal padded conv, a layer neither `nn.Conv` nor `nn.Dense`): those
  layers take the direct route."""
  if isinstance(layer, nn.Dense):
    return Geometry("dense")
  if not isinstance(layer, nn.Conv) or getattr(layer, "mask", None) is not None \
      or not getattr(layer, "shared_weights", True):
    return None
  ks = ((layer.kernel_size,) if isinstance(layer.kernel_size, int)
        else tuple(int(k) for k in layer.kernel_size))
  nd = len(ks)
  if nd > 3:
    return None

  def bcast(v):
    v = 1 if v is None else v
    return (int(v),) * nd if isinstance(v, int) else tuple(int(e) for e in v)

  padding = flax_linear.canonicalize_padding(layer.padding, nd)
  if isinstance(padding, str):
    if padding not in ("SAME", "VALID"):
      return None
  else:
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return Geometry("conv", ks, bcast(layer.strides), padding, bcast(layer.input_dilation),
                  bcast(layer.kernel_dilation), int(layer.feature_group_count))


def patch_rows(geo: Geometry, x: jax.Array) -> jax.Array:
  """(M, groups, K) rows with `rows @ kernel_matrix(w)` = the layer's output without bias
  (M = images x output positions; K = C_in / groups x kernel area)."""
  if geo.kind == "dense":
    return x.reshape(-1, 1, x.shape[-1])
  nd = len(geo.kernel_size)
  x = x.reshape((-1,) + x.shape[-(nd + 1):])
  spatial = "HWD"[:nd]
  spec = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
  p = jax.lax.conv_general_dilated_patches(
      x, geo.kernel_size, geo.strides, geo.padding, lhs_dilation=geo.input_dilation,
      rhs_dilation=geo.kernel_dilation, dimension_numbers=spec,
      precision=jax.lax.Precision.HIGHEST)
  c_in = x.shape[-1]
  area = int(np.prod(geo.kernel_size))
  # features are ordered (C_in, *kernel): group g holds channels g*C/G .. (g+1)*C/G - 1
  return p.reshape(-1, geo.groups, (c_in // geo.groups) * area)


def kernel_matrix(w: jax.Array, geo: Geometry) -> jax.Array:
  """The kernel as (groups, K, C_out / groups), rows in `patch_rows`' order."""
  if geo.kind == "dense":
    return w.reshape(1, w.shape[0], w.shape[1])
  area = int(np.prod(geo.kernel_size))
  c_in_g, c_out = w.shape[-2], w.shape[-1]
  g = geo.groups
  m = w.reshape(area, c_in_g, g, c_out // g)
  return jnp.transpose(m, (2, 1, 0, 3)).reshape(g, c_in_g * area, c_out // g)


def _rows_out(out: jax.Array, geo: Geometry) -> jax.Array:
  """A layer output (..., C_out) as (M, groups, C_out / groups)."""
  return out.reshape(-1, geo.groups, out.shape[-1] // geo.groups)


class Quadratic(NamedTuple):
  r"""The layer's reconstruction error as a quadratic form in the weight change D = W~ - W.

  With patch rows P~ of the layer's input (the quantized model's, asymmetric reconstruction),
  the target Y (the float model's output) and E0 = P~ W - (Y - bias) (the error of the float
  weights on that input; 0 when the input is the float one):

    sum (f(W~; x~) - Y)^2 = sum_g tr(D_gᵀ G_g D_g) + 2 tr(D_gᵀ c_g) + e0,
    G_g = P~_gᵀ P~_g,   c_g = P~_gᵀ E0_g,   e0 = ||E0||^2

  per group g of a grouped (depthwise) conv. `mean_error(D)` divides by `count`, the number of
  output values, and equals `mean((f(W~; x~) - Y)^2)` over all calibration images (the direct
  route's mean over minibatches, taken over the whole set). This is the paper's `B = X~ᵀ(X W)`
  form, c = G W - B, written around W so that no large terms cancel.
  """
  gram: jax.Array      # (groups, K, K)
  cross: jax.Array     # (groups, K, C_out / groups)
  e0: jax.Array        # ()
  count: jax.Array     # () number of output values

  def mean_error(self, d: jax.Array) -> jax.Array:
    """mean squared output error for a kernel change `d` in `kernel_matrix` form."""
    gd = jnp.einsum("gkl,glc->gkc", self.gram, d, precision=jax.lax.Precision.HIGHEST)
    return (jnp.sum(d * (gd + 2.0 * self.cross)) + self.e0) / self.count


@functools.partial(jax.jit, static_argnames=("geo",))
def _accumulate(acc, x, y_nobias, w, *, geo):
  gram, cross, e0 = acc
  p = patch_rows(geo, x)
  e = jnp.einsum("mgk,gkc->mgc", p, kernel_matrix(w, geo),
                 precision=jax.lax.Precision.HIGHEST) - _rows_out(y_nobias, geo)
  gram = gram + jnp.einsum("mgk,mgl->gkl", p, p, precision=jax.lax.Precision.HIGHEST)
  cross = cross + jnp.einsum("mgk,mgc->gkc", p, e, precision=jax.lax.Precision.HIGHEST)
  return gram, cross, e0 + jnp.sum(e * e)


def quadratic_form(layer: nn.Module, w: jax.Array, rest: dict, x: jax.Array, y: jax.Array,
                   *, chunk: int = 32, rtol: float = 1e-4) -> Quadratic | None:
  """The `Quadratic` of `layer` with kernel `w` (and `rest`: its bias), input `x` and target
  `y`, accumulated over chunks of `chunk` images; None where the patch route does not apply or
  does not reproduce the layer (checked on the first chunk: |P w - (f(w; x) - bias)| within
  `rtol` of max |f|), e.g. a compute dtype below float32 or a custom convolution."""
  geo = layer_geometry(layer)
  if geo is None:
    return None
  bias = rest.get("bias")
  w = jnp.asarray(w, jnp.float32)
  x = jnp.asarray(x, jnp.float32)
  y_nb = jnp.asarray(y, jnp.float32) - (0.0 if bias is None else jnp.asarray(bias, jnp.float32))
  head = x[:chunk]
  try:
    ref = jnp.asarray(_apply_layer(layer, w, rest, head), jnp.float32)
    if bias is not None:
      ref = ref - bias
    rows = jnp.einsum("mgk,gkc->mgc", patch_rows(geo, head), kernel_matrix(w, geo),
                      precision=jax.lax.Precision.HIGHEST)
    if rows.size != ref.size:
      return None
    err = float(jnp.max(jnp.abs(rows - _rows_out(ref, geo))))
  except (TypeError, ValueError):
    return None
  if not err <= rtol * max(float(jnp.max(jnp.abs(ref))), 1e-30):
    return None
  k = kernel_matrix(w, geo)
  g, kk, cg = k.shape
  acc = (jnp.zeros((g, kk, kk), jnp.float32), jnp.zeros((g, kk, cg), jnp.float32),
         jnp.zeros((), jnp.float32))
  for i in range(0, x.shape[0], chunk):
    acc = _accumulate(acc, x[i:i + chunk], y_nb[i:i + chunk], w, geo=geo)
  return Quadratic(*acc, jnp.float32(y.size))


# ----------------------------------------------------------------------------- one layer


def _soft_weights(v, base, scale, zero_point, q_min, q_max):
  codes = jnp.clip(base + rectified_sigmoid(v) + zero_point, q_min, q_max)
  return scale * (codes - zero_point)


def _adam_scan(loss, v0, key, *, iters, warmup, lr):
  """V after `iters` Adam steps on `loss(v, beta, reg_on, key_i)` (beta annealed, the
  regularizer off during the warm-up)."""
  opt = optax.adam(lr)

  def step(carry, i):
    v, st = carry
    beta = beta_schedule(i.astype(jnp.float32), iters, warmup)
    reg_on = (i >= warmup * iters).astype(jnp.float32)
    g = jax.grad(loss)(v, beta, reg_on, jax.random.fold_in(key, i))
    upd, st = opt.update(g, st, v)
    return (optax.apply_updates(v, upd), st), None

  (v, _), _ = jax.lax.scan(step, (v0, opt.init(v0)), jnp.arange(iters))
  return v


@functools.partial(jax.jit, static_argnames=("layer_fn", "iters", "batch", "warmup", "lr",
                                             "reg_weight", "q_min", "q_max"))
def _optimize(v0, base, scale, zero_point, rest, x, y, key, *, layer_fn, iters, batch, warmup,
              lr, reg_weight, q_min, q_max):
  """The direct route: V after `iters` Adam steps on the AdaRound objective with the output
  error of minibatches of `batch` images drawn from x (the layer run forward and backward)."""
  n = x.shape[0]

  def loss(v, beta, reg_on, k):
    idx = jax.random.randint(k, (batch,), 0, n)
    w = _soft_weights(v, base, scale, zero_point, q_min, q_max)
    err = jnp.mean((layer_fn(w, rest, x[idx]) - y[idx]) ** 2)
    return err + reg_on * reg_weight * round_reg(v, beta)

  return _adam_scan(loss, v0, key, iters=iters, warmup=warmup, lr=lr)


@functools.partial(jax.jit, static_argnames=("geo", "iters", "warmup", "lr", "reg_weight",
                                             "q_min", "q_max"))
def _optimize_quadratic(v0, base, scale, zero_point, w, quad, *, geo, iters, warmup, lr,
                        reg_weight, q_min, q_max):
  """The quadratic route: the same objective with the output error over all calibration images
  from `quad` (`Quadratic.mean_error`), O(K^2 C_out) per step whatever the images."""

  def loss(v, beta, reg_on, k):
    del k
    d = kernel_matrix(_soft_weights(v, base, scale, zero_point, q_min, q_max) - w, geo)
    return quad.mean_error(d) + reg_on * reg_weight * round_reg(v, beta)

  return _adam_scan(loss, v0, jax.random.key(0), iters=iters, warmup=warmup, lr=lr)


def _apply_layer(layer, w, rest, x):
  return layer.apply({"params": {"kernel": w, **rest}}, x)


class _LayerFn:
  """`layer.apply` as a hashable static argument: equal for equal layer configurations, so that
  layers of the same shape share one compiled direct-route optimization."""

  def __init__(self, layer):
    self.layer = layer
    self._key = repr(layer)

  def __call__(self, w, rest, x):
    return _apply_layer(self.layer, w, rest, x)

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, _LayerFn) and self._key == other._key


def _extremes(w: jax.Array, q: quantize_core.QTensor) -> jax.Array:
  """The weights that set each channel's range (its min and max): they keep their codes."""
  axes = tuple(range(w.ndim - 1)) if q.per_channel else None
  hi = jnp.max(w, axis=axes, keepdims=q.per_channel)
  lo = jnp.min(w, axis=axes, keepdims=q.per_channel)
  return (w == hi) | (w == lo)


ROUTES = ("auto", "quadratic", "direct")


def adaround_layer(layer: nn.Module, w: jax.Array, rest: dict, x: jax.Array, y: jax.Array,
                   bits: int, key: jax.Array, *, symmetric: bool = True,
                   narrow_range: bool = True, per_channel: bool = True, iters: int = 1000,
                   batch: int = 32, warmup: float = 0.2, lr: float = 1e-2,
                   reg_weight: float = 0.01, route: str = "auto",
                   name: str = "kernel") -> tuple[jax.Array, dict]:
  """AdaRound of one layer: (weights on the quantizer's grid, report).

  `layer.apply({"params": {"kernel": w, **rest}}, x)` must give the layer's output; `y` is the
  target (the float model's output of this layer). `route`: "quadratic" (the error over all of
  `x` as the quadratic form `Quadratic`, computed once), "direct" (the layer run on minibatches
  of `batch` images each step) or "auto" (quadratic where `quadratic_form` applies). The report
  has the output error (mean squared, over all of `x`) of round-to-nearest and of the result,
  the fraction of weights rounded the other way from nearest, the route and the seconds taken.
  """
  if route not in ROUTES:
    raise ConfigError(f"adaround: route must be one of {list(ROUTES)}, got {route!r}")
  t0 = time.time()
  q = quantize_core.quantize(w, bits, symmetric=symmetric, narrow_range=narrow_range,
                             per_channel=per_channel, name=name)
  scale = jnp.asarray(q.scale, jnp.float32)
  zp = jnp.asarray(q.zero_point, jnp.float32)
  q_min, q_max = quantize_core.code_range(bits, symmetric, narrow_range)
  ratio = w / scale
  base = jnp.floor(ratio)
  v0 = init_v(ratio - base)
  quad = None if route == "direct" else quadratic_form(layer, w, rest, x, y)
  if quad is None and route == "quadratic":
    raise ConfigError(f"adaround: layer '{name}' ({type(layer).__name__}) does not fit the "
                      "quadratic route (route 'auto' or 'direct' runs it directly)")
  fn = _LayerFn(layer)
  opts = dict(iters=int(iters), warmup=float(warmup), lr=float(lr),
              reg_weight=float(reg_weight), q_min=q_min, q_max=q_max)
  if quad is not None:
    v = _optimize_quadratic(v0, base, scale, zp, jnp.asarray(w, jnp.float32), quad,
                            geo=layer_geometry(layer), **opts)
  else:
    v = _optimize(v0, base, scale, zp, rest, x, y, key, layer_fn=fn,
                  batch=int(min(batch, x.shape[0])), **opts)
  nearest = jnp.asarray(q.codes, jnp.float32)
  codes = jnp.clip(base + (rectified_sigmoid(v) >= 0.5) + zp, q_min, q_max)
  codes = jnp.where(_extremes(w, q), nearest, codes)
  w_q = scale * (codes - zp)
  w_near = scale * (nearest - zp)

  def mse(wt):
    return float(jnp.mean((fn(wt, rest, x) - y) ** 2))

  report = {"mse_nearest": mse(w_near), "mse_adaround": mse(w_q),
            "flipped": float(jnp.mean(codes != nearest)),
            "route": "quadratic" if quad is not None else "direct",
            "seconds": time.time() - t0}
  return w_q.astype(w.dtype), report


# ----------------------------------------------------------------------------- the model


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def adaround_tree(model: nn.Module, params: PyTree, batch_stats: PyTree, images: jax.Array,
                  bits_by_leaf: dict[str, int], *, seed: int = 0, asymmetric: bool = True,
                  log: Callable[[str], None] | None = None, **kwargs) -> tuple[PyTree, dict]:
  """AdaRound of every kernel in `bits_by_leaf` ({"stage1_block0/conv1/kernel": 4, ...}), in
  the order the forward pass meets them: (params with those kernels on their grids, report per
  leaf). `images`: the calibration images (all of them; minibatches are drawn inside).
  kwargs go to `adaround_layer` (symmetric, narrow_range, per_channel, iters, batch, warmup, lr,
  reg_weight, route). With `asymmetric`, each layer's input comes from the model whose earlier
  layers are already rounded; its target is always the float model's output."""
  if not bits_by_leaf:
    raise ConfigError("adaround: no quantized kernel selected (quant.include / quant.exclude)")
  bad = [p for p in bits_by_leaf if not p.endswith("/kernel")]
  if bad:
    raise ConfigError(f"adaround: '{bad[0]}' is not a kernel")
  if images.shape[0] < 2:
    raise ConfigError(f"adaround: needs at least 2 calibration images, got {images.shape[0]} "
                      "(config key 'calibration_batches')")
  layers = {p[:-len("/kernel")]: p for p in bits_by_leaf}
  extra = {} if batch_stats is None else {"batch_stats": batch_stats}
  float_caps = capture(model, {"params": params, **extra}, images, list(layers))
  order = list(float_caps)   # insertion order: the order of the forward pass
  key = jax.random.key(int(seed))
  out, report = params, {}
  for i, layer_path in enumerate(order):
    leaf = layers[layer_path]
    layer, x_fp, y = float_caps[layer_path]
    x = x_fp
    if asymmetric and i > 0:
      x = capture(model, {"params": out, **extra}, images, [layer_path])[layer_path][1]
    node = _get(out, layer_path)
    rest = {k: v for k, v in node.items() if k != "kernel"}
    w_q, rep = adaround_layer(layer, node["kernel"], rest, x, y, bits_by_leaf[leaf],
                              jax.random.fold_in(key, i), name=leaf, **kwargs)
    out = transforms.map_with_path(
        lambda name, w, leaf=leaf, w_q=w_q: w_q if name == leaf else w, out)
    report[leaf] = {"bits": int(bits_by_leaf[leaf]), "weights": int(node["kernel"].size), **rep}
    if log is not None:
      log(f"adaround {leaf} ({bits_by_leaf[leaf]} bits): output mse {rep['mse_nearest']:.3g} "
          f"(nearest) -> {rep['mse_adaround']:.3g}, {100 * rep['flipped']:.1f}% flipped, "
          f"{rep['route']}, {rep['seconds']:.1f} s")
  return out, report


def report_summary(report: dict, images: int, seconds: float | None = None) -> dict:
  """Scalar figures for metrics.jsonl and results.json (`quant_weights`' `metrics`):
  calibration images, layers, total seconds, the output error (mean squared, summed over the
  layers) of round-to-nearest and of AdaRound, the fraction of weights rounded away from
  nearest (over all of them) and how many layers took the quadratic route. `seconds`: the
  wall time of the whole `adaround_tree` call (default: the layers' own seconds summed)."""
  if not report:
    return {}
  reps = list(report.values())
  n = [float(r.get("weights", 1)) for r in reps]
  return {"adaround_images": int(images),
          "adaround_layers": len(reps),
          "adaround_quadratic_layers": sum(r.get("route") == "quadratic" for r in reps),
          "adaround_seconds": round(float(sum(r["seconds"] for r in reps) if seconds is None
                                          else seconds), 3),
          "adaround_mse_nearest": float(sum(r["mse_nearest"] for r in reps)),
          "adaround_mse": float(sum(r["mse_adaround"] for r in reps)),
          "adaround_flipped": float(sum(r["flipped"] * k for r, k in zip(reps, n)) / sum(n))}
