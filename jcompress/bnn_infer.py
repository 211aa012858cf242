"""Frozen, bit-packed binary ResNets and the inference function that runs them.

After training, `freeze` turns a BNN ResNet (`jcompress.models.bnn_resnet`, weights binarized by
`binarize.binary_weights`) into an artifact that holds:

* every binary kernel (`conv1`, `conv2`, `shortcut_conv` of each block) as its signs only,
  permanently: bit 1 for +1 (w >= 0, so sign(0) = +1) and bit 0 for -1 (`binarize.pack_signs`'s
  convention), packed 32 to a uint32 word *over the flattened fan-in of each output channel*:
  the kernel W (kh, kw, C_in, C_out) is read as a (K = kh kw C_in, C_out) matrix in (kh, kw, C_in)
  order and stored as `bits` of shape (C_out, ceil(K / 32)), row o holding output channel o's K
  signs (bit i of word j is fan-in element 32 j + i; the K..32 ceil(K / 32) tail bits are 0). A
  3x3 kernel over 16 channels (K = 144) takes 5 words = 160 bits, 1.11 bits a weight (28.8x
  smaller than float32); K a multiple of 32 (C_in a multiple of 32) gives exactly 1 bit a weight
  (32x). Each row is word-aligned, so an XNOR-popcount kernel reads it as it is. With
  `method="xnor"` the artifact adds `scale`, XNOR-Net's alpha = mean |w| per output channel;
  with `method="ternary"` (weights -1, 0, +1: `binarize.ternarize`) a second plane `nonzero`,
  packed the same way, with bit 1 where the weight is not 0 (2 bits a weight).
* every BatchNorm folded into per-channel terms. A BatchNorm in eval mode (flax's formula) is the
  affine map

      bn(x) = (x - mean) * mul + bias,  mul = scale / sqrt(var + eps),
            = A x + B,                  A = mul, B = bias - mean * mul,

  and where a quantizer Q follows it the pair becomes:

      num_bits = 1:   sign(A x + B) = +1  iff  d x >= d t,   d = sign(A), t = -B / A
                      (A = 0: a constant, t = -inf for B >= 0, +inf otherwise; d = 1).
                      When x is an integer accumulator (the output of a binary conv) the
                      threshold is an integer too: d x >= ceil(d t) (clipped to +-2^30).
      num_bits = k:   Q(y) = q / m with the integer code q = round(clip(y m, -m, m)),
                      m = 2^(k-1) - 1, so q = round(clip(A' x + B', -m, m)) with A' = A m,
                      B' = B m (the symmetric grid of `binarize.quantize_activation`).

  The stem's BatchNorm folds into the float stem kernel and a bias (K' = K A, relu(conv(x, K')
  + B)); `final_bn` into an affine map before the ReLU and the pooling.

Binary convolutions are then exact integer arithmetic: the codes (+-1, or q in -m..m) and the
+-1 weights give an integer sum |acc| <= K m <= 9 * 512 * 127 < 2^24, computed as int8 x int8 ->
int32 (`compute="int8"`), bf16 x bf16 -> f32 or f32 x f32 (both exact: the integers fit the
significand) or, for num_bits = 1 and 2, XNOR + popcount on packed words (`compute="xnor"`,
`fastconv.xnor_conv`: the kernel's and the codes' signs packed 32 channels to a word;
`compute="auto"`, the default, takes the fastest exact kind where the artifact is loaded:
`fastest_compute`):

    sum_i a_i w_i = K - 2 popcount(bits(a) xor bits(w))  over the K fan-in signs,

where the zero padding of the convolution (which adds nothing in the latent model, but reads as
-1 in a sign bit) is put back by adding the sum of w over the taps of each output position that
fall into the padding (2-bit codes -1/0/+1 carry a nonzero bit plane instead). The
accumulator stands for `acc * s`, s = alpha / m (1 for sign weights and 1-bit activations),
which folds into the next BatchNorm or scales the conv2 / shortcut output into the float
residual stream.

Usage:

    frozen = freeze(params, batch_stats, model)            # the stored artifact (packed bits)
    logits = packed_apply(frozen, images)                   # unpacks inside the jitted graph
    runtime = load(frozen, model)                           # checks shapes, unpacks once
    logits = packed_apply(runtime, images)                  # the fast path
    sizes = artifact_nbytes(frozen)                         # bytes per leaf, binary-layer ratio

The artifact is a plain nested dict: `meta` (JSON-able Python values: format, num_bits, method,
stem kind, block list, kernel shapes, compute kind) and the array leaves; `model_bytes` of it is
`artifact_nbytes(frozen)["total"]`.
"""

from __future__ import annotations

import json
import re
from typing import Any
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from jcompress import binary as binarize
from jcompress import transforms
from jcompress.errors import ConfigError

PyTree = Any

#: The artifact's format tag (meta["format"]).
FORMAT = "jcompress.bnn_infer/1"

#: How binary convolutions are computed (meta["compute"]).
COMPUTE = ("auto", "int8", "bf16", "f32", "xnor")


def fastest_compute(num_bits: int = 1, platform: str | None = None) -> str:
  """What `compute="auto"` (the default) means where an artifact of `num_bits` activations is
  loaded: on a CPU "xnor" for 1 and 2 bits (XNOR-popcount, `fastconv.xnor_conv`: 3-4x faster
  than XLA's float32 convolutions on the 2-core AVX2 CPU), else "int8" where XLA's convolutions
  run on YNNPACK (int8 x int8 -> int32 was the fastest there) and "f32" on XLA's Eigen
  convolutions (`runtime.XLA_CPU_FLAG`, set by `runtime.configure_cpu()`: their int8
  convolution measured ~50x slower than float32); "bf16" on GPU/TPU. All are exact (module
  docstring). `platform` ("cpu", "cuda", "tpu", ...; default: jax's default backend) says
  where."""
  from jcompress import fastconv  # noqa: PLC0415
  if (platform or jax.default_backend()) != "cpu":
    return "bf16"
  if num_bits <= 2:
    return "xnor"
  return "f32" if fastconv.cpu_convs_on_eigen() else "int8"

#: Weight binarizers whose frozen form this module knows (config key `binary.method`).
METHODS = ("ste_sign", "approx_sign", "swish_sign", "xnor", "ternary")

_BINARY_CONVS = ("conv1", "conv2", "shortcut_conv")
_INT_LIMIT = 2 ** 30
_DN = ("NHWC", "HWIO", "NHWC")


# ----------------------------------------------------------------------------- packing


def pack_kernel(w: jax.Array) -> jax.Array:
  """Signs of a conv kernel (kh, kw, C_in, C_out) as uint32 (C_out, ceil(kh kw C_in / 32)).

  Row o packs output channel o's flattened fan-in (in (kh, kw, C_in) order), 32 signs a word,
  bit 1 for w >= 0 (`binarize.pack_signs`), tail bits 0.
  """
  w = jnp.asarray(w)
  k = int(np.prod(w.shape[:-1]))
  return binarize.pack_signs(w.reshape(k, w.shape[-1]).T, axis=-1)


def unpack_kernel(bits: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
  """Inverse of `pack_kernel`: the +1/-1 kernel of `shape` (kh, kw, C_in, C_out) in `dtype`."""
  shape = tuple(int(s) for s in shape)
  k = int(np.prod(shape[:-1]))
  # Transpose the words (32x smaller than the signs), then unpack straight into (K, C_out).
  w = binarize.unpack_signs(jnp.asarray(bits).T, k, axis=0, dtype=dtype)
  return w.reshape(shape)


# ----------------------------------------------------------------------------- freezing


def _check_model(model) -> None:
  from jcompress.models.bnn_resnet import BNNResNet  # noqa: PLC0415  (models import binarize)
  if not isinstance(model, BNNResNet):
    raise ConfigError(f"config key 'model': packed inference needs a BNN ResNet "
                      f"(bnn_resnet20, bnn_resnet18_cifar, bnn_resnet18), got "
                      f"{type(model).__name__}")


def _abstract_variables(model, in_channels: int) -> dict:
  x = jax.ShapeDtypeStruct((1, 32, 32, in_channels), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


def _compare_trees(found: PyTree, expected: PyTree, what: str) -> None:
  """ConfigError naming the first leaf whose path, shape or dtype differs."""
  exp = {transforms.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
  got = {transforms.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(found)[0]}
  for path, x in exp.items():
    if path not in got:
      raise ConfigError(f"{what} leaf '{path}' is missing (expected shape {tuple(x.shape)})")
    y = got[path]
    if not hasattr(y, "shape") or tuple(y.shape) != tuple(x.shape):
      raise ConfigError(f"{what} leaf '{path}': expected shape {tuple(x.shape)}, found "
                        f"{tuple(getattr(y, 'shape', ()))}")
    if np.dtype(y.dtype) != np.dtype(x.dtype):
      raise ConfigError(f"{what} leaf '{path}': expected dtype {np.dtype(x.dtype)}, found "
                        f"{np.dtype(y.dtype)}")
  extra = sorted(set(got) - set(exp))
  if extra:
    raise ConfigError(f"{what} leaf '{extra[0]}' is not in the model "
                      f"({len(extra)} unexpected leaves)")


def _spec(model, params_like: PyTree, method: str, compute: str) -> dict:
  """The artifact's `meta`: everything static that `packed_apply` needs."""
  stem = params_like["stem_conv"]["kernel"].shape
  blocks, kernels = [], {}
  for name in sorted((k for k in params_like if re.fullmatch(r"stage\d+_block\d+", k)),
                     key=lambda k: tuple(int(n) for n in re.findall(r"\d+", k))):
    s, b = (int(n) for n in re.findall(r"\d+", name))
    block = params_like[name]
    blocks.append([name, 2 if (s > 1 and b == 0) else 1, "shortcut_conv" in block])
    for conv in _BINARY_CONVS:
      if conv in block:
        kernels[f"{name}/{conv}"] = [int(d) for d in block[conv]["kernel"].shape]
  return {
      "format": FORMAT,
      "num_bits": int(model.num_bits),
      "method": method,
      "cifar_stem": bool(model.cifar_stem),
      "compute": compute,
      "stem_kernel": [int(d) for d in stem],
      "num_classes": int(params_like["head"]["kernel"].shape[-1]),
      "blocks": blocks,
      "kernels": kernels,
  }


def _bn_affine(p: dict, s: dict, eps: float) -> tuple[jax.Array, jax.Array]:
  """(A, B) with bn(x) = A x + B in eval mode: A = scale / sqrt(var + eps), B = bias - mean A."""
  a = jnp.asarray(p["scale"], jnp.float32) * lax.rsqrt(jnp.asarray(s["var"], jnp.float32) + eps)
  return a, jnp.asarray(p["bias"], jnp.float32) - jnp.asarray(s["mean"], jnp.float32) * a


def _quant_terms(a: jax.Array, b: jax.Array, num_bits: int, integer: bool) -> dict:
  """Folded BN + quantizer terms for an input `x` that feeds `a x + b` (module docstring)."""
  if num_bits >= 2:
    m = 2.0 ** (num_bits - 1) - 1
    return {"scale": a * m, "bias": b * m}
  d = jnp.where(a < 0, -1.0, 1.0)
  safe = jnp.where(a == 0, 1.0, a)
  t = jnp.where(a == 0, jnp.where(b >= 0, -jnp.inf, jnp.inf), -b / safe)
  if integer:
    dt = jnp.clip(jnp.ceil(d * t), -_INT_LIMIT, _INT_LIMIT).astype(jnp.int32)
    return {"sign": d.astype(jnp.int8), "threshold": dt}
  return {"sign": d.astype(jnp.int8), "threshold": (d * t).astype(jnp.float32)}


def _freeze_arrays(params: PyTree, batch_stats: PyTree, meta: dict, eps: float) -> dict:
  """The artifact's arrays (pure jnp: `jax.eval_shape` of it gives the expected shapes)."""
  nb = meta["num_bits"]
  m = 1.0 if nb == 1 else 2.0 ** (nb - 1) - 1
  xnor = meta["method"] == "xnor"
  ternary = meta["method"] == "ternary"
  out = {}
  a, b = _bn_affine(params["stem_bn"], batch_stats["stem_bn"], eps)
  out["stem"] = {"kernel": jnp.asarray(params["stem_conv"]["kernel"], jnp.float32) * a,
                 "bias": b}

  def binary(w):
    if ternary:   # signs, and a second plane: 1 where the ternary weight is not 0
      t = binarize.ternarize(jnp.asarray(w, jnp.float32))
      return {"bits": pack_kernel(t), "nonzero": pack_kernel(jnp.where(t != 0, 1.0, -1.0))}
    entry = {"bits": pack_kernel(w)}
    if xnor:
      entry["scale"] = binarize.xnor_scale(jnp.asarray(w, jnp.float32))
    return entry

  def out_scale(w):   # acc * s is the latent conv's output
    s = binarize.xnor_scale(jnp.asarray(w, jnp.float32)) if xnor else jnp.ones(w.shape[-1])
    return s / m

  for name, _, has_short in meta["blocks"]:
    p, s = params[name], batch_stats[name]
    blk = {}
    blk["bn1"] = _quant_terms(*_bn_affine(p["bn1"], s["bn1"], eps), nb, integer=False)
    blk["conv1"] = binary(p["conv1"]["kernel"])
    a2, b2 = _bn_affine(p["bn2"], s["bn2"], eps)
    blk["bn2"] = _quant_terms(a2 * out_scale(p["conv1"]["kernel"]), b2, nb, integer=True)
    blk["conv2"] = binary(p["conv2"]["kernel"])
    if has_short:
      blk["shortcut_bn"] = _quant_terms(*_bn_affine(p["shortcut_bn"], s["shortcut_bn"], eps),
                                        nb, integer=False)
      blk["shortcut_conv"] = binary(p["shortcut_conv"]["kernel"])
    out[name] = blk
  a, b = _bn_affine(params["final_bn"], batch_stats["final_bn"], eps)
  out["final"] = {"scale": a, "bias": b}
  out["head"] = {"kernel": jnp.asarray(params["head"]["kernel"], jnp.float32),
                 "bias": jnp.asarray(params["head"]["bias"], jnp.float32)}
  return out


def is_block_conv(path: str) -> bool:
  """Whether a `/`-joined leaf path lies in a block convolution (conv1, conv2, shortcut_conv)."""
  return "/" in path and path.split("/")[-2] in _BINARY_CONVS


def block_conv_selection(params: PyTree, include: str | Sequence[str] = (r".*",),
                         exclude: str | Sequence[str] = transforms.DEFAULT_EXCLUDE) -> dict:
  """{leaf path: whether the `binary` selection (`include`/`exclude`, as `binarize.
  binary_weights` takes them) treats it as a BNN ResNet's block convolutions are meant to be}:
  False for a block conv kernel left float or another leaf binarized, in tree order."""
  mask = transforms.select(params, include, exclude, kernels_only=True, key="binary.include")
  return {path: bool(selected) == is_block_conv(path)
          for path, selected in zip(transforms.leaf_paths(params), jax.tree.leaves(mask))}


def freeze(params: PyTree, batch_stats: PyTree, model, *, method: str = "ste_sign",
           include: str | Sequence[str] = (r".*",),
           exclude: str | Sequence[str] = transforms.DEFAULT_EXCLUDE,
           compute: str = "auto") -> dict:
  """The packed artifact of a trained BNN ResNet (see the module docstring).

  Args:
    params, batch_stats: the trained model's latent float params and BatchNorm statistics
      (not modified).
    model: the `BNNResNet` they belong to (gives num_bits, the stem kind, bn_epsilon).
    method: the `binary.method` the weights were trained with ("xnor" stores alpha).
    include, exclude: the `binary.include` / `binary.exclude` patterns of the training run;
      they must select exactly the block convolutions (conv1, conv2, shortcut_conv).
    compute: how `packed_apply` computes binary convolutions (`COMPUTE`).

  Returns:
    {"meta": {...}, "stem": ..., "stage1_block0": {"bn1", "conv1": {"bits"}, ...}, ...,
     "final": ..., "head": ...}.

  Raises:
    ConfigError: not a BNN ResNet, params of another shape (naming the leaf), a method or
      compute kind that is unknown, or a binary selection other than the block convolutions.
  """
  _check_model(model)
  if method not in METHODS:
    raise ConfigError(f"config key 'binary.method': packed inference knows {METHODS}, "
                      f"got {method!r}")
  if compute not in COMPUTE:
    raise ConfigError(f"`compute` must be one of {COMPUTE}, got {compute!r}")
  if compute == "xnor" and int(model.num_bits) > 2:
    raise ConfigError(f"`compute`='xnor' needs num_bits 1 or 2 (sign or -1/0/+1 "
                      f"activations), got num_bits={model.num_bits}")
  try:
    in_ch = int(params["stem_conv"]["kernel"].shape[2])
  except (KeyError, TypeError, AttributeError, IndexError):
    raise ConfigError("params leaf 'stem_conv/kernel' is missing: not a BNN ResNet's "
                      "params") from None
  abstract = _abstract_variables(model, in_ch)
  _compare_trees(params, abstract["params"], "params")
  _compare_trees(batch_stats, abstract["batch_stats"], "batch_stats")
  wrong = [p for p, ok in block_conv_selection(params, include, exclude).items() if not ok]
  if wrong:
    raise ConfigError(f"config key 'binary.include': packed inference binarizes exactly the "
                      f"block convolutions {_BINARY_CONVS}; leaf '{wrong[0]}' is "
                      f"{'not selected' if is_block_conv(wrong[0]) else 'selected'}")
  meta = _spec(model, params, method, compute)
  arrays = jax.jit(_freeze_arrays, static_argnums=(2, 3))(
      params, batch_stats, _Static(meta), float(model.bn_epsilon))
  return {"meta": meta, **jax.device_get(arrays)}


class _Static:
  """Hashable wrapper of a JSON-able dict, for jit's static arguments."""

  def __init__(self, value: dict):
    self.value = value
    self.key = json.dumps(value, sort_keys=True)

  def __hash__(self):
    return hash(self.key)

  def __eq__(self, other):
    return isinstance(other, _Static) and self.key == other.key

  def __getitem__(self, k):
    return self.value[k]


def _arrays(frozen: dict) -> dict:
  return {k: v for k, v in frozen.items() if k != "meta"}


def _meta(frozen: Any) -> dict:
  if not isinstance(frozen, dict) or not isinstance(frozen.get("meta"), dict) \
      or frozen["meta"].get("format") != FORMAT:
    raise ConfigError(f"not a packed BNN artifact: expected a dict with meta.format {FORMAT!r}")
  return frozen["meta"]


def expected_arrays(model, meta: dict) -> tuple[dict, PyTree]:
  """(meta, `jax.ShapeDtypeStruct`s of the arrays) that `model` gives under `meta`'s settings
  (method, compute kind, input channels)."""
  _check_model(model)
  abstract = _abstract_variables(model, int(meta["stem_kernel"][2]))
  spec = _spec(model, abstract["params"], meta["method"], meta["compute"])
  shapes = jax.eval_shape(lambda p, s: _freeze_arrays(p, s, spec, float(model.bn_epsilon)),
                          abstract["params"], abstract["batch_stats"])
  return spec, shapes


def abstract_artifact(model, *, method: str = "ste_sign", in_channels: int = 3,
                      compute: str = "auto") -> dict:
  """The artifact `freeze` would give for `model`, with `jax.ShapeDtypeStruct` leaves.

  No params needed and nothing computed: `artifact_nbytes(abstract_artifact(model))` sizes a
  model's packed artifact (e.g. BNN ResNet-18's) before or without training it.
  """
  _check_model(model)
  abstract = _abstract_variables(model, in_channels)
  meta = _spec(model, abstract["params"], method, compute)
  return {"meta": meta, **expected_arrays(model, meta)[1]}


def check_artifact(frozen: dict, model) -> None:
  """Raises ConfigError unless `frozen` (packed, or `load`ed) fits `model` leaf for leaf.

  The message names the leaf (e.g. `stage1_block0/conv1/bits`) and the expected and found
  shapes, or the meta key (`num_bits`, `cifar_stem`, a `kernels` entry) that differs.
  """
  meta = _meta(frozen)
  _check_model(model)
  for key, want in (("num_bits", int(model.num_bits)), ("cifar_stem", bool(model.cifar_stem))):
    if meta.get(key) != want:
      raise ConfigError(f"artifact meta '{key}' is {meta.get(key)!r}, the model has {want!r}")
  spec, expected = expected_arrays(model, meta)
  for path, shape in spec["kernels"].items():
    found = meta["kernels"].get(path)
    if found is None or list(found) != list(shape):
      raise ConfigError(f"artifact leaf '{path}' (meta 'kernels'): expected kernel shape "
                        f"{tuple(shape)}, found {None if found is None else tuple(found)}")
  if meta["blocks"] != spec["blocks"] or len(meta["kernels"]) != len(spec["kernels"]):
    raise ConfigError(f"artifact meta 'blocks' {meta['blocks']} differs from the model's "
                      f"{spec['blocks']}")
  found = _arrays(frozen)
  if _is_loaded(meta):   # `load` replaced bits by unpacked kernels: compare the source shapes
    found = _repacked_shapes(found, meta)
  _compare_trees(found, expected, "artifact")


def _is_loaded(meta: dict) -> bool:
  return bool(meta.get("loaded", False))


def _repacked_shapes(arrays: dict, meta: dict) -> dict:
  """The packed shapes that a `load`ed artifact's unpacked kernels come from."""

  def conv_entry(path, entry):
    entry = dict(entry)
    if "w" in entry:
      w = entry.pop("w")
      shape = meta["kernels"][path]
      if tuple(w.shape) != tuple(shape):
        raise ConfigError(f"artifact leaf '{path}/w': expected shape {tuple(shape)}, found "
                          f"{tuple(w.shape)}")
      entry["bits"] = jax.ShapeDtypeStruct((shape[-1], binarize.num_words(
          int(np.prod(shape[:-1])))), jnp.uint32)
      if entry.pop("wnz", None) is not None or meta["method"] == "ternary":
        entry["nonzero"] = entry["bits"]
    return entry

  out = {}
  for name, blk in arrays.items():
    if isinstance(blk, dict) and name.startswith("stage"):
      out[name] = {k: conv_entry(f"{name}/{k}", v) if k in _BINARY_CONVS else v
                   for k, v in blk.items()}
    else:
      out[name] = blk
  return out


# ----------------------------------------------------------------------------- loading


def load(frozen: dict, model=None, compute: str | None = None) -> dict:
  """Checks `frozen` against `model` (if given) and unpacks its bits once for fast inference.

  Returns the artifact with every binary conv's `bits` replaced by its +1/-1 kernel `w` in the
  compute dtype (int8 / bf16 / f32; for `compute="xnor"` its signs repacked along the input
  channels, the words `fastconv.xnor_conv` reads). The stored artifact is `frozen`; the result
  is a runtime form for `packed_apply`. `frozen` is not modified.
  """
  if model is not None:
    check_artifact(frozen, model)
  meta = loaded_meta(_meta(frozen), compute)
  return {"meta": meta, **unpacked_arrays(frozen, meta)}


def loaded_meta(meta: dict, compute: str | None = None) -> dict:
  """The meta of `load`'s result: `compute` (default the artifact's own; "auto" resolved for
  the platform this runs on) checked and fixed, `loaded` set. ConfigError for an artifact that
  is already loaded or a compute its bit width does not take."""
  meta = dict(meta)
  if _is_loaded(meta):
    raise ConfigError("artifact is already loaded (its bits are unpacked); load the packed one")
  compute = meta["compute"] if compute is None else compute
  if compute not in COMPUTE:
    raise ConfigError(f"`compute` must be one of {COMPUTE}, got {compute!r}")
  if compute == "xnor" and meta["num_bits"] > 2:
    raise ConfigError(f"`compute`='xnor' needs num_bits 1 or 2, the artifact has "
                      f"num_bits={meta['num_bits']}")
  meta["compute"] = _resolve(compute, meta["num_bits"])
  meta["loaded"] = True
  return meta


def unpacked_arrays(frozen: dict, meta: dict) -> dict:
  """`load`'s arrays (no meta) for the `loaded_meta` `meta`: pure jnp, so it can be compiled
  (`export.inference_fn` decodes a packed artifact once this way)."""
  compute = meta["compute"]
  dtype = _compute_dtype(compute)
  out = {}
  for name, blk in _arrays(frozen).items():
    if name.startswith("stage"):
      blk = dict(blk)
      for conv in _BINARY_CONVS:
        if conv in blk:
          entry = dict(blk[conv])
          w = _kernel(entry, meta["kernels"][f"{name}/{conv}"], dtype)
          entry.pop("bits")
          if entry.pop("nonzero", None) is not None and compute == "xnor":
            entry["wnz"] = binarize.pack_signs(
                jnp.where(w != 0, jnp.ones((), dtype), -jnp.ones((), dtype)), axis=2)
          if compute == "xnor":
            w = binarize.pack_signs(w, axis=2)
          entry["w"] = w
          blk[conv] = entry
    out[name] = blk
  return out


def _resolve(compute: str, num_bits: int) -> str:
  return fastest_compute(num_bits) if compute == "auto" else compute


def _compute_dtype(compute: str):
  return {"int8": jnp.int8, "bf16": jnp.bfloat16, "f32": jnp.float32, "xnor": jnp.int8}[compute]


# ----------------------------------------------------------------------------- inference


def _pad(k: int):
  p = (k - 1) // 2
  return ((p, p), (p, p))


def _quantize(x: jax.Array, terms: dict, num_bits: int, dtype) -> jax.Array:
  """Codes of Q(bn(x)) in `dtype`: +-1 (num_bits 1) or round(clip(A' x + B', -m, m))."""
  if num_bits == 1:
    sign = terms["sign"].astype(x.dtype)
    one = jnp.ones((), dtype)
    return jnp.where(x * sign >= terms["threshold"].astype(x.dtype), one, -one)
  m = 2.0 ** (num_bits - 1) - 1
  y = x.astype(jnp.float32) * terms["scale"] + terms["bias"]
  return jnp.round(jnp.clip(y, -m, m)).astype(dtype)


def _kernel(entry: dict, shape: Sequence[int], dtype) -> jax.Array:
  """The stored kernel of a binary conv entry: +-1, or -1/0/+1 with a `nonzero` plane."""
  w = unpack_kernel(entry["bits"], shape, dtype)
  if "nonzero" in entry:
    w = jnp.where(unpack_kernel(entry["nonzero"], shape, dtype) > 0, w, jnp.zeros((), dtype))
  return w


def _binary_conv(codes: jax.Array, entry: dict, shape: Sequence[int], stride: int,
                 compute: str, num_bits: int) -> jax.Array:
  """The integer accumulator (int32, or exact integers in f32) of a binary conv."""
  from jcompress import fastconv  # noqa: PLC0415
  dtype = _compute_dtype(compute)
  w = entry["w"] if "w" in entry else _kernel(entry, shape, dtype)
  if compute == "xnor":
    # ternary kernels: their nonzero plane (packed at load, else the -1/0/+1 kernel itself)
    nonzero = entry.get("wnz", w if "nonzero" in entry else None)
    return fastconv.xnor_conv(codes, w, (stride, stride), _pad(shape[0]), ternary=num_bits > 1,
                              w_nonzero=nonzero)
  if compute == "int8":
    return fastconv.int8_conv(codes, w, (stride, stride), _pad(shape[0]), dimension_numbers=_DN)
  return lax.conv_general_dilated(codes.astype(dtype), w.astype(dtype), (stride, stride),
                                  _pad(shape[0]), dimension_numbers=_DN,
                                  preferred_element_type=jnp.float32)


def _to_float(acc: jax.Array, entry: dict, num_bits: int) -> jax.Array:
  """acc * s: the latent conv's float output (s = alpha / m)."""
  y = acc.astype(jnp.float32)
  m = 1.0 if num_bits == 1 else 2.0 ** (num_bits - 1) - 1
  if "scale" in entry:
    return y * (entry["scale"] / m)
  return y if m == 1.0 else y / m


def _forward(arrays: dict, images: jax.Array, meta: _Static) -> jax.Array:
  """The network; compute "auto" chooses by the platform the graph runs on
  (`lax.platform_dependent`): a StableHLO export lowered for several platforms carries the
  CPU's compute (`fastest_compute(nb, "cpu")`) and GPU/TPU's (bf16), and the device that loads
  it takes its own."""
  nb = meta["num_bits"]
  if meta["compute"] != "auto":
    return _forward_with(arrays, images, meta, meta["compute"])

  def run(compute):
    return lambda a, x: _forward_with(a, x, meta, compute)

  return lax.platform_dependent(arrays, images, cpu=run(fastest_compute(nb, "cpu")),
                                default=run(fastest_compute(nb, "gpu")))


def _forward_with(arrays: dict, images: jax.Array, meta: _Static, compute: str) -> jax.Array:
  nb = meta["num_bits"]
  code_dtype = _compute_dtype(compute)
  stem = arrays["stem"]
  x = jnp.asarray(images, jnp.float32)
  k = stem["kernel"]
  if meta["cifar_stem"]:
    x = lax.conv_general_dilated(x, k, (1, 1), _pad(k.shape[0]), dimension_numbers=_DN)
    x = jax.nn.relu(x + stem["bias"])
  else:
    x = lax.conv_general_dilated(x, k, (2, 2), _pad(k.shape[0]), dimension_numbers=_DN)
    x = jax.nn.relu(x + stem["bias"])
    x = lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                          ((0, 0), (1, 1), (1, 1), (0, 0)))
  for name, stride, has_short in meta["blocks"]:
    blk = arrays[name]
    shapes = {c: meta["kernels"].get(f"{name}/{c}") for c in _BINARY_CONVS}
    a = _quantize(x, blk["bn1"], nb, code_dtype)
    acc = _binary_conv(a, blk["conv1"], shapes["conv1"], stride, compute, nb)
    a = _quantize(acc, blk["bn2"], nb, code_dtype)
    y = _to_float(_binary_conv(a, blk["conv2"], shapes["conv2"], 1, compute, nb), blk["conv2"],
                  nb)
    if has_short:
      a = _quantize(x, blk["shortcut_bn"], nb, code_dtype)
      acc = _binary_conv(a, blk["shortcut_conv"], shapes["shortcut_conv"], stride, compute, nb)
      x = y + _to_float(acc, blk["shortcut_conv"], nb)
    else:
      x = y + x
  x = jax.nn.relu(x * arrays["final"]["scale"] + arrays["final"]["bias"])
  x = jnp.mean(x, axis=(1, 2))
  return x @ arrays["head"]["kernel"] + arrays["head"]["bias"]


_forward_jit = jax.jit(_forward, static_argnums=(2,))


def packed_apply(frozen: dict, images: jax.Array) -> jax.Array:
  """Logits (N, num_classes) float32 of the frozen network on NHWC `images` (jit-compiled).

  `frozen` is the packed artifact (`freeze`; the bits are unpacked inside the compiled graph)
  or its `load`ed form (unpacked once). Compiles once per meta and input shape.
  """
  meta = _meta(frozen)
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] != meta["stem_kernel"][2]:
    raise ConfigError(f"images must be NHWC with {meta['stem_kernel'][2]} channels "
                      f"(stem_conv/kernel {tuple(meta['stem_kernel'])}), got shape "
                      f"{tuple(images.shape)}")
  return _forward_jit(_arrays(frozen), images, _Static(meta))


# ----------------------------------------------------------------------------- files


def save(frozen: dict, path: str) -> int:
  """Writes the packed artifact to `path` (an uncompressed .npz) and returns its size in bytes.

  Each array is stored under its `/`-joined leaf path; `meta` as JSON text in the uint8 array
  `__meta__`. `restore(path)` gives the artifact back.
  """
  import os  # noqa: PLC0415

  meta = _meta(frozen)
  if _is_loaded(meta):
    raise ConfigError("save writes the packed artifact, not a `load`ed one")
  arrays = {transforms.path_str(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(_arrays(frozen))[0]}
  arrays["__meta__"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
  with open(path, "wb") as f:
    np.savez(f, **arrays)
  return os.path.getsize(path)


def restore(path: str) -> dict:
  """The artifact that `save` wrote to `path`."""
  with np.load(path, allow_pickle=False) as data:
    if "__meta__" not in data.files:
      raise ConfigError(f"{path}: not a packed BNN artifact (no __meta__ entry)")
    out = {"meta": json.loads(bytes(data["__meta__"]).decode())}
    for key in data.files:
      if key == "__meta__":
        continue
      node = out
      *parents, leaf = key.split("/")
      for name in parents:
        node = node.setdefault(name, {})
      node[leaf] = data[key]
  _meta(out)
  return out


# ----------------------------------------------------------------------------- sizes


def artifact_nbytes(frozen: dict) -> dict:
  """Bytes of the packed artifact: per leaf, in total, and for the binary layers alone.

  Returns {"per_leaf": {path: bytes}, "total": bytes of every array leaf,
  "binary_bytes": bytes of the binary convs' bits (and XNOR scales),
  "binary_float32_bytes": 4 x their weight count, "binary_ratio": the quotient,
  "binary_bits_per_weight": 8 x binary_bytes / weight count}.
  """
  meta = _meta(frozen)
  if _is_loaded(meta):
    raise ConfigError("artifact_nbytes sizes the packed artifact, not a `load`ed one")
  per_leaf = {}
  for path, x in jax.tree_util.tree_flatten_with_path(_arrays(frozen))[0]:
    per_leaf[transforms.path_str(path)] = int(np.dtype(x.dtype).itemsize * np.prod(x.shape))
  conv_paths = set(meta["kernels"])
  binary = sum(v for p, v in per_leaf.items() if p.rsplit("/", 1)[0] in conv_paths)
  weights = sum(int(np.prod(s)) for s in meta["kernels"].values())
  return {
      "per_leaf": per_leaf,
      "total": int(sum(per_leaf.values())),
      "binary_bytes": int(binary),
      "binary_float32_bytes": 4 * weights,
      "binary_ratio": 4 * weights / binary,
      "binary_bits_per_weight": 8 * binary / weights,
  }
