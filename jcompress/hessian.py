r"""Per-layer Hessian traces by Hutchinson's estimator, and HAWQ-V2's quantization sensitivity.

For a loss L(w) of the parameters and a layer l (a leaf W_l of n_l weights), the Hessian block
H_ll = d^2 L / dW_l^2 has the trace

  Tr(H_ll) = E_v[v_l^T H_ll v_l],      v_l with i.i.d. Rademacher entries (+-1, p = 1/2 each)

since E[v_i v_j] = delta_ij (Hutchinson 1989). One probe v over ALL selected layers at once
gives every layer's estimate from one Hessian-vector product, taken forward-over-reverse
(the directional derivative of the gradient),

  H v = d/dt grad L(w + t v) |_{t=0} = jax.jvp(jax.grad(L), (w,), (v,))[1],
  t_l(v) = sum_i (v_l)_i (H v)_{l,i} = v_l^T H_ll v_l + sum_{k != l} v_l^T H_lk v_k,

whose cross terms have mean zero (v_l and v_k are independent): t_l(v) is unbiased for
Tr(H_ll). Only the selected leaves are probed (the others' tangents are zero, and they are
not differentiated), so the Hessian is the one of L restricted to the selected layers.
Its variance, for Rademacher probes, is 2 sum_{i != j} (H_ll)_ij^2 plus the cross terms':
zero for a diagonal Hessian, where a single probe is exact.

`hutchinson_traces` averages K probes, m_l = (1/K) sum_k t_l(v_k), and stops at the first
K >= min_probes at which every selected layer's standard error of the mean is below `tol`
of its size,

  se_l = s_l / sqrt(K) <= tol |m_l|      for all l   (s_l: the sample std, ddof = 1),

or at K = max_probes (then `converged` is False). The HVP is compiled once (one `jax.jit`
program taking the params and the probe's key) and called once per probe. Network Hessians are
far from diagonal: on a trained ResNet-20 (digits, 256 images) one probe's per-layer estimate
has a standard deviation about twice the trace, so a 10% standard error takes some 400 probes;
`benchmarks/hessian_check.py` measures what a fixed number of probes gives.

`quant_sensitivity` gives HAWQ-V2's (Dong et al. 2020) sensitivity of quantizing layer l to b
bits, the average Hessian eigenvalue (the trace over n_l) times the squared norm of the
quantization perturbation:

  Omega_l(b) = (Tr(H_ll) / n_l) * ||Q_b(W_l) - W_l||_2^2,

i.e. the second-order Taylor term 1/2 dW^T H_ll dW with H_ll replaced by (Tr(H_ll)/n_l) I and
the factor 1/2 dropped (the same for every layer and width, so it changes no comparison).
Q_b is the uniform quantizer PTQ uses (`quantize.quant_weights(method="uniform")`, exported
through `quantize_core.quantize` / `dequantize`): symmetric, narrow range, one scale per output
channel (the last axis), minmax range by default. `jcompress.bitalloc` picks per-layer bits
from these sensitivities under a size budget.

`quadratic_sensitivity` computes the term without the isotropic approximation,
Q_l(b) = 1/2 dW_l^T H_ll dW_l, by one Hessian-vector product per layer and width.
`gauss_newton_sensitivity` replaces H by the generalized Gauss-Newton matrix of the
cross-entropy of the logits z(w),

  G = (1/N) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i,      J_i = dz_i / dw,  p_i = softmax(z_i),

  1/2 dW_l^T G_ll dW_l = (1/2N) sum_i [ sum_k p_ik u_ik^2 - (sum_k p_ik u_ik)^2 ],
  u_i = J_i dW_l  (one forward-mode JVP of the logits),

which is H less the term sum_i sum_k (p_ik - y_ik) d^2 z_ik / dw^2, zero where the model fits
its data: at a trained ResNet-20 (digits, 256 images) the two agree to 1e-5 of the largest
value over all 20 layers x 4 widths, while the JVPs (vmapped over the widths) take 40 s against
380 s for the HVPs on a 2-core CPU. G is positive semi-definite, so these sensitivities are >= 0.
Its traces are exact from per-example gradients, Tr(G_ll) = (1/N) sum_i ||J_il^T S_i||_F^2 with
S_i S_i^T = diag(p_i) - p_i p_i^T (`gauss_newton_traces`: K reverse passes per example, no probe
noise); HAWQ-V2's Omega with them is the sensitivity `hawq_gn`.
`layer_sensitivities` picks one of them by name (`SENSITIVITIES`).
"""

from __future__ import annotations

import math
from typing import Any
from typing import Callable
from typing import Mapping
from typing import NamedTuple
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jcompress import quantize_core
from jcompress import transforms
from jcompress.errors import ConfigError

PyTree = Any

#: The bit widths whose sensitivities are computed by default (bitalloc's default candidates).
DEFAULT_BITS = (2, 3, 4, 8)


class HessianTrace(NamedTuple):
  """What `hutchinson_traces` returns.

  - traces: {layer path: m_l, the mean of the probes' estimates of Tr(H_ll)}, in tree order.
  - stderr: {layer path: se_l = s_l / sqrt(K)} (0.0 with a single probe).
  - sizes: {layer path: n_l, the number of weights}.
  - probes: K, the number of probes taken.
  - converged: whether every layer met `se_l <= tol |m_l|` (False: stopped at max_probes).
  """
  traces: dict[str, float]
  stderr: dict[str, float]
  sizes: dict[str, int]
  probes: int
  converged: bool


def hvp(loss_fn: Callable[[PyTree], jax.Array], params: PyTree, v: PyTree) -> PyTree:
  """The Hessian-vector product H v of `loss_fn` at `params` (forward-over-reverse).

  H v = d/dt grad L(params + t v) at t = 0, a tree like `params`; `v` is a tree like `params`.
  """
  return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def _check_int(value: Any, name: str, lo: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
    raise ConfigError(f"`{name}` must be an int >= {lo}, got {value!r}")
  return int(value)


def _selected(params: PyTree, include, exclude, kernels_only: bool, key: str) -> list[int]:
  sel = transforms.select(params, include, exclude, kernels_only=kernels_only, key=key)
  return [i for i, s in enumerate(jax.tree.leaves(sel)) if s]


def _restricted_loss(loss_fn, leaves, treedef, selected):
  """The loss as a function of the selected leaves only (the others held at `leaves`)."""

  def restricted(sel_leaves):
    full = list(leaves)
    for i, w in zip(selected, sel_leaves):
      full[i] = w
    return loss_fn(jax.tree.unflatten(treedef, full))

  return restricted


def make_probe_fn(loss_fn: Callable[[PyTree], jax.Array], params_like: PyTree,
                  selected: Sequence[int]) -> Callable[[PyTree, jax.Array], jax.Array]:
  """`probe(params, key) -> (L,)` float32: one Rademacher probe's t_l(v) for the L selected
  leaves (their indices among `params_like`'s leaves), jit-compiled once.

  v_l = Rademacher(fold_in(key, i)) for the i-th leaf; the other leaves are held fixed (not
  probed, not differentiated)."""
  selected = list(selected)
  treedef = jax.tree.structure(params_like)

  @jax.jit
  def probe(params, key):
    leaves = jax.tree.leaves(params)
    restricted = _restricted_loss(loss_fn, leaves, treedef, selected)
    w = [leaves[i] for i in selected]
    v = [jax.random.rademacher(jax.random.fold_in(key, i), leaves[i].shape, leaves[i].dtype)
         for i in selected]
    hv = hvp(restricted, w, v)
    return jnp.stack([jnp.vdot(a, b).astype(jnp.float32) for a, b in zip(v, hv)])

  return probe


def hutchinson_traces(loss_fn: Callable[[PyTree], jax.Array], params: PyTree, *,
                      include: str | Sequence[str] = (r".*",),
                      exclude: str | Sequence[str] = transforms.DEFAULT_EXCLUDE,
                      kernels_only: bool = True, tol: float = 0.1, min_probes: int = 4,
                      max_probes: int = 100, seed: int = 0) -> HessianTrace:
  r"""Per-layer Hessian traces Tr(H_ll) of `loss_fn` at `params` (module docstring).

  Args:
    loss_fn: `loss_fn(params) -> scalar`, twice differentiable (the data closed over: a fixed
      batch, e.g. eval-mode cross-entropy on a few hundred training images).
    params: the parameter tree.
    include, exclude: regular expressions selecting the layers by `/`-joined path, as
      `transforms.select` (kernels only by default; the first conv `stem_conv` and the
      classifier `head` excluded, as quantization excludes them). A selection that matches
      nothing is a ConfigError naming `include`.
    tol: stop once every layer's standard error is <= tol |mean| (after `min_probes`).
    min_probes, max_probes: bounds on the number of probes K (min_probes >= 2 so that a
      standard error exists; max_probes >= min_probes).
    seed: probe k uses the key fold_in(key(seed), k).
  Returns:
    `HessianTrace(traces, stderr, sizes, probes, converged)`.
  """
  if isinstance(tol, bool) or not isinstance(tol, (int, float, np.integer, np.floating)) or not (
      tol > 0):
    raise ConfigError(f"`tol` must be a number > 0, got {tol!r}")
  min_probes = _check_int(min_probes, "min_probes", 2)
  max_probes = _check_int(max_probes, "max_probes", min_probes)
  selected = _selected(params, include, exclude, kernels_only, "include")
  paths = transforms.leaf_paths(params)
  leaves = jax.tree.leaves(params)
  probe = make_probe_fn(loss_fn, params, selected)
  base = jax.random.key(int(seed))
  mean = np.zeros(len(selected))
  m2 = np.zeros(len(selected))                 # Welford: sum of squared deviations from the mean
  se = np.zeros(len(selected))
  k, converged = 0, False
  while k < max_probes:
    t = np.asarray(jax.device_get(probe(params, jax.random.fold_in(base, k))), np.float64)
    if not np.all(np.isfinite(t)):
      bad = [paths[i] for i, x in zip(selected, t) if not math.isfinite(x)]
      raise ConfigError(f"the Hessian trace estimate of {', '.join(bad[:4])} is not finite "
                        f"(probe {k}): check `loss_fn` and the params for NaN / Inf")
    k += 1
    delta = t - mean
    mean = mean + delta / k
    m2 = m2 + delta * (t - mean)
    se = np.sqrt(m2 / (k - 1) / k) if k >= 2 else np.zeros_like(mean)
    if k >= min_probes and np.all(se <= tol * np.abs(mean)):
      converged = True
      break
  return HessianTrace(
      traces={paths[i]: float(m) for i, m in zip(selected, mean)},
      stderr={paths[i]: float(s) for i, s in zip(selected, se)},
      sizes={paths[i]: int(np.prod(np.shape(leaves[i]))) for i in selected},
      probes=k, converged=converged)


def _sqrt_softmax_hessian(p: jax.Array) -> jax.Array:
  """S with S S^T = diag(p) - p p^T (the softmax cross-entropy's Hessian in the logits):
  S = diag(s) (I - s s^T), s = sqrt(p), since I - s s^T is a projection (|s| = 1)."""
  s = jnp.sqrt(p)
  return s[:, None] * (jnp.eye(p.shape[-1], dtype=p.dtype) - s[:, None] * s[None, :])


def gauss_newton_traces(apply_fn: Callable[[PyTree, jax.Array], jax.Array], params: PyTree,
                        images: jax.Array, *, include: str | Sequence[str] = (r".*",),
                        exclude: str | Sequence[str] = transforms.DEFAULT_EXCLUDE,
                        kernels_only: bool = True, samples: int = 0, seed: int = 0,
                        memory_bytes: int = 2 ** 30) -> HessianTrace:
  r"""Per-layer traces Tr(G_ll) of the Gauss-Newton matrix of the mean softmax cross-entropy
  of `apply_fn(params, images)` (module docstring), exactly, from per-example gradients:

    Tr(G_ll) = (1/N) sum_i ||J_il^T S_i||_F^2,   S_i S_i^T = diag(p_i) - p_i p_i^T,

  J_il = dz_i / dW_l the logits' Jacobian of example i; one reverse pass per example and class
  (K classes: K vector-Jacobian products through one forward pass). No probe noise: where
  Hutchinson's estimate of a trained ResNet-20's traces still has a standard error of up to
  several times the trace after 16 probes (cross terms between layers and weights), this is
  exact, at the cost of about K backward passes over the images. G = H where the model fits
  its data (module docstring), so these are the Hessian traces HAWQ needs, and never negative.
  With `samples` = S > 0 (for many classes): the Fisher form instead, y ~ p_i drawn S times
  per example, Tr(G_ll) = E ||d log p(y|x_i) / dW_l||^2, unbiased, with the standard error over
  the S draws.

  Args:
    apply_fn: `apply_fn(params, images) -> (N, K)` logits, examples independent (eval mode:
      BatchNorm from its running statistics); called on one example at a time.
    params: the parameter tree.
    images: (N, ...) the examples (a few hundred training images, no augmentation).
    include, exclude, kernels_only: the layer selection, as `hutchinson_traces`.
    samples: 0 (exact, every class) or the label draws per example.
    seed: the draws' key (samples > 0).
    memory_bytes: the reverse passes of one example run batched as far as their gradients
      (classes x selected weights x 4 bytes) fit in this; the result does not depend on it.
  Returns:
    `HessianTrace(traces, stderr, sizes, probes, converged)`: stderr 0 when exact; `probes` the
    reverse passes per example (K or S); converged True.
  """
  samples = _check_int(samples, "samples", 0)
  memory_bytes = _check_int(memory_bytes, "memory_bytes", 1)
  selected = _selected(params, include, exclude, kernels_only, "include")
  paths = transforms.leaf_paths(params)
  leaves = jax.tree.leaves(params)
  treedef = jax.tree.structure(params)
  images = jnp.asarray(images)
  n = int(images.shape[0])
  if n < 1:
    raise ConfigError("`images`: give at least one example")
  k = int(jax.eval_shape(apply_fn, params, images[:1]).shape[-1])
  cols = samples or k
  grad_bytes = 4 * sum(int(np.prod(np.shape(leaves[i]))) for i in selected)
  per_map = max(1, min(cols, memory_bytes // grad_bytes))   # reverse passes batched at once

  def example(all_leaves, x, key):
    logits = _restricted_loss(lambda p: apply_fn(p, x[None])[0].astype(jnp.float32),
                              all_leaves, treedef, selected)   # of the selected leaves only
    z, vjp = jax.vjp(logits, [all_leaves[i] for i in selected])
    p = jax.nn.softmax(z)
    if samples:   # d(-log p(y)) / dz = p - e_y, y ~ p
      y = jax.random.categorical(key, z, shape=(samples,))
      vecs = p[None, :] - jax.nn.one_hot(y, k, dtype=p.dtype)
    else:
      vecs = _sqrt_softmax_hessian(p).T                        # the columns of S

    def sq(v):
      g = vjp(v.astype(z.dtype))[0]
      return jnp.stack([jnp.sum(jnp.square(gi.astype(jnp.float32))) for gi in g])
    if per_map >= cols:
      return jax.vmap(sq)(vecs)                                # (cols, L)
    return jax.lax.map(sq, vecs, batch_size=per_map)

  one = jax.jit(example)
  # one example at a time (a batch of one, its K reverse passes vmapped). ResNet-20, 256 images,
  # 2-core CPU: 6.8 s so; 80 s with lax.map(batch_size=K) over the passes instead of the vmap
  # (the path kept for gradients beyond `memory_bytes`); 180 s with the examples vmapped too
  # (every weight gradient then a per-example one)
  keys = jax.random.split(jax.random.key(int(seed)), n)
  acc = None
  for i in range(n):
    t = one(leaves, images[i], keys[i])
    acc = t if acc is None else acc + t
  total = np.asarray(jax.device_get(acc), np.float64)
  if samples:
    per_draw = total / n                                   # S estimates of every trace
    mean = per_draw.mean(axis=0)
    se = (per_draw.std(axis=0, ddof=1) / math.sqrt(samples) if samples > 1
          else np.zeros_like(mean))
  else:
    mean, se = total.sum(axis=0) / n, np.zeros(len(selected))
  bad = [paths[i] for i, x in zip(selected, mean) if not math.isfinite(x)]
  if bad:
    raise ConfigError(f"the Gauss-Newton trace of {', '.join(bad[:4])} is not finite: check "
                      f"`apply_fn`, the params and the images for NaN / Inf")
  return HessianTrace(
      traces={paths[i]: float(t) for i, t in zip(selected, mean)},
      stderr={paths[i]: float(s) for i, s in zip(selected, se)},
      sizes={paths[i]: int(np.prod(np.shape(leaves[i]))) for i in selected},
      probes=cols, converged=True)


def _get_leaf(params: PyTree, path: str) -> Any:
  flat = dict(zip(transforms.leaf_paths(params), jax.tree.leaves(params)))
  if path not in flat:
    raise ConfigError(f"`traces`: layer '{path}' is not a leaf of the params; leaves are: "
                      f"{', '.join(list(flat)[:12])}")
  return flat[path]


def ptq_weight(w: jax.Array, bits: int, *, per_channel: bool = True, symmetric: bool = True,
               narrow_range: bool | None = None, range_method: str = "minmax",
               percentile: float = 99.99, name: str = "w") -> jax.Array:
  """Q_b(w): `w` quantized and dequantized by the uniform quantizer of PTQ
  (`quantize_core.quantize`, then `dequantize`; per output channel, the last axis, by
  default; narrow_range None: = symmetric, as `quantize.quant_weights`), float32."""
  narrow_range = bool(symmetric) if narrow_range is None else bool(narrow_range)
  q = quantize_core.quantize(jnp.asarray(w), bits, symmetric=symmetric,
                             narrow_range=narrow_range, per_channel=per_channel, axis=-1,
                             range_method=range_method, percentile=percentile, name=name)
  return quantize_core.dequantize(q, jnp.float32)


def quant_perturbation(w: jax.Array, bits: int, **kwargs) -> float:
  """||Q_b(w) - w||_2^2, with Q_b = `ptq_weight(., bits, **kwargs)`."""
  d = ptq_weight(w, bits, **kwargs) - jnp.asarray(w, jnp.float32)
  return float(jnp.sum(d * d))


def _check_uniform_bits(bits_candidates: Sequence[int]) -> list[int]:
  bits_list = []
  for b in bits_candidates:
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 2 <= b <= 8:
      raise ConfigError(f"`bits_candidates`: every width must be an int in 2..8 for the uniform "
                        f"quantizer, got {b!r}")
    bits_list.append(int(b))
  if not bits_list:
    raise ConfigError("`bits_candidates`: give at least one bit width")
  return bits_list


def quant_sensitivity(traces: HessianTrace | Mapping[str, float], params: PyTree,
                      bits_candidates: Sequence[int] = DEFAULT_BITS, *,
                      per_channel: bool = True, symmetric: bool = True,
                      narrow_range: bool | None = None, range_method: str = "minmax",
                      percentile: float = 99.99) -> dict[str, dict[int, float]]:
  r"""HAWQ-V2's sensitivities {layer path: {bits: Omega_l(bits)}} (module docstring):

    Omega_l(b) = (Tr(H_ll) / n_l) * ||Q_b(W_l) - W_l||_2^2

  with the uniform PTQ quantizer's options (those of `quantize.quant_weights`'s defaults).

  Args:
    traces: a `HessianTrace` or {layer path: Tr(H_ll)}; each path a leaf of `params`. A
      negative trace (a non-convex direction) gives negative sensitivities, kept as they are.
    bits_candidates: the widths, ints in 2..8 (the uniform quantizer's range).
  """
  if isinstance(traces, HessianTrace):
    traces = traces.traces
  if not traces:
    raise ConfigError("`traces`: no layer given (a layer selection that matches nothing?)")
  bits_list = _check_uniform_bits(bits_candidates)
  out: dict[str, dict[int, float]] = {}
  for path, trace in traces.items():
    w = _get_leaf(params, path)
    n = int(np.prod(np.shape(w)))
    out[path] = {b: float(trace) / n * quant_perturbation(
        w, b, per_channel=per_channel, symmetric=symmetric, narrow_range=narrow_range,
        range_method=range_method, percentile=percentile, name=path) for b in bits_list}
  return out


def quadratic_sensitivity(loss_fn: Callable[[PyTree], jax.Array], params: PyTree,
                          bits_candidates: Sequence[int] = DEFAULT_BITS, *,
                          include: str | Sequence[str] = (r".*",),
                          exclude: str | Sequence[str] = transforms.DEFAULT_EXCLUDE,
                          per_channel: bool = True, symmetric: bool = True,
                          narrow_range: bool | None = None, range_method: str = "minmax",
                          percentile: float = 99.99) -> dict[str, dict[int, float]]:
  r"""The exact second-order term of quantizing one layer, {layer path: {bits: Q_l(bits)}}:

    Q_l(b) = 1/2 dW_l^T H_ll dW_l,      dW_l = Q_b(W_l) - W_l

  (H_ll dW_l by one Hessian-vector product, no trace, no isotropic approximation): what
  HAWQ-V2's Omega_l(b) approximates with H_ll ~ (Tr(H_ll) / n_l) I, at the cost of one HVP per
  layer and width (the HVP compiled once) instead of one per probe. Same selection and
  quantizer options as `hutchinson_traces` and `quant_sensitivity`; the result has the form
  `bitalloc.allocate_bits` takes.
  """
  bits_list = _check_uniform_bits(bits_candidates)
  selected = _selected(params, include, exclude, True, "include")
  paths = transforms.leaf_paths(params)
  leaves = jax.tree.leaves(params)
  treedef = jax.tree.structure(params)

  @jax.jit
  def quad(params, dw):          # dw: one tangent per selected leaf (all but one zero)
    lv = jax.tree.leaves(params)
    hv = hvp(_restricted_loss(loss_fn, lv, treedef, selected), [lv[i] for i in selected], dw)
    return jnp.stack([0.5 * jnp.vdot(a, b).astype(jnp.float32) for a, b in zip(dw, hv)])

  deltas = _ptq_deltas(leaves, selected, paths, bits_list, dict(
      per_channel=per_channel, symmetric=symmetric, narrow_range=narrow_range,
      range_method=range_method, percentile=percentile))
  out: dict[str, dict[int, float]] = {}
  for j, i in enumerate(selected):
    out[paths[i]] = {}
    for bi, b in enumerate(bits_list):
      dw = [deltas[j][bi] if k == i else jnp.zeros(np.shape(leaves[k]), leaves[k].dtype)
            for k in selected]
      out[paths[i]][b] = float(quad(params, dw)[j])
  return out


def _ptq_deltas(leaves, selected, paths, bits_list, opts) -> list[jax.Array]:
  """For each selected leaf, (len(bits_list), *shape): Q_b(W) - W for each width."""
  out = []
  for i in selected:
    w = leaves[i]
    out.append(jnp.stack([ptq_weight(w, b, name=paths[i], **opts) - jnp.asarray(w, jnp.float32)
                          for b in bits_list]).astype(leaves[i].dtype))
  return out


def gauss_newton_sensitivity(logits_fn: Callable[[PyTree], jax.Array], params: PyTree,
                             bits_candidates: Sequence[int] = DEFAULT_BITS, *,
                             include: str | Sequence[str] = (r".*",),
                             exclude: str | Sequence[str] = transforms.DEFAULT_EXCLUDE,
                             per_channel: bool = True, symmetric: bool = True,
                             narrow_range: bool | None = None, range_method: str = "minmax",
                             percentile: float = 99.99) -> dict[str, dict[int, float]]:
  r"""{layer path: {bits: 1/2 dW_l^T G_ll dW_l}}, G the Gauss-Newton matrix of the mean
  softmax cross-entropy of `logits_fn(params)` (module docstring), dW_l = Q_b(W_l) - W_l.

  Args:
    logits_fn: `logits_fn(params) -> (N, K)` logits over a fixed batch (eval mode), once
      differentiable in forward mode (`jax.jvp`).
    params, bits_candidates, include, exclude and the quantizer options: as
      `quadratic_sensitivity`.
  Returns:
    the sensitivities (>= 0 up to rounding), of the form `bitalloc.allocate_bits` takes. One
    JVP per layer, vmapped over the widths, in one compiled program.
  """
  bits_list = _check_uniform_bits(bits_candidates)
  selected = _selected(params, include, exclude, True, "include")
  paths = transforms.leaf_paths(params)
  leaves = jax.tree.leaves(params)
  treedef = jax.tree.structure(params)
  opts = dict(per_channel=per_channel, symmetric=symmetric, narrow_range=narrow_range,
              range_method=range_method, percentile=percentile)

  @jax.jit
  def quad(params, deltas):     # deltas: per leaf (len(bits_list), *shape), all but one zero
    def one(tangent):
      z, u = jax.jvp(logits_fn, (params,), (jax.tree.unflatten(treedef, tangent),))
      p = jax.nn.softmax(z.astype(jnp.float32), axis=-1)
      u = u.astype(jnp.float32)
      pu = jnp.sum(p * u, axis=-1)
      return 0.5 * jnp.mean(jnp.sum(p * u * u, axis=-1) - pu * pu)
    return jax.vmap(one)(deltas)

  out: dict[str, dict[int, float]] = {}
  k = len(bits_list)
  for i, d in zip(selected, _ptq_deltas(leaves, selected, paths, bits_list, opts)):
    tangent = [d if j == i else jnp.zeros((k, *np.shape(x)), x.dtype)
               for j, x in enumerate(leaves)]
    q = np.asarray(jax.device_get(quad(params, tangent)), np.float64)
    out[paths[i]] = {b: float(v) for b, v in zip(bits_list, q)}
  return out


def mse_sensitivity(params: PyTree, bits_candidates: Sequence[int] = DEFAULT_BITS, *,
                    include: str | Sequence[str] = (r".*",),
                    exclude: str | Sequence[str] = transforms.DEFAULT_EXCLUDE,
                    **quantizer) -> dict[str, dict[int, float]]:
  """{layer path: {bits: ||Q_b(W_l) - W_l||^2}}: the quantization error with no curvature (the
  identity for H), a baseline for the Hessian-based sensitivities."""
  bits_list = _check_uniform_bits(bits_candidates)
  selected = _selected(params, include, exclude, True, "include")
  paths = transforms.leaf_paths(params)
  leaves = jax.tree.leaves(params)
  return {paths[i]: {b: quant_perturbation(leaves[i], b, name=paths[i], **quantizer)
                     for b in bits_list} for i in selected}


#: The sensitivities `layer_sensitivities` computes, by name.
SENSITIVITIES = ("gauss_newton", "quadratic", "hawq", "hawq_gn", "mse")


def layer_sensitivities(kind: str, logits_fn: Callable[[PyTree], jax.Array], labels: jax.Array,
                        params: PyTree, bits_candidates: Sequence[int] = DEFAULT_BITS, *,
                        include: str | Sequence[str] = (r".*",),
                        exclude: str | Sequence[str] = transforms.DEFAULT_EXCLUDE,
                        probes: int = 16, seed: int = 0, key: str = "sensitivity",
                        apply_fn: Callable[[PyTree, jax.Array], jax.Array] | None = None,
                        images: jax.Array | None = None,
                        **quantizer) -> dict[str, dict[int, float]]:
  r"""The per-layer, per-width sensitivities named `kind` (one of `SENSITIVITIES`), of the
  loss L(w) = mean softmax cross-entropy of `logits_fn(params)` against `labels`:

    gauss_newton  1/2 dW^T G dW   (`gauss_newton_sensitivity`; one JVP per layer)
    quadratic     1/2 dW^T H dW   (`quadratic_sensitivity`; one HVP per layer and width)
    hawq          Tr(H_ll)/n_l ||dW||^2  (`hutchinson_traces` with at most `probes` probes,
                  tol 0.1, then `quant_sensitivity`)
    hawq_gn       Tr(G_ll)/n_l ||dW||^2  (the exact `gauss_newton_traces` of
                  `apply_fn(params, images)`, whose logits `logits_fn` gives; then
                  `quant_sensitivity`)
    mse           ||dW||^2        (`mse_sensitivity`; no data)

  `quantizer`: the uniform quantizer's options (per_channel, symmetric, narrow_range,
  range_method, percentile). A bad `kind` is a ConfigError naming `key`, as is hawq_gn
  without `apply_fn` and `images`.
  """
  if kind not in SENSITIVITIES:
    raise ConfigError(f"config key '{key}': must be one of {list(SENSITIVITIES)}, got {kind!r}")
  sel = dict(include=include, exclude=exclude)
  if kind == "hawq_gn":
    if apply_fn is None or images is None:
      raise ConfigError(f"config key '{key}': hawq_gn takes per-example gradients: pass "
                        f"`apply_fn(params, images)` and `images`")
    traces = gauss_newton_traces(apply_fn, params, images, **sel)
    return quant_sensitivity(traces, params, bits_candidates, **quantizer)
  if kind == "mse":
    return mse_sensitivity(params, bits_candidates, **sel, **quantizer)
  if kind == "gauss_newton":
    return gauss_newton_sensitivity(logits_fn, params, bits_candidates, **sel, **quantizer)
  labels = jnp.asarray(labels)

  def loss_fn(p):
    z = logits_fn(p).astype(jnp.float32)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), labels[:, None], axis=-1))

  if kind == "quadratic":
    return quadratic_sensitivity(loss_fn, params, bits_candidates, **sel, **quantizer)
  probes = _check_int(probes, "probes", 2)
  traces = hutchinson_traces(loss_fn, params, **sel, min_probes=min(4, probes),
                             max_probes=probes, seed=seed)
  return quant_sensitivity(traces, params, bits_candidates, **quantizer)
