"""Pretrained weights for jcompress models: Keras Applications and torchvision (safetensors).

Three entry points:

* `from_keras(name, weights)`: a `keras.applications` model ("ResNet50", "MobileNetV2"; the
  ImageNet download, `None` for random weights, a weights file, or a built Keras model) ->
  `(model, params, batch_stats)` of the matching jcompress model.
* `from_safetensors(path, arch)`: a torchvision `state_dict` saved with `safetensors` (ResNet-18,
  -34, -50, MobileNetV2) -> `(model, params, batch_stats)`. `to_torch_state_dict` is the inverse.
* `load_pretrained(spec, model, num_classes, rng)`: what the config key `init_from` calls
  ("keras:ResNet50", "keras:MobileNetV2" or a `.safetensors` path); re-initialises the
  classifier `head` when the class count differs from the source's.

`preprocess(name, images)` applies the input normalisation each source was trained with, and
`model_fields(spec)` gives the model fields (`padding`, `stride_in_1x1`, `bn_epsilon`,
`bn_momentum`) that make a jcompress model compute the source's function.

Name mapping (jcompress path -> source name; `s`, `b` count from 1 and 0 in jcompress):

  ResNet (torchvision naming: resnet18/34/50; Keras naming: ResNet50 only)
  ================================  ===========================  =============================
  jcompress                         torchvision                  Keras
  ================================  ===========================  =============================
  stem_conv, stem_bn                conv1, bn1                   conv1_conv, conv1_bn
  stage{s}_block{b}/conv{i}, bn{i}  layer{s}.{b}.conv{i}, bn{i}  conv{s+1}_block{b+1}_{i}_conv,
                                                                 conv{s+1}_block{b+1}_{i}_bn
  stage{s}_block{b}/shortcut_conv   layer{s}.{b}.downsample.0    conv{s+1}_block{b+1}_0_conv
  stage{s}_block{b}/shortcut_bn     layer{s}.{b}.downsample.1    conv{s+1}_block{b+1}_0_bn
  head                              fc                           predictions
  ================================  ===========================  =============================

  MobileNetV2 (k = 0..16 numbers the inverted residual blocks in order over all stages;
  P = "expanded_conv" for k = 0 and "block_{k}" after; j = k + 1; block 0 has no expansion, so
  its torchvision indices shift down by one: dw conv.0.0/conv.0.1, project conv.1/conv.2)
  ================================  ===========================  =============================
  jcompress                         torchvision                  Keras
  ================================  ===========================  =============================
  stem_conv, stem_bn                features.0.0, features.0.1   Conv1, bn_Conv1
  .../expand_conv, expand_bn        features.{j}.conv.0.0, .0.1  {P}_expand, {P}_expand_BN
  .../dw_conv, dw_bn                features.{j}.conv.1.0, .1.1  {P}_depthwise, {P}_depthwise_BN
  .../project_conv, project_bn      features.{j}.conv.2, .3      {P}_project, {P}_project_BN
  conv_last, bn_last                features.18.0, features.18.1 Conv_1, Conv_1_bn
  head                              classifier.1                 predictions
  ================================  ===========================  =============================

Tensors and layouts (jcompress: conv kernel HWIO, depthwise (kh, kw, 1, C), Dense (in, out)):

  * torchvision: conv `weight` (O, I, kh, kw) -> (kh, kw, I, O), which also takes a depthwise
    (C, 1, kh, kw) to (kh, kw, 1, C); Linear `weight` (out, in) -> (in, out), `bias`; BN
    `weight`, `bias`, `running_mean`, `running_var` -> `scale`, `bias`, `mean`, `var`;
    `num_batches_tracked` is ignored. BatchNorm epsilon 1e-5, momentum 0.1 (= flax 0.9).
  * Keras: Conv2D `kernel` is HWIO already; DepthwiseConv2D `kernel` (kh, kw, C, 1) ->
    (kh, kw, 1, C); Dense `kernel` (in, out) and `bias` as they are; BN `gamma`, `beta`,
    `moving_mean`, `moving_variance` -> `scale`, `bias`, `mean`, `var`. Keras's momentum has
    flax's meaning (`ra = m * ra + (1 - m) * x`): ResNet50 epsilon 1.001e-5, momentum 0.99;
    MobileNetV2 epsilon 1e-3, momentum 0.999 (both read from the model's layers).
  * Convolution biases (every conv of Keras's ResNet50 has one) are folded into the BatchNorm
    that follows, which jcompress's bias-free convs always have: BN(conv(x) + c) with running
    mean m equals BN(conv(x)) with running mean m - c, exactly, in eval mode. (In train mode
    the batch mean absorbs any constant, so the bias never mattered there.)

Architecture fields (see `model_fields`): Keras's ResNet50 is ResNet v1 (the stride of a
Bottleneck on its first 1x1 conv: `stride_in_1x1=True`) with explicit symmetric padding (the
default `padding="torch"`); Keras's MobileNetV2 pads stride-2 convs as TF "SAME"
(`padding="same"`). torchvision's models are jcompress's defaults.

Preprocessing (`preprocess`): RGB images in [0, 255]. Keras ResNet50 ("caffe"): RGB -> BGR, minus
the ImageNet BGR mean (103.939, 116.779, 123.68), no scaling; Keras MobileNetV2 ("tf"):
x / 127.5 - 1; torchvision: x / 255, minus mean (0.485, 0.456, 0.406), over std
(0.229, 0.224, 0.225).

Tensors in float16, bfloat16 or float64 are converted to float32; any other dtype, a missing or
extra tensor, or a shape that does not fit the target model raises `ConfigError` naming the
first tensor at fault and the shape expected, before any training starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Any
from typing import Callable
from typing import Sequence

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jcompress import models
from jcompress.errors import ConfigError
from jcompress.errors import DataError
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


# ----------------------------------------------------------------------------------------------
# torchvision / safetensors.


def _import_safetensors():
  try:
    from safetensors import safe_open  # noqa: PLC0415 (optional dependency)
  except ImportError as e:
    raise ConfigError(
        "reading .safetensors files needs the `safetensors` package: pip install safetensors"
    ) from e
  return safe_open


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file as numpy arrays, in the file's order.

  Raises:
    ConfigError: the file is missing or is not a safetensors file.
  """
  safe_open = _import_safetensors()
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ConfigError(f"pretrained weights file {path!r} does not exist")
  try:
    with safe_open(path, framework="np") as f:
      return {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # safetensors raises its own SafetensorError / OSError.
    raise ConfigError(f"pretrained weights file {path!r} is not a readable safetensors file: "
                      f"{e}") from e


def _check_torch_arch(arch: str) -> str:
  if arch not in TORCHVISION_ARCHS:
    raise ConfigError(
        f"pretrained: no torchvision mapping for model {arch!r}; known: "
        f"{', '.join(TORCHVISION_ARCHS)}"
    )
  return arch


def _torch_head_classes(arch: str, source: dict[str, Array], origin: str) -> int:
  name = torch_name(arch, ("head",)) + ".weight"
  if name not in source or np.ndim(source[name]) != 2:
    raise ConfigError(f"{origin}: no 2-D classifier tensor {name!r} to take the class count from")
  return int(source[name].shape[0])


def from_safetensors(
    path: str, arch: str, **fields: Any
) -> tuple[nn.Module, dict, dict]:
  """Loads a torchvision `state_dict` saved as safetensors into a jcompress model.

  Args:
    path: the `.safetensors` file (e.g. `safetensors.torch.save_file(m.state_dict(), path)`).
    arch: "resnet18", "resnet34", "resnet50" or "mobilenetv2".
    **fields: extra model fields (e.g. `dtype`); the BatchNorm and padding fields default to
      torchvision's (epsilon 1e-5, momentum 0.9 in flax's convention, symmetric padding).

  Returns:
    `(model, params, batch_stats)`; `model.num_classes` is the file's class count.

  Raises:
    ConfigError: unknown arch, unreadable file, or tensors that do not fit (first one named).
  """
  _check_torch_arch(arch)
  source = read_safetensors(path)
  origin = f"file {os.fspath(path)!r}"
  num_classes = _torch_head_classes(arch, source, origin)
  model = models.get_model(arch, num_classes, **{**TORCHVISION_FIELDS, **fields})
  params, batch_stats, _ = _convert(_TORCH, arch, source, target_shapes(model), origin)
  return model, _to_jax(params), _to_jax(batch_stats)


def to_torch_state_dict(arch: str, params: dict, batch_stats: dict) -> dict[str, np.ndarray]:
  """The inverse of the torchvision mapping: jcompress variables -> torchvision `state_dict`.

  BatchNorm layers get `num_batches_tracked = 0` (int64), as torchvision's own state_dict has.
  Save with `safetensors.numpy.save_file(state_dict, path)`.
  """
  _check_torch_arch(arch)
  shapes = {"params": params, "batch_stats": batch_stats}
  flat = {c: traverse_util.flatten_dict(dict(shapes[c])) for c in shapes}
  out: dict[str, np.ndarray] = {}
  for path in _layers(shapes):
    kind = _layer_kind(path)
    layer = torch_name(arch, path)
    for t in _TORCH_LAYOUT[kind]:
      value = np.asarray(flat[t.collection][(*path, t.leaf)], np.float32)
      inv = _inverse(t.perm)
      out[f"{layer}.{t.suffixes[0]}"] = np.ascontiguousarray(
          value if inv is None else np.transpose(value, inv)
      )
    if kind == "bn":
      out[f"{layer}.num_batches_tracked"] = np.zeros((), np.int64)
  return out


# ----------------------------------------------------------------------------------------------
# Keras Applications.


def _keras_app(name: str) -> tuple[str, KerasApplication]:
  for key, app in KERAS_APPLICATIONS.items():
    if name == key or name.lower() == key.lower():
      return key, app
  raise ConfigError(
      f"unknown Keras application {name!r}; known: {', '.join(KERAS_APPLICATIONS)}"
  )


def _import_keras():
  # `import keras` is Keras 3 whatever TF_USE_LEGACY_KERAS says (that variable only redirects
  # `tf.keras`, to the tf_keras package, which is not installed here).
  try:
    import keras  # noqa: PLC0415 (heavy: imports TensorFlow)
  except ImportError as e:
    raise ConfigError("Keras weights need the `keras` package (it comes with tensorflow)") from e
  return keras


def build_keras_model(name: str, weights: Any = "imagenet", **kwargs: Any):
  """`keras.applications.<name>(weights=weights, classifier_activation=None, **kwargs)`.

  Raises:
    ConfigError: unknown application name. DataError: the weights cannot be downloaded.
  """
  key, _ = _keras_app(name)
  keras = _import_keras()
  ctor = getattr(keras.applications, key)
  kwargs.setdefault("classifier_activation", None)
  try:
    return ctor(weights=weights, **kwargs)
  except ValueError as e:
    raise ConfigError(f"Keras {key}: {e}") from e
  except Exception as e:  # download failures surface as URL / HTTP / OS errors.
    raise DataError(f"Keras {key}: could not get weights {weights!r}: {e}") from e


def _keras_tensors(keras_model) -> dict[str, np.ndarray]:
  """layer name + "/" + variable name -> numpy array, over every layer of a Keras model."""
  out = {}
  for layer in keras_model.layers:
    for var in layer.weights:
      short = var.name.split("/")[-1].split(":")[0]
      out[f"{layer.name}/{short}"] = np.asarray(var.numpy())
  return out


def _keras_bn_fields(keras_model, origin: str) -> dict[str, float]:
  """The (single) epsilon and momentum of the model's BatchNormalization layers."""
  values = {(float(layer.epsilon), float(layer.momentum))
            for layer in keras_model.layers if type(layer).__name__ == "BatchNormalization"}
  if len(values) != 1:
    raise ConfigError(
        f"{origin}: BatchNorm layers must share one epsilon and momentum, found "
        f"{sorted(values)}"
    )
  (eps, momentum), = values
  return {"bn_epsilon": eps, "bn_momentum": momentum}


def from_keras(
    name: str, weights: Any = "imagenet", **fields: Any
) -> tuple[nn.Module, dict, dict]:
  """Converts a `keras.applications` model into the matching jcompress model.

  Args:
    name: "ResNet50" or "MobileNetV2" (case-insensitive).
    weights: "imagenet" (Keras downloads them), None (random init, offline), a weights file
      path, or an already built Keras model of that application (with its classifier).
    **fields: extra jcompress model fields (e.g. `dtype`).

  Returns:
    `(model, params, batch_stats)`; the model has the Keras model's class count and the fields
    of `model_fields` (epsilon and momentum as read from the Keras BatchNorm layers). Feed it
    `preprocess(name, images)`.

  Raises:
    ConfigError: unknown application (the known ones are listed), a Keras model without its
      classifier, or weights that do not fit the jcompress model (first tensor named).
  """
  key, app = _keras_app(name)
  if weights is None or isinstance(weights, (str, os.PathLike)):
    keras_model = build_keras_model(key, weights)
  else:
    keras_model = weights
  origin = f"Keras {key}"
  source = _keras_tensors(keras_model)
  head = keras_name(app.model, ("head",)) + "/kernel"
  if head not in source:
    raise ConfigError(f"{origin}: the Keras model has no classifier {head!r} "
                      f"(build it with include_top=True)")
  num_classes = int(source[head].shape[-1])
  model_kwargs = {**app.fields, **_keras_bn_fields(keras_model, origin), **fields}
  model = models.get_model(app.model, num_classes, **model_kwargs)
  params, batch_stats, _ = _convert(_KERAS, app.model, source, target_shapes(model), origin)
  return model, _to_jax(params), _to_jax(batch_stats)


# ----------------------------------------------------------------------------------------------
# Preprocessing.


def preprocessing_of(name: str) -> str:
  """The preprocessing mode ("caffe", "tf", "torch") for a source: a Keras application name,
  an `init_from` spec ("keras:ResNet50", "x.safetensors"), "torchvision", or a mode itself."""
  if name in PREPROCESSING:
    return name
  if name.startswith("keras:"):
    name = name[len("keras:"):]
  if name == "torchvision" or name.endswith(".safetensors") or name in TORCHVISION_ARCHS:
    return "torch"
  return _keras_app(name)[1].preprocessing


def preprocess(name: str, images: Array) -> Array:
  """Normalises RGB images in [0, 255] (NHWC, any float or uint8 dtype) as `name` expects.

  "caffe" (Keras ResNet50): BGR channel order minus the ImageNet BGR mean, no scaling.
  "tf" (Keras MobileNetV2): x / 127.5 - 1. "torch" (torchvision): (x / 255 - mean) / std.
  Returns float32, a jax array for a jax input and a numpy array otherwise.
  """
  mode = preprocessing_of(name)
  xp = jnp if isinstance(images, jax.Array) else np
  x = xp.asarray(images).astype(xp.float32)
  if x.ndim < 1 or x.shape[-1] != 3:
    raise ConfigError(f"preprocess({name!r}): images must have 3 (RGB) channels last, "
                      f"got shape {tuple(x.shape)}")
  if mode == "caffe":
    return x[..., ::-1] - xp.asarray(_IMAGENET_BGR_MEAN, xp.float32)
  if mode == "tf":
    return x / 127.5 - 1.0
  return (x / 255.0 - xp.asarray(_TORCH_MEAN, xp.float32)) / xp.asarray(_TORCH_STD, xp.float32)


def input_norm(name: str, mean: Sequence[float], std: Sequence[float],
               channels: int = 3) -> tuple[tuple[float, ...], tuple[float, ...], bool]:
  """The model field `input_norm` that turns dataset-normalised images into `name`'s input.

  The data pipeline yields `z = (x / 255 - mean) / std` with the dataset's own per-channel
  statistics (a grey dataset's single value repeats over the channels). For `u = z * std +
  mean` (= x / 255), `preprocess(name, 255 u)` is the per-channel affine map `z * scale +
  shift`, followed by RGB -> BGR for "caffe". Returns `(scale, shift, reverse)`, so that
  `common.normalize_input(z, input_norm(...)) == preprocess(name, x)` (tested).
  """
  mode = preprocessing_of(name)
  m = np.resize(np.asarray(mean, np.float64), channels)
  s = np.resize(np.asarray(std, np.float64), channels)
  if mode == "caffe":   # 255 u, channels reversed, minus the BGR mean
    scale, shift, reverse = 255.0 * s, 255.0 * m - np.asarray(_IMAGENET_BGR_MEAN)[::-1], True
  elif mode == "tf":    # 2 u - 1
    scale, shift, reverse = 2.0 * s, 2.0 * m - 1.0, False
  else:                 # (u - M) / S
    tm, ts = np.asarray(_TORCH_MEAN), np.asarray(_TORCH_STD)
    scale, shift, reverse = s / ts, (m - tm) / ts, False
  return (tuple(float(v) for v in scale), tuple(float(v) for v in shift), reverse)


def is_pretrained_spec(spec: Any) -> bool:
  """Whether an `init_from` / `teacher` entry names published weights, not a workdir."""
  return isinstance(spec, str) and (spec.startswith("keras:") or spec.endswith(".safetensors"))


def pretrained_source(spec: str, _depth: int = 0) -> str:
  """The published weights at the root of an `init_from` chain, or "".

  `spec` itself when it is "keras:..." or a .safetensors file; for a workdir, the source of the
  `init_from` in its config.json, recursively: a run fine-tuned from ImageNet weights passes
  its model fields and input preprocessing on to the runs that start from it.
  """
  if is_pretrained_spec(spec):
    return spec
  path = os.path.join(spec, "config.json") if spec else ""
  if not path or _depth > 16 or not os.path.isfile(path):
    return ""
  try:
    with open(path) as f:
      parent = json.load(f).get("init_from", "")
  except (OSError, ValueError):
    return ""
  return pretrained_source(parent, _depth + 1)


def source_model(spec: str) -> str:
  """The jcompress model name of published weights: the Keras application's, or the
  torchvision architecture a .safetensors file holds (from its tensor names)."""
  if spec.startswith("keras:"):
    return _keras_app(spec[len("keras:"):])[1].model
  if not os.path.isfile(spec):
    raise ConfigError(f"{spec} is not a file")
  return torch_arch_of(read_safetensors(spec), f"file {spec!r}")


def torch_arch_of(source: dict[str, Array], origin: str) -> str:
  """The torchvision architecture of a state_dict, from its tensor names."""
  names = set(source)
  if "features.0.0.weight" in names:
    return "mobilenetv2"
  if "layer1.0.conv1.weight" not in names:
    raise ConfigError(f"{origin}: no torchvision ResNet or MobileNetV2 tensor names "
                      f"(found e.g. {sorted(names)[:3]}); known: {', '.join(TORCHVISION_ARCHS)}")
  if "layer1.0.conv3.weight" in names:
    return "resnet50"
  return "resnet34" if "layer3.5.conv1.weight" in names else "resnet18"


# ----------------------------------------------------------------------------------------------
# init_from.


def _parse_spec(spec: str, model: nn.Module, arch: str | None):
  """-> ("keras", application key) or ("torch", jcompress arch)."""
  if not isinstance(spec, str) or not spec:
    raise ConfigError(f"init_from must be 'keras:<Application>' or a .safetensors path, "
                      f"got {spec!r}")
  if spec.startswith("keras:"):
    key, _ = _keras_app(spec[len("keras:"):])
    return "keras", key
  if spec.endswith(".safetensors"):
    target = arch if arch is not None else (arch_of(model) if model is not None else None)
    if target is None:
      raise ConfigError(f"init_from {spec!r}: give the architecture (`arch`)")
    return "torch", _check_torch_arch(target)
  raise ConfigError(
      f"init_from {spec!r}: expected 'keras:<Application>' (known: "
      f"{', '.join('keras:' + k for k in KERAS_APPLICATIONS)}) or a path ending in .safetensors"
  )


def model_fields(spec: str, arch: str | None = None) -> dict[str, Any]:
  """Model fields under which a jcompress model computes the function of source `spec`.

  For "keras:ResNet50": `stride_in_1x1=True, padding="torch", bn_epsilon=1.001e-5,
  bn_momentum=0.99`; "keras:MobileNetV2": `padding="same", bn_epsilon=1e-3, bn_momentum=0.999`;
  a torchvision file: jcompress's defaults (`padding="torch"`, epsilon 1e-5, momentum 0.9).
  `train.py` merges them under the config's own `model_kwargs`.
  """
  kind, key = _parse_spec(spec, None, arch or "resnet50")
  if kind == "keras":
    return dict(KERAS_APPLICATIONS[key].fields)
  return dict(TORCHVISION_FIELDS)


def _check_fields(spec: str, model: nn.Module, required: dict[str, Any]) -> None:
  for field in _FUNCTIONAL_FIELDS:
    if field not in required:
      continue
    want = required[field]
    have = getattr(model, field, _FIELD_DEFAULTS.get(field))
    same = math.isclose(have, want, rel_tol=1e-6) if isinstance(want, float) else have == want
    if not same:
      raise ConfigError(
          f"init_from {spec!r} needs the model field `{field}` = {want!r} (config "
          f"`model_kwargs`), the model has {have!r}"
      )


def load_pretrained(
    spec: str,
    model: nn.Module,
    num_classes: int,
    rng: Array,
    arch: str | None = None,
    keras_weights: Any = "imagenet",
    reinit_head: bool = True,
) -> tuple[dict, dict, str]:
  """Pretrained variables for `model` (config key `init_from`).

  Args:
    spec: "keras:ResNet50", "keras:MobileNetV2", or a path ending in `.safetensors` holding a
      torchvision state_dict.
    model: the jcompress model to initialise; its fields must include `model_fields(spec)`'s
      `padding`, `stride_in_1x1` and `bn_epsilon` (checked), its momentum is its own.
    num_classes: the model's class count. When it differs from the source's, the classifier
      `head` comes from `model.init(rng, ...)` (exactly the values a fresh model would get).
    rng: a `jax.random` key, used only for a re-initialised head.
    arch: for a `.safetensors` spec, the torchvision architecture ("resnet18", ...); inferred
      from `model` when None.
    keras_weights: what Keras builds the application with (default: the ImageNet download;
      None gives random weights, for tests).
    reinit_head: False refuses (ConfigError) a source whose class count differs from
      `num_classes` instead of re-initialising the head (a teacher must keep its classifier).

  Returns:
    `(params, batch_stats, message)`: float32 trees with the structure of `model.init`'s, and a
    one-line account of what was loaded.

  Raises:
    ConfigError: a bad spec, a model field that does not match the source, or tensors that do
      not fit the model. DataError: Keras could not download the weights.
  """
  t0 = time.perf_counter()
  kind, key = _parse_spec(spec, model, arch)
  shapes = target_shapes(model)
  if kind == "keras":
    app = KERAS_APPLICATIONS[key]
    model_arch = arch_of(model)
    if model_arch != app.model:
      raise ConfigError(f"init_from {spec!r} gives {app.model} weights, the model is "
                        f"{model_arch} (config key `model`)")
    _check_fields(spec, model, app.fields)
    keras_model = (build_keras_model(key, keras_weights)
                   if keras_weights is None or isinstance(keras_weights, (str, os.PathLike))
                   else keras_weights)
    source = _keras_tensors(keras_model)
    fmt, origin = _KERAS, f"Keras {key}"
    head_kernel = keras_name(app.model, ("head",)) + "/kernel"
    src_classes = int(source[head_kernel].shape[-1]) if head_kernel in source else None
    what = f"keras:{key}"
    if not (isinstance(keras_weights, str) and keras_weights == "imagenet"):
      what += " (weights: " + ("random" if keras_weights is None else "given") + ")"
  else:
    model_arch = key
    if arch_of(model) != model_arch:
      raise ConfigError(f"init_from {spec!r}: arch {model_arch!r} does not fit the model "
                        f"{arch_of(model)!r} (config key `model`)")
    _check_fields(spec, model, {**TORCHVISION_FIELDS, "stride_in_1x1": False})
    source = read_safetensors(spec)
    fmt, origin = _TORCH, f"file {spec!r}"
    src_classes = _torch_head_classes(model_arch, source, origin)
    what = f"{spec} ({model_arch}, torchvision naming)"
  reinit = src_classes != num_classes
  if reinit and not reinit_head:
    raise ConfigError(f"{what} predicts {src_classes} classes, the data has {num_classes}: a "
                      "teacher must predict the student's classes (fine-tune it first with "
                      f"init_from={spec} and give that run's workdir as the teacher)")
  if reinit:
    # The head's input width must still fit: check it against the source's classifier.
    head_name = fmt.layer_name(model_arch, ("head",)) + fmt.sep + (
        "weight" if fmt is _TORCH else "kernel")
    if head_name in source:
      in_axis = 1 if fmt is _TORCH else 0
      want = shapes["params"]["head"]["kernel"].shape[0]
      if source[head_name].shape[in_axis] != want:
        raise ConfigError(f"{origin}: tensor {head_name!r} has {source[head_name].shape[in_axis]} "
                          f"input features, the model's head takes {want}")
  params, batch_stats, used = _convert(fmt, model_arch, source, shapes, origin, skip_head=reinit)
  n = models.count_params(params)
  msg = f"init_from {what}: loaded {len(used)} tensors, {n:,} parameters"
  if reinit:
    params["head"] = _init_head(model, rng)
    source_head = ("no classifier" if src_classes is None else f"{src_classes} classes")
    msg += f"; head re-initialised: the source has {source_head}, the model {num_classes}"
  if getattr(model, "cifar_stem", False):
    msg += "; note: the model has cifar_stem=True (strides differ from the source's)"
  msg += f" ({time.perf_counter() - t0:.1f} s)"
  return _to_jax(params), _to_jax(batch_stats), msg


__all__ = [
    "KERAS_APPLICATIONS",
    "KerasApplication",
    "PREPROCESSING",
    "TORCHVISION_ARCHS",
    "TORCHVISION_FIELDS",
    "arch_of",
    "build_keras_model",
    "from_keras",
    "input_norm",
    "is_pretrained_spec",
    "from_safetensors",
    "keras_name",
    "load_pretrained",
    "model_fields",
    "preprocess",
    "preprocessing_of",
    "pretrained_source",
    "read_safetensors",
    "source_model",
    "target_shapes",
    "to_torch_state_dict",
    "torch_arch_of",
    "torch_name",
]
