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

import json
import math
import os
import time
from typing import Any
from typing import Sequence

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jcompress import models
from jcompress.errors import ConfigError
from jcompress.errors import DataError
from jcompress.pretrained_convert import _BN_AFTER_CONV  # noqa: F401
from jcompress.pretrained_convert import _FIELD_DEFAULTS  # noqa: F401
from jcompress.pretrained_convert import _FLOAT_DTYPES  # noqa: F401
from jcompress.pretrained_convert import _FUNCTIONAL_FIELDS  # noqa: F401
from jcompress.pretrained_convert import _IGNORED_TORCH_SUFFIXES  # noqa: F401
from jcompress.pretrained_convert import _IMAGENET_BGR_MEAN  # noqa: F401
from jcompress.pretrained_convert import _IN_BLOCK_ORDER  # noqa: F401
from jcompress.pretrained_convert import _KERAS  # noqa: F401
from jcompress.pretrained_convert import _KERAS_LAYOUT  # noqa: F401
from jcompress.pretrained_convert import _NUM_MBV2_BLOCKS  # noqa: F401
from jcompress.pretrained_convert import _PROBE_SIZE  # noqa: F401
from jcompress.pretrained_convert import _TORCH  # noqa: F401
from jcompress.pretrained_convert import _TORCH_LAYOUT  # noqa: F401
from jcompress.pretrained_convert import _TORCH_MEAN  # noqa: F401
from jcompress.pretrained_convert import _TORCH_STD  # noqa: F401
from jcompress.pretrained_convert import KERAS_APPLICATIONS  # noqa: F401
from jcompress.pretrained_convert import PREPROCESSING  # noqa: F401
from jcompress.pretrained_convert import TORCHVISION_ARCHS  # noqa: F401
from jcompress.pretrained_convert import TORCHVISION_FIELDS  # noqa: F401
from jcompress.pretrained_convert import Array  # noqa: F401
from jcompress.pretrained_convert import KerasApplication  # noqa: F401
from jcompress.pretrained_convert import Variables  # noqa: F401
from jcompress.pretrained_convert import _as_float32  # noqa: F401
from jcompress.pretrained_convert import _convert  # noqa: F401
from jcompress.pretrained_convert import _family  # noqa: F401
from jcompress.pretrained_convert import _Format  # noqa: F401
from jcompress.pretrained_convert import _init_head  # noqa: F401
from jcompress.pretrained_convert import _inverse  # noqa: F401
from jcompress.pretrained_convert import _layer_kind  # noqa: F401
from jcompress.pretrained_convert import _layers  # noqa: F401
from jcompress.pretrained_convert import _mbv2_block_index  # noqa: F401
from jcompress.pretrained_convert import _order_key  # noqa: F401
from jcompress.pretrained_convert import _permute_shape  # noqa: F401
from jcompress.pretrained_convert import _probe_input  # noqa: F401
from jcompress.pretrained_convert import _shape_str  # noqa: F401
from jcompress.pretrained_convert import _Tensor  # noqa: F401
from jcompress.pretrained_convert import _to_jax  # noqa: F401
from jcompress.pretrained_convert import arch_of  # noqa: F401
from jcompress.pretrained_convert import keras_name  # noqa: F401
from jcompress.pretrained_convert import target_shapes  # noqa: F401
from jcompress.pretrained_convert import torch_name  # noqa: F401

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
