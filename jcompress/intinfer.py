"""Integer inference: a quantized model's convolutions and Dense layers as int8 products.

A layer runs on integers when its weights are stored as symmetric uniform codes of at most 8
bits (a `quant` or `sparse_quant` encoding, code 0 = 0.0, one scale per output channel or per
tensor) and its input passes an activation quantizer (`jcompress.actquant`: PACT, LSQ or
DoReFa, at most 8 bits). Then, with `k` the activation codes and `s` their step, `q` the weight
codes and `t` their scale,

    conv(k s, q t) = s t * conv(k, q)

and `conv(k, q)` is computed exactly: the activation codes as int8 (unsigned 8-bit codes
shifted by -128 into int8, the shift put back as `128 * sum(q)` per output channel, padding
filled with the shifted zero), the weight codes as int8, the products summed in int32 by one
`dot_general` over the convolution's patches (im2col: `k*k` strided slices side by side), and
one float multiply by `s t` per output channel (XLA fuses it with the BatchNorm, the ReLU and
the next layer's quantizer: the requantization). Only the rounding of `s t * acc` and the
float32 sums of the fake-quant model differ, so the logits agree to float rounding.

Why im2col and a matmul: on XLA:CPU an int8 convolution is not routed to a fast kernel
(about 10 GOP/s against 300 for float32), while an int8 matrix product reaches 400-750 GOP/s
where XLA hands standalone dots to YNNPACK (`runtime.XLA_CPU_FLAG` does), with VNNI where the
CPU has it. Where the CPU has AVX-512 VNNI, `jcompress.native.int8_matmul` (built on first use)
does the products instead, at 1.7-2.7x YNNPACK's rate on the Zen 5 EPYC
(benchmarks/int_rates.py; `export.inference_fn(native=...)`). Convolving the int8 codes
directly was measured too, in a process whose convolutions go to YNNPACK (which has int8
convolutions, where Eigen has none: 3.8 images/s): resnet18_cifar W8A8 at batch 64 ran at 396
images/s against 397 by im2col, and YNNPACK's float convolutions took the float artifact from
365 (Eigen) to 216 images/s (2026-12-04, one process per setting, idle 2-core CPU).

Everything else (the stem and classifier, which stay float as the export says, BatchNorm,
depthwise convolutions, layers without an input quantizer) runs as the float model does.
`integer_layers` says which layers qualify and why the others do not; `intercept` runs a
model's `apply` with those layers replaced, through `flax.linen.intercept_methods`, so no model
knows about it.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any
from typing import Callable

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from jcompress import actquant

#: Activation-quantizer kinds (model field `act_quant`) whose codes the integer route reads.
ACT_KINDS = ("pact", "lsq", "dorefa")
#: The quantizer modules of those kinds.
_QUANTIZERS = (actquant.PACT, actquant.LSQ, actquant.DoReFa)


# ----------------------------------------------------------------------------- pure functions


def to_int8(codes: jax.Array, code_range: tuple[int, int]) -> tuple[jax.Array, int]:
  """Activation codes as int8 and the offset `z` subtracted to fit (`codes - z`): 128 for
  unsigned 8-bit codes, else 0."""
  lo, hi = code_range
  shift = 128 if hi > 127 else 0
  if lo - shift < -128 or hi - shift > 127:
    raise ValueError(f"activation codes {code_range} do not fit int8")
  return (codes.astype(jnp.int32) - shift).astype(jnp.int8), shift


def _pair(v) -> tuple[int, int]:
  """A Flax conv's stride / dilation field (None, an int or a pair) as a pair."""
  if v is None:
    return (1, 1)
  return (int(v), int(v)) if isinstance(v, int) else tuple(int(x) for x in v)


def _pads(padding: Any, in_hw, kernel, strides) -> tuple[tuple[int, int], ...]:
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(in_hw, kernel, strides, padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def patches(x: jax.Array, kernel: tuple[int, int], strides: tuple[int, int],
            pads: tuple[tuple[int, int], ...], fill: int = 0) -> jax.Array:
  """(N * H_out * W_out, kh * kw * C) im2col of NHWC `x`, columns in HWIO kernel order
  (tap (i, j) major, channel minor), padding filled with `fill`."""
  n, h, w, c = x.shape
  kh, kw = kernel
  sh, sw = strides
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), constant_values=fill)
  ho = (h + pads[0][0] + pads[0][1] - kh) // sh + 1
  wo = (w + pads[1][0] + pads[1][1] - kw) // sw + 1
  cols = [lax.slice(xp, (0, i, j, 0), (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                    (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]
  cols = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
  return cols.reshape(n * ho * wo, kh * kw * c), (n, ho, wo)


def int_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """int8 (R, K) x int8 (K, O) -> int32 (R, O), exact."""
  return lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())),
                         preferred_element_type=jnp.int32)


#: Images per im2col chunk: as many as keep one chunk's patches under this many bytes (one
#: `lax.map` step per chunk). The patches of a whole batch (37.7 MB for resnet18_cifar's first
#: stage at batch 64) leave the cache before the matmul reads them. resnet18_cifar W8A8 at
#: batch 64 against the float artifact (one run, alternating): 1.13x unchunked, 1.04x / 1.16x
#: / 1.20x / 1.25x with 1 / 2 / 4 / 8 MB chunks.
CHUNK_BYTES = 2 ** 23


def chunk_images(n: int, bytes_per_image: int, limit: int | None = None) -> int:
  """The largest divisor of `n` whose chunk of patches stays under `limit` bytes (default
  `CHUNK_BYTES`; at least 1)."""
  limit = CHUNK_BYTES if limit is None else limit
  best = 1
  for k in range(1, n + 1):
    if n % k == 0 and k * bytes_per_image <= limit:
      best = k
  return best


def int_conv(xq: jax.Array, shift: int, wq: jax.Array, strides, padding,
             chunk: int | None = None, native: bool = False, prepared=None) -> jax.Array:
  """The exact int32 convolution of activation codes `xq + shift` (int8 `xq`, NHWC) with
  int8 HWIO weight codes `wq` (no groups, no dilation): im2col and one int8 matmul, over
  chunks of `chunk` images (default `chunk_images`; the whole batch where that is all).
  `native`: the matmul is `jcompress.native.int8_matmul` (the codes as uint8, `xq + 128`;
  `prepared`: `native.prepare` of the (kh * kw * C, O) weights), over the whole batch by
  default (the kernel blocks for the caches itself: resnet18_cifar W8A8 at batch 64 ran at
  669 images/s unchunked, 623 with 8 MB chunks), else XLA's `dot_general`; the same int32
  sums."""
  kh, kw, c, o = wq.shape
  strides = tuple(strides)
  pads = _pads(padding, xq.shape[1:3], (kh, kw), strides)
  w2 = wq.reshape(kh * kw * c, o)
  if native:
    x, offset = _native_operand(xq, shift)
    fill, matmul = offset, functools.partial(_native_matmul, offset=offset, prepared=prepared)
  else:
    x, fill, matmul = xq, -shift, int_matmul

  def one(x):
    cols, (n, ho, wo) = patches(x, (kh, kw), strides, pads, fill=fill)
    return matmul(cols, w2).reshape(n, ho, wo, o)

  n = xq.shape[0]
  ho = (xq.shape[1] + sum(pads[0]) - kh) // strides[0] + 1
  wo = (xq.shape[2] + sum(pads[1]) - kw) // strides[1] + 1
  if not isinstance(n, int):   # a symbolic batch (jax.export): one piece
    chunk = n
  elif chunk is None:
    chunk = n if native else chunk_images(n, ho * wo * kh * kw * c)
  if chunk is n or chunk >= n:
    acc = one(x)
  else:
    acc = lax.map(one, x.reshape(n // chunk, chunk, *x.shape[1:]))
    acc = acc.reshape(n, ho, wo, o)
  if shift and not native:
    acc = acc + shift * column_sums(w2)
  return acc


def _native_operand(xq: jax.Array, shift: int) -> tuple[jax.Array, int]:
  """(uint8 `xq + 128` (the top bit flipped), the offset the native kernel takes off it,
  `128 - shift`): then `(x - offset) = xq + shift`, the codes themselves (padding: `offset`)."""
  return lax.bitcast_convert_type(xq ^ jnp.int8(-128), jnp.uint8), 128 - shift


def _native_matmul(a: jax.Array, b: jax.Array, offset: int, prepared=None) -> jax.Array:
  from jcompress import native as native_kernels  # noqa: PLC0415

  return native_kernels.int8_matmul(a, b, offset, prepared)


def column_sums(w2: jax.Array) -> jax.Array:
  """Exact int32 column sums of int8 (K, O) `w2`, as an int8 matmul with ones (XLA:CPU rewrote
  the plain reduction into a windowed one: 11 ms a call for resnet18_cifar's weights)."""
  return int_matmul(jnp.ones((1, w2.shape[0]), jnp.int8), w2)[0]


def int_dense(xq: jax.Array, shift: int, wq: jax.Array, native: bool = False,
              prepared=None) -> jax.Array:
  """The exact int32 product of activation codes `xq + shift` (int8, (..., K)) with int8
  (K, O) weight codes (`native`, `prepared`: as in `int_conv`)."""
  if native:
    x, offset = _native_operand(xq, shift)
    acc = _native_matmul(x.reshape(-1, x.shape[-1]), wq, offset, prepared)
    return acc.reshape(*x.shape[:-1], wq.shape[1])
  acc = int_matmul(xq, wq)
  if shift:
    acc = acc + shift * column_sums(wq)
  return acc


# ----------------------------------------------------------------------------- the artifact


#: Layers whose matmul depth (kh * kw * C_in) is below this run float: there im2col costs as
#: much as the int8 products save (batch 64 on the 2-core CPU: resnet20's 3x3 convs with 16
#: and 32 channels took 2.5 / 1.2 ms on integers against 2.3 / 1.0 ms in float32; with 64
#: channels 0.9 against 1.0; resnet18_cifar's 64-512 channels 13.8-7.9 against 15.0-10.9).
MIN_DEPTH = 512


def integer_layers(manifest: dict,
                   min_depth: int | None = None) -> tuple[dict[str, dict], dict[str, str]]:
  """({layer: info}, {layer: why not}) over the artifact's conv / Dense kernels.

  `info`: `act` (the input quantizer's path), `bits` (weight bits), `per_channel`, `kind`
  (the activation quantizer's; each layer's code range comes from its quantizer module when it
  runs: signed where the model asks, `models.common.conv(signed_input=True)`). A kernel is
  listed in the second dict, with the reason, when it is stored quantized but cannot (or,
  below `min_depth`, default `MIN_DEPTH`, should not) run on integers."""
  min_depth = MIN_DEPTH if min_depth is None else min_depth
  spec = (manifest["model"].get("kwargs") or {}).get("act_quant")
  kind = dict(spec).get("kind", "none") if spec else "none"
  ok, why = {}, {}
  for path, e in manifest["params"].items():
    if not path.endswith("/kernel"):
      continue
    layer = path[:-len("/kernel")]
    enc = e.get("encoding")
    if enc not in ("quant", "sparse_quant"):
      continue
    if e.get("kind") != "uniform" or not e.get("symmetric") or e.get("bits", 99) > 8:
      why[layer] = (f"weights {e.get('kind')} {e.get('bits')}-bit "
                    f"{'symmetric' if e.get('symmetric') else 'asymmetric'}: the integer route "
                    "takes symmetric uniform codes of at most 8 bits")
      continue
    if kind not in ACT_KINDS:
      why[layer] = "its input is not quantized (model field act_quant)"
      continue
    if int(spec["bits"]) > 8:
      why[layer] = f"activations of {spec['bits']} bits"
      continue
    if len(e["shape"]) == 4 and e["shape"][2] == 1 and e["shape"][3] > 1:
      why[layer] = "depthwise convolution (runs float)"
      continue
    depth = int(np.prod(e["shape"][:-1]))
    if depth < min_depth:
      why[layer] = (f"matmul depth {depth} < {min_depth} (intinfer.MIN_DEPTH): im2col costs "
                    "what the int8 products save; runs float")
      continue
    act = layer + "_act"
    has_param = any(p.startswith(act + "/") for p in manifest["params"])
    if kind != "dorefa" and not has_param:
      why[layer] = "no input quantizer beside it (the stem's input, or not a conv input)"
      continue
    ok[layer] = {"act": act, "bits": int(e["bits"]), "per_channel": bool(e["per_channel"]),
                 "kind": kind}
  return ok, why


def _act_codes(module: nn.Module, x: jax.Array, params: dict, path: str):
  """(codes int32, step, float output equal to the quantizer module's, (lowest, highest)
  code) of `x`."""
  bits, signed = module.bits, module.signed
  if isinstance(module, (actquant.DoReFa, actquant.PACT)):
    n = actquant.levels(bits, signed)
    top = 1.0 if isinstance(module, actquant.DoReFa) else jnp.maximum(
        params[f"{path}/alpha"], actquant._TINY).astype(x.dtype)
    scale = top / n
    codes = jnp.round(jnp.clip(x, -top if signed else 0, top) / scale)
    return (codes.astype(jnp.int32), jnp.asarray(scale, jnp.float32),
            (codes * scale).astype(x.dtype), (-int(n) if signed else 0, int(n)))
  step = jnp.maximum(params[f"{path}/step"], actquant._TINY).astype(x.dtype)
  q_n, q_p = actquant.lsq_code_range(bits, signed)
  codes = jnp.round(jnp.clip(x / step, q_n, q_p))
  return (codes.astype(jnp.int32), step.astype(jnp.float32), (codes * step).astype(x.dtype),
          (q_n, q_p))


@contextlib.contextmanager
def intercept(layers: dict[str, dict], params: dict, weight: Callable[[str], tuple],
              native: bool = False):
  """Within the block, `model.apply` runs `layers` (from `integer_layers`) on integers, their
  matmuls by `jcompress.native.int8_matmul` where `native` (else XLA's `dot_general`).

  `params`: the flat `/`-joined float params (the quantizers' alpha / step);
  `weight(layer) -> (int8 codes of the kernel's shape, scale broadcastable to its output
  channels[, native.prepare of the codes as a (fan-in, outputs) matrix])`. A layer whose
  input did not come straight from its quantizer runs float."""
  acts = {info["act"]: layer for layer, info in layers.items()}
  seen: dict[str, tuple] = {}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = "/".join(str(p) for p in module.scope.path)
    if path in acts and isinstance(module, _QUANTIZERS):
      codes, step, y, code_range = _act_codes(module, args[0], params, path)
      seen[acts[path]] = (y, codes, step, code_range)
      return y
    if path in layers and path in seen and seen[path][0] is args[0]:
      _, codes, step, code_range = seen.pop(path)
      xq, shift = to_int8(codes, code_range)
      wq, scale, *prepared = weight(path)
      prepared = prepared[0] if prepared else None
      plain = set(_pair(module.kernel_dilation)) | set(_pair(module.input_dilation)) == {1} \
          if isinstance(module, nn.Conv) else False
      if plain and module.feature_group_count == 1 and wq.ndim == 4:
        acc = int_conv(xq, shift, wq, _pair(module.strides), module.padding,
                       native=native, prepared=prepared)
      elif isinstance(module, nn.Dense) and wq.ndim == 2:
        acc = int_dense(xq, shift, wq, native=native, prepared=prepared)
      else:
        return next_fun(*args, **kwargs)
      out = acc.astype(jnp.float32) * (step * jnp.reshape(scale, (-1,)))
      if getattr(module, "use_bias", False):
        out = out + params[f"{path}/bias"]
      return out.astype(module.dtype or jnp.float32)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield


def products(jaxpr) -> list[tuple[str, tuple[str, ...]]]:
  """(primitive, operand dtypes) of every dot_general and conv_general_dilated in `jaxpr` and
  its sub-jaxprs, and ("int8_matmul", (A's, B's dtype)) for each call of the native kernel
  (`jcompress.native`): what a test reads to see that the products really are 8-bit integers."""
  from jcompress import jaxpr_utils  # noqa: PLC0415
  from jcompress import native  # noqa: PLC0415

  out = [(name, tuple(np.dtype(v.aval.dtype).name for v in eqn.invars))
         for name in ("dot_general", "conv_general_dilated")
         for eqn in jaxpr_utils.primitive_eqns(jaxpr, name)]
  return out + [("int8_matmul", tuple(np.dtype(v.aval.dtype).name for v in eqn.invars[:2]))
                for eqn in jaxpr_utils.primitive_eqns(jaxpr, "ffi_call")
                if eqn.params.get("target_name") == native.TARGET]
