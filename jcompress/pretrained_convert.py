"""Conversion of published weights (torchvision state dicts, Keras Applications) into jcompress
models' variables: the Keras applications known, the source names of each layer, tensor layouts
and their permutations, the target model's structure, and the converter that checks every tensor
against it. `jcompress.pretrained` reads the files and applications and builds on this."""

from __future__ import annotations

import dataclasses
import re
from typing import Any
from typing import Callable

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jcompress.errors import ConfigError
from jcompress.models.mobilenetv2 import INVERTED_RESIDUAL_SETTING

Array = Any
Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class KerasApplication:
  """How a `keras.applications` model maps onto a jcompress model.

  Attributes:
    model: the jcompress model name (`jcompress.models.MODELS`).
    preprocessing: the input normalisation it was trained with (a key of `PREPROCESSING`).
    fields: model fields that make the jcompress model compute the Keras function.
  """

  model: str
  preprocessing: str
  fields: dict[str, Any]


KERAS_APPLICATIONS: dict[str, KerasApplication] = {
    "ResNet50": KerasApplication(
        model="resnet50",
        preprocessing="caffe",
        fields={"stride_in_1x1": True, "padding": "torch", "bn_epsilon": 1.001e-5,
                "bn_momentum": 0.99},
    ),
    "MobileNetV2": KerasApplication(
        model="mobilenetv2",
        preprocessing="tf",
        fields={"padding": "same", "bn_epsilon": 1e-3, "bn_momentum": 0.999},
    ),
}

# jcompress model names whose parameters follow torchvision's naming.
TORCHVISION_ARCHS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "mobilenetv2")
TORCHVISION_FIELDS: dict[str, Any] = {"padding": "torch", "bn_epsilon": 1e-5, "bn_momentum": 0.9}
# Fields that change the function the network computes (checked by `load_pretrained`); the
# momentum only matters for further training and is left to the config.
_FUNCTIONAL_FIELDS = ("padding", "stride_in_1x1", "bn_epsilon")
_FIELD_DEFAULTS = {"padding": "torch", "stride_in_1x1": False}

_IMAGENET_BGR_MEAN = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)

PREPROCESSING = ("caffe", "tf", "torch")

# Dtypes converted to float32; anything else is refused.
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_IGNORED_TORCH_SUFFIXES = (".num_batches_tracked",)

# The BatchNorm that follows each convolution (conv biases fold into it).
_BN_AFTER_CONV = {
    "stem_conv": "stem_bn",
    "conv1": "bn1",
    "conv2": "bn2",
    "conv3": "bn3",
    "shortcut_conv": "shortcut_bn",
    "expand_conv": "expand_bn",
    "dw_conv": "dw_bn",
    "project_conv": "project_bn",
    "conv_last": "bn_last",
}
# Order of the layers inside a block, for reporting the first mismatch in network order.
_IN_BLOCK_ORDER = (
    "conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "shortcut_conv", "shortcut_bn",
    "expand_conv", "expand_bn", "dw_conv", "dw_bn", "project_conv", "project_bn",
)


# ----------------------------------------------------------------------------------------------
# Layers of a jcompress model and their source names.


def _layer_kind(path: tuple[str, ...]) -> str:
  """"conv", "dwconv", "bn" or "dense" for a jcompress layer path."""
  leaf = path[-1]
  if leaf == "head":
    return "dense"
  if leaf == "dw_conv":
    return "dwconv"
  if leaf in _BN_AFTER_CONV:
    return "conv"
  if leaf in _BN_AFTER_CONV.values():
    return "bn"
  raise ConfigError(f"pretrained: no weight mapping for layer {'/'.join(path)!r}")


def _order_key(path: tuple[str, ...]) -> tuple:
  top = path[0]
  m = re.fullmatch(r"stage(\d+)_block(\d+)", top)
  if m:
    inner = _IN_BLOCK_ORDER.index(path[1]) if path[1] in _IN_BLOCK_ORDER else 99
    return (1, int(m.group(1)), int(m.group(2)), inner)
  rank = {"stem_conv": 0, "stem_bn": 1, "conv_last": 2, "bn_last": 3, "head": 4}
  group = 0 if top.startswith("stem") else 2
  return (group, rank.get(top, 9), 0, 0)


def _family(arch: str) -> str:
  if arch.startswith("resnet"):
    return "resnet"
  if arch.startswith("mobilenetv2"):
    return "mobilenetv2"
  raise ConfigError(
      f"pretrained: no weight mapping for model {arch!r}; known: resnet18, resnet34, resnet50, "
      f"mobilenetv2"
  )


def _mbv2_block_index(stage: int, block: int) -> int:
  """Global index (0..16) of `stage{stage}_block{block}` among MobileNetV2's blocks."""
  return sum(n for _, _, n, _ in INVERTED_RESIDUAL_SETTING[: stage - 1]) + block


_NUM_MBV2_BLOCKS = sum(n for _, _, n, _ in INVERTED_RESIDUAL_SETTING)


def torch_name(arch: str, path: tuple[str, ...]) -> str:
  """torchvision module name of jcompress layer `path` (e.g. ("stage1_block0", "conv1"))."""
  family = _family(arch)
  top = path[0]
  m = re.fullmatch(r"stage(\d+)_block(\d+)", top)
  if family == "resnet":
    if not m:
      return {"stem_conv": "conv1", "stem_bn": "bn1", "head": "fc"}[top]
    prefix = f"layer{m.group(1)}.{m.group(2)}"
    leaf = path[1]
    if leaf == "shortcut_conv":
      return f"{prefix}.downsample.0"
    if leaf == "shortcut_bn":
      return f"{prefix}.downsample.1"
    return f"{prefix}.{leaf}"
  if not m:
    last = _NUM_MBV2_BLOCKS + 1
    return {
        "stem_conv": "features.0.0", "stem_bn": "features.0.1",
        "conv_last": f"features.{last}.0", "bn_last": f"features.{last}.1",
        "head": "classifier.1",
    }[top]
  j = _mbv2_block_index(int(m.group(1)), int(m.group(2))) + 1
  expands = INVERTED_RESIDUAL_SETTING[int(m.group(1)) - 1][0] != 1
  names = {
      "expand_conv": "conv.0.0", "expand_bn": "conv.0.1",
      "dw_conv": "conv.1.0", "dw_bn": "conv.1.1",
      "project_conv": "conv.2", "project_bn": "conv.3",
  }
  if not expands:
    names = {"dw_conv": "conv.0.0", "dw_bn": "conv.0.1", "project_conv": "conv.1",
             "project_bn": "conv.2"}
  return f"features.{j}.{names[path[1]]}"


def keras_name(arch: str, path: tuple[str, ...]) -> str:
  """Keras Applications layer name of jcompress layer `path` (ResNet50, MobileNetV2)."""
  family = _family(arch)
  top = path[0]
  m = re.fullmatch(r"stage(\d+)_block(\d+)", top)
  if family == "resnet":
    if not m:
      return {"stem_conv": "conv1_conv", "stem_bn": "conv1_bn", "head": "predictions"}[top]
    prefix = f"conv{int(m.group(1)) + 1}_block{int(m.group(2)) + 1}"
    leaf = path[1]
    if leaf.startswith("shortcut_"):
      return f"{prefix}_0_{leaf[len('shortcut_'):]}"
    return f"{prefix}_{leaf[-1]}_{leaf[:-1]}"
  if not m:
    return {"stem_conv": "Conv1", "stem_bn": "bn_Conv1", "conv_last": "Conv_1",
            "bn_last": "Conv_1_bn", "head": "predictions"}[top]
  k = _mbv2_block_index(int(m.group(1)), int(m.group(2)))
  prefix = "expanded_conv" if k == 0 else f"block_{k}"
  suffix = {
      "expand_conv": "expand", "expand_bn": "expand_BN",
      "dw_conv": "depthwise", "dw_bn": "depthwise_BN",
      "project_conv": "project", "project_bn": "project_BN",
  }[path[1]]
  return f"{prefix}_{suffix}"


# ----------------------------------------------------------------------------------------------
# Tensor layouts: (jcompress collection, leaf) <- (source tensor suffix, permutation to jcompress).


@dataclasses.dataclass(frozen=True)
class _Tensor:
  collection: str        # "params" or "batch_stats"
  leaf: str              # jcompress leaf name
  suffixes: tuple        # source tensor names accepted, first preferred
  perm: tuple | None     # axes permutation source -> jcompress (None: as is)


_TORCH_LAYOUT = {
    "conv": (_Tensor("params", "kernel", ("weight",), (2, 3, 1, 0)),),
    "dwconv": (_Tensor("params", "kernel", ("weight",), (2, 3, 1, 0)),),
    "dense": (_Tensor("params", "kernel", ("weight",), (1, 0)),
              _Tensor("params", "bias", ("bias",), None)),
    "bn": (_Tensor("params", "scale", ("weight",), None),
           _Tensor("params", "bias", ("bias",), None),
           _Tensor("batch_stats", "mean", ("running_mean",), None),
           _Tensor("batch_stats", "var", ("running_var",), None)),
}
_KERAS_LAYOUT = {
    "conv": (_Tensor("params", "kernel", ("kernel",), None),),
    "dwconv": (_Tensor("params", "kernel", ("kernel", "depthwise_kernel"), (0, 1, 3, 2)),),
    "dense": (_Tensor("params", "kernel", ("kernel",), None),
              _Tensor("params", "bias", ("bias",), None)),
    "bn": (_Tensor("params", "scale", ("gamma",), None),
           _Tensor("params", "bias", ("beta",), None),
           _Tensor("batch_stats", "mean", ("moving_mean",), None),
           _Tensor("batch_stats", "var", ("moving_variance",), None)),
}


@dataclasses.dataclass(frozen=True)
class _Format:
  name: str                                # "torchvision" or "Keras"
  sep: str                                 # between layer and tensor name
  layout: dict
  layer_name: Callable[[str, tuple], str]  # (arch, jcompress path) -> source layer name
  conv_bias: str                           # name of a conv's (optional) bias tensor


_TORCH = _Format("torchvision", ".", _TORCH_LAYOUT, torch_name, "bias")
_KERAS = _Format("Keras", "/", _KERAS_LAYOUT, keras_name, "bias")


def _inverse(perm: tuple | None) -> tuple | None:
  return None if perm is None else tuple(int(i) for i in np.argsort(perm))


def _permute_shape(shape: tuple, perm: tuple | None) -> tuple:
  return tuple(shape) if perm is None else tuple(shape[i] for i in perm)


def _shape_str(shape) -> str:
  return str(tuple(int(d) for d in shape))


# ----------------------------------------------------------------------------------------------
# Target model structure.

_PROBE_SIZE = 32  # spatial size for init / eval_shape: parameter shapes do not depend on it.


def _probe_input() -> jnp.ndarray:
  return jnp.zeros((1, _PROBE_SIZE, _PROBE_SIZE, 3), jnp.float32)


def target_shapes(model: nn.Module) -> Variables:
  """`jax.ShapeDtypeStruct` tree of `model`'s variables (`params`, `batch_stats`), no compute."""
  return jax.eval_shape(
      lambda r: model.init(r, _probe_input(), train=False), jax.random.PRNGKey(0)
  )


def _layers(shapes: Variables) -> list[tuple[str, ...]]:
  """Paths of the layers (modules holding variables) of a variables tree, in network order."""
  flat = traverse_util.flatten_dict(dict(shapes["params"]))
  paths = sorted({k[:-1] for k in flat}, key=_order_key)
  return paths


def _init_head(model: nn.Module, rng: Array) -> dict[str, Array]:
  """`model.init(rng, x)["params"]["head"]`, without computing the rest (XLA drops it)."""
  return jax.jit(lambda r: model.init(r, _probe_input(), train=False)["params"]["head"])(rng)


def arch_of(model: nn.Module) -> str:
  """The jcompress model name whose weights `model` can take ("resnet50", "mobilenetv2")."""
  cls = type(model).__name__
  if cls == "ResNet":
    return f"resnet{model.depth}"
  if cls == "MobileNetV2":
    return "mobilenetv2"
  raise ConfigError(
      f"pretrained: cannot load torchvision/Keras weights into a {cls}; supported models: "
      f"{', '.join(TORCHVISION_ARCHS)}"
  )


# ----------------------------------------------------------------------------------------------
# The converter.


def _as_float32(name: str, array: Array, origin: str) -> np.ndarray:
  dtype = np.dtype(array.dtype)
  if dtype.name not in _FLOAT_DTYPES:
    raise ConfigError(
        f"{origin}: tensor {name!r} has dtype {dtype.name}, which the converter does not handle "
        f"(float16, bfloat16, float32 and float64 are converted to float32)"
    )
  return np.asarray(array, dtype=np.float32)


def _convert(
    fmt: _Format,
    arch: str,
    source: dict[str, Array],
    shapes: Variables,
    origin: str,
    skip_head: bool = False,
) -> tuple[dict, dict, list[str]]:
  """Maps source tensors onto the target's variables.

  Args:
    fmt: the source's naming and layouts.
    arch: jcompress model name (picks the name mapping).
    source: source tensor name -> array (numpy, any dtype; only shapes/dtypes are read before
      the checks pass).
    shapes: the target's variable shapes (`target_shapes`).
    origin: the source, for messages ("file x.safetensors", "Keras ResNet50").
    skip_head: leave the classifier out (its tensors are consumed but need not fit).

  Returns:
    (params, batch_stats) as nested dicts of float32 numpy arrays, and the source names used.

  Raises:
    ConfigError: the first target tensor missing from the source or of the wrong shape, a dtype
      that is not a float, or a source tensor the model has no place for.
  """
  flat_shapes = {
      coll: traverse_util.flatten_dict(dict(shapes.get(coll, {})))
      for coll in ("params", "batch_stats")
  }
  out = {"params": {}, "batch_stats": {}}
  used: list[str] = []
  pending_bias: dict[tuple, tuple[str, np.ndarray]] = {}
  for path in _layers(shapes):
    kind = _layer_kind(path)
    layer = fmt.layer_name(arch, path)
    where = "/".join(path)
    for t in fmt.layout[kind]:
      target = flat_shapes[t.collection].get((*path, t.leaf))
      if target is None:
        raise ConfigError(f"pretrained: model {arch!r} has no variable {t.collection}/{where}/"
                          f"{t.leaf} (mapping bug)")
      expected = _permute_shape(target.shape, _inverse(t.perm))
      names = [f"{layer}{fmt.sep}{s}" for s in t.suffixes]
      name = next((n for n in names if n in source), None)
      if path == ("head",) and skip_head:
        used.extend([name] if name is not None else [])
        continue
      if name is None:
        raise ConfigError(
            f"{origin}: no tensor {names[0]!r} (expected shape {_shape_str(expected)}, for "
            f"{t.collection}/{where}/{t.leaf} of model {arch!r})"
        )
      used.append(name)
      array = source[name]
      if tuple(array.shape) != tuple(expected):
        raise ConfigError(
            f"{origin}: tensor {name!r} has shape {_shape_str(array.shape)}, expected "
            f"{_shape_str(expected)} (for {t.collection}/{where}/{t.leaf} of model {arch!r})"
        )
      value = _as_float32(name, array, origin)
      if t.perm is not None:
        value = np.ascontiguousarray(np.transpose(value, t.perm))
      out[t.collection][(*path, t.leaf)] = value
    if kind in ("conv", "dwconv"):
      bias_name = f"{layer}{fmt.sep}{fmt.conv_bias}"
      if bias_name in source:
        used.append(bias_name)
        channels = target.shape[-1]
        if tuple(source[bias_name].shape) != (channels,):
          raise ConfigError(
              f"{origin}: tensor {bias_name!r} has shape {_shape_str(source[bias_name].shape)}, "
              f"expected ({channels},) (conv bias of {where}, folded into its BatchNorm)"
          )
        bn_path = (*path[:-1], _BN_AFTER_CONV[path[-1]])
        pending_bias[bn_path] = (bias_name, _as_float32(bias_name, source[bias_name], origin))
  # Fold conv biases into the following BatchNorm: BN(z + c) with mean m == BN(z) with m - c.
  for bn_path, (bias_name, bias) in pending_bias.items():
    key = (*bn_path, "mean")
    if key not in out["batch_stats"]:
      raise ConfigError(f"{origin}: conv bias {bias_name!r} has no BatchNorm to fold into")
    out["batch_stats"][key] = out["batch_stats"][key] - bias
  used_set = set(used)
  extra = [
      n for n in source
      if n not in used_set and not n.endswith(_IGNORED_TORCH_SUFFIXES)
  ]
  if extra:
    raise ConfigError(
        f"{origin}: tensor {extra[0]!r} (shape {_shape_str(source[extra[0]].shape)}) has no "
        f"place in model {arch!r}" + (f" ({len(extra) - 1} more unused)" if len(extra) > 1 else "")
    )
  params = traverse_util.unflatten_dict(out["params"])
  batch_stats = traverse_util.unflatten_dict(out["batch_stats"])
  return params, batch_stats, used


def _to_jax(tree: dict) -> dict:
  return jax.tree_util.tree_map(jnp.asarray, tree)
