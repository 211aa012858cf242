r"""Vision Transformer (Dosovitskiy et al. 2021) with DeiT's distillation token (Touvron et al.
2021), for small and ImageNet-sized images.

The image is cut into non-overlapping `patch_size` x `patch_size` patches, each mapped to a
`D`-vector by one linear map (a convolution with kernel = stride = patch, computed as a
matmul); a learned class token (and, with `distill_token`, a distillation token) is prepended
and learned position embeddings are added. `depth` pre-norm encoder blocks follow:

    x = x + out(MHSA(norm1(x)))           MHSA: softmax(q k^T / sqrt(D / H)) v per head
    x = x + fc2(gelu(fc1(norm2(x))))

then a final LayerNorm (`norm`); the class token's vector is `pre_logits` and goes to `head`
(the distillation token's to `head_dist`). `D = round(embed_dim * width)`, the MLP's hidden
size `round(mlp_dim * width)`; `D` must be a multiple of `num_heads` and the image's height
and width multiples of `patch_size` (ConfigError naming the field otherwise: the first at
construction, the second at the first call, both before anything compiles).

Parameter names (`N` from 1 to depth):

    stem_conv/kernel (p, p, C, D), stem_conv/bias   the patch embedding (HWIO, as a conv)
    stem_conv/cls (1, 1, D), stem_conv/dist         class and distillation tokens
    stem_conv/pos_embedding (1, T, D)               T = patches + 1 (+ 1 with distill_token)
    blockN/norm1, blockN/norm2                      LayerNorm scale, bias
    blockN/attn/query, key, value                   Dense D -> D, kernel (D, D), bias (D,)
    blockN/attn/out                                 Dense D -> D
    blockN/mlp/fc1, blockN/mlp/fc2                  Dense D -> M, M -> D
    norm, head, head_dist                           final LayerNorm and classifiers

The tokens and position embeddings live under `stem_conv` so that the default exclusion of
every compression method (`transforms.DEFAULT_EXCLUDE`: `stem_conv/`, `head/`) keeps the whole
embedding float, as it keeps a CNN's first convolution. Heads are a reshape: head `h` owns
output columns `h*d:(h+1)*d` of `query`, `key` and `value` (d = D / H) and input rows
`h*d:(h+1)*d` of `out`, so pruning a head removes one column block of each of the three and one
row block of `out`. A structurally pruned ViT (`jcompress.structured`) is this class built with
per-block `heads` (each head keeps its width d = D / num_heads) and `mlp_dims`; its
`structured_fields` turns the pruned layers' widths into those fields.

Activation quantization (QAT, root field `act_quant`, `jcompress.actquant`): the input of every
Dense layer inside the blocks passes a quantizer named `<layer>_act` beside it
(`block1/attn/query_act`, ..., `block1/mlp/fc2_act`), the convention `jcompress.intinfer` reads
for integer inference; the patch embedding and the heads stay float. LayerNorm outputs are
signed, so the spec must be LSQ with `signed: True` (PACT and DoReFa clip at 0; refused).
With `quantize_attention`, the per-head queries and keys (`attn/scores_q_act`,
`attn/scores_k_act`, signed) and the softmax probabilities (`attn/probs_act`, unsigned codes
in [0, 2^b - 1]) are quantized too, at the same bits.

Returns `(logits, features)` as every model here: features `stem` (the patch embeddings,
(N, H/p, W/p, D), before tokens and positions), `block1` ... `blockN` (each block's output
tokens, (N, T, D)), `pre_logits` (the class token after `norm`, (N, D)); with
`distill_token` also `dist_logits` (the distillation head's logits, float32). With
`distill_token`, `logits` are the class head's in train mode and the mean of the two heads'
at inference (`train=False`), as DeiT evaluates.
"""

from __future__ import annotations

import math
import numbers
from typing import Any
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jcompress.errors import ConfigError
from jcompress.models.common import check_width
from jcompress.models.common import head

#: Dense kernels: Xavier uniform, biases zero (timm / big_vision ViTs).
dense_kernel_init = nn.initializers.xavier_uniform()


def _check_int(value: Any, key: str, minimum: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    raise ConfigError(f"ViT: `{key}` must be an int >= {minimum}, got {value!r}")


def _spec(module: nn.Module) -> dict | None:
  """The root model's activation quantizer spec as a dict, or None when off."""
  root = module
  while isinstance(root.parent, nn.Module):
    root = root.parent
  spec = getattr(root, "act_quant", None)
  if spec is None or dict(spec).get("kind", "none") == "none":
    return None
  return dict(spec)


def _quantizer(module: nn.Module, name: str, signed: bool = True):
  """The activation quantizer `name` in `module`'s scope (identity when `act_quant` is off).

  `signed=False` gives unsigned LSQ codes (the softmax probabilities)."""
  spec = _spec(module)
  if spec is None:
    return lambda x: x
  from jcompress import actquant  # noqa: PLC0415  (only QAT runs need it)

  if not signed:
    spec = {k: v for k, v in spec.items() if k != "signed"}
  return actquant.make_quantizer(spec, name=name)


def dense(module: nn.Module, features: int, name: str):
  """`nn.Dense(features, name=name)` (Xavier uniform kernel, zero bias, the module's dtype)
  whose input first passes the activation quantizer `<name>_act`, if any. Call inside a
  compact method; returns a function of the input."""
  quantizer = _quantizer(module, f"{name}_act")
  layer = nn.Dense(features, dtype=module.dtype, param_dtype=jnp.float32,
                   kernel_init=dense_kernel_init, bias_init=nn.initializers.zeros, name=name)
  return lambda x: layer(quantizer(x))


class PatchEmbedding(nn.Module):
  """Patches -> tokens: the linear patch embedding, class (and distillation) tokens, learned
  position embeddings. Returns `(tokens (N, T, D), patch grid (N, H/p, W/p, D))`."""
  features: int
  patch_size: int
  distill_token: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, h, w, c = x.shape
    p = self.patch_size
    if h % p or w % p:
      raise ConfigError(f"ViT: `patch_size` {p} does not divide the image size {h}x{w} "
                        "(model field patch_size; config key image_size)")
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    gh, gw = h // p, w // p
    # (N, gh, p, gw, p, C) -> (N, gh, gw, p, p, C): a VALID stride-p convolution as one matmul.
    patches = x.reshape(n, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
    grid = jnp.einsum("nijabc,abcd->nijd", patches, kernel.astype(self.dtype))
    grid = grid + bias.astype(self.dtype)
    tokens = [jnp.broadcast_to(self.param("cls", nn.initializers.zeros, (1, 1, self.features),
                                          jnp.float32).astype(self.dtype),
                               (n, 1, self.features))]
    if self.distill_token:
      dist = self.param("dist", nn.initializers.truncated_normal(0.02), (1, 1, self.features),
                        jnp.float32)
      tokens.append(jnp.broadcast_to(dist.astype(self.dtype), (n, 1, self.features)))
    seq = jnp.concatenate([*tokens, grid.reshape(n, gh * gw, self.features)], axis=1)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, seq.shape[1],
                                                                     self.features), jnp.float32)
    return seq + pos.astype(self.dtype), grid


class SelfAttention(nn.Module):
  """Multi-head self-attention with separate `query`, `key`, `value` and `out` Dense layers;
  heads are a reshape of their `num_heads * head_dim` features (module docstring). `head_dim`
  0 means D / num_heads (a pruned block keeps the unpruned head width with fewer heads)."""
  num_heads: int
  quantize_attention: bool = False
  dropout: float = 0.0
  dtype: Any = jnp.float32
  head_dim: int = 0

  @nn.compact
  def __call__(self, x, train: bool = False):
    n, t, d = x.shape
    h = self.num_heads
    hd = self.head_dim or d // h
    q, k, v = (dense(self, h * hd, name)(x).reshape(n, t, h, hd)
               for name in ("query", "key", "value"))
    if self.quantize_attention:
      q = _quantizer(self, "scores_q_act")(q)
      k = _quantizer(self, "scores_k_act")(k)
    scores = jnp.einsum("nqhd,nkhd->nhqk", q, k).astype(jnp.float32) / math.sqrt(hd)
    probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
    if self.quantize_attention:
      probs = _quantizer(self, "probs_act", signed=False)(probs)
    probs = nn.Dropout(self.dropout, deterministic=not train)(probs)
    y = jnp.einsum("nhqk,nkhd->nqhd", probs, v).reshape(n, t, h * hd)
    return dense(self, d, "out")(y)


class Mlp(nn.Module):
  """fc1 (D -> M), GELU, fc2 (M -> D)."""
  hidden: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    d = x.shape[-1]
    y = nn.gelu(dense(self, self.hidden, "fc1")(x), approximate=False)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    return dense(self, d, "fc2")(y)


class EncoderBlock(nn.Module):
  """Pre-norm block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`."""
  num_heads: int
  mlp_hidden: int
  quantize_attention: bool = False
  dropout: float = 0.0
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  head_dim: int = 0

  @nn.compact
  def __call__(self, x, train: bool = False):
    def norm(name):
      return nn.LayerNorm(epsilon=self.epsilon, dtype=self.dtype, param_dtype=jnp.float32,
                          name=name)

    y = SelfAttention(self.num_heads, self.quantize_attention, self.dropout, self.dtype,
                      self.head_dim, name="attn")(norm("norm1")(x), train)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = Mlp(self.mlp_hidden, self.dropout, self.dtype, name="mlp")(norm("norm2")(x), train)
    return x + nn.Dropout(self.dropout, deterministic=not train)(y)


class ViT(nn.Module):
  """Vision Transformer; DeiT's distillation token with `distill_token` (module docstring).

  Attributes:
    num_classes: classifier outputs.
    embed_dim: token width D before the width multiplier (DeiT-Ti 192, -S 384, ViT-B 768).
    depth: number of encoder blocks.
    num_heads: attention heads; must divide round(embed_dim * width).
    mlp_dim: the MLP's hidden size before the width multiplier (usually 4 * embed_dim).
    patch_size: side of the square patches; must divide the image's height and width.
    width: multiplies embed_dim and mlp_dim (rounded), as the CNNs' width multiplier.
    distill_token: add DeiT's distillation token and its classifier `head_dist`.
    quantize_attention: with `act_quant`, also quantize q, k and the softmax probabilities.
    dropout: dropout rate on attention probabilities and block outputs (train mode only).
    layer_norm_epsilon: LayerNorm epsilon (1e-6, as timm and big_vision).
    dtype: compute dtype; parameters stay float32, logits are returned in float32.
    act_quant: the activation quantizer spec of QAT (`jcompress.actquant`; LSQ, signed).
    heads: per-block head counts (a tuple of `depth` ints >= 1), or None: `num_heads` in every
      block. Each head keeps the width D / num_heads, so a block with fewer heads has narrower
      query, key and value layers (a structurally pruned ViT, `jcompress.structured`).
    mlp_dims: per-block MLP hidden sizes (a tuple of `depth` ints >= 1, absolute: `width` does
      not scale them), or None: round(mlp_dim * width) in every block.
  """

  num_classes: int
  embed_dim: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_dim: int = 768
  patch_size: int = 16
  width: float = 1.0
  distill_token: bool = False
  quantize_attention: bool = False
  dropout: float = 0.0
  layer_norm_epsilon: float = 1e-6
  dtype: Any = jnp.float32
  act_quant: Any = None
  heads: Any = None
  mlp_dims: Any = None

  def __post_init__(self):
    check_width(self.width, type(self).__name__)
    for key in ("embed_dim", "depth", "num_heads", "mlp_dim", "patch_size"):
      _check_int(getattr(self, key), key)
    for key in ("heads", "mlp_dims"):
      # JSON (a run's config.json) gives lists: Flax fields must be hashable tuples.
      object.__setattr__(self, key, self._per_block(key))
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f"ViT: `dropout` must be in [0, 1), got {self.dropout!r}")
    dim = self.dim
    if dim % self.num_heads:
      raise ConfigError(
          f"ViT: `num_heads` {self.num_heads} does not divide the token width {dim} "
          f"(embed_dim {self.embed_dim} x width {self.width}); choose num_heads dividing it "
          "or another width")
    if self.act_quant is not None:
      from jcompress import actquant  # noqa: PLC0415

      spec = actquant.check_spec(self.act_quant)
      kind = spec.get("kind", "none")
      if kind in ("pact", "dorefa"):
        raise ConfigError(
            f"config key 'model_kwargs.act_quant.kind': {kind!r} clips activations to [0, "
            "alpha], but a ViT's Dense inputs (LayerNorm outputs) are signed; use kind 'lsq' "
            "with signed: True")
      if kind == "lsq" and not spec.get("signed", False):
        raise ConfigError(
            "config key 'model_kwargs.act_quant.signed': a ViT's Dense inputs (LayerNorm "
            "outputs) are signed; set signed: True for the 'lsq' quantizer")
    super().__post_init__()

  def _per_block(self, key: str) -> tuple | None:
    value = getattr(self, key)
    if value is None:
      return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
      raise ConfigError(f"ViT: model field `{key}` must be a tuple of {self.depth} ints (one per "
                        f"block) or None, got {value!r}")
    value = tuple(value)
    if len(value) != self.depth:
      raise ConfigError(f"ViT: model field `{key}` has {len(value)} entries for {self.depth} "
                        "blocks (depth)")
    for i, n in enumerate(value):
      if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        what = "attention heads" if key == "heads" else "MLP hidden units"
        raise ConfigError(f"ViT: model field `{key}`: block{i + 1} must keep at least one of "
                          f"its {what} (an int >= 1), got {n!r}")
    return tuple(int(n) for n in value)

  @property
  def dim(self) -> int:
    """The token width D = round(embed_dim * width)."""
    return max(1, int(round(self.embed_dim * self.width)))

  @property
  def head_dim(self) -> int:
    """The width of one head, D / num_heads (also in a pruned model with fewer heads)."""
    return self.dim // self.num_heads

  @property
  def hidden(self) -> int:
    """The unpruned MLP hidden size round(mlp_dim * width)."""
    return max(1, int(round(self.mlp_dim * self.width)))

  def structured_fields(self, widths: Mapping[str, int]) -> dict:
    """The model fields (`heads`, `mlp_dims`) that build this ViT with the given output widths
    of its Dense layers ({module path: width}, e.g. `block1/attn/query`: 32), the protocol
    `jcompress.structured` uses to build a model from pruned widths. Raises ConfigError naming
    the field when a block would keep no head or no MLP unit, or a width that is not whole
    heads."""
    hd = self.head_dim
    heads, mlp = [], []
    for i in range(1, self.depth + 1):
      qkv = {widths.get(f"block{i}/attn/{n}", self._block_heads(i) * hd)
             for n in ("query", "key", "value")}
      w = qkv.pop() if len(qkv) == 1 else None
      if w is None or w % hd:
        raise ConfigError(f"ViT: model field `heads`: block{i}'s query, key and value widths "
                          f"{sorted(qkv)} are not one whole number of {hd}-wide heads")
      if w < hd:
        raise ConfigError(f"ViT: model field `heads`: pruning would leave block{i} with no "
                          "attention heads (keep at least one)")
      heads.append(w // hd)
      m = widths.get(f"block{i}/mlp/fc1", self._block_mlp(i))
      if m < 1:
        raise ConfigError(f"ViT: model field `mlp_dims`: pruning would leave block{i}'s MLP "
                          "with no hidden units (keep at least one)")
      mlp.append(int(m))
    return {"heads": tuple(heads), "mlp_dims": tuple(mlp)}

  def _block_heads(self, i: int) -> int:
    return self.heads[i - 1] if self.heads is not None else self.num_heads

  def _block_mlp(self, i: int) -> int:
    return self.mlp_dims[i - 1] if self.mlp_dims is not None else self.hidden

  @nn.compact
  def __call__(self, x, train: bool = False):
    features = {}
    d = self.dim
    x = jnp.asarray(x, self.dtype)
    x, grid = PatchEmbedding(d, self.patch_size, self.distill_token, self.dtype,
                             name="stem_conv")(x)
    features["stem"] = grid
    for i in range(1, self.depth + 1):
      x = EncoderBlock(self._block_heads(i), self._block_mlp(i), self.quantize_attention,
                       self.dropout, self.layer_norm_epsilon, self.dtype, self.head_dim,
                       name=f"block{i}")(x, train)
      features[f"block{i}"] = x
    x = nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype,
                     param_dtype=jnp.float32, name="norm")(x)
    features["pre_logits"] = x[:, 0]
    logits = jnp.asarray(head(self, self.num_classes)(x[:, 0]), jnp.float32)
    if self.distill_token:
      dist = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                      name="head_dist")(x[:, 1])
      dist = jnp.asarray(dist, jnp.float32)
      features["dist_logits"] = dist
      if not train:
        logits = (logits + dist) / 2
    return logits, features
