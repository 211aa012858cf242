"""Compressed artifacts: what `--mode=export` writes, and the inference function that reads them.

`python launch.py --mode=export --workdir=DIR` restores DIR's latest readable checkpoint (a
truncated or corrupted one is skipped, with a warning, for the one before it) and writes

  DIR/export/manifest.json      what the model is and what every stored tensor is (JSON)
  DIR/export/weights.bin        the stored tensors, one after the other, raw (C order, no
                                padding, no compression)
  DIR/export/inference.stablehlo  the inference function serialized with `jax.export`
                                (StableHLO for cpu, cuda and tpu, symbolic batch size; it takes
                                the stored tensors and the images, so it holds code, not
                                weights: `load_stablehlo(path)(arrays, images)`)

`manifest.json` + `weights.bin` are the artifact: their size on disk is results.json's
`model_bytes` (`train.summarize` counts `artifact_nbytes(*artifact_arrays(exp, state))`, the same
bytes). The StableHLO file is a deployment form of the code and is not counted.

What is stored, per parameter leaf of the model (named by its `/`-joined param path `P`, as
`transforms.leaf_paths` gives it; `P` minus its last component is the layer):

  float        P                               the float32 leaf as it is (stem, head, BN, ...)
  quant        P/codes [+ P/scale, P/zero_point, P/codebook]
                                               integer codes packed at their real bit-width
                                               (`quantize.pack_qtensor`, `packing.pack`)
  sparse       P/bitmask, P/values             1 bit a weight + the non-zeros
                                               (`prune.sparse_encode`)
  csr          P/indptr, P/indices, P/values   where CSR is smaller (`prune.sparse_encode`)
  sparse_quant P/bitmask, P/codes, P/scale     pruned then quantized (symmetric uniform or
                                               pow2): the bitmask and the codes of the kept
                                               weights only, packed at their bit-width
  pq           P/codes, P/codebooks            product quantization (`pq.pack_pq`)
  binary       P/bits [+ P/nonzero, P/scale]   signs 32 to a uint32 word (`binarize.pack_signs`);
                                               ternary: a second plane, 1 where w != 0

plus the BatchNorm statistics (`P` = `layer/mean`, `layer/var`, float32). A chain of transforms
(prune, then quantize) stores each leaf once, in the encoding of the last method that encoded it
(the one whose decoding gives the effective weights), merged as `sparse_quant` where that is
exact. A binary ResNet (`bnn_*` with a `binary` sub-config) stores `bnn_infer.freeze`'s artifact
instead (signs packed per output channel, BatchNorms folded into thresholds), under its layers'
names (`stage1_block0/conv1/bits`, `stage1_block0/bn2/threshold`, `stem_conv/kernel` (the stem's
BN folded in), `final_bn/scale`, ...).

The manifest holds the model (name, num_classes, width, dtype, model kwargs, input shape, a
low-rank plan), the methods and their config, every tensor's shape, dtype, byte count, offset in
weights.bin and CRC-32, and every param leaf's encoding. `load_artifact` checks all of it and
refuses, naming the tensor, an artifact whose manifest does not match its data;
`inference_fn(dir)` rebuilds the model from the manifest alone (no checkpoint, no config file,
no dataset) and decodes the tensors inside the jitted function.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any
from typing import Callable
import zlib

from absl import logging
from flax import traverse_util
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from jcompress import binary as binarize
from jcompress import data as data_lib
from jcompress import experiment
from jcompress import intinfer
from jcompress import models as models_lib
from jcompress import packing
from jcompress import pq
from jcompress import quantize
from jcompress.artifact import ARTIFACT_FILES  # noqa: F401  (the artifact's names, re-exported)
from jcompress.artifact import BLOB
from jcompress.artifact import FORMAT  # noqa: F401
from jcompress.artifact import MANIFEST
from jcompress.artifact import ArtifactError
from jcompress.artifact import _flat
from jcompress.artifact import _signed_zero
from jcompress.artifact import artifact_arrays
from jcompress.artifact import artifact_nbytes  # noqa: F401
from jcompress.artifact import layer_of  # noqa: F401
from jcompress.artifact import manifest_bytes
from jcompress.artifact import param_of  # noqa: F401
from jcompress.artifact import tensor_entry
from jcompress.errors import ConfigError
from jcompress.errors import JCompressError
from jcompress.methods import registry

PyTree = Any

STABLEHLO = "inference.stablehlo"


# ----------------------------------------------------------------------------- files


def write_artifact(arrays: dict, manifest: dict, directory: str) -> int:
  """Writes manifest.json and weights.bin into `directory`; returns their bytes on disk."""
  os.makedirs(directory, exist_ok=True)
  for name, a in arrays.items():
    t = tensor_entry(manifest, name)
    if int(a.nbytes) != t["nbytes"]:
      raise JCompressError(f"tensor '{name}': {a.nbytes} bytes, the manifest says {t['nbytes']}")
  blob = os.path.join(directory, BLOB)
  with open(blob + ".tmp", "wb") as f:
    for a in arrays.values():
      f.write(np.asarray(a, order="C").tobytes())
  os.replace(blob + ".tmp", blob)
  path = os.path.join(directory, MANIFEST)
  with open(path + ".tmp", "wb") as f:
    f.write(manifest_bytes(manifest))
  os.replace(path + ".tmp", path)
  return os.path.getsize(path) + os.path.getsize(blob)


def load_artifact(directory: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(manifest, arrays) of an artifact written by `write_artifact`, every tensor checked.

  Raises ArtifactError (a WorkdirError) naming the file or the tensor when the manifest is
  missing or unreadable, weights.bin is shorter or longer than the manifest says, or a tensor's
  shape and dtype do not give its byte count, its bytes fall outside the blob, or its CRC-32
  differs (the data was changed or the manifest edited).
  """
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    raise ArtifactError(f"{path} does not exist: {directory} holds no exported artifact "
                        "(run --mode=export first)")
  try:
    with open(path, "rb") as f:
      manifest = json.loads(f.read().decode())
  except (OSError, ValueError) as e:
    raise ArtifactError(f"{path} cannot be read ({e}); refusing to load the artifact") from e
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ArtifactError(f"{path}: not a jcompress artifact (format "
                        f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                        f"expected {FORMAT!r})")
  blob_path = os.path.join(directory, manifest.get("blob", BLOB))
  if not os.path.exists(blob_path):
    raise ArtifactError(f"{blob_path} does not exist; refusing to load the artifact")
  with open(blob_path, "rb") as f:
    blob = f.read()
  arrays = {}
  end = 0
  try:
    entries = sorted(((n, tensor_entry(manifest, n)) for n in manifest["tensors"]),
                     key=lambda kv: int(kv[1]["offset"]))
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise ArtifactError(f"{path}: the tensors' entries are malformed ({e})") from e
  for name, t in entries:
    try:
      dtype = np.dtype(t["dtype"])
      shape = tuple(int(d) for d in t["shape"])
      nbytes, offset, crc = int(t["nbytes"]), int(t["offset"]), int(t["crc32"])
    except (KeyError, TypeError, ValueError) as e:
      raise ArtifactError(f"tensor '{name}': manifest entry {t!r} is malformed ({e})") from e
    if math.prod(shape) * dtype.itemsize != nbytes:
      raise ArtifactError(f"tensor '{name}': shape {shape} of {dtype} is "
                          f"{math.prod(shape) * dtype.itemsize} bytes, the manifest says "
                          f"{nbytes}; the manifest does not match the data, refusing to load")
    if offset != end:
      raise ArtifactError(f"tensor '{name}': offset {offset} in {BLOB}, expected {end} (the "
                          "tensors are stored one after the other); refusing to load")
    if offset + nbytes > len(blob):
      raise ArtifactError(f"tensor '{name}': bytes [{offset}, {offset + nbytes}) lie past the "
                          f"end of {blob_path} ({len(blob)} bytes): the file is truncated; "
                          "refusing to load")
    raw = blob[offset:offset + nbytes]
    if zlib.crc32(raw) & 0xFFFFFFFF != crc:
      raise ArtifactError(f"tensor '{name}': CRC-32 of its {nbytes} bytes in {blob_path} does "
                          "not match the manifest (the data or the manifest was changed); "
                          "refusing to load")
    arrays[name] = np.frombuffer(raw, dtype).reshape(shape).copy()
    end = offset + nbytes
  if end != len(blob):
    raise ArtifactError(f"{blob_path} has {len(blob)} bytes, the manifest's tensors "
                        f"{end}: the manifest does not match the data; refusing to load")
  _check_layout(manifest, arrays)
  return manifest, arrays


#: The tensors each encoding always stores (`path/part`); optional ones (scales, zero points,
#: codebooks) are checked where decoding reads them.
_PARTS = {"quant": ("codes",), "sparse_quant": ("bitmask", "codes", "scale"),
          "sparse": ("bitmask", "values"), "csr": ("indptr", "indices", "values"),
          "pq": ("codes", "codebooks"), "binary": ("bits",)}


def _check_layout(manifest: dict, arrays: dict) -> None:
  """Every param leaf's tensors exist and have the sizes its encoding implies."""
  for path in manifest.get("batch_stats", []):
    if path not in arrays:
      raise ArtifactError(f"tensor '{path}' (batch_stats) is not in the artifact; refusing to "
                          "load")
  for path, e in manifest.get("params", {}).items():
    enc = e.get("encoding")
    if enc == "float":
      if path not in arrays:
        raise ArtifactError(f"tensor '{path}' is not in the artifact; refusing to load")
      continue
    for part in _PARTS.get(enc, ()):
      if f"{path}/{part}" not in arrays:
        raise ArtifactError(f"tensor '{path}/{part}' (of the {enc} leaf '{path}') is not in the "
                            "artifact; refusing to load")
    n = math.prod(e["shape"])
    want = {}
    if enc == "quant":
      want[f"{path}/codes"] = packing.packed_nbytes(n, e["bits"])
    elif enc == "sparse_quant":
      want[f"{path}/bitmask"] = math.ceil(n / 8)
      want[f"{path}/codes"] = packing.packed_nbytes(e["nnz"], e["bits"])
    elif enc == "sparse":
      want[f"{path}/bitmask"] = math.ceil(n / 8)
    for name, nbytes in want.items():
      if arrays[name].nbytes != nbytes:
        raise ArtifactError(f"tensor '{name}': {arrays[name].nbytes} bytes, a {enc} "
                            f"{tuple(e['shape'])} leaf needs {nbytes}; refusing to load")


# ----------------------------------------------------------------------------- decoding


def _unpack_codes(packed: jax.Array, bits: int, count: int, signed: bool) -> jax.Array:
  """`packing.unpack` in jnp (jit-able): int32 codes."""
  packed = jnp.asarray(packed, jnp.uint8).reshape(-1)
  if bits == 8:
    c = packed[:count].astype(jnp.int32)
  elif 8 % bits == 0:   # whole codes per byte, the first in the low bits: shifts and masks
    per = 8 // bits
    shifts = jnp.arange(per, dtype=jnp.uint8) * jnp.uint8(bits)
    c = ((packed[:, None] >> shifts) & jnp.uint8(2 ** bits - 1)).reshape(-1)[:count]
    c = c.astype(jnp.int32)
  else:
    stream = jnp.unpackbits(packed, bitorder="little")[:count * bits].reshape(count, bits)
    c = jnp.sum(stream.astype(jnp.int32) << jnp.arange(bits, dtype=jnp.int32), axis=1)
  return c - (1 << (bits - 1)) if signed else c


def _qtensor(arrays: dict, path: str, e: dict, codes: jax.Array):
  shape = tuple(e["shape"])
  bshape = [1] * len(shape)
  if e["per_channel"]:
    bshape[-1] = shape[-1]

  def per(v, dtype):
    v = jnp.asarray(v, dtype)
    return v.reshape(bshape) if e["per_channel"] else v.reshape(())

  signed = _signed_zero(e)
  codes = codes.reshape(shape).astype(jnp.int8 if signed else jnp.uint8)
  scale = zero_point = codebook = None
  if e["kind"] in ("uniform", "pow2"):
    scale = per(arrays[f"{path}/scale"], jnp.float32)
  if e["kind"] == "uniform":
    zero_point = (per(arrays[f"{path}/zero_point"], jnp.uint8) if not e["symmetric"]
                  else jnp.zeros(jnp.shape(scale), jnp.int8))
  if e["kind"] == "kmeans":
    codebook = jnp.asarray(arrays[f"{path}/codebook"], jnp.float32)
  q = quantize.QTensor(codes=codes, scale=scale, zero_point=zero_point, codebook=codebook,
                       bits=e["bits"], kind=e["kind"], symmetric=e["symmetric"],
                       narrow_range=e["narrow_range"], per_channel=e["per_channel"])
  return quantize.dequantize(q, jnp.float32)


def _scatter_mask(bitmask, values, n: int, nnz: int, dtype) -> jax.Array:
  """A dense (n,) vector: `values` (in order) where the big-endian `bitmask` has a 1, else 0.

  Element i takes value number (set bits before i): a prefix sum over the bytes' popcounts
  (n / 8 terms) plus the set bits before i within its byte, so that the only scan is over
  bytes (over all n bits it cost 141 ms a call for 11M weights, this 85 ms, most of it the
  gather)."""
  packed = jnp.asarray(bitmask, jnp.uint8)
  mask = jnp.unpackbits(packed, count=n).astype(bool)
  if nnz == 0:
    return jnp.zeros((n,), dtype)
  counts = lax.population_count(packed).astype(jnp.int32)
  start = jnp.cumsum(counts) - counts                       # set bits before each byte
  # set bits among the first j bits (most significant first) of each byte, j = 0..7
  within = lax.population_count(packed.astype(jnp.uint32)[:, None]
                                >> (8 - jnp.arange(8, dtype=jnp.uint32))).astype(jnp.int32)
  idx = (start[:, None] + within).reshape(-1)[:n]
  return jnp.where(mask, jnp.take(jnp.asarray(values), idx, mode="clip"), jnp.zeros((), dtype))


def leaf_codes(arrays: dict, path: str, e: dict, int8: bool = False) -> jax.Array:
  """The int32 codes (flat) of a `quant` or `sparse_quant` leaf (jnp, jit-able); `int8`:
  signed codes of at most 8 bits as int8 (8-bit ones straight from their stored bytes)."""
  n = math.prod(e["shape"])
  if int8:
    if e["encoding"] == "quant" and e["bits"] == 8 and _signed_zero(e):
      packed = jnp.asarray(arrays[f"{path}/codes"], jnp.uint8).reshape(-1)[:n]
      return lax.bitcast_convert_type(packed ^ jnp.uint8(128), jnp.int8)   # code + 128
    return leaf_codes(arrays, path, e).astype(jnp.int8)
  if e["encoding"] == "quant":
    return _unpack_codes(arrays[f"{path}/codes"], e["bits"], n, _signed_zero(e))
  nz = _unpack_codes(arrays[f"{path}/codes"], e["bits"], e["nnz"], True)
  return _scatter_mask(arrays[f"{path}/bitmask"], nz, n, e["nnz"], jnp.int32)


def decode_leaf(arrays: dict, path: str, e: dict) -> jax.Array:
  """The effective float32 weights of param leaf `path` (jnp, jit-able; shapes from `e`)."""
  enc = e["encoding"]
  if enc == "float":
    return jnp.asarray(arrays[path])
  shape = tuple(e["shape"])
  n = math.prod(shape)
  if enc in ("quant", "sparse_quant"):
    return _qtensor(arrays, path, e, leaf_codes(arrays, path, e))
  if enc == "sparse":
    values = jnp.asarray(arrays[f"{path}/values"], jnp.float32)
    return _scatter_mask(arrays[f"{path}/bitmask"], values, n, values.shape[0],
                         jnp.float32).reshape(shape)
  if enc == "csr":
    values = jnp.asarray(arrays[f"{path}/values"], jnp.float32)
    indptr = jnp.asarray(arrays[f"{path}/indptr"]).astype(jnp.int32)
    rows_n, cols_n = shape[-1], n // shape[-1]
    nnz = values.shape[0]
    rows = jnp.repeat(jnp.arange(rows_n), jnp.diff(indptr), total_repeat_length=nnz)
    cols = jnp.asarray(arrays[f"{path}/indices"]).astype(jnp.int32)
    mat = jnp.zeros((rows_n, cols_n), jnp.float32).at[rows, cols].set(values)
    return jnp.moveaxis(mat.reshape((rows_n,) + shape[:-1]), 0, -1)
  if enc == "pq":
    cb = jnp.asarray(arrays[f"{path}/codebooks"], jnp.float32)
    m = cb.shape[0]
    count = n // cb.shape[-1]
    codes = _unpack_codes(arrays[f"{path}/codes"], e["bits"], count, False).reshape(m, -1)
    return pq.reconstruct(cb, codes, shape).astype(jnp.float32)
  if enc == "binary":
    w = binarize.unpack_signs(arrays[f"{path}/bits"], shape[-2], axis=-2, dtype=jnp.float32)
    if f"{path}/nonzero" in arrays:   # ternary
      w = w * (binarize.unpack_signs(arrays[f"{path}/nonzero"], shape[-2], axis=-2) > 0)
    if f"{path}/scale" in arrays:
      w = w * jnp.asarray(arrays[f"{path}/scale"], jnp.float32)
    return w
  raise ArtifactError(f"param '{path}': unknown encoding {enc!r} in the manifest")


def _methods_of(manifest: dict) -> list:
  """The registered methods an artifact was made with (its manifest's "methods")."""
  known = set(registry.names())
  return [registry.get(n) for n in manifest.get("methods", []) if n in known]


def build_model(manifest: dict):
  """The Flax module the manifest describes (`models.get_model`, then the methods'
  `rebuild_model`: a factorized model from its plan)."""
  m = manifest["model"]
  dtype = jnp.bfloat16 if m["dtype"] == "bfloat16" else jnp.float32
  model = models_lib.get_model(m["name"], m["num_classes"], width=m["width"], dtype=dtype,
                               **{k: _tuples(v) for k, v in m["kwargs"].items()})
  for method in _methods_of(manifest):
    if method.rebuild_model is not None:
      model = method.rebuild_model(m, model)
  return model


def _tuples(x):
  """JSON lists back to the tuples module fields hold (dicts stay dicts)."""
  if isinstance(x, list):
    return tuple(_tuples(v) for v in x)
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  return x


def decode_variables(manifest: dict, arrays: dict) -> dict:
  """{"params", "batch_stats"}: the effective weights of a generic (not BNN) artifact."""
  params = {p: decode_leaf(arrays, p, e) for p, e in manifest["params"].items()}
  stats = {p: jnp.asarray(arrays[p]) for p in manifest["batch_stats"]}
  return {"params": traverse_util.unflatten_dict(params, sep="/"),
          "batch_stats": traverse_util.unflatten_dict(stats, sep="/")}


def make_apply(manifest: dict, model=None, integer: bool | str = "auto",
               min_depth: int | None = None, native: bool = False) -> Callable:
  """`apply(arrays, images) -> logits`, pure jnp: the stored tensors decoded inside the graph,
  then the model in eval mode (an artifact in a method's own layout: its `artifact_apply`, e.g.
  `bnn_infer.packed_apply`).

  `integer`: True: the layers `intinfer.integer_layers` accepts (symmetric uniform weight codes
  of at most 8 bits after an activation quantizer) run as int8 products with int32 sums
  (`jcompress.intinfer`); False: every layer computes in float on the decoded weights, as the
  fake-quant model in training did; "auto" (the default): integers on a CPU, float elsewhere,
  chosen where the graph runs (`lax.platform_dependent`, so a StableHLO export carries both):
  on a GPU the im2col int8 products ran at 0.53-0.59x the float artifact's speed, where cuDNN
  runs the float convolutions (docs/performance.md, "On a GPU"). `min_depth` (default
  `intinfer.MIN_DEPTH`): shallower layers stay float. `apply.integer_layers` lists the layers
  that run on integers (on a CPU, for "auto"). `native`: their matmuls by the AVX-512 VNNI
  kernel of `jcompress.native` (registered in this process; a StableHLO export must not
  hold it), else XLA's int8 `dot_general`."""
  for method in _methods_of(manifest):
    own = method.artifact_apply(manifest) if method.artifact_apply is not None else None
    if own is not None:
      return own
  if integer not in (True, False, "auto"):
    raise ConfigError(f"integer={integer!r}: expected True, False or 'auto'")
  model = build_model(manifest) if model is None else model
  layers = intinfer.integer_layers(manifest, min_depth)[0] if integer else {}

  def decode(arrays):
    """What the stored tensors decode to: the float variables and, per integer layer, its
    int8 kernel codes and scales (and, for the native kernel, `native.prepare` of them)."""
    codes = {}
    for layer in layers:
      path = f"{layer}/kernel"
      e = manifest["params"][path]
      wq = leaf_codes(arrays, path, e, int8=True).reshape(e["shape"])
      codes[layer] = (wq, jnp.asarray(arrays[f"{path}/scale"], jnp.float32))
      if native:   # the kernel's packed weights, once per decode
        from jcompress import native as native_kernels  # noqa: PLC0415
        codes[layer] += (native_kernels.prepare(wq.reshape(-1, wq.shape[-1])),)
    return decode_variables(manifest, arrays), codes

  def run_float(decoded, images):
    return model.apply(decoded[0], images, train=False)[0]

  def run_integer(decoded, images):
    variables, codes = decoded
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    with intinfer.intercept(layers, flat, codes.__getitem__, native=native):
      return model.apply(variables, images, train=False)[0]

  def run(decoded, images):
    """The model on decoded tensors (`decode`'s output)."""
    if not layers:
      return run_float(decoded, images)
    if integer == "auto":
      return lax.platform_dependent(decoded, images, cpu=run_integer, default=run_float)
    return run_integer(decoded, images)

  def apply(arrays, images):
    return run(decode(arrays), images)

  apply.integer_layers = sorted(layers)
  apply.decode, apply.run = decode, run
  return apply


def check_against_model(manifest: dict, arrays: dict, model=None) -> None:
  """ArtifactError naming the first leaf whose decoded shape is not the rebuilt model's."""
  for method in _methods_of(manifest):
    if method.artifact_check is None:
      continue
    error = method.artifact_check(manifest, arrays, build_model(manifest))
    if error:
      raise ArtifactError(f"artifact does not fit its model: {error}")
    if error is not None:   # the method's own layout, and it fits
      return
  model = build_model(manifest) if model is None else model
  shape = [1, *manifest["model"]["image_shape"]]
  want = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                        jax.ShapeDtypeStruct(shape, jnp.float32))
  for coll in ("params", "batch_stats"):
    w = _flat(want.get(coll, {}))
    have = {p: (manifest["params"][p].get("shape") if coll == "params" else None)
            for p in manifest[coll]}
    have = {p: tuple(s) if s is not None else tuple(arrays[p].shape) for p, s in have.items()}
    for path, x in w.items():
      if path not in have:
        raise ArtifactError(f"tensor '{path}' ({coll}) of the model {manifest['model']['name']} "
                            "is missing from the artifact; refusing to load")
      if have[path] != tuple(x.shape):
        raise ArtifactError(f"tensor '{path}': the artifact has shape {have[path]}, the model "
                            f"expects {tuple(x.shape)}; refusing to load")
    extra = sorted(set(have) - set(w))
    if extra:
      raise ArtifactError(f"tensor '{extra[0]}' is in the artifact but not in the model")


def inference_fn(source, integer: bool | str = "auto", min_depth: int | None = None,
                 decode_once: bool = True, native: bool | str = "auto") -> Callable:
  """`fn(images) -> logits` from an artifact directory or a loaded `(manifest, arrays)`.

  The model is rebuilt from the manifest alone and checked against the stored tensors;
  `integer`, `min_depth` (`make_apply`): quantized layers with quantized inputs compute on int8
  codes (by default on a CPU only; elsewhere it logs once that they run in float).
  `decode_once`: the stored tensors (bit-packed codes, codebooks, sparse bitmasks) are
  decoded once, here, by a compiled function, and every call runs the model on the decoded
  tensors, as a runtime unpacks weights when it loads them (the packed BNN: its kernels
  unpacked, or repacked for the XNOR route, as `bnn_infer.load` does); False: decoded inside
  every call (what the StableHLO export does). `native` ("auto", True, False): the integer
  layers' matmuls by `jcompress.native.int8_matmul` where the CPU has AVX-512 VNNI and the
  kernel builds ("auto"; True: required, an error naming why not), else XLA's `dot_general`;
  the same int32 sums, so the same logits. `fn.manifest`, `fn.arrays`, `fn.apply` (the pure
  `apply(arrays, images)` without the native kernel, what `export_stablehlo` serializes) and
  `fn.native` (whether the native kernel runs) are set.
  """
  manifest, arrays = load_artifact(source) if isinstance(source, str) else source
  own_layout = manifest.get("kind") not in ("float", "compressed")
  model = None if own_layout else build_model(manifest)
  check_against_model(manifest, arrays, model)
  if native not in (True, False, "auto"):
    raise ConfigError(f"native={native!r}: expected True, False or 'auto'")
  apply = make_apply(manifest, model, integer=integer, min_depth=min_depth)
  if integer == "auto" and getattr(apply, "integer_layers", None) and \
      jax.default_backend() != "cpu":
    logging.info("%d quantized layers compute in float on %s (int8 products only on a CPU; "
                 "integer=True forces them)", len(apply.integer_layers), jax.default_backend())
  use_native = False
  if native and getattr(apply, "integer_layers", None) and (
      integer is True or jax.default_backend() == "cpu"):
    from jcompress import native as native_kernels  # noqa: PLC0415
    why = native_kernels.unavailable_reason()
    if why and native is True:
      raise ConfigError(f"native=True: the int8 kernel of jcompress.native is unavailable: {why}")
    use_native = why is None
  runner = make_apply(manifest, model, integer=integer, min_depth=min_depth,
                      native=True) if use_native else apply
  device_arrays = {k: jnp.asarray(v) for k, v in arrays.items()}
  if decode_once and hasattr(runner, "decode"):
    decoded = jax.jit(runner.decode)(device_arrays)
    run = jax.jit(runner.run)

    def fn(images):
      return run(decoded, jnp.asarray(images, jnp.float32))
  else:
    jitted = jax.jit(runner)

    def fn(images):
      return jitted(device_arrays, jnp.asarray(images, jnp.float32))

  fn.manifest, fn.arrays, fn.apply, fn.native = manifest, arrays, apply, use_native
  return fn


# ----------------------------------------------------------------------------- StableHLO


#: The platforms the StableHLO is lowered for (one serialized module serves them all); where
#: lowering for all of them fails, the current backend's alone.
PLATFORMS = ("cpu", "cuda", "tpu")


def export_stablehlo(manifest: dict, arrays: dict, path: str | None = None,
                     batch_size: int | None = None) -> tuple[bytes, dict]:
  """`jax.export` of `apply(arrays, images)` (the stored tensors and the images are its
  arguments, so the module holds code, not weights). The batch dimension is symbolic unless
  `batch_size` is given (or the model does not trace with a symbolic one: batch 1); lowered for
  `PLATFORMS` (or, failing that, the current backend). Returns (serialized bytes, info) and
  writes the bytes to `path`."""
  from jax import export as jax_export  # noqa: PLC0415
  apply = make_apply(manifest)
  arg_specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in arrays.items()}
  image_shape = tuple(manifest["model"]["image_shape"])
  batches = [batch_size] if batch_size is not None else ["symbolic", 1]
  errors = []
  exported, info = None, {}
  for platforms in (PLATFORMS, None):
    for batch in batches:
      dim = jax_export.symbolic_shape("b")[0] if batch == "symbolic" else int(batch)
      try:
        exported = jax_export.export(jax.jit(apply), platforms=platforms)(
            arg_specs, jax.ShapeDtypeStruct((dim, *image_shape), jnp.float32))
      except Exception as e:  # noqa: BLE001  (lowering errors come in many kinds)
        errors.append(f"platforms={platforms or 'default'}, batch={batch}: "
                      f"{type(e).__name__}: {str(e)[:200]}")
        continue
      info["batch"] = batch
      break
    if exported is not None:
      break
  if exported is None:
    raise JCompressError("jax.export of the inference function failed: " + "; ".join(errors))
  if errors:
    logging.warning("jax.export: %s; exported with batch=%s for %s", "; ".join(errors),
                    info["batch"], list(exported.platforms))
    info["fallbacks"] = errors
  data = bytes(exported.serialize())
  info["platforms"] = list(exported.platforms)
  info["bytes"] = len(data)
  if path is not None:
    with open(path + ".tmp", "wb") as f:
      f.write(data)
    os.replace(path + ".tmp", path)
  return data, info


def load_stablehlo(path: str) -> Callable:
  """`fn(arrays, images) -> logits` from a serialized `inference.stablehlo`."""
  from jax import export as jax_export  # noqa: PLC0415
  with open(path, "rb") as f:
    exported = jax_export.deserialize(bytearray(f.read()))
  return exported.call


# ----------------------------------------------------------------------------- export_run


def _reference_logits(exp, state, images) -> np.ndarray:
  """The trained model's eval path: transform.apply, then model.apply in eval mode."""

  @jax.jit
  def fn(params, compression, batch_stats, x):
    eff = exp.transform.apply(params, compression)
    return exp.model.apply({"params": eff, "batch_stats": batch_stats}, x, train=False)[0]

  return np.asarray(fn(state.params, state.compression, state.batch_stats, images))


def export_run(workdir: str, check_examples: int = 256) -> dict:
  """Writes DIR/export/ (the artifact and its StableHLO) for the run in `workdir`.

  Returns a JSON-able summary: files and bytes, `artifact_bytes` (manifest.json + weights.bin,
  what results.json's `model_bytes` counts), the checkpoint step (and `warnings` when it fell
  back from an unreadable one), `compressed` (False: a float run, exported as the float model),
  and `check`: the loaded artifact's logits against the trained model's on up to
  `check_examples` eval images (argmax agreement, max |difference|; 0 skips the check).
  """
  exp, state, step, _, skipped = experiment.load_workdir_run(workdir, "export")
  warnings = [f"checkpoint {s} could not be read; falling back to the previous checkpoint, "
              f"step {step}" for s in skipped]
  arrays, manifest = artifact_arrays(exp, state)
  out_dir = os.path.join(workdir, "export")
  tmp_dir = out_dir + ".tmp"
  shutil.rmtree(tmp_dir, ignore_errors=True)
  artifact_bytes = write_artifact(arrays, manifest, tmp_dir)
  _, hlo_info = export_stablehlo(manifest, arrays, os.path.join(tmp_dir, STABLEHLO))
  shutil.rmtree(out_dir, ignore_errors=True)
  os.replace(tmp_dir, out_dir)

  summary: dict = {"export_dir": out_dir, "step": step, "model": manifest["model"]["name"],
                   "kind": manifest["kind"], "compressed": manifest["compressed"],
                   "methods": manifest["methods"], "artifact_bytes": artifact_bytes,
                   "files": {f: os.path.getsize(os.path.join(out_dir, f))
                             for f in sorted(os.listdir(out_dir))},
                   "stablehlo": hlo_info, "tensors": len(manifest["tensors"])}
  if not manifest["compressed"]:
    msg = (f"the run in {workdir} has no compression (none of the sub-configs "
           f"{', '.join(registry.names())}): exported the float model")
    logging.warning("%s", msg)
    summary["note"] = msg
  if warnings:
    summary["warnings"] = warnings
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(exp.abstract_state.params))
  summary["float_bytes"] = 4 * n_params
  summary["compression_ratio"] = 4 * n_params / artifact_bytes
  results_path = os.path.join(workdir, "results.json")
  if os.path.exists(results_path):
    with open(results_path) as f:
      reported = json.load(f).get("model_bytes")
    if reported:
      summary["results_model_bytes"] = reported
      summary["size_vs_results"] = artifact_bytes / reported
      if abs(artifact_bytes / reported - 1) > 0.02:
        msg = (f"the artifact takes {artifact_bytes} bytes, {results_path} reports model_bytes "
               f"{reported}: that results.json was written by an older jcompress (or another "
               "checkpoint); the export's size is the artifact's")
        logging.warning("%s", msg)
        summary.setdefault("warnings", []).append(msg)

  logging.info("exported %s (step %d) to %s: %d bytes (manifest + weights), StableHLO %d bytes",
               workdir, step, out_dir, artifact_bytes, hlo_info["bytes"])
  if check_examples <= 0:
    return summary
  # Check: the artifact read back from disk predicts what the trained model predicts.
  c = exp.config
  batch = next(iter(data_lib.eval_iterator(c.data, batch_size=check_examples,
                                           image_size=c.image_size or None,
                                           data_dir=c.data_dir or None)))
  images = batch["image"][batch["mask"].astype(bool)]
  fn = inference_fn(out_dir)
  got = np.asarray(fn(images))
  want = _reference_logits(exp, state, images)
  summary["check"] = {"examples": int(images.shape[0]),
                      "argmax_equal": bool(np.all(got.argmax(-1) == want.argmax(-1))),
                      "max_abs_logit_diff": float(np.max(np.abs(got - want)))}
  return summary
