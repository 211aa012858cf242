"""Building blocks shared by the jcompress models.

Conventions every model follows (see `jcompress/models/__init__.py` for the full contract):

* Convolutions use torchvision's initialisation, He (kaiming) normal with fan_out:
  `w ~ N(0, 2 / (k_h * k_w * C_out))` (untruncated), and no bias when a BatchNorm follows.
* Convolution padding is explicit and symmetric, `(k - 1) // 2` on each side, as in PyTorch
  (`padding=k // 2`), not XLA's "SAME". For a stride-2 convolution on an even input the two
  differ by where the extra row/column of zeros sits; matching PyTorch keeps imported
  torchvision weights exact.
* Parameters are float32 (`param_dtype`); activations are computed in the module's `dtype`.

Four fields of the top-level (root) model reach every convolution built by `conv`, whatever
block it sits in, so that compression code needs no per-architecture plumbing:

* `channels`: `{conv path: output channels}` (paths like `stage1_block0/conv1`) overriding the
  architecture's widths: a structurally pruned model is the same class with smaller convs.
  A depthwise convolution (`groups == features`) always follows its input's channel count.
* `act_quant`: an activation quantizer spec (`{"kind": ..., "bits": ...}`, see
  `jcompress.actquant.make_quantizer`) applied to the input of every convolution except
  `stem_conv` (quantization-aware training of activations). None or kind "none": off.
* `conv_impl`: "auto", "xla", "staged" or "fast" (`CONV_IMPLS`; "staged": XLA's gradients
  with the kernel gradient's operands stored before XLA:CPU transposes them; "fast": the kernel
  gradient as a matmul; both compute depthwise convolutions as shifted multiply-adds,
  `fastconv.depthwise_conv`; same values within float32 rounding, see `jcompress.fastconv`;
  "auto" picks the fastest for the platform, "xla" on GPU/TPU); None: `DEFAULT_CONV_IMPL`
  ("auto").
* `padding`: "torch" (default, symmetric as above) or "same" (XLA/TF "SAME", as Keras's
  `ZeroPadding2D(correct_pad)` + "valid" does for stride-2 convolutions; for imported Keras
  weights).

The models that pretrained weights load into (ResNet, MobileNetV2) also take `input_norm`, an
affine map applied to their input before the stem (`normalize_input`): the data pipeline
normalises with the dataset's own statistics, and `input_norm` turns that into what the
source's weights expect (Keras "caffe" BGR mean subtraction, "tf" [-1, 1], torchvision's
ImageNet mean/std; `jcompress.pretrained.input_norm`).
"""

from __future__ import annotations

import functools
import numbers
from typing import Any
from typing import Callable

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from jcompress import fastconv
from jcompress.errors import ConfigError

#: `conv_impl` values: "xla" (plain `lax.conv_general_dilated`), "staged" (the same, the kernel
#: gradient's operands stored first: `fastconv.staged_conv_general_dilated`), "fast" (the same
#: forward and input gradient, the kernel gradient as one patches-times-gradient matmul:
#: `fastconv.conv_general_dilated`); "staged" and "fast" compute depthwise convolutions as
#: `fastconv.depthwise_conv`; or "auto" (`fastconv.default_conv_impl()`: "xla" on GPU/TPU,
#: "staged" on CPU with XLA's Eigen convolutions, which `import jcompress` selects; "fast" on CPU
#: with YNNPACK convolutions).
CONV_IMPLS = ("auto", "xla", "staged", "fast")
#: What a model without a `conv_impl` field (or with None) uses.
DEFAULT_CONV_IMPL = "auto"

# He / kaiming normal, fan_out mode, untruncated (torchvision's `kaiming_normal_(mode="fan_out")`).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
  """Rounds a channel count to the nearest multiple of `divisor` (MobileNet's `_make_divisible`).

  The result is at least `min_value` (default `divisor`) and never more than 10% below `value`.
  """
  if min_value is None:
    min_value = divisor
  new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
  if new_value < 0.9 * value:
    new_value += divisor
  return int(new_value)


def scale_channels(channels: int, width: float) -> int:
  """`round(channels * width)`, at least 1: the width rule for ResNets and the small CNN."""
  return max(1, int(round(channels * width)))


def check_width(width: Any, model: str) -> None:
  """Raises `ConfigError` unless `width` is a real number > 0."""
  if isinstance(width, bool) or not isinstance(width, numbers.Real) or not width > 0:
    raise ConfigError(f"model {model!r}: `width` must be a number > 0, got {width!r}")


def root_field(module: nn.Module, name: str, default: Any = None) -> Any:
  """Field `name` of the top-level model that `module` belongs to (`default` if it has none)."""
  root = module
  while isinstance(root.parent, nn.Module):
    root = root.parent
  value = getattr(root, name, None)
  return default if value is None else value


def module_path(module: nn.Module, name: str) -> str:
  """The `/`-joined path of child `name` of `module`: `stage1_block0/conv1`."""
  return "/".join((*module.scope.path, name))


def out_channels(module: nn.Module, name: str, features: int) -> int:
  """The output channels of conv `name` in `module`: the root's `channels` override, or
  `features`."""
  overrides = root_field(module, "channels")
  if not overrides:
    return features
  path = module_path(module, name)
  value = dict(overrides).get(path, features)
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ConfigError(f"model field `channels`: the width of conv {path!r} must be an int >= 1, "
                      f"got {value!r}")
  return int(value)


def has_channel_override(module: nn.Module, name: str) -> bool:
  """Whether the root's `channels` names conv `name` of `module` (a pruned model lists every
  convolution it has, so this tells a kept projection shortcut from an identity one)."""
  overrides = root_field(module, "channels")
  return bool(overrides) and module_path(module, name) in dict(overrides)


def conv(
    module: nn.Module,
    features: int,
    kernel_size: int,
    strides: int = 1,
    groups: int = 1,
    name: str | None = None,
    narrow: tuple[str, int, bool] | None = None,
    signed_input: bool = False,
) -> Callable:
  """A bias-free square convolution with PyTorch padding and He fan_out init.

  Must be called inside a `@nn.compact` method of `module`, which provides `dtype`.
  `groups == features == C_in` gives a depthwise convolution (`feature_group_count`).
  `narrow = (compute, levels, zeros)` with `compute` "bf16", "int8" or "xnor" runs the forward
  in that form (`fastconv.narrow_conv_general_dilated`: exact only for inputs on the grid
  k / levels, holding 0 only if `zeros`, and +-1 kernels, which the caller guarantees); "f32",
  "auto" or None: the ordinary convolution. `signed_input`: the input can be negative (no ReLU
  before it, as MobileNetV2's linear bottleneck): its activation quantizer, if any, is signed.
  Returns a function of the input; the root model's `channels`, `act_quant` and `padding`
  fields act here (see the module docstring).
  """
  depthwise = groups > 1 and groups == features
  if name is not None and not depthwise:
    features = out_channels(module, name, features)
  if root_field(module, "padding", "torch") == "same":
    padding: Any = "SAME"
  else:
    pad = (kernel_size - 1) // 2
    padding = ((pad, pad), (pad, pad))
  spec = root_field(module, "act_quant")
  impl = root_field(module, "conv_impl", DEFAULT_CONV_IMPL)
  if impl not in CONV_IMPLS:
    raise ConfigError(f"model field `conv_impl` must be one of {CONV_IMPLS}, got {impl!r}")
  if impl == "auto":
    impl = fastconv.default_conv_impl()
  conv_fn = fastconv.conv_function(impl)
  if narrow is not None and narrow[0] not in (None, "f32", "auto"):
    conv_fn = fastconv.narrow_conv_general_dilated(narrow[0], narrow[1], base=conv_fn,
                                                   zeros=narrow[2])
  quantizer = None
  if spec is not None and name != "stem_conv" and dict(spec).get("kind", "none") != "none":
    from jcompress import actquant  # noqa: PLC0415  (only QAT runs need it)
    spec = dict(spec, signed=True) if signed_input else dict(spec)
    quantizer = actquant.make_quantizer(spec, name=f"{name}_act" if name else None)

  def apply(x, linear: bool = False):
    """The convolution of `x`; with `linear=True`, `(y, operands)` where `operands` is
    `pointwise_operands`'s (input, kernel) pair for `BatchNorm(linear=...)`, or None."""
    n_out, n_groups = features, groups
    if depthwise:   # follows the input: a pruned expand conv shrinks its depthwise conv
      n_out = n_groups = x.shape[-1]
    if quantizer is not None:
      x = quantizer(x)
    calls = []

    def recorded(lhs, rhs, *args, **kwargs):
      out = conv_fn(lhs, rhs, *args, **kwargs)
      calls.append((lhs, rhs, out, args, kwargs))
      return out

    y = nn.Conv(
        n_out,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=padding,
        feature_group_count=n_groups,
        use_bias=False,
        kernel_init=conv_kernel_init,
        dtype=module.dtype,
        param_dtype=jnp.float32,
        conv_general_dilated=recorded if linear else conv_fn,
        name=name,
    )(x)
    if not linear:
      return y
    return y, (pointwise_operands(calls, y) if impl != "xla" else None)

  return apply


def pointwise_operands(calls: list, y: jnp.ndarray) -> tuple | None:
  """`(lhs, rhs)` of the one recorded `conv_general_dilated` call `(lhs, rhs, out, args, kwargs)`
  in `calls` when `y` is that call's very output and the call is a plain 1x1 convolution
  (stride 1, no padding, dilation or groups, NHWC/HWIO, float32, no precision or output type
  asked for), so that `y == lhs @ rhs[0, 0]` per pixel; otherwise None. What a layer
  interceptor (low-rank factors, a quantizer) did before the last call is in `lhs` and `rhs`;
  one that changed the output afterwards breaks the identity, and the caller falls back."""
  if len(calls) != 1:
    return None
  lhs, rhs, out, args, kwargs = calls[0]
  kw = dict(zip(("window_strides", "padding", "lhs_dilation", "rhs_dilation",
                 "dimension_numbers", "feature_group_count", "batch_group_count", "precision",
                 "preferred_element_type"), args), **kwargs)
  if out is not y or lhs.ndim != 4 or rhs.shape[:2] != (1, 1):
    return None
  if lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
    return None
  if tuple(kw.get("window_strides", (1, 1))) != (1, 1) or isinstance(kw.get("padding"), str):
    return None
  if any(v != 0 for p in kw.get("padding", ((0, 0), (0, 0))) for v in p):
    return None
  if any(d not in (None, (1, 1), [1, 1]) for d in (kw.get("lhs_dilation"), kw.get("rhs_dilation"))):
    return None
  if kw.get("feature_group_count", 1) != 1 or kw.get("batch_group_count", 1) != 1:
    return None
  if kw.get("precision") is not None or kw.get("preferred_element_type") is not None:
    return None
  if not fastconv._is_nhwc(kw.get("dimension_numbers")):
    return None
  return lhs, rhs[0, 0]


def channel_sum(t: jnp.ndarray) -> jnp.ndarray:
  """The sum of `t` over every axis but the last, in float32 at least: (..., C) -> (C,).

  On CPU as a product with a vector of ones on the matmul library: XLA:CPU turns a large
  reduction into a windowed reduction that reads the tensor in strided order, 2-5x slower than
  the product (measured at 64x32x32x64: 6.6 against 2.2 ms), and BatchNorm's four reductions
  per layer were 15% of a ResNet-18 train step. Elsewhere XLA's own reduction.
  """
  t2 = t.reshape(-1, t.shape[-1])
  if jax.default_backend() != "cpu":
    return jnp.sum(t2, axis=0, dtype=jnp.promote_types(t.dtype, jnp.float32))
  ones = jnp.ones((t2.shape[0],), t2.dtype)
  return jnp.dot(ones, t2, precision=lax.Precision.HIGHEST,
                 preferred_element_type=jnp.promote_types(t.dtype, jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray,
                     epsilon: float) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """BatchNorm with batch statistics over all axes but the last: `(y, mean, var)` with
  `y = (x - mean) * scale / sqrt(var + epsilon) + bias` and the biased variance
  `mean(x^2) - mean^2` (clipped at 0), as flax's `nn.BatchNorm` computes them.

  Its gradient is the closed form (two channel sums of the output gradient, then one
  elementwise pass), the same values as differentiating the formula above within float32
  rounding; the channel sums are `channel_sum`'s.
  """
  return _bn_train_fwd(x, scale, bias, epsilon)[0]


def _bn_train_fwd(x, scale, bias, epsilon):
  m = x.size // x.shape[-1]
  mean = channel_sum(x) / m
  var = jnp.maximum(channel_sum(x * x) / m - mean * mean, 0.0)
  rstd = lax.rsqrt(var + epsilon)
  y = (x - mean) * (scale * rstd) + bias
  return (y, mean, var), (x, scale, mean, rstd)


def _bn_train_bwd(epsilon, res, cts):
  del epsilon
  x, scale, mean, rstd = res
  dy, dmean, dvar = cts
  m = x.size // x.shape[-1]
  xhat = (x - mean) * rstd
  dbias = channel_sum(dy)
  dscale = channel_sum(dy * xhat)
  a = scale * rstd
  # dx = a (dy - dbias / m - xhat dscale / m) + dmean / m + dvar 2 (x - mean) / m
  shift = (dmean - a * dbias) / m
  slope = (2.0 * dvar / rstd - a * dscale) / m
  dx = dy * a + xhat * slope + shift
  return dx, dscale.astype(scale.dtype), dbias.astype(scale.dtype)


batch_norm_train.defvjp(_bn_train_fwd, _bn_train_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def linear_batch_norm_train(x: jnp.ndarray, w: jnp.ndarray, scale: jnp.ndarray,
                            bias: jnp.ndarray, epsilon: float
                            ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """`batch_norm_train(x @ w, scale, bias, epsilon)` for `x` (..., Cin) and `w` (Cin, Cout) (a
  1x1 convolution and its BatchNorm), without storing or re-reading `x @ w`.

  The statistics come from the centred input's Gram matrix: with `mu` the column means of x,
  `xc = x - mu` (M rows) and `xa = [xc, 1]`, `G = xa^T xa` holds `xc^T xc` and the column sums
  `s` of xc (zero but for the rounding of mu), so `mean_c = s w / M`, `mean = mu w + mean_c` and
  `var = diag(w^T xc^T xc w) / M - mean_c^2`; since `x w - mean = xc w - mean_c`, the output is
  one product, `xa @ [w a; b - mean_c a]` with `a = scale / sqrt(var + eps)` (BatchNorm folded
  into the kernel). Centring first keeps float32 accurate where the channels' means are large
  against their spread (after a ReLU): the uncentred form, `E[(x w)^2] - mean^2` and
  `x w a - mean a`, cancels there (0.018 of ResNet-50's largest gradient against XLA's 0.0004,
  tests/test_depthwise.py). The gradient needs `P = xa^T dy` (the kernel gradient's product,
  with the column sums of dy in its last row): `sum(dy * (x w - mean)) = colsum(w * P) - mean_c
  colsum(dy)`, and with the BatchNorm input gradient written per channel as `dy a + (xc w) beta
  + gamma`, `dx = dy (w a)^T + xc (w beta w^T) + gamma w^T` and `dw = P a + (xc^T xc) w beta +
  s gamma + mu dmean^T` (the gradient with respect to x w sums over the rows to `dmean`). Where
  Cout is several times Cin (MobileNetV2's expansion) this reads and writes the Cout-wide tensor
  2 times a step instead of about 15. Same values as the two-step form within float32 rounding
  (tests/test_models.py).
  """
  return _linear_bn_fwd(x, w, scale, bias, epsilon)[0]


def _with_ones(x2: jnp.ndarray) -> jnp.ndarray:
  return jnp.concatenate([x2, jnp.ones((x2.shape[0], 1), x2.dtype)], axis=1)


def _mm(a, b):
  return jnp.dot(a, b, precision=lax.Precision.HIGHEST)


def _linear_bn_fwd(x, w, scale, bias, epsilon):
  m = x.size // x.shape[-1]
  x2 = x.reshape(m, x.shape[-1])
  mu = jnp.mean(x2, axis=0)
  xa = _with_ones(x2 - mu)
  g = _mm(xa.T, xa)
  gram, sx = g[:-1, :-1], g[-1, :-1]
  mean_c = _mm(sx, w) / m     # the centred input's batch mean: mu's rounding, not zero
  var = jnp.maximum(jnp.sum(w * _mm(gram, w), axis=0) / m - mean_c * mean_c, 0.0)
  rstd = lax.rsqrt(var + epsilon)
  a = scale * rstd
  y = _mm(xa, jnp.concatenate([w * a, (bias - mean_c * a)[None]], axis=0))
  return ((y.reshape(*x.shape[:-1], w.shape[-1]), mean_c + _mm(mu, w), var),
          (xa, gram, sx, mu, w, scale, mean_c, rstd))


def _linear_bn_bwd(epsilon, res, cts):
  del epsilon
  xa, gram, sx, mu, w, scale, mean_c, rstd = res
  dy, dmean, dvar = cts
  m = xa.shape[0]
  dy2 = dy.reshape(m, dy.shape[-1])
  pa = _mm(xa.T, dy2)
  p, dbias = pa[:-1], pa[-1]
  dscale = rstd * (jnp.sum(w * p, axis=0) - mean_c * dbias)
  a = scale * rstd
  # batch_norm_train's input gradient dy a + xhat slope + shift, with xhat = (xc w - mean_c) rstd
  beta = rstd * (2.0 * dvar / rstd - a * dscale) / m
  gamma = (dmean - a * dbias) / m - mean_c * beta
  dx_w = jnp.concatenate([_mm(w * beta, w.T), _mm(gamma, w.T)[None]], axis=0)
  dx = _mm(dy2, (w * a).T) + _mm(xa, dx_w)
  # x = xc + mu: the gradient with respect to x w sums over the rows to dmean
  dw = p * a + _mm(gram, w) * beta + sx[:, None] * gamma[None, :] + mu[:, None] * dmean[None, :]
  return (dx.reshape(*dy.shape[:-1], w.shape[0]).astype(xa.dtype), dw.astype(w.dtype),
          dscale.astype(scale.dtype), dbias.astype(scale.dtype))


linear_batch_norm_train.defvjp(_linear_bn_fwd, _linear_bn_bwd)


class BatchNorm(nn.Module):
  """flax's `nn.BatchNorm` over the last axis (same variables: params `scale`, `bias`;
  batch_stats `mean`, `var`; the same outputs and running-average update), with train mode's
  statistics and gradient computed by `batch_norm_train`.

  Train mode (`use_running_average=False`) normalises with the batch statistics and, unless
  initialising, updates `ra = momentum * ra + (1 - momentum) * batch_stat`; eval mode uses the
  running averages. Statistics and normalisation run in float32 at least; the output is in
  `dtype` (default: the promoted dtype of the input and the parameters).

  `linear`: the `(inputs, kernel)` of the 1x1 convolution whose output `x` is (what
  `conv(...)(inputs, linear=True)` returns beside it). Where that convolution widens the
  channels, train mode then computes the statistics, the output and the gradient from them
  (`linear_batch_norm_train`) and `x` itself is left unused (XLA drops it).
  """
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jnp.ndarray, linear: tuple | None = None) -> jnp.ndarray:
    features = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
    scale = self.param("scale", self.scale_init, features, self.param_dtype)
    bias = self.param("bias", self.bias_init, features, self.param_dtype)
    out_dtype = nn.dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
    compute = jnp.promote_types(jnp.promote_types(x.dtype, scale.dtype), jnp.float32)
    xc, scale_c, bias_c = (v.astype(compute) for v in (x, scale, bias))
    if self.use_running_average:
      y = (xc - ra_mean.value) * (scale_c * lax.rsqrt(ra_var.value + self.epsilon)) + bias_c
    else:
      if self._fuses(x, linear, compute):
        y, mean, var = linear_batch_norm_train(*linear, scale_c, bias_c, self.epsilon)
      else:
        y, mean, var = batch_norm_train(xc, scale_c, bias_c, self.epsilon)
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y.astype(out_dtype)

  def _fuses(self, x, linear, compute) -> bool:
    """Whether train mode computes `linear_batch_norm_train(*linear)` instead: `linear` is
    `(inputs, kernel)` of the 1x1 convolution whose output `x` is (`pointwise_operands`), in
    float32, widening (Cout > Cin: only there is it fewer bytes moved) and not initialising."""
    if linear is None or self.is_initializing() or compute != jnp.float32:
      return False
    inputs, kernel = linear
    return (x.dtype == jnp.float32 and inputs.dtype == jnp.float32
            and kernel.shape == (inputs.shape[-1], x.shape[-1])
            and kernel.shape[1] > kernel.shape[0])


def batch_norm(
    module: nn.Module, train: bool, name: str | None = None, zero_init: bool = False
) -> BatchNorm:
  """BatchNorm over the channel axis with the module's momentum, epsilon and dtype.

  In train mode it normalises with the batch statistics and updates the running averages in the
  `batch_stats` collection (`ra = momentum * ra + (1 - momentum) * batch_stat`, with the biased
  batch variance); in eval mode it uses the running averages and writes nothing.
  `zero_init=True` starts gamma at 0 (the last BN of a residual block, "zero_init_residual").
  `BatchNorm` is flax's `nn.BatchNorm` (same variables and values) with a faster train mode.
  """
  return BatchNorm(
      use_running_average=not train,
      momentum=module.bn_momentum,
      epsilon=module.bn_epsilon,
      dtype=module.dtype,
      param_dtype=jnp.float32,
      scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
      name=name,
  )


def normalize_input(x: jnp.ndarray, input_norm: Any) -> jnp.ndarray:
  """`x * scale + shift` per channel, then the channel order reversed if `reverse`, for
  `input_norm = (scale, shift, reverse)`; None returns `x` unchanged."""
  if input_norm is None:
    return x
  scale, shift, reverse = input_norm
  x = x * jnp.asarray(scale, x.dtype) + jnp.asarray(shift, x.dtype)
  return x[..., ::-1] if reverse else x


def resnet_stem(module: nn.Module, x: jnp.ndarray, channels: int, cifar_stem: bool,
                train: bool) -> jnp.ndarray:
  """The ResNet stem, `stem_conv` + `stem_bn` + ReLU: 3x3 stride 1 (CIFAR), or 7x7 stride 2
  followed by a 3x3 stride-2 max pool (ImageNet). Call inside `module`'s compact method."""
  if cifar_stem:
    x = conv(module, channels, 3, name="stem_conv")(x)
    return nn.relu(batch_norm(module, train, "stem_bn")(x))
  x = conv(module, channels, 7, strides=2, name="stem_conv")(x)
  x = nn.relu(batch_norm(module, train, "stem_bn")(x))
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def head(module: nn.Module, num_classes: int) -> nn.Dense:
  """The classifier, always named `head` (compression code excludes it by this name)."""
  return nn.Dense(num_classes, dtype=module.dtype, param_dtype=jnp.float32, name="head")


def global_avg_pool(x: jnp.ndarray) -> jnp.ndarray:
  """Mean over the spatial axes of an NHWC tensor: (N, H, W, C) -> (N, C)."""
  return jnp.mean(x, axis=(1, 2))
