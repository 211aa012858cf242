"""Vision models: plain Flax Linen modules that know nothing about compression.

Contract shared by every model here:

* `model.apply(variables, x, train=False)` with `x` an NHWC float batch (any batch size) returns
  `(logits, features)`: logits of shape (N, num_classes) in float32, and `features`, a dict of
  intermediate activations in the compute dtype:

    `stem`        output of the stem (conv-BN-ReLU, plus the max pool where there is one);
    `stage1` ...  output of each stage, in order (ResNets: 3 for CIFAR, 4 for ImageNet;
                  MobileNetV2: 7, one per row of the (t, c, n, s) table; ShuffleNetV2: 3;
                  small_cnn: 2);
    `conv_last`   MobileNetV2 and ShuffleNetV2 only: after the final 1x1 conv-BN-ReLU;
    `pre_logits`  the globally average-pooled vector (N, C) fed to the classifier.

* Variables: `params` (float32) and `batch_stats` (BatchNorm running mean/var). With
  `train=True`, apply with `mutable=["batch_stats"]`; with `train=False` nothing is written.
* The first convolution is `params["stem_conv"]` and the classifier is `params["head"]` in every
  model; compression code excludes these two by path name by default. Other names are stable:
  `stage{s}_block{b}/conv1`, `.../bn1`, `.../shortcut_conv`, ... (see each module's docstring).
* Common fields: `num_classes`, `width` (width multiplier), `dtype` (compute dtype),
  `bn_momentum` (0.9), `bn_epsilon` (1e-5; set 1e-3 for Keras weights). ResNets add
  `zero_init_residual`; ImageNet-style models add `cifar_stem`.
* Vision Transformers (`vit_tiny_cifar`, `vit_digits`, `vit_ti16`, `vit_s16`, `vit_b16`, see
  `vit.py`) have no BatchNorm (no `batch_stats`): `stem` is the patch embedding grid, the
  stages are `block1` ... `blockN` (tokens, (N, T, D)), `pre_logits` the class token; the
  patch embedding with its tokens and position embeddings is `params["stem_conv"]`; `width`
  multiplies the token width and MLP size; `distill_token` adds DeiT's distillation token,
  head `head_dist` and feature `dist_logits` (logits at inference: the two heads' mean).
* Binary ResNets (`bnn_resnet18_cifar`, `bnn_resnet18`, `bnn_resnet20`, see `bnn_resnet.py`)
  quantize the input of every conv but the stem to `num_bits` (1: sign); their conv kernels are
  binarized outside the model, by the `binary_weights` ParamTransform.

Use `get_model(name, num_classes, **kwargs)` with a name from `MODELS`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jcompress.errors import ConfigError
from jcompress.models.bnn_resnet import BinaryBasicBlock
from jcompress.models.bnn_resnet import BNNResNet
from jcompress.models.common import check_width
from jcompress.models.common import make_divisible
from jcompress.models.mobilenetv2 import InvertedResidual
from jcompress.models.mobilenetv2 import MobileNetV2
from jcompress.models.resnet import BasicBlock
from jcompress.models.resnet import Bottleneck
from jcompress.models.resnet import CifarResNet
from jcompress.models.resnet import ResNet
from jcompress.models.shufflenetv2 import ShuffleNetV2
from jcompress.models.shufflenetv2 import ShuffleUnit
from jcompress.models.shufflenetv2 import channel_shuffle
from jcompress.models.small_cnn import SmallCNN
from jcompress.models.vit import ViT

_P = functools.partial

# name -> constructor; call as `MODELS[name](num_classes=..., **kwargs)` or use `get_model`.
MODELS: dict[str, Callable[..., nn.Module]] = {
    # CIFAR ResNets (He et al. 2016), option-B shortcuts.
    "resnet20": _P(CifarResNet, depth=20),
    "resnet32": _P(CifarResNet, depth=32),
    "resnet56": _P(CifarResNet, depth=56),
    # RepDistiller / CRD teacher-student pair: stem 32, stages 64/128/256.
    "resnet8x4": _P(CifarResNet, depth=8, num_filters=(32, 64, 128, 256)),
    "resnet32x4": _P(CifarResNet, depth=32, num_filters=(32, 64, 128, 256)),
    # torchvision ImageNet ResNets.
    "resnet18": _P(ResNet, depth=18),
    "resnet34": _P(ResNet, depth=34),
    "resnet50": _P(ResNet, depth=50),
    # The same with a 3x3 stride-1 stem and no max pool.
    "resnet18_cifar": _P(ResNet, depth=18, cifar_stem=True),
    "resnet34_cifar": _P(ResNet, depth=34, cifar_stem=True),
    "resnet50_cifar": _P(ResNet, depth=50, cifar_stem=True),
    "mobilenetv2": _P(MobileNetV2),
    "mobilenetv2_cifar": _P(MobileNetV2, cifar_stem=True),
    "shufflenetv2": _P(ShuffleNetV2),
    "shufflenetv2_cifar": _P(ShuffleNetV2, cifar_stem=True),
    "small_cnn": _P(SmallCNN),
    # Binary ResNets (seed 001): float stem/head, binary 3x3 blocks, `num_bits` activations.
    "bnn_resnet18_cifar": _P(BNNResNet, stage_sizes=(2, 2, 2, 2), num_filters=64, cifar_stem=True),
    "bnn_resnet18": _P(BNNResNet, stage_sizes=(2, 2, 2, 2), num_filters=64, cifar_stem=False),
    "bnn_resnet20": _P(BNNResNet, stage_sizes=(3, 3, 3), num_filters=16, cifar_stem=True),
    # Vision Transformers (`vit.py`). DeiT-Ti's shape with 4x4 patches for 32x32 images (5.4M
    # params at 10 classes); a small one for the offline digits (32x32x3, 8x8 patches);
    # DeiT-Ti/16, DeiT-S/16 and ViT-B/16 at 224x224 (5.7M, 22.1M, 86.6M at 1000 classes).
    "vit_tiny_cifar": _P(ViT, embed_dim=192, depth=12, num_heads=3, mlp_dim=768, patch_size=4),
    "vit_digits": _P(ViT, embed_dim=64, depth=4, num_heads=4, mlp_dim=128, patch_size=8),
    "vit_ti16": _P(ViT, embed_dim=192, depth=12, num_heads=3, mlp_dim=768, patch_size=16),
    "vit_s16": _P(ViT, embed_dim=384, depth=12, num_heads=6, mlp_dim=1536, patch_size=16),
    "vit_b16": _P(ViT, embed_dim=768, depth=12, num_heads=12, mlp_dim=3072, patch_size=16),
}


def _allowed_kwargs(name: str) -> list[str]:
  """Fields that `get_model(name, ...)` accepts beyond `num_classes`."""
  ctor = MODELS[name]
  fixed = set(ctor.keywords) if isinstance(ctor, functools.partial) else set()
  cls = ctor.func if isinstance(ctor, functools.partial) else ctor
  return [
      f.name
      for f in dataclasses.fields(cls)
      if f.name not in ("parent", "name", "num_classes") and f.name not in fixed
  ]


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds the model registered as `name` (config key `model`).

  Args:
    name: a key of `MODELS`.
    num_classes: classifier outputs (>= 1).
    **kwargs: module fields, e.g. `width`, `dtype` (a dtype or its name, "bfloat16"),
      `bn_epsilon`, `zero_init_residual`. Fields that the name fixes (the depth of "resnet20",
      `cifar_stem` of "resnet18_cifar") cannot be overridden.

  Raises:
    ConfigError: unknown name, bad `num_classes`, `width` or `dtype`, or an unexpected kwarg;
      the message names the key at fault.
  """
  if name not in MODELS:
    raise ConfigError(
        f"unknown model {name!r} (config key `model`); known models: {', '.join(MODELS)}"
    )
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or (
      num_classes < 1
  ):
    raise ConfigError(f"model {name!r}: `num_classes` must be an int >= 1, got {num_classes!r}")
  allowed = _allowed_kwargs(name)
  unexpected = sorted(set(kwargs) - set(allowed))
  if unexpected:
    raise ConfigError(
        f"model {name!r} has no option {', '.join(repr(k) for k in unexpected)}; "
        f"its options are: {', '.join(allowed)}"
    )
  if "width" in kwargs:
    check_width(kwargs["width"], name)
  if "dtype" in kwargs:
    try:
      kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    except TypeError as e:
      raise ConfigError(f"model {name!r}: `dtype` {kwargs['dtype']!r} is not a dtype") from e
    if not jnp.issubdtype(kwargs["dtype"], jnp.floating):
      raise ConfigError(f"model {name!r}: `dtype` must be a float dtype, got {kwargs['dtype']}")
  return MODELS[name](num_classes=int(num_classes), **kwargs)


def count_params(params: Any) -> int:
  """Total number of scalars in a pytree's leaves (arrays or `jax.ShapeDtypeStruct`s)."""
  total = 0
  for leaf in jax.tree_util.tree_leaves(params):
    shape = getattr(leaf, "shape", None)
    total += math.prod(np.shape(leaf) if shape is None else shape)
  return int(total)


__all__ = [
    "MODELS",
    "BNNResNet",
    "BasicBlock",
    "BinaryBasicBlock",
    "Bottleneck",
    "CifarResNet",
    "InvertedResidual",
    "MobileNetV2",
    "ResNet",
    "ShuffleNetV2",
    "ShuffleUnit",
    "SmallCNN",
    "ViT",
    "channel_shuffle",
    "count_params",
    "get_model",
    "make_divisible",
]
