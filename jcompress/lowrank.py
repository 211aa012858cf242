r"""Low-rank factorization of Dense and Conv layers: truncated SVD, Jaderberg's spatial scheme,
Tucker-2; and a real Flax model in which each factorized layer is two (or three) smaller ones.

Kernels are HWIO for convolutions (`W[h, w, c, o]`, k_h x k_w, C_in -> C_out) and (in, out) for
Dense. Methods (r: rank):

* `svd` (Dense; and conv "channel" decomposition, Zhang et al. 2015):
      W (in, out) ~ A (in, r) @ B (r, out),   W = U S V^T,  A = U_r S_r^{1/2},  B = S_r^{1/2} V_r^T.
  A conv kernel is reshaped to M = W.reshape(k_h k_w C_in, C_out): a k_h x k_w conv C_in -> r
  (with the layer's strides and padding) followed by a 1x1 conv r -> C_out.
  Parameters: r (k_h k_w C_in + C_out); max rank min(k_h k_w C_in, C_out).
* `spatial` (Jaderberg et al. 2014, scheme 2, initialised by SVD as in Tai et al. 2016):
      M[(h, c), (w, o)] = W[h, w, c, o],   M (k_h C_in, k_w C_out) ~ U_r S_r V_r^T
      V[h, 0, c, r] = (U_r S_r^{1/2})[(h, c), r]      a k_h x 1 conv C_in -> r
      H[0, w, r, o] = (S_r^{1/2} V_r^T)[r, (w, o)]    a 1 x k_w conv r -> C_out
  The vertical conv takes the layer's vertical stride and padding, the horizontal one the
  horizontal ones, so a full-rank factorization reproduces the layer exactly.
  Parameters: r (k_h C_in + k_w C_out); max rank min(k_h C_in, k_w C_out).
* `tucker` (Tucker-2, Kim et al. 2016; HOSVD initialisation):
      W ~ G x_3 U_in x_4 U_out,   U_in (C_in, r1), U_out (C_out, r2): the leading left singular
      vectors of the mode-3 / mode-4 unfoldings of W;  G = W x_3 U_in^T x_4 U_out^T (kh,kw,r1,r2);
  computed as a 1x1 conv C_in -> r1, the k_h x k_w core conv r1 -> r2 (strides, padding), a 1x1
  conv r2 -> C_out. Parameters: C_in r1 + k_h k_w r1 r2 + r2 C_out; max ranks
  (min(C_in, k_h k_w C_out), min(C_out, k_h k_w C_in)).

Dense layers and 1x1 convolutions are matrices: they are factorized by SVD whatever the method.

Rank per layer: a fixed `rank` (r1 = r2 = rank for Tucker); the smallest rank keeping a fraction
`energy` of the spectral energy, `sum_{i<r} s_i^2 >= energy * sum_i s_i^2` (per mode for Tucker);
or `param_fraction`, the largest rank whose factors hold at most that fraction of the layer's
parameters (Tucker: r1 / C_in = r2 / C_out as nearly as integers allow).

`Factorized(base, plan)` is a Flax module that runs `base` with `flax.linen.intercept_methods`
replacing the `__call__` of each planned `nn.Conv` / `nn.Dense` (matched by module path,
`stage2_block0/conv1`) by the factorized computation: the factor kernels are parameters of that
module (`kernel_in`/`kernel_out`, `kernel_v`/`kernel_h`, `kernel_in`/`kernel_core`/`kernel_out`)
and its `kernel` is never created. It shares `base`'s scope, so every other parameter keeps its
path. `factorized_model(model, params, cfg)` builds the plan, the factorized params and the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any
from typing import Mapping
from typing import Sequence

import flax
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jcompress import transforms as transforms_lib
from jcompress.errors import ConfigError

PyTree = Any

METHODS = ("svd", "spatial", "tucker")

#: Leaf names of the factors per method (a matrix layer always uses the `svd` names).
FACTOR_NAMES = {
    "svd": ("kernel_in", "kernel_out"),
    "spatial": ("kernel_v", "kernel_h"),
    "tucker": ("kernel_in", "kernel_core", "kernel_out"),
}

#: Fields of the top-level model that `jcompress.models.common.root_field` reads; `Factorized`
#: forwards them from its base model so that the convolutions see them unchanged.
ROOT_FIELDS = ("channels", "act_quant", "padding", "stride_in_1x1")


def default_config() -> ml_collections.ConfigDict:
  """The `lowrank` sub-config with every key it accepts (set one of rank, energy,
  param_fraction)."""
  c = ml_collections.ConfigDict()
  c.method = "svd"                                   # svd | spatial | tucker
  c.rank = 0                                         # > 0: this rank for every layer
  c.energy = 0.0                                     # in (0, 1]: spectral energy kept per layer
  c.param_fraction = 0.0                             # in (0, 1]: parameter budget per layer
  c.include = (r".*",)                               # regexes over `a/b/kernel` paths
  c.exclude = transforms_lib.DEFAULT_EXCLUDE         # stem_conv and head by default
  return c


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """How one layer is factorized: `path` (module path, `stage2_block0/conv1`), the `method`
  actually used (`svd` for matrices), its `ranks` ((r,) or (r1, r2)) and the original
  `kernel_shape`."""
  path: str
  method: str
  ranks: tuple
  kernel_shape: tuple


# ----------------------------------------------------------------------------- shapes and ranks


def _is_matrix(shape: Sequence[int]) -> bool:
  return len(shape) == 2 or (len(shape) == 4 and shape[0] == 1 and shape[1] == 1)


def effective_method(shape: Sequence[int], method: str) -> str:
  """`method`, or `svd` for a Dense kernel or a 1x1 convolution."""
  if method not in METHODS:
    raise ConfigError(f"config key 'lowrank.method': unknown method {method!r}; choose one of "
                      f"{', '.join(METHODS)}")
  return "svd" if _is_matrix(shape) else method


def _dims(shape):
  """(k_h, k_w, C_in, C_out) of a conv kernel or a Dense kernel (as a 1x1 conv)."""
  if len(shape) == 2:
    return 1, 1, shape[0], shape[1]
  if len(shape) == 4:
    return tuple(shape)
  raise ConfigError(f"lowrank: cannot factorize a kernel of shape {tuple(shape)}")


def max_ranks(shape: Sequence[int], method: str) -> tuple:
  """The largest ranks a layer of kernel `shape` allows (see the module docstring)."""
  method = effective_method(shape, method)
  kh, kw, ci, co = _dims(shape)
  if method == "svd":
    return (min(kh * kw * ci, co),)
  if method == "spatial":
    return (min(kh * ci, kw * co),)
  return (min(ci, kh * kw * co), min(co, kh * kw * ci))


def factor_param_count(shape: Sequence[int], method: str, ranks: Sequence[int]) -> int:
  """Parameters of the factors (biases excluded) of a kernel of `shape` at `ranks`."""
  method = effective_method(shape, method)
  kh, kw, ci, co = _dims(shape)
  if method == "svd":
    (r,) = ranks
    return r * (kh * kw * ci + co)
  if method == "spatial":
    (r,) = ranks
    return r * (kh * ci + kw * co)
  r1, r2 = ranks
  return ci * r1 + kh * kw * r1 * r2 + r2 * co


def _unfoldings(kernel: np.ndarray, method: str) -> list[np.ndarray]:
  """The matrices whose singular values set the ranks (one per rank)."""
  kh, kw, ci, co = _dims(kernel.shape)
  w = np.asarray(kernel, np.float64).reshape(kh, kw, ci, co)
  if method == "svd":
    return [w.reshape(kh * kw * ci, co)]
  if method == "spatial":
    return [w.transpose(0, 2, 1, 3).reshape(kh * ci, kw * co)]
  return [w.transpose(2, 0, 1, 3).reshape(ci, -1), w.transpose(3, 0, 1, 2).reshape(co, -1)]


def spectra(kernel: Any, method: str) -> list[np.ndarray]:
  """Singular values (descending, float64) of the unfolding(s) that `method` truncates."""
  method = effective_method(np.shape(kernel), method)
  return [np.linalg.svd(m, compute_uv=False) for m in _unfoldings(np.asarray(kernel), method)]


def rank_for_energy(singular_values: Sequence[float], energy: float) -> int:
  r"""The smallest r with `sum_{i<r} s_i^2 >= energy * sum_i s_i^2` (s descending)."""
  if not 0.0 < energy <= 1.0:
    raise ConfigError(f"config key 'lowrank.energy': must be in (0, 1], got {energy!r}")
  s2 = np.square(np.asarray(singular_values, np.float64))
  total = s2.sum()
  if total == 0:
    return 1
  kept = np.cumsum(s2) / total
  # A relative slack of 1e-12 so that energy = 1.0 is met despite rounding in the cumsum.
  return int(min(np.argmax(kept >= energy - 1e-12) + 1, len(s2)))


def rank_for_param_fraction(shape: Sequence[int], method: str, fraction: float,
                            layer: str = "") -> tuple:
  """The largest ranks whose factors hold at most `fraction` of the kernel's parameters.

  SVD and spatial: `r = floor(fraction * |W| / cost_per_rank)`, capped at the max rank. Tucker:
  the largest r1 with r2 = max(1, round(r1 C_out / C_in)) within the budget. Raises ConfigError
  when even rank 1 exceeds the budget.
  """
  if not 0.0 < fraction <= 1.0:
    raise ConfigError(f"config key 'lowrank.param_fraction': must be in (0, 1], got {fraction!r}")
  method = effective_method(shape, method)
  budget = fraction * math.prod(shape)
  maxr = max_ranks(shape, method)
  if method in ("svd", "spatial"):
    r = min(int(budget // factor_param_count(shape, method, (1,))), maxr[0])
    best = (r,) if r >= 1 else None
  else:
    _, _, ci, co = _dims(shape)
    best = None
    for r1 in range(1, maxr[0] + 1):
      r2 = min(max(1, round(r1 * co / ci)), maxr[1])
      if factor_param_count(shape, method, (r1, r2)) <= budget:
        best = (r1, r2)
  if best is None:
    raise ConfigError(f"config key 'lowrank.param_fraction': {fraction} of layer {layer!r} "
                      f"(kernel {tuple(shape)}) is less than its rank-1 {method} factors "
                      f"({factor_param_count(shape, method, (1,) * len(maxr))} parameters)")
  return best


# ----------------------------------------------------------------------------- factors


def factorize_kernel(kernel: Any, method: str, ranks: Sequence[int]) -> dict:
  """The factors of one kernel (float32, shapes in the module docstring), from its SVD(s)."""
  shape = tuple(np.shape(kernel))
  method = effective_method(shape, method)
  kh, kw, ci, co = _dims(shape)
  mats = _unfoldings(np.asarray(kernel), method)
  if method in ("svd", "spatial"):
    (r,) = ranks
    u, s, vt = np.linalg.svd(mats[0], full_matrices=False)
    root = np.sqrt(s[:r])
    a, b = u[:, :r] * root, root[:, None] * vt[:r]
    if method == "svd":
      if len(shape) == 2:
        out = {"kernel_in": a, "kernel_out": b}
      else:
        out = {"kernel_in": a.reshape(kh, kw, ci, r), "kernel_out": b.reshape(1, 1, r, co)}
    else:
      out = {"kernel_v": a.reshape(kh, ci, r)[:, None],                  # (kh, 1, ci, r)
             "kernel_h": b.reshape(r, kw, co).transpose(1, 0, 2)[None]}  # (1, kw, r, co)
  else:
    r1, r2 = ranks
    u_in = np.linalg.svd(mats[0], full_matrices=False)[0][:, :r1]
    u_out = np.linalg.svd(mats[1], full_matrices=False)[0][:, :r2]
    w = np.asarray(kernel, np.float64)
    core = np.einsum("hwio,ia,ob->hwab", w, u_in, u_out)
    out = {"kernel_in": u_in[None, None], "kernel_core": core, "kernel_out": u_out.T[None, None]}
  return {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}


def reconstruct_kernel(factors: Mapping[str, Any], method: str) -> np.ndarray:
  """The dense kernel the factors represent (float64 numpy): the inverse of
  `factorize_kernel` up to truncation."""
  f = {k: np.asarray(v, np.float64) for k, v in factors.items()}
  if "kernel_v" in f:
    return np.einsum("hicr,jwro->hwco", f["kernel_v"], f["kernel_h"])
  if "kernel_core" in f:
    return np.einsum("hwab,ia,ob->hwio", f["kernel_core"], f["kernel_in"][0, 0],
                     f["kernel_out"][0, 0].T)
  del method
  a, b = f["kernel_in"], f["kernel_out"]
  if a.ndim == 2:
    return a @ b
  return np.einsum("hwir,ro->hwio", a, b[0, 0])


# ----------------------------------------------------------------------------- plans


def _nested_get(tree: Mapping, path: str) -> Any:
  node = tree
  for part in path.split("/"):
    node = node[part]
  return node


def validate_lowrank(cfg: ml_collections.ConfigDict) -> None:
  """ConfigError naming the key for an unknown key or method, or a bad rank specification
  (exactly one of `rank` > 0, `energy` in (0, 1], `param_fraction` in (0, 1])."""
  known = default_config()
  unknown = sorted(set(cfg.keys()) - set(known.keys()) - {"enabled"})
  if unknown:
    raise ConfigError(f"config key 'lowrank.{unknown[0]}' is unknown; the lowrank sub-config "
                      f"accepts: {', '.join(sorted(known.keys()))}")
  get = lambda k: cfg[k] if k in cfg else known[k]
  effective_method((3, 3, 1, 1), get("method"))
  rank, energy, fraction = get("rank"), get("energy"), get("param_fraction")
  if rank < 0:
    raise ConfigError(f"config key 'lowrank.rank': must be >= 1 (0: unused), got {rank}")
  if energy and not 0.0 < energy <= 1.0:
    raise ConfigError(f"config key 'lowrank.energy': must be in (0, 1], got {energy}")
  if fraction and not 0.0 < fraction <= 1.0:
    raise ConfigError(f"config key 'lowrank.param_fraction': must be in (0, 1], got {fraction}")
  if energy < 0:
    raise ConfigError(f"config key 'lowrank.energy': must be in (0, 1], got {energy}")
  if fraction < 0:
    raise ConfigError(f"config key 'lowrank.param_fraction': must be in (0, 1], got {fraction}")
  n_set = sum(bool(v) for v in (rank, energy, fraction))
  if n_set != 1:
    raise ConfigError("config keys 'lowrank.rank', 'lowrank.energy', 'lowrank.param_fraction': "
                      f"set exactly one of them (got rank={rank}, energy={energy}, "
                      f"param_fraction={fraction})")


def make_plan(params: PyTree, cfg: ml_collections.ConfigDict) -> tuple:
  """The layers to factorize and their ranks, as a tuple of `LayerPlan`s in tree order.

  Selected: `kernel` leaves of 2 (Dense) or 4 (Conv) dimensions whose path matches
  `cfg.include` and not `cfg.exclude` (stem and head by default); conv kernels with one input
  channel are skipped (depthwise convolutions, which this module does not factorize). `params`
  may be abstract (`jax.ShapeDtypeStruct`s) unless ranks come from `energy`.
  """
  validate_lowrank(cfg)
  d = default_config()
  get = lambda k: cfg[k] if k in cfg else d[k]
  method = get("method")
  params = flax.core.unfreeze(params) if isinstance(params, flax.core.FrozenDict) else params
  mask = transforms_lib.select(params, get("include"), get("exclude"), kernels_only=True,
                               key="lowrank.include")
  plans = []
  for path, (leaf, picked) in zip(transforms_lib.leaf_paths(params),
                                  zip(jax.tree.leaves(params), jax.tree.leaves(mask))):
    shape = tuple(np.shape(leaf)) if not hasattr(leaf, "shape") else tuple(leaf.shape)
    if not picked or not path.endswith("/kernel") or len(shape) not in (2, 4):
      continue
    if len(shape) == 4 and shape[2] == 1:
      continue
    layer = path[: -len("/kernel")]
    m = effective_method(shape, method)
    maxr = max_ranks(shape, m)
    if get("rank"):
      ranks = (int(get("rank")),) * len(maxr)
      if any(r > mr for r, mr in zip(ranks, maxr)):
        raise ConfigError(f"config key 'lowrank.rank': {get('rank')} is larger than layer "
                          f"{layer!r} (kernel {shape}, {m}) allows: max rank "
                          f"{maxr if len(maxr) > 1 else maxr[0]}")
    elif get("energy"):
      if isinstance(leaf, jax.ShapeDtypeStruct):
        raise ConfigError("config key 'lowrank.energy': ranks from the spectral energy need "
                          "trained weights (set init_from), not only shapes")
      ranks = tuple(rank_for_energy(s, float(get("energy"))) for s in spectra(leaf, m))
    else:
      ranks = rank_for_param_fraction(shape, m, float(get("param_fraction")), layer)
    plans.append(LayerPlan(layer, m, tuple(int(r) for r in ranks), shape))
  if not plans:
    raise ConfigError(f"config key 'lowrank.include': no Dense or Conv kernel to factorize "
                      f"(include={get('include')}, exclude={get('exclude')})")
  return tuple(plans)


def factorize_params(params: PyTree, plan: Sequence[LayerPlan]) -> dict:
  """A copy of `params` in which each planned layer's `kernel` is replaced by its factors
  (`factorize_kernel`); every other leaf is kept as it is."""
  out = flax.core.unfreeze(params) if isinstance(params, flax.core.FrozenDict) else params
  out = jax.tree.map(lambda x: x, out)   # copy the containers
  for p in plan:
    try:
      module = _nested_get(out, p.path)
    except (KeyError, TypeError):
      raise ConfigError(f"lowrank plan: the params have no layer {p.path!r}") from None
    kernel = module.pop("kernel")
    if tuple(kernel.shape) != tuple(p.kernel_shape):
      raise ConfigError(f"lowrank plan: {p.path!r} has kernel {tuple(kernel.shape)}, the plan "
                        f"was made for {p.kernel_shape}")
    module.update(factorize_kernel(kernel, p.method, p.ranks))
  return out


def plan_summary(plan: Sequence[LayerPlan]) -> dict:
  """Per-layer and total parameter counts: {"layers": {path: {...}}, "original_params",
  "factorized_params", "param_fraction"} (kernels only, biases excluded)."""
  layers, orig, fact = {}, 0, 0
  for p in plan:
    n0 = math.prod(p.kernel_shape)
    n1 = factor_param_count(p.kernel_shape, p.method, p.ranks)
    layers[p.path] = {"method": p.method, "ranks": list(p.ranks), "kernel_shape":
                      list(p.kernel_shape), "original_params": n0, "factorized_params": n1}
    orig, fact = orig + n0, fact + n1
  return {"layers": layers, "original_params": orig, "factorized_params": fact,
          "param_fraction": fact / orig if orig else 1.0}


def plan_to_json(plan: Sequence[LayerPlan]) -> str:
  """The plan as JSON (to store in a workdir: energy-chosen ranks depend on the weights)."""
  return json.dumps([dataclasses.asdict(p) for p in plan])


def plan_from_json(text: str) -> tuple:
  """Inverse of `plan_to_json`."""
  return tuple(LayerPlan(d["path"], d["method"], tuple(d["ranks"]), tuple(d["kernel_shape"]))
               for d in json.loads(text))


# ----------------------------------------------------------------------------- the model


def _pairs(value, n=2):
  if value is None:
    return (1,) * n
  if isinstance(value, int):
    return (value,) * n
  return tuple(value)


def _explicit_padding(padding, x_spatial, kernel_spatial, strides, layer) -> tuple:
  """nn.Conv's `padding` as ((lo, hi), (lo, hi))."""
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ConfigError(f"lowrank: layer {layer!r} has padding {padding!r}; only explicit, "
                        "SAME and VALID padding can be factorized")
    return tuple(lax.padtype_to_pads(x_spatial, kernel_spatial, strides, padding.upper()))
  if isinstance(padding, int):
    return ((padding, padding),) * 2
  return tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)


def _conv(x, kernel, strides, padding, precision):
  return lax.conv_general_dilated(x, kernel, window_strides=strides, padding=padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)


def _factorized_call(module: nn.Module, plan: LayerPlan, x: jax.Array) -> jax.Array:
  """The factorized computation of `module` (an nn.Conv or nn.Dense), creating its factors."""
  shape = plan.kernel_shape
  kh, kw, ci, co = _dims(shape)
  shapes = {
      "svd": ({"kernel_in": (ci, plan.ranks[0]), "kernel_out": (plan.ranks[0], co)}
              if len(shape) == 2 else
              {"kernel_in": (kh, kw, ci, plan.ranks[0]), "kernel_out": (1, 1, plan.ranks[0], co)}),
      "spatial": {"kernel_v": (kh, 1, ci, plan.ranks[0]), "kernel_h": (1, kw, plan.ranks[0], co)},
      "tucker": {"kernel_in": (1, 1, ci, plan.ranks[0]),
                 "kernel_core": (kh, kw, *plan.ranks),
                 "kernel_out": (1, 1, plan.ranks[-1], co)},
  }[plan.method]
  f = {name: module.param(name, module.kernel_init, s, module.param_dtype)
       for name, s in shapes.items()}
  bias = None
  if module.use_bias:
    bias = module.param("bias", module.bias_init, (co,), module.param_dtype)
  dtype = module.dtype or jnp.result_type(x, module.param_dtype)
  x = jnp.asarray(x, dtype)
  f = {k: jnp.asarray(v, dtype) for k, v in f.items()}
  precision = module.precision
  if isinstance(module, nn.Dense):
    y = jnp.matmul(jnp.matmul(x, f["kernel_in"], precision=precision), f["kernel_out"],
                   precision=precision)
  else:
    if x.ndim != 4:
      raise ConfigError(f"lowrank: layer {plan.path!r} receives a {x.ndim}-D input; only NHWC "
                        "convolutions can be factorized")
    if module.feature_group_count != 1 or _pairs(module.kernel_dilation) != (1, 1) or _pairs(
        module.input_dilation) != (1, 1):
      raise ConfigError(f"lowrank: layer {plan.path!r} is a grouped or dilated convolution, "
                        "which cannot be factorized; exclude it with lowrank.exclude")
    strides = _pairs(module.strides)
    pads = _explicit_padding(module.padding, x.shape[1:3], (kh, kw), strides, plan.path)
    if plan.method == "svd":
      y = _conv(x, f["kernel_in"], strides, pads, precision)
      y = jnp.matmul(y, f["kernel_out"][0, 0], precision=precision)
    elif plan.method == "spatial":
      y = _conv(x, f["kernel_v"], (strides[0], 1), (pads[0], (0, 0)), precision)
      y = _conv(y, f["kernel_h"], (1, strides[1]), ((0, 0), pads[1]), precision)
    else:
      # The 1x1 conv commutes with zero padding (no bias), so it may run before the core's.
      y = jnp.matmul(x, f["kernel_in"][0, 0], precision=precision)
      y = _conv(y, f["kernel_core"], strides, pads, precision)
      y = jnp.matmul(y, f["kernel_out"][0, 0], precision=precision)
  if bias is not None:
    y = y + jnp.asarray(bias, dtype)
  return y


class Factorized(nn.Module):
  """`base` with the layers of `plan` replaced by their factorized computations.

  Applied exactly as `base` (same arguments, same `(logits, features)`, same variable tree
  except that each planned layer holds its factors instead of `kernel`). Root fields that the
  convolutions read (`channels`, `act_quant`, `padding`, `stride_in_1x1`) are forwarded from
  `base`. A planned layer that the forward pass never reaches raises ConfigError.
  """
  base: nn.Module
  plan: tuple

  def setup(self):
    nn.share_scope(self, self.base)

  # root_field() reads these on the top-level module (this one).
  @property
  def channels(self):
    return getattr(self.base, "channels", None)

  @property
  def act_quant(self):
    return getattr(self.base, "act_quant", None)

  @property
  def padding(self):
    return getattr(self.base, "padding", None)

  @property
  def stride_in_1x1(self):
    return getattr(self.base, "stride_in_1x1", None)

  def __call__(self, *args, **kwargs):
    by_path = {p.path: p for p in self.plan}
    prefix = len(self.scope.path)
    seen = set()

    def intercept(next_fun, call_args, call_kwargs, context):
      module = context.module
      if context.method_name != "__call__" or not isinstance(module, (nn.Conv, nn.Dense)):
        return next_fun(*call_args, **call_kwargs)
      path = "/".join(module.scope.path[prefix:])
      plan = by_path.get(path)
      if plan is None:
        return next_fun(*call_args, **call_kwargs)
      seen.add(path)
      return _factorized_call(module, plan, call_args[0])

    with nn.intercept_methods(intercept):
      out = self.base(*args, **kwargs)
    missing = sorted(set(by_path) - seen)
    if missing:
      raise ConfigError(f"lowrank: the model has no Conv/Dense layer {missing[0]!r} (planned "
                        "layers must be module paths such as 'stage2_block0/conv1')")
    return out


def factorized_model(model: nn.Module, params: PyTree,
                     cfg: ml_collections.ConfigDict) -> tuple[Factorized, dict]:
  """`(Factorized(model, plan), factorized params)` for the `lowrank` sub-config `cfg`.

  `new_model.init(...)["params"]` has exactly the tree structure and shapes of the returned
  params; BatchNorm statistics are unchanged (reuse the base model's `batch_stats`).
  """
  plan = make_plan(params, cfg)
  return Factorized(model, plan), factorize_params(params, plan)


def transform_from_config(sub_config, params, config) -> transforms_lib.ParamTransform:
  """The ParamTransform of the `lowrank` sub-config (the train loop's method registry).

  Factorization changes the model, not the weights the forward pass sees, so `apply` is the
  identity; this transform reports the factor counts (`metrics`) and exports the params. The
  model itself must be `factorized_model(...)`'s.
  """
  del config
  validate_lowrank(sub_config)
  names = {n for names in FACTOR_NAMES.values() for n in names}

  def factor_count(p):
    return sum(int(np.prod(x.shape)) for path, x in
               zip(transforms_lib.leaf_paths(p), jax.tree.leaves(p))
               if path.rsplit("/", 1)[-1] in names)

  n_factors = factor_count(params)

  def metrics(p, state):
    del p, state
    return {"lowrank_factor_params": float(n_factors)}

  return transforms_lib.ParamTransform(
      init=lambda p, rng: {},
      apply=lambda p, state: p,
      update=lambda p, state, step: (p, state),
      export=lambda p, state: {"params": p},
      metrics=metrics,
  )
