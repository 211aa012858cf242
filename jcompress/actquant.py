r"""Activation quantizers for quantization-aware training (QAT): DoReFa, PACT and LSQ.

Models take an activation quantizer spec as their root field `act_quant` (config key
`model_kwargs.act_quant`, e.g. `{"kind": "pact", "bits": 4}`); `models/common.py:conv` calls
`make_quantizer(spec, name=f"{conv_name}_act")` inside the parent module's compact scope and
applies the result to the input of every convolution but `stem_conv`. The quantizer's params
land beside the conv, e.g. `stage1_block0/conv1_act/alpha`. With `n = 2^k - 1` for `k` bits:

* "dorefa" (DoReFa-Net, Zhou et al. 2016): no params,

    y = round(clip(x, 0, 1) * n) / n,         dy/dx = 1{0 <= x <= 1}  (straight-through).

* "pact" (PACT, Choi et al. 2018): a learnable clip level `alpha` (param "alpha", init
  `spec["init"]`, default 6.0),

    y = round(clip(x, 0, alpha) * n / alpha) * alpha / n,
    dy/dx = 1{0 <= x < alpha},               dy/dalpha = 1{x >= alpha}

  (the straight-through estimate of the rounding, the paper's eq. 2-3). PACT regularises
  alpha with an L2 penalty; `pact_alpha_l2(params)` gives sum(alpha^2) to add to the loss.

* "lsq" (LSQ, Esser et al. 2020): a learnable step `s` (param "step"), codes in
  `[Q_n, Q_p]` = `[0, 2^k - 1]` (default, for the non-negative post-ReLU inputs of a ResNet's
  convs) or `[-2^(k-1), 2^(k-1) - 1]` with `spec["signed"]`; with `v = x / s`,

    y = round(clip(v, Q_n, Q_p)) * s,
    dy/dx = 1{Q_n < v < Q_p},
    dy/ds = (round(v) - v) if Q_n < v < Q_p, Q_n if v <= Q_n, Q_p if v >= Q_p,

  and the step's gradient is multiplied by `g = 1 / sqrt(N * Q_p)`, `N` the number of features
  of the layer per example (H * W * C of the quantizer's input). The step is initialised from
  data, as LSQ does (`s = 2 mean|x| / sqrt(Q_p)` on the first batch): `calibrate(model, params,
  batch_stats, batches)` sets every LSQ step from the float inputs the quantizers see on
  `batches`; the `quant` transform's `calibrate` hook calls it on a fresh run (see
  `jcompress.quantize.transform_from_config`). Before calibration the step is `spec["init"]`
  (default `4 / Q_p`: the range [0, 4] of a BatchNorm-ReLU activation).

* "none": the identity.

Signed inputs (`signed`): a MobileNetV2's expand convolutions and `conv_last` read the linear
bottleneck (no ReLU before them), whose values are negative as often as positive; an unsigned
grid would clip them all to 0. There the quantizers are signed and symmetric, with `n = 2^(k-1)
- 1` levels each side: PACT `round(clip(x, -alpha, alpha) n / alpha) alpha / n` (dy/dalpha:
+1 above alpha, -1 below -alpha), DoReFa `round(clip(x, -1, 1) n) / n`, LSQ codes in
`[-2^(k-1), 2^(k-1) - 1]`. The models ask for it per convolution (`models.common.conv`'s
`signed_input`); `signed` in the spec makes every quantizer signed.

Spec keys: `kind`, `bits` (1..8; 2..8 when signed), `init`, `signed`, `calibrate` (PACT: also
set alpha from data, the MSE-optimal clip of the k-bit grid; LSQ always calibrates). Errors
name the config key `model_kwargs.act_quant.<key>`.
"""

from __future__ import annotations

import functools
import math
from typing import Any
from typing import Callable
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jcompress.errors import ConfigError

PyTree = Any

KINDS = ("none", "dorefa", "pact", "lsq")
SPEC_KEYS = ("kind", "bits", "init", "signed", "calibrate")
_KEY = "model_kwargs.act_quant"
_TINY = 1e-8    # alpha and step are kept >= this in the forward pass


# ----------------------------------------------------------------------------- pure functions


def levels(bits: int, signed: bool = False) -> float:
  """Levels above zero of a k-bit PACT / DoReFa grid: 2^k - 1, or 2^(k-1) - 1 when signed."""
  return float(2 ** (bits - 1) - 1 if signed else 2 ** bits - 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def dorefa_quantize(x: jax.Array, bits: int, signed: bool = False) -> jax.Array:
  """DoReFa-Net's k-bit activation: round(clip(x, 0, 1) * n) / n, n = 2^bits - 1 (STE);
  signed: round(clip(x, -1, 1) * n) / n, n = 2^(bits-1) - 1."""
  n = levels(bits, signed)
  return (jnp.round(jnp.clip(x, -1.0 if signed else 0.0, 1) * n) / n).astype(x.dtype)


def _dorefa_fwd(x, bits, signed):
  return dorefa_quantize(x, bits, signed), x


def _dorefa_bwd(bits, signed, x, g):
  del bits
  return (jnp.where((x >= (-1 if signed else 0)) & (x <= 1), g, jnp.zeros_like(g)),)


dorefa_quantize.defvjp(_dorefa_fwd, _dorefa_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def pact_quantize(x: jax.Array, alpha: jax.Array, bits: int, signed: bool = False) -> jax.Array:
  """PACT: round(clip(x, 0, alpha) * n / alpha) * alpha / n, n = 2^bits - 1; signed:
  clip(x, -alpha, alpha), n = 2^(bits-1) - 1.

  Gradients: dy/dx = 1{0 <= x < alpha} (signed: -alpha < x < alpha); dL/dalpha = sum of dL/dy
  where x >= alpha (signed: minus the sum where x <= -alpha).
  """
  scale = alpha / levels(bits, signed)
  lo = -alpha if signed else 0
  return (jnp.round(jnp.clip(x, lo, alpha) / scale) * scale).astype(x.dtype)


def _pact_fwd(x, alpha, bits, signed):
  return pact_quantize(x, alpha, bits, signed), (x, alpha)


def _pact_bwd(bits, signed, res, g):
  del bits
  x, alpha = res
  zero = jnp.zeros_like(g)
  lo_inside = (x > -alpha) if signed else (x >= 0)
  dx = jnp.where(lo_inside & (x < alpha), g, zero)
  up = jnp.where(x >= alpha, g, zero)
  if signed:
    up = up - jnp.where(x <= -alpha, g, zero)
  dalpha = jnp.sum(up, dtype=jnp.float32).astype(alpha.dtype)
  return dx, jnp.reshape(dalpha, jnp.shape(alpha))


pact_quantize.defvjp(_pact_fwd, _pact_bwd)


def lsq_code_range(bits: int, signed: bool) -> tuple[int, int]:
  """(Q_n, Q_p): `[0, 2^b - 1]`, or `[-2^(b-1), 2^(b-1) - 1]` when signed."""
  if signed:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
  return 0, 2 ** bits - 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def lsq_quantize(x: jax.Array, step: jax.Array, bits: int, signed: bool = False,
                 grad_scale: float = 1.0) -> jax.Array:
  """LSQ: round(clip(x / s, Q_n, Q_p)) * s, with the LSQ gradients (module docstring).

  `grad_scale` multiplies the step's gradient (LSQ's g = 1 / sqrt(N Q_p)).
  """
  q_n, q_p = lsq_code_range(bits, signed)
  return (jnp.round(jnp.clip(x / step, q_n, q_p)) * step).astype(x.dtype)


def _lsq_fwd(x, step, bits, signed, grad_scale):
  return lsq_quantize(x, step, bits, signed, grad_scale), (x, step)


def _lsq_bwd(bits, signed, grad_scale, res, g):
  x, step = res
  q_n, q_p = lsq_code_range(bits, signed)
  v = x / step
  inside = (v > q_n) & (v < q_p)
  dx = jnp.where(inside, g, jnp.zeros_like(g))
  dv = jnp.where(v <= q_n, float(q_n), jnp.where(v >= q_p, float(q_p), jnp.round(v) - v))
  ds = jnp.sum((g * dv).astype(jnp.float32)) * grad_scale
  return dx, jnp.reshape(ds, jnp.shape(step)).astype(step.dtype)


lsq_quantize.defvjp(_lsq_fwd, _lsq_bwd)


def lsq_init_step(x: jax.Array, bits: int, signed: bool = False) -> jax.Array:
  """LSQ's data-dependent initial step: 2 mean|x| / sqrt(Q_p)."""
  _, q_p = lsq_code_range(bits, signed)
  return 2.0 * jnp.mean(jnp.abs(x.astype(jnp.float32))) / math.sqrt(q_p)


def pact_init_alpha(x: jax.Array, bits: int, num_candidates: int = 100,
                    signed: bool = False) -> jax.Array:
  """The clip level alpha in {max(x) r : r = 1/K, ..., 1} minimising the MSE of the k-bit PACT
  quantizer on the values `x` (the first minimum on ties); signed: of the symmetric quantizer,
  over max |x|."""
  x = x.astype(jnp.float32).reshape(-1)
  if not signed:
    x = jnp.maximum(x, 0.0)
  m = jnp.maximum(jnp.max(jnp.abs(x)), _TINY)
  ratios = jnp.arange(1, num_candidates + 1, dtype=jnp.float32) / num_candidates
  n = levels(bits, signed)

  def err(r):
    scale = r * m / n
    q = jnp.clip(x, -r * m if signed else 0.0, r * m)
    return jnp.mean(jnp.square(jnp.round(q / scale) * scale - x))

  errs = jax.lax.map(err, ratios)
  return ratios[jnp.argmin(errs)] * m


# ----------------------------------------------------------------------------- modules


class DoReFa(nn.Module):
  """DoReFa-Net k-bit activations: round(clip(x, 0, 1) * n) / n, straight-through (signed:
  on [-1, 1])."""
  bits: int = 4
  signed: bool = False

  @nn.compact
  def __call__(self, x):
    return dorefa_quantize(x, self.bits, self.signed)


class PACT(nn.Module):
  """PACT: a learnable clip level `alpha` and k-bit uniform levels on [0, alpha] (signed:
  symmetric on [-alpha, alpha])."""
  bits: int = 4
  init_value: float = 6.0
  signed: bool = False

  @nn.compact
  def __call__(self, x):
    alpha = self.param("alpha", nn.initializers.constant(self.init_value), (), jnp.float32)
    alpha = jnp.maximum(alpha, _TINY).astype(x.dtype)
    return pact_quantize(x, alpha, self.bits, self.signed)


class LSQ(nn.Module):
  """LSQ: a learnable step `s`, codes in [Q_n, Q_p], the step's gradient scaled by
  1 / sqrt(N Q_p), N = features per example."""
  bits: int = 4
  init_value: float | None = None
  signed: bool = False

  def default_init(self) -> float:
    return 4.0 / lsq_code_range(self.bits, self.signed)[1]

  @nn.compact
  def __call__(self, x):
    init = self.default_init() if self.init_value is None else self.init_value
    step = self.param("step", nn.initializers.constant(init), (), jnp.float32)
    step = jnp.maximum(step, _TINY).astype(x.dtype)
    n_features = int(np.prod(x.shape[1:])) if x.ndim > 1 else int(x.size)
    q_p = lsq_code_range(self.bits, self.signed)[1]
    return lsq_quantize(x, step, self.bits, self.signed, 1.0 / math.sqrt(n_features * q_p))


def _identity(x):
  return x


def check_spec(spec: Any) -> dict:
  """The spec as a dict, checked: known keys, a known kind, bits an int in 1..8, init > 0."""
  if spec is None:
    return {"kind": "none"}
  try:
    spec = dict(spec)
  except (TypeError, ValueError):
    raise ConfigError(f"config key '{_KEY}': expected a dict like {{'kind': 'pact', 'bits': 4}}, "
                      f"got {spec!r}") from None
  for key in spec:
    if key not in SPEC_KEYS:
      raise ConfigError(f"config key '{_KEY}.{key}': unknown key; an activation quantizer spec "
                        f"takes {', '.join(SPEC_KEYS)}")
  kind = spec.get("kind", "none")
  if kind not in KINDS:
    raise ConfigError(f"config key '{_KEY}.kind': unknown activation quantizer {kind!r}; "
                      f"known: {', '.join(KINDS)}")
  if kind == "none":
    return spec
  bits = spec.get("bits")
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
    raise ConfigError(f"config key '{_KEY}.bits': activation bits must be an integer in 1..8, "
                      f"got {bits!r}")
  init = spec.get("init")
  if init is not None and (isinstance(init, bool) or not isinstance(init, (int, float))
                           or not init > 0):
    raise ConfigError(f"config key '{_KEY}.init': must be a number > 0, got {init!r}")
  if spec.get("signed", False) and bits < 2:
    raise ConfigError(f"config key '{_KEY}.bits': a signed activation quantizer needs at least "
                      f"2 bits, got {bits!r}")
  return spec


def make_quantizer(spec: Any, name: str | None = None) -> Callable[[jax.Array], jax.Array]:
  """The activation quantizer of `spec` (a dict: kind, bits, ...; see the module docstring).

  Call inside a `@nn.compact` method: the returned Flax module is created in the caller's
  scope with `name`, so its params sit beside the caller's other submodules. Kind "none"
  (or a None spec) gives the identity function.

  Raises:
    ConfigError: an unknown kind (the message lists the known ones), bits outside 1..8
      (naming `model_kwargs.act_quant.bits`), an unknown spec key.
  """
  spec = check_spec(spec)
  kind = spec["kind"]
  if kind == "none":
    return _identity
  bits = int(spec["bits"])
  signed = bool(spec.get("signed", False))
  if kind == "dorefa":
    return DoReFa(bits=bits, signed=signed, name=name)
  if kind == "pact":
    return PACT(bits=bits, init_value=float(spec.get("init", 6.0)), signed=signed, name=name)
  init = spec.get("init")
  return LSQ(bits=bits, init_value=None if init is None else float(init), signed=signed,
             name=name)


# ----------------------------------------------------------------------------- tree helpers


def _quantizer_leaves(params: PyTree, leaf_name: str) -> dict[str, Any]:
  from jcompress import transforms  # noqa: PLC0415

  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    p = transforms.path_str(path)
    parts = p.split("/")
    if len(parts) >= 2 and parts[-1] == leaf_name and parts[-2].endswith("_act"):
      out[p] = leaf
  return out


def pact_alpha_l2(params: PyTree) -> jax.Array:
  """sum(alpha^2) over every PACT quantizer's `alpha` in `params` (PACT's L2 regulariser;
  the train loss adds `lambda * pact_alpha_l2(params)`). 0 when there is none."""
  alphas = list(_quantizer_leaves(params, "alpha").values())
  if not alphas:
    return jnp.zeros((), jnp.float32)
  return sum(jnp.sum(jnp.square(a)) for a in alphas)


def quantizer_params(params: PyTree) -> dict[str, Any]:
  """{path: value} of the activation quantizers' params (`.../<conv>_act/alpha|step`)."""
  return {**_quantizer_leaves(params, "alpha"), **_quantizer_leaves(params, "step")}


def needs_calibration(spec: Any) -> bool:
  """Whether `calibrate` sets params for this spec: LSQ always, PACT with `calibrate`."""
  spec = check_spec(spec)
  return spec["kind"] == "lsq" or (spec["kind"] == "pact" and bool(spec.get("calibrate", False)))


def collect_inputs(model: nn.Module, variables: dict, images: jax.Array,
                   fn: Callable[[nn.Module, jax.Array], Any]) -> dict[str, Any]:
  """{quantizer path: fn(quantizer, x)} for the float input `x` of every activation quantizer
  of `model` on `images` (eval mode). The quantizers pass their inputs through unchanged
  while collecting, so each sees the float network's activations."""
  found: dict[str, Any] = {}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, (PACT, LSQ, DoReFa)) and context.method_name == "__call__":
      found["/".join(module.scope.path)] = fn(module, args[0])
      return args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply(variables, images, train=False)
  return found


def calibrate(model: nn.Module, params: PyTree, batch_stats: PyTree,
              batches: Sequence[dict]) -> PyTree:
  """Data-dependent initialisation of the activation quantizers' params; returns new params.

  For each LSQ quantizer, `step = 2 mean|x| / sqrt(Q_p)` (LSQ's init) with mean|x| over the
  float inputs it sees on `batches` (averaged over batches); for each PACT quantizer of a spec
  with `calibrate`, `alpha` = the mean over batches of `pact_init_alpha` (the MSE-optimal clip).
  Other leaves are returned as they are; `params` is not modified.
  """
  spec = check_spec(getattr(model, "act_quant", None))
  if not needs_calibration(spec) or not batches:
    return params

  def stat(module, x):
    if isinstance(module, LSQ):
      return lsq_init_step(x, module.bits, module.signed)
    if isinstance(module, PACT):
      return pact_init_alpha(x, module.bits, signed=module.signed)
    return jnp.zeros((), jnp.float32)

  @jax.jit
  def one(p, bs, images):
    return collect_inputs(model, {"params": p, "batch_stats": bs}, images, stat)

  totals: dict[str, Any] = {}
  for batch in batches:
    for path, v in one(params, batch_stats, batch["image"]).items():
      totals[path] = totals.get(path, 0.0) + v
  values = {f"{path}/{'step' if spec['kind'] == 'lsq' else 'alpha'}": v / len(batches)
            for path, v in totals.items()}

  from jcompress import transforms  # noqa: PLC0415

  def set_leaf(path, leaf):
    if path in values:
      return jnp.asarray(values[path], leaf.dtype).reshape(leaf.shape)
    return leaf

  return transforms.map_with_path(set_leaf, params)
