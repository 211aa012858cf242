"""A drop-in `lax.conv_general_dilated` whose kernel gradient is one patches-times-gradient matmul.

Why: on XLA:CPU the kernel gradient of a convolution (what `jax.grad` emits for the weights:
a convolution of the input with the output gradient, the batch as the contracted feature
dimension and a "kernel" as large as the image) runs an order of magnitude below the forward
convolution at large spatial sizes (measured for ResNet-18's CIFAR stage 1, 64x32x32x64, 3x3:
about 1-2 GFLOP/s against 20-30 for the forward). The same sum written as a matrix product

    dW[i, j, c, o] = sum_{n, h, w} xpad[n, s h + i, s w + j, c] g[n, h, w, o]
                   = (P^T G)[(i, j, c), o],   P = patches of x (R x k*k*C), G = g (R x C_out)

runs at the machine's matmul rate, provided P is built cheaply. It is built with *flat shifts*:
split the padded input into its s x s stride phases, each an (N, Hq, Wq, C) grid with
Hq = H_out + (k - 1) // s, flatten it to (N * Hq * Wq, C) rows; tap (i, j) of every output
pixel is then the same phase's row shifted by the constant (i // s) * Wq + j // s, so P is nine
contiguous row slices side by side, and G is g zero-padded to the same (Hq, Wq) grid (the
zeros cancel every row that would wrap around a border). The forward convolution and the input
gradient stay XLA's own (both run near the matmul rate).

Which is faster depends on XLA:CPU's convolution kernels. With YNNPACK convolutions (the jax
0.10 default on CPU) the kernel gradient above is 2-2.5x faster than XLA's; with XLA's Eigen
convolutions (`runtime.XLA_CPU_FLAG`, which `jcompress.runtime.configure_cpu()` adds to XLA_FLAGS)
XLA's own convolutions and gradients are faster still, 115 against 78 GFLOP/s over
resnet18_cifar's convolutions, and beat this kernel gradient; there the kernel gradient's
operands are stored before XLA transposes them (`staged_conv_general_dilated`, below). Models
default to `conv_impl="auto"`, which takes `default_conv_impl()`: "xla" on GPU/TPU, "staged"
on Eigen, "fast" on YNNPACK.

Depthwise convolutions (MobileNetV2's, ShuffleNetV2's) are another case: XLA:CPU runs them as
generic grouped convolutions about 40x below what memory allows, forward and gradients
(benchmarks/depthwise_rates.py). `depthwise_conv` writes them as shifted multiply-adds, its
input gradient as the same stencil over the gradient with the flipped kernel, its kernel
gradient as per-image reductions; the CPU impls ("staged", "fast") route every depthwise
convolution there (`with_depthwise`); "xla" keeps XLA's own.

`conv_general_dilated(...)` takes `lax.conv_general_dilated`'s arguments (flax's `nn.Conv`
accepts it as its `conv_general_dilated` field); anything it does not cover (dilation,
groups, string padding, other layouts, small outputs where the (Hq, Wq) grid wastes work:
`MAX_GRID_WASTE`) goes
to `lax.conv_general_dilated` unchanged. Values and gradients equal the reference within float
rounding (the products are the same, summed in a different order); tests/test_fastconv.py.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any
from typing import Callable
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from jcompress import runtime

#: Convolutions whose flat-shift grid is larger than the output by more than this factor
#: ((H_out + (k-1)//s) (W_out + (k-1)//s) / (H_out W_out): 1.13 at 32x32 and 3x3, 1.27 at 16x16
#: or 8x8 with stride 2, 1.56 at 8x8 with stride 1) keep XLA's own kernel gradient: there the
#: grid's padding wastes work and XLA's kernel-gradient convolution is near its forward rate.
MAX_GRID_WASTE = 1.3

#: Target size of one chunk's patches in `kernel_grad` (bytes): a few MB, cache-sized.
CHUNK_BYTES = 6 * 2**20

_NHWC = ("NHWC", "HWIO", "NHWC")

def cpu_convs_on_eigen() -> bool:
  """Whether XLA_FLAGS keeps YNNPACK away from convolutions (`runtime.XLA_CPU_FLAG`, or the user's
  own setting of `runtime.YNN_OPTION` without CONVOLUTION)."""
  m = re.search(runtime.YNN_OPTION + r"=(\S*)", os.environ.get("XLA_FLAGS", ""))
  return bool(m) and "CONVOLUTION" not in m.group(1)


def default_conv_impl() -> str:
  """What `conv_impl="auto"` (every model's default) means here: XLA's own convolution and
  gradients ("xla") on GPU/TPU; on a CPU whose convolutions run on Eigen, the same with the
  kernel gradient's operands stored before XLA transposes them ("staged":
  `staged_conv_general_dilated`); the matmul kernel gradient ("fast") on a CPU whose
  convolutions go to YNNPACK, whose kernel gradients are slow (1-2 GFLOP/s at 32x32: see the
  module docstring)."""
  if jax.default_backend() != "cpu":
    return "xla"
  return "staged" if cpu_convs_on_eigen() else "fast"


def _conv(x, w, strides, padding, precision=None, preferred_element_type=None):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                  precision=precision,
                                  preferred_element_type=preferred_element_type)


def kernel_grad(x: jax.Array, g: jax.Array, kernel_size: int, stride: int,
                padding: Sequence[tuple[int, int]], out_dtype: Any = None,
                chunk_bytes: int | None = None) -> jax.Array:
  """dW of the NHWC/HWIO convolution y = conv(x, W, stride, padding) for output gradient g.

  `x`: (N, H, W, C); `g`: (N, Ho, Wo, Co); square `kernel_size` and `stride`; `padding`
  ((top, bottom), (left, right)), all >= 0. Returns (k, k, C, Co) in `out_dtype` (g's dtype by
  default), accumulated in float32 at least. See the module docstring for the construction.

  The batch is cut into chunks of as many images as keep one chunk's patches under
  `chunk_bytes` (default `CHUNK_BYTES`; the largest divisor of N that fits, at least 1), summed
  in a `lax.scan`: the patches then stay in cache instead of streaming a 9x copy of the
  activations through memory (measured 2-2.5x faster than one big matmul at ResNet-18's CIFAR
  stage 1).
  """
  n = x.shape[0]
  k, s = kernel_size, stride
  hq, wq = g.shape[1] + (k - 1) // s, g.shape[2] + (k - 1) // s
  per_image = hq * wq * k * k * x.shape[-1] * jnp.dtype(x.dtype).itemsize
  limit = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
  imgs = max([d for d in range(1, n + 1) if n % d == 0 and d * per_image <= limit] or [1])
  acc = jnp.promote_types(jnp.float32, jnp.result_type(x.dtype, g.dtype))
  if imgs < n:
    xs = x.reshape(n // imgs, imgs, *x.shape[1:])
    gs = g.reshape(n // imgs, imgs, *g.shape[1:])

    def body(total, xg):
      return total + _kernel_grad(xg[0], xg[1], k, s, padding, acc), None

    total = jnp.zeros((k, k, x.shape[-1], g.shape[-1]), acc)
    dw = lax.scan(body, total, (xs, gs))[0]
  else:
    dw = _kernel_grad(x, g, k, s, padding, acc)
  return dw.astype(out_dtype or g.dtype)


def _kernel_grad(x, g, k, s, padding, acc):
  """`kernel_grad` of one chunk, in `acc`."""
  n, h, w_, c = x.shape
  _, ho, wo, co = g.shape
  (pt, _), (pl, _) = padding
  hq, wq = ho + (k - 1) // s, wo + (k - 1) // s
  # The padded input covering s * hq rows and s * wq columns (extra rows are zeros that only
  # ever meet zero rows of the padded gradient).
  xp = jnp.pad(x, ((0, 0), (pt, max(0, s * hq - h - pt)), (pl, max(0, s * wq - w_ - pl)),
                   (0, 0)))[:, :s * hq, :s * wq, :]
  xp = xp.reshape(n, hq, s, wq, s, c)
  rows = n * hq * wq
  max_off = ((k - 1) // s) * (wq + 1)
  phases = {}
  cols = []
  for i in range(k):
    for j in range(k):
      phase = (i % s, j % s)
      if phase not in phases:
        flat = xp[:, :, phase[0], :, phase[1], :].reshape(rows, c)
        phases[phase] = jnp.pad(flat, ((0, max_off), (0, 0))) if max_off else flat
      off = (i // s) * wq + j // s
      cols.append(lax.slice_in_dim(phases[phase], off, off + rows, axis=0))
  patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=1)   # (rows, k*k*C)
  gp = jnp.pad(g, ((0, 0), (0, hq - ho), (0, wq - wo), (0, 0))).reshape(rows, co)
  dw = lax.dot_general(patches, gp, (((0,), (0,)), ((), ())), preferred_element_type=acc)
  return dw.reshape(k, k, c, co)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: jax.Array, w: jax.Array, stride: int, padding: tuple) -> jax.Array:
  """NHWC x HWIO convolution, square stride, explicit padding; its kernel gradient is
  `kernel_grad` (a matmul) and its input gradient XLA's transposed convolution."""
  return _conv(x, w, (stride, stride), padding)


def _conv2d_fwd(x, w, stride, padding):
  return _conv(x, w, (stride, stride), padding), (x, w)


def _conv2d_bwd(stride, padding, res, g):
  x, w = res
  dx = jax.linear_transpose(lambda x_: _conv(x_, w, (stride, stride), padding), x)(g)[0]
  dw = kernel_grad(x, g, w.shape[0], stride, padding, out_dtype=w.dtype)
  return dx, dw


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def _is_nhwc(dimension_numbers) -> bool:
  if dimension_numbers is None:
    return False
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
    return tuple(map(tuple, dimension_numbers)) == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
  return tuple(dimension_numbers) == _NHWC


def _plain_2d(lhs_shape, padding, lhs_dilation, rhs_dilation, dimension_numbers,
              feature_group_count, batch_group_count) -> bool:
  """A 2-D NHWC/HWIO convolution without dilation or groups, with explicit non-negative
  padding: what `kernel_grad` and `phase_input_grad` are written for."""
  if len(lhs_shape) != 4 or feature_group_count != 1 or batch_group_count != 1:
    return False
  if any(d != 1 for d in (lhs_dilation or (1, 1))) or any(d != 1 for d in (rhs_dilation or (1, 1))):
    return False
  if not _is_nhwc(dimension_numbers) or isinstance(padding, str):
    return False
  return min(v for p in padding for v in p) >= 0


def applies(lhs_shape, rhs_shape, window_strides, padding, lhs_dilation=None,
            rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
            batch_group_count=1) -> bool:
  """Whether `conv_general_dilated` takes the matmul kernel gradient for these arguments."""
  if not _plain_2d(lhs_shape, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                   feature_group_count, batch_group_count):
    return False
  kh, kw = rhs_shape[0], rhs_shape[1]
  sh, sw = tuple(window_strides)
  if kh != kw or sh != sw:
    return False
  (pt, pb), (pl, pr) = tuple(tuple(p) for p in padding)
  ho = (lhs_shape[1] + pt + pb - kh) // sh + 1
  wo = (lhs_shape[2] + pl + pr - kw) // sw + 1
  waste = (ho + (kh - 1) // sh) * (wo + (kw - 1) // sw) / (ho * wo)
  return waste <= MAX_GRID_WASTE


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` with the matmul kernel gradient where `applies` says so."""
  if precision is None and preferred_element_type is None and applies(
      lhs.shape, rhs.shape, window_strides, padding, lhs_dilation, rhs_dilation,
      dimension_numbers, feature_group_count, batch_group_count):
    pad = tuple(tuple(int(v) for v in p) for p in padding)
    return conv2d(lhs, rhs, int(window_strides[0]), pad)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                  rhs_dilation=rhs_dilation,
                                  dimension_numbers=dimension_numbers,
                                  feature_group_count=feature_group_count,
                                  batch_group_count=batch_group_count, precision=precision,
                                  preferred_element_type=preferred_element_type)


# ------------------------------------------------------------------------- staged kernel gradient

def materialize(x: jax.Array) -> jax.Array:
  """`x`, stored: its consumers read the stored tensor instead of recomputing its producers.

  XLA:CPU fuses a chain of elementwise producers (BatchNorm, ReLU, the residual add) into each
  consumer, even into a transposing copy, which then recomputes the chain element by element
  in the transposed order: reading every input with a stride of the whole tensor, unvectorised,
  about 5x slower than transposing the stored result (measured at 64x32x32x64: 56 against 9
  ms). `lax.optimization_barrier` does not stop it (XLA:CPU expands barriers before fusion); a
  conditional does, as its operand is a buffer. The predicate, the sign bit of one element
  shifted down, is always true, but XLA cannot fold it; the other branch is never taken (both
  branches are written differently so that XLA keeps the conditional). Values are unchanged.
  """
  nbits = 8 * jnp.dtype(x.dtype).itemsize
  bits = lax.bitcast_convert_type(x.reshape(-1)[0], jnp.dtype(f"uint{nbits}"))
  always = (bits >> (nbits - 1)) <= 1
  return lax.cond(always, lambda t: t, lambda t: t * 2, x)


#: Strided convolutions whose output has at least this many pixels take `phase_input_grad`
#: in "staged" (below it XLA's own input gradient was as fast: 19 vs 18 ms at 16x16 -> 8x8,
#: 24 vs 19 ms at 8x8 -> 4x4; at 32x32 -> 16x16 it took 51 against 20 ms).
PHASE_MIN_PIXELS = 256


def phase_input_grad(g: jax.Array, w: jax.Array, x_shape: Sequence[int],
                     strides: Sequence[int], padding: Sequence[tuple[int, int]]) -> jax.Array:
  """dx of the NHWC/HWIO convolution y = conv(x, w, strides, padding) for output gradient g,
  without the zeros XLA inserts.

  XLA writes a strided convolution's input gradient as a stride-1 convolution of g dilated by
  the stride (zeros between its pixels); XLA:CPU's Eigen kernels then multiply those zeros too,
  4x the work for stride 2 (measured 2.5x slower than below at ResNet-18's 32x32 -> 16x16
  convolution). Split the padded input's pixels by their phase (u mod s_h, v mod s_w) instead:
  the pixels of phase (a, b) only meet the taps w[a::s_h, b::s_w], so each phase is a
  stride-1 convolution of g with that sub-kernel (flipped, channels swapped), and the phases
  interleave back into dx (a reshape). The same products as XLA's, no zeros; exact up to
  float32 summation order (tests/test_fastconv.py).
  """
  n, h, wd, c = x_shape
  sh, sw = strides
  (pt, pb), (pl, pr) = padding
  ho, wo = g.shape[1], g.shape[2]
  mh, mw = -(-(h + pt + pb) // sh), -(-(wd + pl + pr) // sw)   # rows / columns per phase
  rows = []
  for a in range(sh):
    cols = []
    for b in range(sw):
      sub = w[a::sh, b::sw]
      ta, tb = sub.shape[0], sub.shape[1]
      if ta == 0 or tb == 0:   # taps that never reach this phase (kernel smaller than stride)
        cols.append(jnp.zeros((n, mh, mw, c), g.dtype))
        continue
      # dx_ab[m] = sum_t g[m - t] sub[t]: a correlation with the flipped sub-kernel.
      kern = jnp.flip(sub, (0, 1)).transpose(0, 1, 3, 2)
      cols.append(lax.conv_general_dilated(g, kern, (1, 1),
                                           ((ta - 1, mh - ho), (tb - 1, mw - wo)),
                                           dimension_numbers=_NHWC))
    rows.append(jnp.stack(cols, axis=3))           # (n, mh, mw, sw, c)
  full = jnp.stack(rows, axis=2).reshape(n, mh * sh, mw * sw, c)
  return full[:, pt:pt + h, pl:pl + wd, :]


def _phase_applies(x_shape, g_shape, window_strides, padding, kw) -> bool:
  """Whether "staged" takes `phase_input_grad`: a strided `_plain_2d` convolution without a
  `preferred_element_type`, whose output has >= PHASE_MIN_PIXELS pixels."""
  if all(st == 1 for st in window_strides) or kw["preferred_element_type"] is not None:
    return False
  if not _plain_2d(x_shape, padding, kw["lhs_dilation"], kw["rhs_dilation"],
                   kw["dimension_numbers"], kw["feature_group_count"], kw["batch_group_count"]):
    return False
  return g_shape[1] * g_shape[2] >= PHASE_MIN_PIXELS


def conv_applies_pointwise(lhs_shape, padding, kw) -> bool:
  """Whether a 1x1 stride-1 convolution with these arguments is a plain matmul `conv2d` computes:
  `_plain_2d`, no padding, no precision or preferred_element_type."""
  if kw["precision"] is not None or kw["preferred_element_type"] is not None:
    return False
  if not _plain_2d(lhs_shape, padding, kw["lhs_dilation"], kw["rhs_dilation"],
                   kw["dimension_numbers"], kw["feature_group_count"], kw["batch_group_count"]):
    return False
  return all(v == 0 for p in padding for v in p)


def staged_conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                rhs_dilation=None, dimension_numbers=None,
                                feature_group_count=1, batch_group_count=1, precision=None,
                                preferred_element_type=None):
  """`lax.conv_general_dilated` whose kernel gradient reads its two operands stored.

  XLA:CPU computes a kernel gradient on its Eigen kernels as a convolution over the batch,
  after transposing the input (N<->C) and the output gradient; fused with their elementwise
  producers those transposes cost more than the convolution itself (about 0.5 s of a 2.5 s
  ResNet-18 step at batch 64; benchmarks/step_profile.py). Here the backward passes the saved
  input and the output gradient through `materialize` first, then runs XLA's own transpose
  rule: the same operations on the same values (tests/test_fastconv.py checks the kernel
  gradients bitwise), the transposes now plain copies (the step's transposes: 0.5 s -> 0.13 s).

  The input gradient of a strided convolution with an output of >= PHASE_MIN_PIXELS pixels
  is `phase_input_grad` (XLA's multiplies the zeros of a dilated gradient): the same products
  summed in another order. Operands that need no gradient (the stem's input, a frozen kernel)
  get none.
  """
  kw = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
            batch_group_count=batch_group_count, precision=precision,
            preferred_element_type=preferred_element_type)
  if (rhs.shape[:2] == (1, 1) and all(st == 1 for st in window_strides)
      and conv_applies_pointwise(lhs.shape, padding, kw)):
    # A 1x1 convolution is a matmul: its kernel gradient is one product of the stored
    # operands (`kernel_grad`), with no transposes to stage.
    return conv2d(lhs, rhs, 1, ((0, 0), (0, 0)))

  def conv(x, w):
    return lax.conv_general_dilated(x, w, window_strides, padding, **kw)

  @jax.custom_vjp
  def staged(x, w):
    return conv(x, w)

  def fwd(x, w):
    # Which operands need a gradient (static): the stem's input, a frozen kernel need none.
    return conv(x.value, w.value), (x.value, w.value, x.perturbed, w.perturbed)

  def bwd(res, g):
    x, w, need_dx, need_dw = res
    dx = dw = None
    if need_dx and _phase_applies(x.shape, g.shape, window_strides, padding, kw):
      pad = tuple(tuple(int(v) for v in p) for p in padding)
      dx = phase_input_grad(g, w, x.shape, tuple(window_strides), pad).astype(x.dtype)
    elif need_dx:
      dx = jax.linear_transpose(lambda x_: conv(x_, w), x)(g)[0]
    if need_dw:
      xs = materialize(x)
      dw = jax.linear_transpose(lambda w_: conv(xs, w_), w)(materialize(g))[0]
    return dx, dw

  staged.defvjp(fwd, bwd, symbolic_zeros=True)
  return staged(lhs, rhs)


def conv_function(impl: str):
  """The `lax.conv_general_dilated` stand-in of a model's `conv_impl` ("auto": `default_conv_impl`):
  what models.common passes to flax's Conv, and what benchmarks/conv_rates.py times. The CPU
  impls ("fast", "staged") compute depthwise convolutions as shifted multiply-adds
  (`with_depthwise`); "xla" is XLA's own everywhere."""
  if impl == "auto":
    impl = default_conv_impl()
  if impl == "xla":
    return lax.conv_general_dilated
  return with_depthwise({"fast": conv_general_dilated,
                         "staged": staged_conv_general_dilated}[impl])


# ------------------------------------------------------------------------- depthwise convolutions

def depthwise_applies(lhs_shape, rhs_shape, padding, lhs_dilation=None, rhs_dilation=None,
                      dimension_numbers=None, feature_group_count=1, batch_group_count=1) -> bool:
  """Whether `depthwise_conv` computes these `lax.conv_general_dilated` arguments: a 2-D
  NHWC/HWIO convolution with one group per input channel and one output per group (kernel
  (kh, kw, 1, C)), no dilation, explicit non-negative padding."""
  if len(lhs_shape) != 4 or batch_group_count != 1 or not _is_nhwc(dimension_numbers):
    return False
  c = lhs_shape[3]
  if c < 2 or feature_group_count != c or tuple(rhs_shape[2:]) != (1, c):
    return False
  if any(d != 1 for d in (lhs_dilation or (1, 1))) or any(d != 1 for d in (rhs_dilation or (1, 1))):
    return False
  return not isinstance(padding, str) and min(v for p in padding for v in p) >= 0


def _taps(xp, kh, kw, strides, out_hw):
  """Tap (i, j) of every output pixel of a padded NHWC input: kh * kw strided slices."""
  n, c = xp.shape[0], xp.shape[-1]
  (sh, sw), (ho, wo) = strides, out_hw
  return [lax.slice(xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                    (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]


def _out_hw(x_shape, k_hw, strides, padding):
  return tuple((x_shape[1 + a] + sum(padding[a]) - k_hw[a]) // strides[a] + 1 for a in (0, 1))


def _depthwise_forward(x, w, strides, padding):
  """sum over taps of the shifted input times the tap's per-channel weights, in float32 at least."""
  kh, kw = w.shape[:2]
  acc = jnp.promote_types(jnp.float32, jnp.result_type(x.dtype, w.dtype))
  xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  y = None
  for t, xt in enumerate(_taps(xp, kh, kw, strides, _out_hw(x.shape, (kh, kw), strides, padding))):
    term = xt.astype(acc) * w[t // kw, t % kw, 0].astype(acc)
    y = term if y is None else y + term
  return y.astype(jnp.result_type(x.dtype, w.dtype))


def depthwise_kernel_grad(x: jax.Array, g: jax.Array, k_hw: Sequence[int],
                          strides: Sequence[int], padding: Sequence[tuple[int, int]],
                          out_dtype: Any = None) -> jax.Array:
  """dW (kh, kw, 1, C) of the depthwise convolution y = conv(x, W) for output gradient g:
  dW[i, j, 0, c] = sum_{n, h, w} xpad[n, s h + i, s w + j, c] g[n, h, w, c].

  One image at a time in a `lax.scan` (its input and gradient stay in cache while the kh * kw
  taps read them), each tap's product summed over the image's rows with the (columns,
  channels) kept: a reduction over the outer axis, which XLA:CPU vectorises over the kept
  ones. XLA's own depthwise kernel gradient (a convolution with a batch group per channel)
  reduces in strided order: 164 against 20 ms at 64x32x32x144 (benchmarks/depthwise_rates.py).
  Accumulated in float32 at least.
  """
  kh, kw = k_hw
  c = x.shape[-1]
  ho, wo = g.shape[1], g.shape[2]
  acc = jnp.promote_types(jnp.float32, jnp.result_type(x.dtype, g.dtype))
  xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))

  def body(total, xg):
    xi, gi = xg
    xi, gi = xi[None].astype(acc), gi[None].astype(acc)
    per_tap = [jnp.sum((t * gi).reshape(ho, wo * c), axis=0)
               for t in _taps(xi, kh, kw, strides, (ho, wo))]
    return total + jnp.stack(per_tap), None

  total = lax.scan(body, jnp.zeros((kh * kw, wo * c), acc), (xp, g))[0]
  dw = jnp.sum(total.reshape(kh, kw, wo, c), axis=2)[:, :, None, :]
  return dw.astype(out_dtype or g.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def depthwise_conv(x: jax.Array, w: jax.Array, strides: tuple, padding: tuple) -> jax.Array:
  """The depthwise NHWC convolution of `x` (N, H, W, C) with `w` (kh, kw, 1, C): `strides`
  (sh, sw), explicit `padding` ((top, bottom), (left, right)).

  XLA:CPU runs a depthwise convolution (`feature_group_count` = channels) as a generic grouped
  convolution, about 40x below what the memory allows (454 ms forward at 64x32x32x144, where
  this takes 10). Here the forward is the kh * kw shifted slices of the padded input times
  their per-channel weights, added: one loop fusion. The input gradient is that function's
  transpose (the same fusion over the gradient, padded back), the kernel gradient
  `depthwise_kernel_grad`. The same products as XLA's in another order: values and gradients
  equal within float32 rounding (tests/test_fastconv.py).
  """
  return _depthwise_forward(x, w, strides, padding)


def _depthwise_fwd(x, w, strides, padding):
  return _depthwise_forward(x, w, strides, padding), (x, w)


def depthwise_input_grad(g: jax.Array, w: jax.Array, x_shape: Sequence[int],
                         strides: Sequence[int], padding: Sequence[tuple[int, int]]) -> jax.Array:
  """dx of the depthwise convolution y = conv(x, w, strides, padding) for output gradient g: the
  stride-1 depthwise correlation of g, dilated by the strides and padded to x's size, with the
  flipped kernel (`_depthwise_forward` again: one loop fusion, the dilation's zeros read as
  index arithmetic). Written out because the transpose jax derives from the forward pads every
  tap's product to the input's size and stores it before adding them (9 stored copies of a
  3x3 layer's input)."""
  kh, kw = w.shape[:2]
  pads = [(0, 0, 0)]
  for a, k in ((0, kh), (1, kw)):
    lo = k - 1 - padding[a][0]
    hi = x_shape[1 + a] + padding[a][0] - 1 - (g.shape[1 + a] - 1) * strides[a]
    pads.append((lo, hi, strides[a] - 1))
  gp = lax.pad(g, jnp.zeros((), g.dtype), [*pads, (0, 0, 0)])
  return _depthwise_forward(gp, jnp.flip(w, (0, 1)), (1, 1), ((0, 0), (0, 0)))


def _depthwise_bwd(strides, padding, res, g):
  x, w = res
  # Stored: its consumers (the previous ReLU6's mask, the BatchNorm gradient's sums and input
  # gradient) would otherwise each recompute the kh * kw taps.
  dx = materialize(depthwise_input_grad(g, w, x.shape, strides, padding).astype(x.dtype))
  dw = depthwise_kernel_grad(x, g, w.shape[:2], strides, padding, out_dtype=w.dtype)
  return dx, dw


depthwise_conv.defvjp(_depthwise_fwd, _depthwise_bwd)


def with_depthwise(base):
  """`base` (a `lax.conv_general_dilated` stand-in) with its depthwise convolutions computed by
  `depthwise_conv` where `depthwise_applies` (and no `precision` or `preferred_element_type`
  is asked for)."""

  def conv_fn(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
              dimension_numbers=None, feature_group_count=1, batch_group_count=1,
              precision=None, preferred_element_type=None):
    if precision is None and preferred_element_type is None and depthwise_applies(
        lhs.shape, rhs.shape, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count):
      pad = tuple(tuple(int(v) for v in p) for p in padding)
      return depthwise_conv(lhs, rhs, tuple(int(s) for s in window_strides), pad)
    return base(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                feature_group_count=feature_group_count, batch_group_count=batch_group_count,
                precision=precision, preferred_element_type=preferred_element_type)

  return conv_fn


# ---------------------------------------------------------------------------- XNOR-popcount forward


#: Popcount terms summed in one XLA loop fusion by `xnor_conv`: longer sums are cut into
#: stored partial sums. XLA:CPU's code for one long fused sum slows down with its length: a
#: 3x3 conv at batch 64, 4x4x512 -> 512 (144 terms), took 9.2 CPU-ms in one fusion, 2.2 at 18
#: terms a fusion; with ternary weights 90.9 -> 4.6; at 64 channels (18 terms) nothing changes;
#: 12 or fewer were no faster (`python benchmarks/xnor_terms.py`; docs/performance.md).
XNOR_TERMS_PER_FUSION = 18


def _fused_sum(term: Callable, items: Sequence, store_last: bool = True) -> jax.Array:
  """sum(term(*item) for item in items), at most `XNOR_TERMS_PER_FUSION` terms to a fusion:
  each group's partial sum stored (`materialize`) before the next adds to it."""
  total = None
  for start in range(0, len(items), XNOR_TERMS_PER_FUSION):
    for item in items[start:start + XNOR_TERMS_PER_FUSION]:
      t = term(*item)
      total = t if total is None else total + t
    if start + XNOR_TERMS_PER_FUSION < len(items) or store_last:
      total = materialize(total)
  return total


def xnor_conv(x: jax.Array, w: jax.Array, strides: Sequence[int],
              padding: Sequence[tuple[int, int]], ternary: bool = False,
              w_nonzero: jax.Array | None = None) -> jax.Array:
  """The NHWC/HWIO convolution of +-1 activations with +-1 kernels by XOR and popcount: int32.

  `x` holds -1 and +1 (`ternary`: -1, 0 and +1, the 2-bit activations), `w` -1 and +1 (any
  other values read as their sign, >= 0 being +1), or `w` is already packed: the uint32 words
  `binarize.pack_signs(w, axis=2)`, (kh, kw, ceil(C / 32), C_out), which a caller whose kernel
  is fixed (packed inference) computes once. Both are packed 32 channels to a uint32 word
  (`binarize.pack_signs`: bit 1 for +1; a channel count that is not a multiple of 32 is padded
  with 0 bits on both sides, which agree and add nothing). Each output is then

      sum_{taps, c} x w = K - 2 popcount(x_bits xor w_bits)  summed over the taps' words,

  K = kh kw C. The zero padding of the convolution reads as -1 bits; the sum of w over an output
  position's padded taps (what those -1s took away) is added back. Ternary activations carry a
  second bit plane `nz` (x != 0): sum = popcount(nz) - 2 popcount(nz and (x_bits xor w_bits)),
  the padding being nz = 0. Ternary weights (-1, 0, +1) carry their own nonzero plane
  `w_nonzero` (packed like `w`, or the -1/0/+1 kernel itself, whose zeros it reads): then
  sum = popcount(m) - 2 popcount(m and (x_bits xor w_bits)), m = nz(x) and nz(w), per output
  channel (the activations' nz is all ones inside the image for sign activations, 0 in the
  padding). Exact integers, so equal to the float32 convolution of the same values
  (tests/test_narrow_binary.py). One XLA loop fusion: every output element sums
  kh kw ceil(C / 32) popcounts, vectorised over the output channels; the result is stored
  (`materialize`), else XLA fuses that sum into each consumer and computes it again there.
  3-4x faster than XLA:CPU's float32 convolutions at ResNet-18's sizes (README "Speed").
  """
  from jcompress import binary as binarize  # noqa: PLC0415
  n, h, wd, c = x.shape
  wbits = w if w.dtype == jnp.uint32 else binarize.pack_signs(w, axis=2)  # (kh, kw, words, C_out)
  kh, kw = wbits.shape[:2]
  sh, sw = strides
  (pt, pb), (pl, pr) = padding
  ho, wo = (h + pt + pb - kh) // sh + 1, (wd + pl + pr - kw) // sw + 1
  spatial = ((0, 0), (pt, pb), (pl, pr), (0, 0))
  # The sign bits (x >= 0; a 0 of ternary activations is masked out by `nz` below).
  bits = jnp.pad(binarize.pack_signs(x, axis=-1), spatial)
  one = jnp.ones((), jnp.int8)
  if ternary or w_nonzero is not None:
    nz = jnp.pad(binarize.pack_signs(jnp.where(x != 0, one, -one), axis=-1), spatial)

  def tap(a, i, j, q):   # word q of tap (i, j) of every output position: (n, ho, wo, 1)
    return lax.slice(a, (0, i, j, q), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, q + 1),
                     (1, sh, sw, 1))

  if w_nonzero is not None and w_nonzero.dtype != jnp.uint32:
    w_nonzero = binarize.pack_signs(jnp.where(w_nonzero != 0, one, -one), axis=2)
  words = [(i, j, q) for i in range(kh) for j in range(kw) for q in range(wbits.shape[2])]
  if w_nonzero is not None and ternary:   # both nonzero planes, per output channel

    def term(i, j, q):   # popcount(m) - 2 popcount(m and (x xor w))
      m = tap(nz, i, j, q) & w_nonzero[i, j, q]
      return (lax.population_count(m).astype(jnp.int32) - 2 * lax.population_count(
          (tap(bits, i, j, q) ^ wbits[i, j, q]) & m).astype(jnp.int32))

    return _fused_sum(term, words)

  def term(i, j, q):
    d = tap(bits, i, j, q) ^ wbits[i, j, q]
    if w_nonzero is not None:   # sign activations, ternary weights: their nonzero plane
      d = d & w_nonzero[i, j, q]
    elif ternary:
      d = d & tap(nz, i, j, q)
    return lax.population_count(d).astype(jnp.int32)

  diff = _fused_sum(term, words, store_last=False)
  nonzero = None
  if ternary and w_nonzero is None:
    nonzero = _fused_sum(lambda i, j, q: lax.population_count(tap(nz, i, j, q)).astype(
        jnp.int32), words, store_last=False)
  if ternary:
    # The nonzero activations under each output's taps are the same for every output
    # channel: stored once (`materialize`) rather than recounted in every channel's sum.
    return materialize(materialize(nonzero) - 2 * diff)
  # sum of w over the padded taps of each output position: sum_taps (1 - valid) colsum(w).
  rows = np.arange(ho)[:, None] * sh + np.arange(kh)[None] - pt          # (ho, kh)
  cols = np.arange(wo)[:, None] * sw + np.arange(kw)[None] - pl          # (wo, kw)
  outside = ~(((rows >= 0) & (rows < h))[:, None, :, None]
              & ((cols >= 0) & (cols < wd))[None, :, None, :])          # (ho, wo, kh, kw)
  # sum of w over C_in per tap: (+1s) - (-1s) = 2 popcount - C (the pad bits are 0); with
  # ternary weights over their nonzero ones, and the taps' nonzero weights in place of K.
  if w_nonzero is None:
    plus = jnp.sum(lax.population_count(wbits).astype(jnp.int32), axis=2)
    count = jnp.full(plus.shape, c, jnp.int32)
  else:
    plus = jnp.sum(lax.population_count(wbits & w_nonzero).astype(jnp.int32), axis=2)
    count = jnp.sum(lax.population_count(w_nonzero).astype(jnp.int32), axis=2)
  wsum = 2 * plus - count                                                # (kh, kw, C_out)
  pad_sum = jnp.einsum("hwij,ijo->hwo", outside.astype(np.int32), wsum)
  return materialize(jnp.sum(count, axis=(0, 1)) - 2 * diff + pad_sum)


# ----------------------------------------------------------------------------- exact narrow forward

def int8_conv(lhs: jax.Array, rhs: jax.Array, *args, **kwargs) -> jax.Array:
  """`lax.conv_general_dilated` of int8 operands into exact int32 sums, on any backend.

  A CPU accumulates int8 x int8 in int32. cuDNN's int8 convolutions output only int8 or
  float32 (an int32 accumulator does not lower on a GPU), so elsewhere the sums come out in
  float32, exact while they stay below 2^24 (binary and low-bit kernels: callers' bound), and
  are cast back. Both branches are in the graph (`lax.platform_dependent`), so an export
  lowered for several platforms runs the loading device's.
  """
  def conv(acc):
    return lambda x, w: lax.conv_general_dilated(
        x.astype(jnp.int8), w.astype(jnp.int8), *args, preferred_element_type=acc, **kwargs)

  return lax.platform_dependent(
      lhs, rhs, cpu=conv(jnp.int32),
      default=lambda x, w: conv(jnp.float32)(x, w).astype(jnp.int32))


#: Narrow forward computes of a binary convolution (`narrow_conv_general_dilated`): operand
#: dtype and accumulator. Both are exact for integer operands of magnitude <= 127: bfloat16
#: holds every integer up to 256 and the products accumulate in float32 (exact below 2^24);
#: int8 accumulates in int32. "xnor" (`xnor_conv`: packed sign bits, XOR and popcount, int32
#: sums) computes the levels-1 grid only: sign activations, or -1/0/+1 (2 bits).
NARROW_COMPUTE = {"bf16": (jnp.bfloat16, jnp.float32), "int8": (jnp.int8, jnp.int32),
                  "xnor": (jnp.uint32, jnp.int32)}


def narrow_conv_general_dilated(compute: str, levels: int, base=None, zeros: bool = True):
  """A `lax.conv_general_dilated` for a binary convolution whose forward runs in `compute`.

  Exact under two preconditions the caller guarantees (`jcompress.models.bnn_resnet` checks
  them where the model is built for training: `methods.binary.resolve_binary_compute`): the input's
  values are integers over `levels`, `k / levels` with |k| <= `levels` <= 127 (the output of
  `binarize.quantize_activation`: sign for 1 bit, `levels = 2^(b-1) - 1` for b signed bits),
  and the kernel's values are -1 or +1 (a sign binarizer). The forward then computes
  `conv(round(x * levels), w) / levels` with both operands in `NARROW_COMPUTE[compute]`'s
  dtype: integer products and sums, exact, so for `levels == 1` the result is bitwise the
  float32 convolution's, otherwise within one float32 rounding of it.

  "xnor" (levels 1 only) packs the signs 32 to a word and sums popcounts (`xnor_conv`); `zeros`
  says whether the activations may hold 0 (2-bit activations do, sign activations never): with
  False it skips the nonzero bit plane. A convolution `xnor_conv` does not cover (dilation,
  groups, string padding, other layouts) runs the float32 forward.

  The backward is `base`'s (default `lax.conv_general_dilated`; `conv_general_dilated` of this
  module for the matmul kernel gradient) on the float values: the output gradient is not an
  integer, so neither gradient has an exact narrow form.
  """
  if compute not in NARROW_COMPUTE:
    raise ValueError(f"narrow compute must be one of {tuple(NARROW_COMPUTE)}, got {compute!r}")
  if not 1 <= levels <= 127:
    raise ValueError(f"levels must be in 1..127 for an exact narrow conv, got {levels}")
  if compute == "xnor" and levels != 1:
    raise ValueError(f"xnor computes levels 1 (sign or -1/0/+1 activations) only, got {levels}")
  dt, acc = NARROW_COMPUTE[compute]
  base = base or lax.conv_general_dilated

  def conv_fn(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
              dimension_numbers=None, feature_group_count=1, batch_group_count=1,
              precision=None, preferred_element_type=None):
    kw = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
              dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
              batch_group_count=batch_group_count)

    def reference(x, w):
      return base(x, w, window_strides, padding, precision=precision,
                  preferred_element_type=preferred_element_type, **kw)

    @jax.custom_vjp
    def narrow(x, w):
      if compute == "xnor":
        out = preferred_element_type or jnp.result_type(x.dtype, w.dtype)
        if preferred_element_type is None and _plain_2d(
            x.shape, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count):
          pad = tuple(tuple(int(v) for v in p) for p in padding)
          return xnor_conv(x, w, tuple(window_strides), pad, ternary=zeros).astype(out)
        return reference(x, w)
      xq = jnp.round(x.astype(jnp.float32) * levels).astype(dt)
      conv = int8_conv if compute == "int8" else functools.partial(
          lax.conv_general_dilated, preferred_element_type=acc)
      y = conv(xq, w.astype(dt), window_strides, padding, **kw).astype(jnp.float32)
      if levels != 1:
        y = y / levels
      return y.astype(preferred_element_type or jnp.result_type(x.dtype, w.dtype))

    def fwd(x, w):
      return narrow(x, w), (x, w)

    def bwd(res, g):
      return jax.vjp(reference, *res)[1](g)

    narrow.defvjp(fwd, bwd)
    return narrow(lhs, rhs)

  return conv_fn
