"""The compressed artifact built in memory: the arrays `--mode=export` stores and its manifest.

`artifact_arrays(exp, state)` encodes every param leaf in the encoding of the last method that
encoded it (packed integer codes, bitmasks, CSR, packed signs, PQ codebooks; float leaves as
they are) plus the BatchNorm statistics, or takes a method's own layout (`Method.artifact`: a
packed BNN); `artifact_nbytes` is its size on disk, results.json's `model_bytes`. The file
format, and what each encoding stores, is described in `jcompress.export`, which writes and
reads it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import config as config_lib
from jcompress import models as models_lib
from jcompress import packing
from jcompress import pq
from jcompress import transforms as transforms_lib
from jcompress.errors import JCompressError
from jcompress.errors import WorkdirError
from jcompress.methods import registry

PyTree = Any

FORMAT = "jcompress.export/1"
MANIFEST = "manifest.json"
BLOB = "weights.bin"
#: The files whose bytes are the artifact (`model_bytes`).
ARTIFACT_FILES = (MANIFEST, BLOB)
#: What each manifest["tensors"][name] list holds, in order (`tensor_entry` reads it).
TENSOR_FIELDS = ("dtype", "shape", "nbytes", "offset", "crc32")


class ArtifactError(WorkdirError):
  """An exported artifact that cannot be read: missing, truncated, or unlike its manifest."""


# ----------------------------------------------------------------------------- building


def _methods(config) -> list[str]:
  """The active methods that change the weights or the model (not a loss alone)."""
  return [m.name for m in registry.active(config)
          if m.transform is not None or m.rewrite_model is not None or m.prepare is not None]


def _model_kwargs(exp) -> dict:
  """The module fields exp's model has beyond what its name, num_classes, width and dtype
  give (config `model_kwargs`, and what `experiment.build_model` adds, e.g. for pretrained weights):
  read off the built module, so the manifest rebuilds exactly that module."""
  c = exp.config
  model = exp.model.base if exp.plans else exp.model   # a rewritten model wraps the base
  dtype = jnp.bfloat16 if c.dtype == "bfloat16" else jnp.float32
  plain = models_lib.get_model(c.model, exp.info.num_classes, width=c.width, dtype=dtype)
  kwargs = {}
  for f in dataclasses.fields(model):
    if f.name in ("parent", "name", "num_classes", "width", "dtype"):
      continue
    v, d = getattr(model, f.name), getattr(plain, f.name, None)
    try:
      same = bool(v == d)
    except Exception:  # noqa: BLE001  (arrays: compare as differing)
      same = False
    if not same:
      kwargs[f.name] = v
  out = _jsonable(kwargs)
  try:
    json.dumps(out)
  except TypeError as e:
    raise JCompressError(f"model {c.model!r}: a field cannot be written to the manifest "
                         f"({e})") from e
  return out


def _model_spec(exp) -> dict:
  """What `models.get_model` (and the methods' `rebuild_model`) need to rebuild exp's module."""
  c = exp.config
  out = {"name": str(c.model), "num_classes": int(exp.info.num_classes),
         "width": float(c.width), "dtype": str(c.dtype), "kwargs": _model_kwargs(exp),
         "image_shape": [int(d) for d in exp.info.image_shape]}
  for m in registry.with_hook(exp.config, "model_spec"):
    out.update(m.model_spec(exp))
  return out


def _jsonable(x):
  if isinstance(x, np.ndarray):
    return x.tolist()
  if hasattr(x, "to_dict"):
    return _jsonable(x.to_dict())
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, (np.bool_,)):
    return bool(x)
  if hasattr(x, "to_dict"):
    return _jsonable(x.to_dict())
  return x


def _flat(tree: PyTree) -> dict[str, Any]:
  return {transforms_lib.path_str(p): x for p, x in
          jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_encoded)[0]}


def _is_encoded(x) -> bool:
  return pq.is_pq(x) or isinstance(x, dict) and (
      ("codes" in x and "kind" in x) or ("values" in x and "shape" in x)
      or ("bits" in x and "shape" in x))


def _encode_leaf(path: str, x, earlier) -> tuple[dict, dict]:
  """(arrays named path/..., the leaf's manifest entry) of an exported leaf `x`.

  `earlier`: the sparse encoding an earlier transform gave this leaf, or None."""
  if pq.is_pq(x):
    return ({f"{path}/codes": np.asarray(x.codes, np.uint8),
             f"{path}/codebooks": np.asarray(x.codebooks, np.float32)},
            {"encoding": "pq", "shape": list(x.shape), "bits": int(x.bits)})
  if isinstance(x, dict) and "codes" in x and "kind" in x:      # quantize.pack_qtensor
    entry = {"encoding": "quant", "shape": [int(d) for d in x["shape"]], "bits": int(x["bits"]),
             "kind": x["kind"], "per_channel": bool(x["per_channel"]),
             "symmetric": bool(x["symmetric"]), "narrow_range": bool(x["narrow_range"])}
    arrays = {f"{path}/codes": np.asarray(x["codes"], np.uint8)}
    for k, dt in (("scale", np.float32), ("zero_point", np.uint8), ("codebook", np.float32)):
      if k in x:
        arrays[f"{path}/{k}"] = np.asarray(x[k], dt)
    if earlier is not None and "bitmask" in earlier and _signed_zero(entry):
      merged = _merge_sparse_quant(path, x, earlier, entry)
      if merged is not None:
        return merged
    return arrays, entry
  if isinstance(x, dict) and "values" in x and "shape" in x:    # prune.sparse_encode
    shape = [int(d) for d in np.asarray(x["shape"])]
    if "bitmask" in x:
      return ({f"{path}/bitmask": np.asarray(x["bitmask"], np.uint8),
               f"{path}/values": np.asarray(x["values"], np.float32)},
              {"encoding": "sparse", "shape": shape})
    return ({f"{path}/indptr": np.asarray(x["indptr"]), f"{path}/indices": np.asarray(x["indices"]),
             f"{path}/values": np.asarray(x["values"], np.float32)},
            {"encoding": "csr", "shape": shape})
  if isinstance(x, dict) and "bits" in x and "shape" in x:      # binarize.binary_weights
    arrays = {f"{path}/bits": np.asarray(x["bits"], np.uint32)}
    if "nonzero" in x:   # ternary: the plane of weights that are not 0
      arrays[f"{path}/nonzero"] = np.asarray(x["nonzero"], np.uint32)
    if "scale" in x:
      arrays[f"{path}/scale"] = np.asarray(x["scale"], np.float32)
    return arrays, {"encoding": "binary", "shape": [int(d) for d in x["shape"]]}
  arr = np.asarray(x)
  return {path: arr}, {"encoding": "float", "shape": list(arr.shape)}


def _signed_zero(entry: dict) -> bool:
  """Code 0 decodes to exactly 0.0: symmetric uniform, and pow2."""
  return entry["kind"] == "pow2" or (entry["kind"] == "uniform" and entry["symmetric"])


def _merge_sparse_quant(path, x, sparse, entry):
  """Bitmask + the codes of the kept weights only, when the pruned weights' codes are all 0
  (so they decode to exactly 0); None otherwise."""
  shape = tuple(entry["shape"])
  n = math.prod(shape)
  bits = entry["bits"]
  codes = packing.unpack(x["codes"], bits, n, signed=True).astype(np.int16)
  mask = np.unpackbits(np.asarray(sparse["bitmask"], np.uint8), count=n).astype(bool)
  if tuple(int(d) for d in np.asarray(sparse["shape"])) != shape or np.any(codes[~mask] != 0):
    return None
  arrays = {f"{path}/bitmask": np.asarray(sparse["bitmask"], np.uint8),
            f"{path}/codes": packing.pack(codes[mask], bits, signed=True)}
  if "scale" in x:
    arrays[f"{path}/scale"] = np.asarray(x["scale"], np.float32)
  entry = {**entry, "encoding": "sparse_quant", "nnz": int(mask.sum())}
  return arrays, entry


def _layer_artifacts(exp, state) -> list[dict]:
  """The transform's export as a list of flat {param path: leaf} dicts, one per method."""
  out = exp.transform.export(state.params, state.compression)
  arts = out if isinstance(out, list) else [out]
  return [_flat(jax.device_get(a["params"])) for a in arts]


def _generic_arrays(exp, state) -> tuple[dict, dict]:
  arts = _layer_artifacts(exp, state)
  params_paths = transforms_lib.leaf_paths(exp.abstract_state.params)
  arrays: dict[str, np.ndarray] = {}
  entries: dict[str, dict] = {}
  for path in params_paths:
    encoded = [art[path] for art in arts if _is_encoded(art[path])]
    chosen = encoded[-1] if encoded else arts[-1][path]   # never encoded: the float leaf
    earlier_sparse = next((x for x in reversed(encoded[:-1])
                           if isinstance(x, dict) and "bitmask" in x), None)
    a, e = _encode_leaf(path, chosen, earlier_sparse)
    arrays.update(a)
    entries[path] = {"encoding": "float"} if e["encoding"] == "float" else e
  stats = _flat(jax.device_get(state.batch_stats))
  for path, x in stats.items():
    if path in arrays:
      raise JCompressError(f"batch_stats leaf '{path}' has the name of a stored param tensor")
    arrays[path] = np.asarray(x)
  return arrays, {"params": entries, "batch_stats": list(stats)}


def artifact_arrays(exp, state) -> tuple[dict[str, np.ndarray], dict]:
  """The arrays the artifact stores and its manifest, built in memory (nothing written).

  Args:
    exp: the run's `experiment.Experiment` (model, transform, config, dataset info).
    state: its `state.TrainState` (latent params, batch_stats, compression state).

  Returns:
    arrays: {name: numpy array}, in storage order. A name is the param path of the leaf it
      stores (`stage1_block0/conv1/kernel`), followed for an encoded leaf by the part
      (`.../kernel/codes`, `.../kernel/scale`, `.../kernel/bitmask`); BatchNorm statistics
      are `layer/mean`, `layer/var`. `layer_of(name, manifest)` gives the layer of a name.
    manifest: JSON-able dict: format, model (to rebuild the module), methods and their config,
      `compressed` (False for a float run), tensors {name: [dtype, shape, nbytes, offset in
      weights.bin, crc32]} (`tensor_entry` reads one as a dict), and the per-leaf encodings
      `params` {param path: {"encoding", ...}} and `batch_stats` [names], or the BNN artifact's
      `bnn` meta.
  """
  c = exp.config
  methods = _methods(c)
  own = [out for m in registry.with_hook(c, "artifact") if (out := m.artifact(exp, state))]
  if own:   # a method with its own layout (a packed BNN)
    arrays, layout, kind = own[-1]
  else:
    arrays, layout = _generic_arrays(exp, state)
    kind = "compressed" if methods else "float"
  tensors, offset = {}, 0
  for name, a in arrays.items():
    a = np.asarray(a, order="C")   # (ascontiguousarray would make a 0-d array 1-d)
    arrays[name] = a
    if a.dtype.byteorder == ">":
      raise JCompressError(f"tensor '{name}' is big-endian")
    tensors[name] = [a.dtype.str.lstrip("<|="), list(a.shape), int(a.nbytes), offset,
                     zlib.crc32(a.tobytes()) & 0xFFFFFFFF]
    offset += int(a.nbytes)
  cfg = config_lib.to_dict(c)
  manifest = {
      "format": FORMAT,
      "kind": kind,
      "compressed": bool(methods),
      "methods": methods,
      "method_config": {m: _jsonable(cfg[m]) for m in methods},
      "model": _model_spec(exp),
      "step": int(jax.device_get(state.step)),
      "blob": BLOB,
      "blob_bytes": offset,
      "tensor_fields": list(TENSOR_FIELDS),
      "tensors": tensors,
      **layout,
  }
  return arrays, manifest


def tensor_entry(manifest: dict, name: str) -> dict:
  """manifest["tensors"][name] as {"dtype", "shape", "nbytes", "offset", "crc32"}."""
  t = manifest["tensors"][name]
  if not isinstance(t, (list, tuple)) or len(t) != len(TENSOR_FIELDS):
    raise ArtifactError(f"tensor '{name}': manifest entry {t!r} is malformed (expected "
                        f"{list(TENSOR_FIELDS)})")
  return dict(zip(TENSOR_FIELDS, t))


def param_of(name: str, manifest: dict | None = None) -> str:
  """The param (or batch_stats) path a stored tensor belongs to: `name` itself for a float
  leaf, the encoded leaf's path for its parts (`.../kernel/codes` -> `.../kernel`)."""
  if manifest is not None and "params" in manifest:
    if name in manifest["params"] or name in manifest.get("batch_stats", ()):
      return name
    head = name
    while "/" in head:
      head = head.rsplit("/", 1)[0]
      if head in manifest["params"]:
        return head
    return name
  for suffix in ("/codes", "/scale", "/zero_point", "/codebook", "/codebooks", "/bitmask",
                 "/values", "/indptr", "/indices", "/bits"):
    if name.endswith(suffix) and name.count("/") >= 2:
      return name[: -len(suffix)]
  return name


def layer_of(name: str, manifest: dict | None = None) -> str:
  """The layer (module path) a stored tensor belongs to: its param path minus the leaf name
  (`stage1_block0/conv1/kernel/codes` -> `stage1_block0/conv1`)."""
  param = param_of(name, manifest)
  return param.rsplit("/", 1)[0] if "/" in param else param


def manifest_bytes(manifest: dict) -> bytes:
  """manifest.json's exact content (compact, sorted keys)."""
  return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def artifact_nbytes(arrays: dict, manifest: dict) -> int:
  """The artifact's size on disk (manifest.json + weights.bin), without writing it."""
  return len(manifest_bytes(manifest)) + sum(int(a.nbytes) for a in arrays.values())
