"""MobileNetV2 (Sandler et al. 2018), following torchvision's `mobilenet_v2`.

A 3x3 stride-2 stem convolution (32 channels), seven stages of inverted residual blocks given by
the (t, c, n, s) table below (expansion t, output channels c, repeats n, stride s of the first
repeat), a 1x1 convolution to 1280 channels, global average pooling and the classifier. Every
activation is ReLU6 except after the projection ("linear bottleneck"); a block has a residual
connection when its stride is 1 and its input and output channels agree.

Width multiplier `width`: channel counts are `make_divisible(c * width, 8)`; the last
convolution has `make_divisible(1280 * max(1, width), 8)` channels (scaled only when width > 1).

`cifar_stem=True` is the usual CIFAR adaptation: stride 1 in the stem and in the first stride-2
stage (stage 2), so a 32x32 input reaches the last stage at 4x4 instead of 1x1.

Features returned beside the logits: `stem`, `stage1` ... `stage7` (one per table row),
`conv_last` (after the 1x1 1280-channel conv-BN-ReLU6), `pre_logits` (pooled vector).

`activation="relu"` replaces every ReLU6 by ReLU, as data-free quantization's cross-layer
equalization needs (`jcompress.equalize`: ReLU is positively homogeneous, ReLU6 is not).

Parameter names: `stem_conv`, `stem_bn`; `stage{s}_block{b}` holding `expand_conv`, `expand_bn`
(absent when t = 1), `dw_conv`, `dw_bn` (depthwise 3x3), `project_conv`, `project_bn`;
`conv_last`, `bn_last`; `head`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jcompress.errors import ConfigError
from jcompress.models.common import batch_norm
from jcompress.models.common import check_width
from jcompress.models.common import conv
from jcompress.models.common import global_avg_pool
from jcompress.models.common import head
from jcompress.models.common import make_divisible
from jcompress.models.common import normalize_input

_ACTIVATIONS = {"relu6": nn.relu6, "relu": nn.relu}

# (expansion t, output channels c, repeats n, first stride s), Table 2 of the paper.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
  """Expand 1x1 (ReLU6) -> depthwise 3x3 (ReLU6) -> project 1x1 (linear), + x when shapes match."""

  features: int
  strides: int = 1
  expansion: int = 6
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  # Whether to add the input: None decides from the shapes (stride 1, equal channels);
  # MobileNetV2 passes the decision of the unpruned architecture, so that a structurally
  # pruned block (whose widths no longer equal `features`) keeps its residual connection.
  residual: bool | None = None
  activation: str = "relu6"        # relu6 | relu

  @nn.compact
  def __call__(self, x, train: bool = False):
    act = _ACTIVATIONS[self.activation]
    in_features = x.shape[-1]
    hidden = int(round(in_features * self.expansion))
    y = x
    if self.expansion != 1:
      # its input is the linear bottleneck (no activation): signed activation quantizer
      y, linear = conv(self, hidden, 1, name="expand_conv", signed_input=True)(y, linear=True)
      y = act(batch_norm(self, train, "expand_bn")(y, linear))
    y = conv(self, hidden, 3, self.strides, groups=hidden, name="dw_conv")(y)
    y = act(batch_norm(self, train, "dw_bn")(y))
    y = conv(self, self.features, 1, name="project_conv")(y)
    y = batch_norm(self, train, "project_bn")(y)
    residual = self.residual
    if residual is None:
      residual = self.strides == 1 and in_features == self.features
    if residual:
      y = y + x
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2 classifier.

  Attributes:
    num_classes: classifier outputs.
    width: width multiplier (channels rounded with `make_divisible(., 8)`).
    cifar_stem: stride 1 in the stem and in stage 2 (for 32x32 inputs).
    dropout_rate: dropout before the classifier (torchvision uses 0.2). The default 0 needs no
      `dropout` rng; with a rate > 0, `apply(..., train=True)` needs `rngs={"dropout": key}`.
    dtype: compute dtype; parameters stay float32, logits are returned in float32.
    bn_momentum, bn_epsilon: BatchNorm running-average momentum and epsilon (Keras uses 1e-3).
  """

  num_classes: int
  width: float = 1.0
  cifar_stem: bool = False
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  channels: Any = None   # per-conv widths, QAT activation quantizer, padding: models/common.py
  act_quant: Any = None
  padding: str = "torch"
  conv_impl: Any = None   # conv gradients: CONV_IMPLS of jcompress.models.common
  input_norm: Any = None
  activation: str = "relu6"   # relu6 | relu (every ReLU6 becomes a ReLU)

  def __post_init__(self):
    check_width(self.width, type(self).__name__)
    if self.activation not in _ACTIVATIONS:
      raise ConfigError(f"MobileNetV2: `activation` must be one of {sorted(_ACTIVATIONS)}, got "
                        f"{self.activation!r}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ConfigError(f"MobileNetV2: `dropout_rate` must be in [0, 1), got {self.dropout_rate!r}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    features = {}
    x = normalize_input(jnp.asarray(x, self.dtype), self.input_norm)
    x = conv(self, make_divisible(32 * self.width), 3, 1 if self.cifar_stem else 2,
             name="stem_conv")(x)
    act = _ACTIVATIONS[self.activation]
    x = act(batch_norm(self, train, "stem_bn")(x))
    features["stem"] = x
    nominal_in = make_divisible(32 * self.width)   # the unpruned widths decide the residuals
    for s, (t, c, n, stride) in enumerate(INVERTED_RESIDUAL_SETTING, start=1):
      if self.cifar_stem and s == 2:
        stride = 1
      out = make_divisible(c * self.width)
      for b in range(n):
        block_stride = stride if b == 0 else 1
        x = InvertedResidual(
            features=out,
            strides=block_stride,
            expansion=t,
            residual=block_stride == 1 and nominal_in == out,
            dtype=self.dtype,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            activation=self.activation,
            name=f"stage{s}_block{b}",
        )(x, train)
        nominal_in = out
      features[f"stage{s}"] = x
    x, linear = conv(self, make_divisible(1280 * max(1.0, self.width)), 1, name="conv_last",
                     signed_input=True)(x, linear=True)
    x = act(batch_norm(self, train, "bn_last")(x, linear))
    features["conv_last"] = x
    x = global_avg_pool(x)
    features["pre_logits"] = x
    if self.dropout_rate > 0:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = head(self, self.num_classes)(x)
    return jnp.asarray(logits, jnp.float32), features
