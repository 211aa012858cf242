"""Binary networks (`binary` sub-config): +-1 weights with straight-through gradients
(`jcompress.binary`), the BNN models' compute choice, and a binary ResNet's packed artifact
(`jcompress.bnn_infer`: signs 1 bit each, BatchNorms folded into thresholds)."""

from __future__ import annotations

from flax import traverse_util
import jax
import numpy as np

from jcompress import binary as binarize
from jcompress import bnn_infer
from jcompress import data as data_lib
from jcompress import transforms
from jcompress.errors import ConfigError
from jcompress.methods.base import Method

#: The artifact kind of a packed binary ResNet (manifest "kind").
KIND = "bnn_packed"
#: The packed artifact's top-level names that are not a layer of the model, and the layer
#: whose name they are stored under.
_RENAME = {"stem": "stem_conv", "final": "final_bn"}


def packs(config) -> bool:
  """Whether a run's artifact is the packed BNN (`bnn_*` model with the method on)."""
  return METHOD.active(config) and str(config.model).startswith("bnn_")


def resolve_binary_compute(config, model, params):
  """`model` with its `binary_compute` field checked and "auto" resolved.

  "bf16", "int8" and "xnor" are exact only where every block convolution's kernel is +-1 (bf16
  and int8 also for the -1/0/+1 kernels of "ternary"): the
  config's `binary` sub-config must be enabled with a sign binarizer (not "xnor", whose kernels
  are alpha * sign) and select every block conv kernel (`bnn_infer.block_conv_selection`);
  "xnor" (packed signs, XOR and popcount) also needs activations on the levels-1 grid, 1 or 2
  bits (`num_bits`; the model checks that). Otherwise a ConfigError names
  `model_kwargs.binary_compute`. "auto" (the BNN models' default) becomes, where those hold,
  "bf16" on a GPU or TPU (bf16 products run faster there) and "xnor" on a CPU (3-4x faster
  than the float32 convolutions on the 2-core AVX2 CPU, where bf16 and int8 products are not:
  benchmarks/suite.py's `w1a1_*` rows), and "f32" where they do not hold.
  """
  requested = getattr(model, "binary_compute", None)
  if requested in (None, "f32"):
    return model
  why = None
  binary = config.get("binary")
  num_bits = getattr(model, "num_bits", 1)
  if binary is None or not binary.get("enabled", True):
    why = "the config has no enabled `binary` sub-config, so the block kernels are float"
  elif binary.method not in binarize.BINARIZERS or binary.method == "xnor":
    why = f"binary.method {binary.method!r} does not give +-1 kernels"
  elif binary.get("float_steps", 0):
    why = "binary.float_steps keeps the kernels float for the first steps"
  else:
    selection = bnn_infer.block_conv_selection(params, tuple(binary.include),
                                               tuple(binary.exclude))
    block = [p for p in selection if bnn_infer.is_block_conv(p)]
    missed = [p for p in block if not selection[p]]
    if not block:
      why = "the model has no binary block convolutions"
    elif missed:
      why = (f"binary.include/exclude leave {len(missed)} block conv kernel(s) float, "
             f"e.g. {missed[0]}")
  ternary = binary is not None and binary.get("method") == "ternary"
  if why is None and ternary and requested == "xnor":
    why = ("binary.method 'ternary' gives -1/0/+1 kernels, which the training forward's XNOR "
           "does not take (the packed artifact computes them by XNOR with two planes); use "
           "int8, bf16 or f32")
  if requested == "auto":
    if why is not None:
      return model.clone(binary_compute="f32")
    if jax.default_backend() in ("gpu", "tpu"):
      return model.clone(binary_compute="bf16")
    return model.clone(binary_compute="xnor" if num_bits <= 2 and not ternary else "f32")
  if why is not None:
    raise ConfigError(f"config key 'model_kwargs.binary_compute': {requested!r} computes the "
                      f"binary convolutions exactly only when their kernels are +-1, but {why}")
  return model


def _freeze(exp, state) -> dict:
  c = exp.config
  params, batch_stats = jax.device_get((state.params, state.batch_stats))
  return bnn_infer.freeze(params, batch_stats, exp.model, method=c.binary.method,
                          include=tuple(c.binary.include), exclude=tuple(c.binary.exclude))


def packed_figures(exp, state, results, meta) -> dict:
  """A BNN ResNet's frozen, packed artifact (`bnn_infer.freeze`): the binary layers' ratio to
  float32, their bits per weight, and the test accuracy of the packed inference function, which
  must equal the latent model's. Nothing for other models."""
  del results, meta
  c = exp.config
  if not packs(c):
    return {}
  frozen = _freeze(exp, state)
  sizes = bnn_infer.artifact_nbytes(frozen)
  runtime = bnn_infer.load(frozen, exp.model)
  correct = count = 0
  for batch in data_lib.eval_iterator(c.data, batch_size=c.eval_batch_size,
                                      image_size=c.image_size or None,
                                      data_dir=c.data_dir or None):
    pred = np.argmax(np.asarray(bnn_infer.packed_apply(runtime, batch["image"])), -1)
    correct += int(np.sum((pred == batch["label"]) * batch["mask"]))
    count += int(np.sum(batch["mask"]))
  return {"binary_ratio": float(sizes["binary_ratio"]),
          "binary_bits_per_weight": float(sizes["binary_bits_per_weight"]),
          "packed_test_accuracy": correct / max(count, 1)}


def packed_artifact(exp, state):
  """(arrays, layout, kind) of a packed BNN's artifact, stored under its layers' names
  (`stage1_block0/conv1/bits`, `stem_conv/kernel`, `final_bn/scale`, ...); None for other
  models (they store the per-leaf encodings)."""
  if not packs(exp.config):
    return None
  frozen = _freeze(exp, state)
  arrays = {}
  flat = {transforms.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(
      {k: v for k, v in frozen.items() if k != "meta"})[0]}
  for path, x in flat.items():
    head, _, rest = path.partition("/")
    arrays["/".join([_RENAME.get(head, head), rest]) if rest else path] = np.asarray(x)
  return arrays, {"bnn": frozen["meta"]}, KIND


def _frozen(manifest: dict, arrays: dict) -> dict:
  back = {v: k for k, v in _RENAME.items()}
  flat = {}
  for name, a in arrays.items():
    head, _, rest = name.partition("/")
    flat["/".join([back.get(head, head), rest]) if rest else name] = a
  return {"meta": manifest["bnn"], **traverse_util.unflatten_dict(flat, sep="/")}


def artifact_apply(manifest: dict):
  """`apply(arrays, images) -> logits` of a packed BNN artifact (`bnn_infer.packed_apply`), with
  `apply.decode` / `apply.run` (`export.make_apply`'s split: the bits unpacked once)."""
  if manifest.get("kind") != KIND:
    return None

  def apply(arrays, images):
    return bnn_infer.packed_apply(_frozen(manifest, arrays), images)

  # decoded once (`export.inference_fn`): the kernels unpacked as `bnn_infer.load` does, for
  # the compute of the platform this runs on
  meta = bnn_infer.loaded_meta(manifest["bnn"])

  def decode(arrays):
    return bnn_infer.unpacked_arrays(_frozen(manifest, arrays), meta)

  def run(decoded, images):
    return bnn_infer.packed_apply({"meta": meta, **decoded}, images)

  apply.decode, apply.run = decode, run
  return apply


def artifact_check(manifest: dict, arrays: dict, model) -> str | None:
  """None when a packed BNN artifact fits `model`, else why not."""
  if manifest.get("kind") != KIND:
    return None
  try:
    bnn_infer.check_artifact(_frozen(manifest, arrays), model)
  except ConfigError as e:
    return str(e)
  return ""


METHOD = Method(
    name="binary",
    summary="+-1 weights with straight-through gradients; binary ResNets packed 1 bit a weight",
    transform=binarize.transform_from_config,
    adjust_model=resolve_binary_compute,
    results=packed_figures,
    artifact=packed_artifact,
    artifact_apply=artifact_apply,
    artifact_check=artifact_check,
)
