"""Binary ResNets (BNN): the residual unit of seed article 001, with k-bit activations.

The model only quantizes activations. Weight binarization is not done here: the block
convolutions are ordinary `nn.Conv` kernels (latent float weights) that a `ParamTransform`
(`jcompress.binary.binary_weights`) replaces by sign(w) before the forward pass. That
transform leaves `stem_conv` and `head` float by default, as the BNN literature does.

Residual unit (`BinaryBasicBlock`), after the seed's `residual_unit(data, num_filter, stride,
dim_match, num_bits)`, where `bnn.BatchNorm(num_bits=...)` is a BatchNorm that also quantizes:

    a1 = Q(bn1(x))                 y = conv2(Q(bn2(conv1(a1))))       (conv1 has the stride)
    out = y + x                                        if the shape is unchanged,
    out = y + shortcut_conv(Q(shortcut_bn(x)))         otherwise (3x3, stride s, binary),

with `Q = quantize_activation(., num_bits)`. There is no ReLU on the binary path: the sign is
the nonlinearity. The output is the plain, real-valued sum, so the identity path carries full
precision information from block to block (as in Bi-Real Net). The projection shortcut is a 3x3
convolution, not 1x1: a 1-bit 1x1 kernel has too little capacity (the seed's advice: avoid 1x1
binary convolutions). The seed feeds the shortcut convolution the main path's `a1`; here the
shortcut has its own BatchNorm (`shortcut_bn`, over the input channels), which costs 2 * C_in
parameters and lets the two paths scale their inputs independently.

Activation quantizer `Q`:

  num_bits = 1       sign(x) in {-1, +1} (sign(0) = +1), gradient g * 1{|x| <= 1} (STE).
  num_bits = k >= 2  the *signed* symmetric quantizer, round(clip(x, -1, 1) * m) / m with
                     m = 2^(k-1) - 1: the 2^k - 1 levels {-1, ..., -1/m, 0, 1/m, ..., 1}
                     (k = 2: {-1, 0, +1}; k = 4: 15 levels), gradient g * 1{|x| <= 1}.
                     The input comes straight out of a BatchNorm, so it is zero-centred;
                     DoReFa's unsigned clip(x, 0, 1) would throw the negative half away (a
                     hidden ReLU) and break continuity with the 1-bit sign, whose levels are
                     also symmetric. Zero is a level, so small activations are exactly 0.

Network (`BNNResNet`): a float stem (`stem_conv` 3x3 stride 1 + `stem_bn` + ReLU with
`cifar_stem=True`; 7x7 stride 2 + BN + ReLU + 3x3/2 max pool otherwise), stages of
`BinaryBasicBlock`s with `num_filters * 2^(s-1)` channels (stride 1 in stage 1, 2 in the first
block of every later stage), then `final_bn` + ReLU, global average pooling and the float
classifier `head`. The stem has `num_filters` channels, so stage 1 never needs a projection.

Features returned beside the logits: `stem`, `stage1` ... `stageN` (the last block's sum),
`pre_logits` (the pooled vector fed to `head`).

Parameter names: `stem_conv`, `stem_bn`, `stage{s}_block{b}` (s from 1, b from 0) holding `bn1`,
`conv1`, `bn2`, `conv2` and, where the shape changes, `shortcut_bn`, `shortcut_conv`; then
`final_bn` and `head`.
"""

from __future__ import annotations

from typing import Any
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jcompress.binary import quantize_activation
from jcompress.errors import ConfigError
from jcompress.models.common import batch_norm
from jcompress.models.common import check_width
from jcompress.models.common import conv
from jcompress.models.common import global_avg_pool
from jcompress.models.common import head
from jcompress.models.common import resnet_stem
from jcompress.models.common import root_field
from jcompress.models.common import scale_channels

#: Values of the `binary_compute` model field (None: "f32").
BINARY_COMPUTE = (None, "auto", "f32", "bf16", "int8", "xnor")


def check_num_bits(num_bits: Any, model: str) -> None:
  """Raises `ConfigError` naming `num_bits` unless it is an int in 1..8."""
  if isinstance(num_bits, bool) or not isinstance(num_bits, (int, np.integer)) or not (
      1 <= num_bits <= 8
  ):
    raise ConfigError(
        f"model {model!r}: `num_bits` (activation bits) must be an integer in 1..8, "
        f"got {num_bits!r}"
    )


def quantize(x: jnp.ndarray, num_bits: int) -> jnp.ndarray:
  """The block's activation quantizer: sign for 1 bit, the symmetric k-bit grid otherwise."""
  return quantize_activation(x, num_bits, signed=num_bits >= 2)


class BinaryBasicBlock(nn.Module):
  """`conv2(Q(bn2(conv1(Q(bn1(x)))))) + shortcut(x)`, binary 3x3 convs, no ReLU.

  The shortcut is the identity, or `shortcut_conv(Q(shortcut_bn(x)))` (3x3, stride `strides`)
  when the stride is not 1 or the channel count changes. See the module docstring.
  """

  features: int
  strides: int = 1
  num_bits: int = 1
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x, train: bool = False):
    # The root model's `binary_compute`: the three convs below see inputs on the grid
    # k / levels (the quantizer's output) and, when it is set, +-1 kernels.
    levels = 1 if self.num_bits == 1 else 2 ** (self.num_bits - 1) - 1
    narrow = (root_field(self, "binary_compute"), levels, self.num_bits > 1)
    y = quantize(batch_norm(self, train, "bn1")(x), self.num_bits)
    y = conv(self, self.features, 3, self.strides, name="conv1", narrow=narrow)(y)
    y = quantize(batch_norm(self, train, "bn2")(y), self.num_bits)
    y = conv(self, self.features, 3, name="conv2", narrow=narrow)(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = quantize(batch_norm(self, train, "shortcut_bn")(x), self.num_bits)
      shortcut = conv(self, self.features, 3, self.strides, name="shortcut_conv",
                      narrow=narrow)(shortcut)
    return y + shortcut


class BNNResNet(nn.Module):
  """Binary ResNet: float stem and head, `BinaryBasicBlock` stages with k-bit activations.

  Attributes:
    num_classes: classifier outputs.
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18, (3, 3, 3) for ResNet-20.
    num_filters: channels of the stem and stage 1; stage s has `num_filters * 2^(s-1)`
      (64 -> 64/128/256/512 for ResNet-18, 16 -> 16/32/64 for ResNet-20), before `width`.
    width: multiplies every channel count (`round(c * width)`, at least 1, as the ResNets).
    num_bits: activation bits inside the blocks, 1..8 (1: sign; k >= 2: symmetric k-bit).
    cifar_stem: 3x3 stride-1 stem and no max pool instead of 7x7/2 + max pool 3x3/2.
    dtype: compute dtype; parameters stay float32, logits are returned in float32.
    bn_momentum, bn_epsilon: BatchNorm running-average momentum and epsilon.
    conv_impl: "auto", "xla", "staged" or "fast" convolution gradients (see
      `jcompress.models.common`).
    binary_compute: how the block convolutions' forward computes (`BINARY_COMPUTE`): "bf16" or
      "int8" (exact narrow products, `fastconv.narrow_conv_general_dilated`) or "xnor" (packed
      sign bits, XOR and popcount, `fastconv.xnor_conv`; 1- and 2-bit activations) when the
      block kernels are +-1, which the model cannot see: `experiment.make_experiment` allows them
      only when the `binary` transform binarizes every block conv with a sign, and resolves
      "auto" (the default) there: bf16 on GPU/TPU, xnor on CPU (1-2 bits), else f32.
      None, "f32" and an unresolved "auto" (the model used outside `make_experiment`):
      float32, as the other layers. The gradients are float32 in every case.
  """

  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  num_filters: int = 64
  width: float = 1.0
  num_bits: int = 1
  cifar_stem: bool = True
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  conv_impl: Any = None
  binary_compute: Any = "auto"

  def __post_init__(self):
    name = type(self).__name__
    check_width(self.width, name)
    check_num_bits(self.num_bits, name)
    if self.binary_compute not in BINARY_COMPUTE:
      raise ConfigError(f"model {name!r}: `binary_compute` must be one of {BINARY_COMPUTE}, "
                        f"got {self.binary_compute!r}")
    if self.binary_compute == "xnor" and self.num_bits > 2:
      raise ConfigError(f"model {name!r}: `binary_compute` 'xnor' computes 1- and 2-bit "
                        f"activations only (-1/+1, -1/0/+1), but `num_bits` is {self.num_bits}; "
                        f"use 'bf16', 'int8', 'f32' or 'auto'")
    if not self.stage_sizes or not all(
        isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1
        for n in self.stage_sizes
    ):
      raise ConfigError(
          f"model {name!r}: `stage_sizes` must be a non-empty sequence of ints >= 1, "
          f"got {self.stage_sizes!r}"
      )
    if isinstance(self.num_filters, bool) or not isinstance(
        self.num_filters, (int, np.integer)
    ) or self.num_filters < 1:
      raise ConfigError(
          f"model {name!r}: `num_filters` must be an int >= 1, got {self.num_filters!r}"
      )
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    features = {}
    x = jnp.asarray(x, self.dtype)
    stem_channels = scale_channels(self.num_filters, self.width)
    x = resnet_stem(self, x, stem_channels, self.cifar_stem, train)
    features["stem"] = x
    for s, blocks in enumerate(self.stage_sizes, start=1):
      channels = scale_channels(self.num_filters * 2 ** (s - 1), self.width)
      for b in range(blocks):
        x = BinaryBasicBlock(
            features=channels,
            strides=2 if (s > 1 and b == 0) else 1,
            num_bits=int(self.num_bits),
            dtype=self.dtype,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            name=f"stage{s}_block{b}",
        )(x, train)
      features[f"stage{s}"] = x
    x = nn.relu(batch_norm(self, train, "final_bn")(x))
    x = global_avg_pool(x)
    features["pre_logits"] = x
    logits = head(self, self.num_classes)(x)
    return jnp.asarray(logits, jnp.float32), features
