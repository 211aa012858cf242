"""ShuffleNetV2 (Ma et al. 2018), following torchvision's `shufflenet_v2_x*`.

A 3x3 stride-2 stem convolution (24 channels) and a 3x3 stride-2 max pool, three stages of
[4, 8, 4] units, a 1x1 convolution (`conv_last`, the paper's conv5), global average pooling and
the classifier. Stage channels by `width`:

  0.5: 48 / 96 / 192,  1.0: 116 / 232 / 464,  1.5: 176 / 352 / 704,  2.0: 244 / 488 / 976,

and conv5 has 1024 channels (2048 for width 2.0); other widths are not defined by the paper.

A unit with stride 1 splits the channels in two halves, keeps the first and sends the second
through 1x1 conv-BN-ReLU, depthwise 3x3 conv-BN, 1x1 conv-BN-ReLU; a stride-2 unit (the first of
each stage) feeds the whole input to both branches, the left one being depthwise 3x3/2 conv-BN,
1x1 conv-BN-ReLU. The two halves are concatenated and channel-shuffled with 2 groups.

`cifar_stem=True`: the stem convolution has stride 1 and there is no max pool, so a 32x32 input
reaches the stages at 32x32 (stage outputs 16, 8, 4).

Note: the paper and torchvision call the stages stage2..stage4 (stage1 being conv1 + max pool);
here they are `stage1`..`stage3`, like every other jcompress model.

Features returned beside the logits: `stem` (after stem conv-BN-ReLU and max pool), `stage1`,
`stage2`, `stage3`, `conv_last` (after conv5-BN-ReLU), `pre_logits` (pooled vector).

Parameter names: `stem_conv`, `stem_bn`; `stage{s}_block{b}` holding `branch1_dw_conv`,
`branch1_dw_bn`, `branch1_pw_conv`, `branch1_pw_bn` (stride-2 units only), `branch2_pw1_conv`,
`branch2_pw1_bn`, `branch2_dw_conv`, `branch2_dw_bn`, `branch2_pw2_conv`, `branch2_pw2_bn`;
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

STAGE_REPEATS = (4, 8, 4)
# width -> (stage1, stage2, stage3, conv_last) channels; the stem always has 24.
STAGE_CHANNELS = {
    0.5: (48, 96, 192, 1024),
    1.0: (116, 232, 464, 1024),
    1.5: (176, 352, 704, 1024),
    2.0: (244, 488, 976, 2048),
}
STEM_CHANNELS = 24


def channel_shuffle(x: jnp.ndarray, groups: int) -> jnp.ndarray:
  """Channel shuffle of an NHWC tensor (Zhang et al. 2018).

  View the C channels as a (groups, C / groups) matrix, transpose it and flatten:
  `out[..., k] = x[..., (k % groups) * (C // groups) + k // groups]`. With C = 8 and 2 groups the
  new channel order is 0, 4, 1, 5, 2, 6, 3, 7. Equals torchvision's NCHW
  `x.view(b, g, c // g, h, w).transpose(1, 2).reshape(b, c, h, w)` in NHWC layout.
  """
  *lead, c = x.shape
  if c % groups:
    raise ValueError(f"channel_shuffle: {c} channels do not split into {groups} groups")
  x = x.reshape(*lead, groups, c // groups)
  x = jnp.swapaxes(x, -1, -2)
  return x.reshape(*lead, c)


class ShuffleUnit(nn.Module):
  """ShuffleNetV2 unit (torchvision's `InvertedResidual`); `features` output channels."""

  features: int
  strides: int = 1
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool = False):
    branch = self.features // 2
    if self.strides == 1:
      if x.shape[-1] != 2 * branch:
        raise ValueError(
            f"ShuffleUnit: stride 1 needs {2 * branch} input channels, got {x.shape[-1]}"
        )
      left, right = jnp.split(x, 2, axis=-1)
    else:
      in_features = x.shape[-1]
      left = conv(self, in_features, 3, self.strides, groups=in_features,
                  name="branch1_dw_conv")(x)
      left = batch_norm(self, train, "branch1_dw_bn")(left)
      left = conv(self, branch, 1, name="branch1_pw_conv")(left)
      left = nn.relu(batch_norm(self, train, "branch1_pw_bn")(left))
      right = x
    right = conv(self, branch, 1, name="branch2_pw1_conv")(right)
    right = nn.relu(batch_norm(self, train, "branch2_pw1_bn")(right))
    right = conv(self, branch, 3, self.strides, groups=branch, name="branch2_dw_conv")(right)
    right = batch_norm(self, train, "branch2_dw_bn")(right)
    right = conv(self, branch, 1, name="branch2_pw2_conv")(right)
    right = nn.relu(batch_norm(self, train, "branch2_pw2_bn")(right))
    return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleNetV2(nn.Module):
  """ShuffleNetV2 classifier.

  Attributes:
    num_classes: classifier outputs.
    width: one of 0.5, 1.0, 1.5, 2.0 (the x0.5 ... x2.0 models).
    cifar_stem: stride-1 stem convolution and no max pool (for 32x32 inputs).
    dtype: compute dtype; parameters stay float32, logits are returned in float32.
    bn_momentum, bn_epsilon: BatchNorm running-average momentum and epsilon.
  """

  num_classes: int
  width: float = 1.0
  cifar_stem: bool = False
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  channels: Any = None   # per-conv widths, QAT activation quantizer, padding: models/common.py
  act_quant: Any = None
  padding: str = "torch"
  conv_impl: Any = None   # conv gradients: CONV_IMPLS of jcompress.models.common

  def __post_init__(self):
    check_width(self.width, type(self).__name__)
    if self.width not in STAGE_CHANNELS:
      raise ConfigError(
          f"ShuffleNetV2: `width` must be one of {sorted(STAGE_CHANNELS)}, got {self.width!r}"
      )
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    features = {}
    *stage_channels, last_channels = STAGE_CHANNELS[self.width]
    x = jnp.asarray(x, self.dtype)
    x = conv(self, STEM_CHANNELS, 3, 1 if self.cifar_stem else 2, name="stem_conv")(x)
    x = nn.relu(batch_norm(self, train, "stem_bn")(x))
    if not self.cifar_stem:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    features["stem"] = x
    for s, (c, n) in enumerate(zip(stage_channels, STAGE_REPEATS), start=1):
      for b in range(n):
        x = ShuffleUnit(
            features=c,
            strides=2 if b == 0 else 1,
            dtype=self.dtype,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            name=f"stage{s}_block{b}",
        )(x, train)
      features[f"stage{s}"] = x
    x, linear = conv(self, last_channels, 1, name="conv_last")(x, linear=True)
    x = nn.relu(batch_norm(self, train, "bn_last")(x, linear))
    features["conv_last"] = x
    x = global_avg_pool(x)
    features["pre_logits"] = x
    logits = head(self, self.num_classes)(x)
    return jnp.asarray(logits, jnp.float32), features
