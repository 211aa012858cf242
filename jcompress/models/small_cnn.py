"""A small CNN for quick runs and tests.

3x3 conv(32)-BN-ReLU (`stem_conv`, `stem_bn`), 3x3 conv(64, stride 2)-BN-ReLU (`stage1_conv`,
`stage1_bn`), 3x3 conv(128, stride 2)-BN-ReLU (`stage2_conv`, `stage2_bn`), global average
pooling and the classifier `head`. Channel counts are `round(c * width)`, at least 1.

Features returned beside the logits: `stem`, `stage1`, `stage2`, `pre_logits`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jcompress.models.common import batch_norm
from jcompress.models.common import check_width
from jcompress.models.common import conv
from jcompress.models.common import global_avg_pool
from jcompress.models.common import head
from jcompress.models.common import scale_channels


class SmallCNN(nn.Module):
  """Three conv-BN-ReLU layers (32, 64/2, 128/2 channels), average pool, classifier.

  Attributes:
    num_classes: classifier outputs.
    width: multiplies the channel counts.
    dtype: compute dtype; parameters stay float32, logits are returned in float32.
    bn_momentum, bn_epsilon: BatchNorm running-average momentum and epsilon.
  """

  num_classes: int
  width: float = 1.0
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  channels: Any = None   # per-conv widths, QAT activation quantizer, padding: models/common.py
  act_quant: Any = None
  padding: str = "torch"
  conv_impl: Any = None   # conv gradients: CONV_IMPLS of jcompress.models.common

  def __post_init__(self):
    check_width(self.width, type(self).__name__)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    features = {}
    x = jnp.asarray(x, self.dtype)
    x = conv(self, scale_channels(32, self.width), 3, name="stem_conv")(x)
    x = nn.relu(batch_norm(self, train, "stem_bn")(x))
    features["stem"] = x
    for s, c in enumerate((64, 128), start=1):
      x = conv(self, scale_channels(c, self.width), 3, strides=2, name=f"stage{s}_conv")(x)
      x = nn.relu(batch_norm(self, train, f"stage{s}_bn")(x))
      features[f"stage{s}"] = x
    x = global_avg_pool(x)
    features["pre_logits"] = x
    logits = head(self, self.num_classes)(x)
    return jnp.asarray(logits, jnp.float32), features
