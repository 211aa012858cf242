"""ResNets: the CIFAR family (He et al. 2016, Sec. 4.2) and the ImageNet family (torchvision).

`CifarResNet` is the 6n+2-layer network of He et al. for 32x32 inputs: a 3x3 stem convolution,
three stages of n BasicBlocks (the first block of stages 2 and 3 has stride 2), global average
pooling and the classifier. Where a block changes the shape, its shortcut is a 1x1 convolution +
BatchNorm projection ("option B"; the paper's CIFAR numbers use option A, zero-padding, which has
no parameters: ResNet-20 is then 269,722 parameters instead of 272,474 for 10 classes).
`num_filters = (stem, stage1, stage2, stage3)`: (16, 16, 32, 64) for ResNet-20/32/56 and
(32, 64, 128, 256) for RepDistiller's `resnet8x4` / `resnet32x4` (CRD, Tian et al. 2020).

`ResNet` is torchvision's ResNet-18/34/50/101/152 (v1.5: in the Bottleneck the stride sits on
the 3x3 convolution): a 7x7 stride-2 stem and a 3x3 stride-2 max pool, four stages of
64/128/256/512 channels (x4 for Bottleneck), global average pooling and the classifier. With
`cifar_stem=True` the stem is a 3x3 stride-1 convolution and there is no max pool, so a 32x32
input keeps 32x32 in stage 1 (the usual "ResNet-18 on CIFAR").

Features returned beside the logits: `stem` (after stem conv-BN-ReLU, and the max pool for the
ImageNet stem), `stage1` ... `stageN` (output of each stage, after the last block's ReLU),
`pre_logits` (the globally pooled vector fed to `head`).

Parameter names: `stem_conv`, `stem_bn`, `stage{s}_block{b}` (s from 1, b from 0) holding
`conv1`, `bn1`, `conv2`, `bn2` (and `conv3`, `bn3` in a Bottleneck) and, where the shape changes,
`shortcut_conv`, `shortcut_bn`; the classifier is `head`.
"""

from __future__ import annotations

from typing import Any
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from jcompress.errors import ConfigError
from jcompress.models.common import batch_norm
from jcompress.models.common import check_width
from jcompress.models.common import conv
from jcompress.models.common import global_avg_pool
from jcompress.models.common import has_channel_override
from jcompress.models.common import head
from jcompress.models.common import normalize_input
from jcompress.models.common import resnet_stem
from jcompress.models.common import root_field
from jcompress.models.common import scale_channels


class BasicBlock(nn.Module):
  """Two 3x3 conv-BN layers plus a shortcut: `relu(bn2(conv2(relu(bn1(conv1(x))))) + sc(x))`.

  The shortcut is the identity, or a 1x1 conv + BN projection when the stride is not 1 or the
  channel count changes.
  """

  features: int
  strides: int = 1
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = conv(self, self.features, 3, self.strides, name="conv1")(x)
    y = nn.relu(batch_norm(self, train, "bn1")(y))
    y = conv(self, self.features, 3, name="conv2")(y)
    y = batch_norm(self, train, "bn2", zero_init=self.zero_init_residual)(y)
    shortcut = x
    if (self.strides != 1 or x.shape[-1] != y.shape[-1]
        or has_channel_override(self, "shortcut_conv")):
      shortcut = conv(self, self.features, 1, self.strides, name="shortcut_conv")(x)
      shortcut = batch_norm(self, train, "shortcut_bn")(shortcut)
    return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
  """1x1 (reduce) - 3x3 (stride here, torchvision v1.5) - 1x1 (expand x4) conv-BN, plus shortcut.

  `features` is the bottleneck width; the block outputs `4 * features` channels.
  """

  features: int
  strides: int = 1
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    out_features = self.features * self.expansion
    # torchvision v1.5 strides the 3x3 conv; Keras's ResNet50 (v1) the first 1x1.
    s1, s3 = (self.strides, 1) if root_field(self, "stride_in_1x1", False) else (1, self.strides)
    y = conv(self, self.features, 1, s1, name="conv1")(x)
    y = nn.relu(batch_norm(self, train, "bn1")(y))
    y = conv(self, self.features, 3, s3, name="conv2")(y)
    y = nn.relu(batch_norm(self, train, "bn2")(y))
    y, linear = conv(self, out_features, 1, name="conv3")(y, linear=True)
    y = batch_norm(self, train, "bn3", zero_init=self.zero_init_residual)(y, linear)
    shortcut = x
    if (self.strides != 1 or x.shape[-1] != y.shape[-1]
        or has_channel_override(self, "shortcut_conv")):
      shortcut = conv(self, out_features, 1, self.strides, name="shortcut_conv")(x)
      shortcut = batch_norm(self, train, "shortcut_bn")(shortcut)
    return nn.relu(y + shortcut)


def _stage(module, x, block_cls, stage: int, features: int, blocks: int, strides: int, train):
  for b in range(blocks):
    x = block_cls(
        features=features,
        strides=strides if b == 0 else 1,
        zero_init_residual=module.zero_init_residual,
        dtype=module.dtype,
        bn_momentum=module.bn_momentum,
        bn_epsilon=module.bn_epsilon,
        name=f"stage{stage}_block{b}",
    )(x, train)
  return x


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for CIFAR with BasicBlocks and option-B projection shortcuts.

  Attributes:
    num_classes: classifier outputs.
    depth: 6n + 2 (20, 32, 44, 56, 110, ...; 8 for resnet8x4); n blocks per stage.
    num_filters: channels of (stem, stage1, stage2, stage3) before the width multiplier.
    width: multiplies every channel count (rounded, at least 1).
    zero_init_residual: start the last BN gamma of every block at 0.
    dtype: compute dtype; parameters stay float32, logits are returned in float32.
    bn_momentum, bn_epsilon: BatchNorm running-average momentum and epsilon.
    channels, act_quant, padding, conv_impl: see `jcompress.models.common` (per-conv widths of
      a pruned model, the activation quantizer of QAT, "torch" or "same" padding, "auto",
      "xla", "staged" or "fast" convolution gradients).
  """

  num_classes: int
  depth: int = 20
  num_filters: Sequence[int] = (16, 16, 32, 64)
  width: float = 1.0
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  channels: Any = None
  act_quant: Any = None
  padding: str = "torch"
  conv_impl: Any = None

  def __post_init__(self):
    check_width(self.width, type(self).__name__)
    if not isinstance(self.depth, int) or self.depth < 8 or (self.depth - 2) % 6:
      raise ConfigError(
          f"CifarResNet: `depth` must be 6n + 2 with n >= 1 (8, 14, 20, 32, 56, 110, ...), "
          f"got {self.depth!r}"
      )
    if len(self.num_filters) != 4:
      raise ConfigError(
          f"CifarResNet: `num_filters` must be (stem, stage1, stage2, stage3), "
          f"got {self.num_filters!r}"
      )
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    features = {}
    channels = [scale_channels(c, self.width) for c in self.num_filters]
    blocks = (self.depth - 2) // 6
    x = jnp.asarray(x, self.dtype)
    x = conv(self, channels[0], 3, name="stem_conv")(x)
    x = nn.relu(batch_norm(self, train, "stem_bn")(x))
    features["stem"] = x
    for s, (c, strides) in enumerate(zip(channels[1:], (1, 2, 2)), start=1):
      x = _stage(self, x, BasicBlock, s, c, blocks, strides, train)
      features[f"stage{s}"] = x
    x = global_avg_pool(x)
    features["pre_logits"] = x
    logits = head(self, self.num_classes)(x)
    return jnp.asarray(logits, jnp.float32), features


# depth -> (block, blocks per stage), as torchvision.
IMAGENET_RESNET_SPECS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


class ResNet(nn.Module):
  """torchvision's ImageNet ResNet (v1.5), optionally with a CIFAR stem.

  Attributes:
    num_classes: classifier outputs.
    depth: one of 18, 34 (BasicBlock), 50, 101, 152 (Bottleneck).
    width: multiplies every channel count (stem 64, stages 64/128/256/512), rounded.
    cifar_stem: 3x3 stride-1 stem convolution and no max pool instead of 7x7/2 + max pool 3x3/2.
    zero_init_residual: start the last BN gamma of every block at 0.
    dtype: compute dtype; parameters stay float32, logits are returned in float32.
    bn_momentum, bn_epsilon: BatchNorm running-average momentum and epsilon.
    stride_in_1x1: Bottleneck stride on the first 1x1 conv (Keras's ResNet50, v1) instead of
      the 3x3 (torchvision, v1.5).
    channels, act_quant, padding, conv_impl: see `jcompress.models.common` (per-conv widths of
      a pruned model, the activation quantizer of QAT, "torch" or "same" padding, "auto",
      "xla", "staged" or "fast" convolution gradients).
    input_norm: `(scale, shift, reverse)` applied to the input first (`common.normalize_input`):
      the preprocessing that imported weights expect; None: the input as given.
  """

  num_classes: int
  depth: int = 18
  width: float = 1.0
  cifar_stem: bool = False
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  stride_in_1x1: bool = False
  channels: Any = None
  act_quant: Any = None
  padding: str = "torch"
  conv_impl: Any = None
  input_norm: Any = None

  def __post_init__(self):
    check_width(self.width, type(self).__name__)
    if self.depth not in IMAGENET_RESNET_SPECS:
      raise ConfigError(
          f"ResNet: `depth` must be one of {sorted(IMAGENET_RESNET_SPECS)}, got {self.depth!r}"
      )
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    features = {}
    block_cls, blocks = IMAGENET_RESNET_SPECS[self.depth]
    x = normalize_input(jnp.asarray(x, self.dtype), self.input_norm)
    stem_channels = scale_channels(64, self.width)
    x = resnet_stem(self, x, stem_channels, self.cifar_stem, train)
    features["stem"] = x
    for s, (c, n, strides) in enumerate(zip((64, 128, 256, 512), blocks, (1, 2, 2, 2)), start=1):
      x = _stage(self, x, block_cls, s, scale_channels(c, self.width), n, strides, train)
      features[f"stage{s}"] = x
    x = global_avg_pool(x)
    features["pre_logits"] = x
    logits = head(self, self.num_classes)(x)
    return jnp.asarray(logits, jnp.float32), features
