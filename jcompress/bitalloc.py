r"""Mixed-precision bit allocation: per-layer bit widths that minimise the summed sensitivity
under a size budget, solved exactly.

Given layers l = 1..L (the quantized kernels), candidate widths B (default {2, 3, 4, 8}), a
sensitivity Omega_l(b) for each (HAWQ-V2's `hessian.quant_sensitivity`, or the exact
`hessian.quadratic_sensitivity`) and the bytes c_l(b) that layer l takes when stored at b bits,
choose one width per layer:

  minimise   sum_l sum_b Omega_l(b) x_lb
  subject to sum_b x_lb = 1                                  (one width per layer)
             F + sum_l sum_b c_l(b) x_lb <= budget_bytes     (or the average-bits budget below)
             x_lb in {0, 1}

a multiple-choice knapsack, solved exactly by a dynamic program over the Pareto frontier of
(bytes, summed sensitivity) of the partial allocations (`solver="dp"`, the default: integer
costs, no tolerance), or as a mixed-integer linear program (`solver="milp"`:
`scipy.optimize.milp`, HiGHS branch and bound with relative gap 0, for models with many
layers). The chosen widths' bytes are recomputed in integers and checked against the budget.

The bytes are those the export stores (`quantize.quant_weights(...).export`, the artifact's
weights.bin, `jcompress.artifact`), from the layer's shape alone (`quantize._stored_nbytes`):

  uniform   c_l(b) = ceil(n_l b / 8) + 4 G_l  [+ G_l zero points if asymmetric]
  pow2      c_l(b) = ceil(n_l b / 8) + 4 G_l
  kmeans    c_l(b) = ceil(n_l b / 8) + 4 G_l 2^b

with G_l the number of channels (the last axis) per channel, else 1. F is the fixed cost of
everything not allocated: by default the bytes of every param leaf outside the selection (the
stem, the classifier, biases, BatchNorm scales: stored as float) plus the BatchNorm statistics
when `batch_stats` is given, i.e. weights.bin of the export. results.json's `model_bytes` also
counts manifest.json (a few kB of JSON whose length barely depends on the widths); add it to
`fixed_bytes` to budget against `model_bytes`.

With `avg_bits` instead, the budget is on the mean code width per quantized weight (what the
`weight_bits` metric reports, scales not counted):

  sum_l sum_b b n_l x_lb <= avg_bits * sum_l n_l.

The result's `bits_by_path` is the `quant` sub-config's per-layer form, one anchored
"pattern=bits" entry per layer (`quantize.parse_bits_by_path` reads it):

  c.quant.bits_by_path = alloc.bits_by_path
"""

from __future__ import annotations

import re
from typing import Any
from typing import Mapping
from typing import NamedTuple
from typing import Sequence

import jax
import numpy as np

from jcompress import quantize
from jcompress import transforms
from jcompress.errors import ConfigError

PyTree = Any

#: Candidate widths by default.
DEFAULT_BITS = (2, 3, 4, 8)
METHODS = ("uniform", "kmeans", "pow2")


class Allocation(NamedTuple):
  """What `allocate_bits` returns.

  - bits: {layer path: bits}, in tree order.
  - bits_by_path: ("^<escaped path>$=<bits>", ...) for `quant.bits_by_path`.
  - nbytes: F + sum_l c_l(bits_l), the stored bytes of the allocation.
  - layer_nbytes: {layer path: c_l(bits_l)}.
  - fixed_bytes: F.
  - objective: sum_l Omega_l(bits_l).
  - avg_bits: sum_l bits_l n_l / sum_l n_l.
  """
  bits: dict[str, int]
  bits_by_path: tuple[str, ...]
  nbytes: int
  layer_nbytes: dict[str, int]
  fixed_bytes: int
  objective: float
  avg_bits: float


def layer_nbytes(shape: Sequence[int], bits: int, *, method: str = "uniform",
                 per_channel: bool = True, symmetric: bool = True) -> int:
  """c_l(b): the bytes `quant_weights(...).export` stores for a kernel of `shape` at `bits`
  (packed codes and scales / zero points / codebook; `quantize._stored_nbytes`)."""
  leaf = quantize._Leaf(int(bits), bool(per_channel), tuple(int(d) for d in shape), 0)  # noqa: SLF001
  return quantize._stored_nbytes(leaf, method, bool(symmetric))  # noqa: SLF001


def _check_candidates(bits_candidates: Sequence[int], method: str) -> list[int]:
  lo = 1 if method == "kmeans" else 2
  if isinstance(bits_candidates, (str, bytes)) or not hasattr(bits_candidates, "__iter__"):
    raise ConfigError(f"`bits_candidates` must be a sequence of ints, got {bits_candidates!r}")
  out = []
  for b in bits_candidates:
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b <= 8:
      raise ConfigError(f"`bits_candidates`: every width must be an int in 1..8, got {b!r}")
    if b < lo:
      raise ConfigError(f"`bits_candidates`: {b} bits cannot be stored by method '{method}' "
                        f"(widths {lo}..8)")
    out.append(int(b))
  if not out:
    raise ConfigError("`bits_candidates`: give at least one bit width")
  return sorted(set(out))


def _tree_nbytes(tree: PyTree) -> int:
  return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(np.shape(x)))
                 for x in jax.tree.leaves(tree) if hasattr(x, "dtype")))


def selected_layers(params: PyTree, include: str | Sequence[str] = (r".*",),
                    exclude: str | Sequence[str] = transforms.DEFAULT_EXCLUDE) -> dict[str, tuple]:
  """{path: shape} of the kernels `quant_weights` would quantize with these patterns (a
  selection matching nothing is a ConfigError naming `include`)."""
  sel = transforms.select(params, include, exclude, kernels_only=True, key="include")
  return {p: tuple(int(d) for d in np.shape(x))
          for p, x, s in zip(transforms.leaf_paths(params), jax.tree.leaves(params),
                             jax.tree.leaves(sel)) if s}


def fixed_nbytes(params: PyTree, layers: Sequence[str], batch_stats: PyTree = None) -> int:
  """F: the bytes of the param leaves not in `layers` (stored as they are) plus those of
  `batch_stats`."""
  layers = set(layers)
  rest = sum(np.dtype(x.dtype).itemsize * int(np.prod(np.shape(x)))
             for p, x in zip(transforms.leaf_paths(params), jax.tree.leaves(params))
             if p not in layers)
  return int(rest) + (_tree_nbytes(batch_stats) if batch_stats is not None else 0)


def allocation_nbytes(bits: Mapping[str, int], params: PyTree, *, method: str = "uniform",
                      per_channel: bool = True, symmetric: bool = True,
                      fixed_bytes: int | None = None, batch_stats: PyTree = None) -> int:
  """F + sum_l c_l(bits_l) for {layer path: bits} (F as `allocate_bits` counts it)."""
  shapes = dict(zip(transforms.leaf_paths(params),
                    (tuple(np.shape(x)) for x in jax.tree.leaves(params))))
  total = 0
  for path, b in bits.items():
    if path not in shapes:
      raise ConfigError(f"`bits`: '{path}' is not a leaf of the params")
    total += layer_nbytes(shapes[path], b, method=method, per_channel=per_channel,
                          symmetric=symmetric)
  if fixed_bytes is None:
    fixed_bytes = fixed_nbytes(params, list(bits), batch_stats)
  return int(fixed_bytes) + total


def _solve_milp(omega: np.ndarray, cost: np.ndarray, capacity: int) -> np.ndarray:
  """argmin sum omega[l, j] x_lj, one j per l, sum cost[l, j] x_lj <= capacity, by
  `scipy.optimize.milp` (HiGHS; relative gap 0, the objective scaled to max |omega| = 1)."""
  from scipy import optimize  # noqa: PLC0415
  from scipy import sparse  # noqa: PLC0415

  n_layers, k = omega.shape
  scale = float(np.max(np.abs(omega))) or 1.0
  one = sparse.kron(sparse.eye(n_layers), np.ones((1, k)))
  cons = [optimize.LinearConstraint(one, np.ones(n_layers), np.ones(n_layers)),
          optimize.LinearConstraint(cost.reshape(1, -1).astype(np.float64), -np.inf, capacity)]
  res = optimize.milp((omega / scale).reshape(-1), constraints=cons,
                      integrality=np.ones(n_layers * k), bounds=optimize.Bounds(0, 1),
                      options={"mip_rel_gap": 0.0})
  if res.x is None:
    raise RuntimeError(f"scipy.optimize.milp found no allocation: {res.message}")
  x = np.rint(res.x).reshape(n_layers, k)
  if not np.all(x.sum(axis=1) == 1):
    raise RuntimeError(f"scipy.optimize.milp returned a non-integral allocation: {res.x}")
  return np.argmax(x, axis=1)


#: The most states the dynamic program keeps per layer before it gives up (solver "dp").
DP_MAX_STATES = 4_000_000


def _solve_dp(omega: np.ndarray, cost: np.ndarray, capacity: int) -> np.ndarray:
  """The same optimum by a dynamic program over the Pareto frontier of (cost, value).

  After layers 1..l the states are the partial allocations no other one beats in both cost and
  value (sorted by cost, values strictly decreasing), less those that cannot complete within
  `capacity` (their cost plus the cheapest widths of the remaining layers exceeds it). Exact:
  costs are integers and a dominated partial allocation never completes into the optimum."""
  n_layers, k = omega.shape
  rest = np.concatenate([np.cumsum(cost.min(axis=1)[::-1])[::-1][1:], [0]])
  costs, values = np.zeros(1, np.int64), np.zeros(1)
  parents, choices = [], []
  for layer in range(n_layers):
    c = (costs[:, None] + cost[layer][None, :]).reshape(-1)
    v = (values[:, None] + omega[layer][None, :]).reshape(-1)
    parent = np.repeat(np.arange(costs.size), k)
    choice = np.tile(np.arange(k), costs.size)
    ok = c + rest[layer] <= capacity
    c, v, parent, choice = c[ok], v[ok], parent[ok], choice[ok]
    order = np.lexsort((v, c))                  # by cost, then value
    c, v, parent, choice = c[order], v[order], parent[order], choice[order]
    best_before = np.concatenate([[np.inf], np.minimum.accumulate(v)[:-1]])
    keep = v < best_before                      # strictly better than every cheaper state
    costs, values = c[keep], v[keep]
    parents.append(parent[keep])
    choices.append(choice[keep])
    if costs.size > DP_MAX_STATES:
      raise ConfigError(f"`solver`: the dynamic program holds {costs.size} states after "
                        f"{layer + 1} layers; use solver='milp' for a problem this size")
  state = int(np.argmin(values))              # the last state: every kept one fits
  out = np.zeros(n_layers, np.int64)
  for layer in range(n_layers - 1, -1, -1):
    out[layer] = choices[layer][state]
    state = int(parents[layer][state])
  return out


SOLVERS = {"dp": _solve_dp, "milp": _solve_milp}


def bits_by_path(bits: Mapping[str, int]) -> tuple[str, ...]:
  """{layer path: bits} as `quant.bits_by_path` entries, one anchored "^path$=bits" each."""
  return tuple(f"^{re.escape(p)}$={int(b)}" for p, b in bits.items())


def allocate_bits(sensitivities: Mapping[str, Mapping[int, float]], params: PyTree, *,
                  budget_bytes: int | None = None, avg_bits: float | None = None,
                  bits_candidates: Sequence[int] = DEFAULT_BITS,
                  include: str | Sequence[str] = (r".*",),
                  exclude: str | Sequence[str] = transforms.DEFAULT_EXCLUDE,
                  method: str = "uniform", per_channel: bool = True, symmetric: bool = True,
                  fixed_bytes: int | None = None, batch_stats: PyTree = None,
                  solver: str = "dp") -> Allocation:
  r"""The optimal per-layer widths (module docstring) under `budget_bytes` or `avg_bits`.

  Args:
    sensitivities: {layer path: {bits: Omega_l(bits)}} for every selected layer and every
      candidate width (`hessian.quant_sensitivity`); entries of other layers are ignored.
    params: the parameter tree (shapes fix the bytes; leaves outside the selection are F).
    budget_bytes: the most bytes F + sum_l c_l(b_l) may take; or
    avg_bits: the most mean code bits per quantized weight (exactly one of the two).
    bits_candidates: the widths to choose from, ints in 1..8 (2..8 for uniform / pow2).
    include, exclude: the layers allocated, as `quant_weights` selects them (kernels; stem and
      classifier excluded by default); give those of the `quant` sub-config.
    method, per_channel, symmetric: the quantizer whose storage is counted (the `quant`
      sub-config's; uniform symmetric per-channel by default).
    fixed_bytes: F; None: the non-selected param leaves' bytes plus `batch_stats`'.
    solver: "dp" (the exact dynamic program, `_solve_dp`) or "milp" (`scipy.optimize.milp`,
      for many layers: HiGHS proves optimality up to its absolute gap tolerance, 1e-6 of the
      largest sensitivity).
  Returns:
    an `Allocation`; `.bits_by_path` goes into `quant.bits_by_path`.
  Raises:
    ConfigError: a budget below the smallest achievable one (every layer at the lowest
      candidate; the message gives that minimum), both or neither budget, a width outside
      1..8, a selection that matches no layer (naming `include`), a selected layer without a
      sensitivity for some candidate (naming it).
  """
  if method not in METHODS:
    raise ConfigError(f"`method` must be one of {list(METHODS)}, got {method!r}")
  if solver not in SOLVERS:
    raise ConfigError(f"`solver` must be one of {list(SOLVERS)}, got {solver!r}")
  if (budget_bytes is None) == (avg_bits is None):
    raise ConfigError("give exactly one of `budget_bytes` and `avg_bits`, got "
                      f"budget_bytes={budget_bytes!r}, avg_bits={avg_bits!r}")
  cands = _check_candidates(bits_candidates, method)
  layers = selected_layers(params, include, exclude)
  paths = list(layers)
  omega = np.zeros((len(paths), len(cands)))
  for i, p in enumerate(paths):
    if p not in sensitivities:
      raise ConfigError(f"`sensitivities`: no entry for the selected layer '{p}' (it has "
                        f"{', '.join(list(sensitivities)[:8])})")
    row = {int(k): v for k, v in sensitivities[p].items()}
    for j, b in enumerate(cands):
      if b not in row:
        raise ConfigError(f"`sensitivities`: layer '{p}' has no value for {b} bits (it has "
                          f"{sorted(row)})")
      if not np.isfinite(float(row[b])):
        raise ConfigError(f"`sensitivities`: layer '{p}' at {b} bits is {row[b]!r}")
      omega[i, j] = float(row[b])
  cost = np.array([[layer_nbytes(layers[p], b, method=method, per_channel=per_channel,
                                 symmetric=symmetric) for b in cands] for p in paths],
                  dtype=np.int64)
  sizes = np.array([int(np.prod(layers[p])) for p in paths], dtype=np.int64)
  fixed = fixed_nbytes(params, paths, batch_stats) if fixed_bytes is None else int(fixed_bytes)

  if budget_bytes is not None:
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, np.integer, float)):
      raise ConfigError(f"`budget_bytes` must be a number of bytes, got {budget_bytes!r}")
    minimum = fixed + int(cost[:, 0].sum())
    if budget_bytes < minimum:
      raise ConfigError(
          f"`budget_bytes`={budget_bytes} is below the smallest achievable size, {minimum} "
          f"bytes (all {len(paths)} layers at {cands[0]} bits: {minimum - fixed} bytes, plus "
          f"{fixed} fixed bytes)")
    weights, capacity = cost, int(np.floor(budget_bytes)) - fixed
  else:
    if isinstance(avg_bits, bool) or not isinstance(avg_bits, (int, np.integer, float)):
      raise ConfigError(f"`avg_bits` must be a number of bits, got {avg_bits!r}")
    if avg_bits < cands[0]:
      raise ConfigError(f"`avg_bits`={avg_bits} is below the smallest achievable mean width, "
                        f"{cands[0]} bits (every layer at {cands[0]} bits: "
                        f"{fixed + int(cost[:, 0].sum())} bytes)")
    weights = sizes[:, None] * np.array(cands, dtype=np.int64)[None, :]
    capacity = int(np.floor(avg_bits * int(sizes.sum()) + 1e-9))
  choice = SOLVERS[solver](omega, weights, capacity)
  used = int(weights[np.arange(len(paths)), choice].sum())
  if used > capacity:
    raise RuntimeError(f"solver {solver!r}'s allocation takes {used} > {capacity}")
  bits = {p: cands[j] for p, j in zip(paths, choice)}
  per_layer = {p: int(cost[i, j]) for i, (p, j) in enumerate(zip(paths, choice))}
  return Allocation(
      bits=bits,
      bits_by_path=bits_by_path(bits),
      nbytes=fixed + sum(per_layer.values()),
      layer_nbytes=per_layer,
      fixed_bytes=fixed,
      objective=float(sum(omega[i, j] for i, j in enumerate(choice))),
      avg_bits=float(sum(bits[p] * int(n) for p, n in zip(paths, sizes)) / int(sizes.sum())))


def allocate_bits_measured(sensitivities: Mapping[str, Mapping[int, float]], params: PyTree,
                           budget_bytes: int, measure, *,
                           bits_candidates: Sequence[int] = DEFAULT_BITS,
                           include: str | Sequence[str] = (r".*",),
                           exclude: str | Sequence[str] = transforms.DEFAULT_EXCLUDE,
                           method: str = "uniform", per_channel: bool = True,
                           symmetric: bool = True, solver: str = "dp", max_rounds: int = 8,
                           key: str = "budget_bytes") -> Allocation:
  r"""`allocate_bits` under a budget on bytes that `measure` counts, not this module's model.

  `measure(bits) -> int` gives the bytes of the whole artifact with the per-layer widths
  `bits` ({layer path: bits}): e.g. manifest.json + weights.bin of the export, whose
  manifest's length depends a little on the widths (offsets' digits). The fixed cost is
  taken as F = measure(all at the lowest width) - sum_l c_l(lowest); the optimum under
  F + sum_l c_l(b_l) <= budget is measured, and while it exceeds the budget by e bytes,
  F grows by e and the allocation is solved again (at most `max_rounds` times). The result's
  `nbytes` is the measured size, <= budget_bytes.

  Raises:
    ConfigError naming `key` when even every layer at the lowest width measures above the
    budget (the message gives that minimum).
  """
  cands = _check_candidates(bits_candidates, method)
  layers = selected_layers(params, include, exclude)
  low = {p: cands[0] for p in layers}
  minimum = int(measure(low))
  if budget_bytes < minimum:
    raise ConfigError(f"`{key}`={budget_bytes} is below the smallest achievable size, "
                      f"{minimum} bytes (all {len(layers)} layers at {cands[0]} bits)")
  fixed = minimum - sum(layer_nbytes(s, cands[0], method=method, per_channel=per_channel,
                                     symmetric=symmetric) for s in layers.values())
  opts = dict(include=include, exclude=exclude, method=method, per_channel=per_channel,
              symmetric=symmetric, solver=solver)
  for _ in range(max_rounds):
    if fixed + sum(layer_nbytes(s, cands[0], method=method, per_channel=per_channel,
                                symmetric=symmetric) for s in layers.values()) > budget_bytes:
      # only the lowest widths fit (they measured within the budget above)
      alloc = allocate_bits(sensitivities, params, budget_bytes=2 ** 62,
                            bits_candidates=cands[:1], fixed_bytes=fixed, **opts)
      return alloc._replace(nbytes=minimum, fixed_bytes=fixed)
    alloc = allocate_bits(sensitivities, params, budget_bytes=budget_bytes,
                          bits_candidates=cands, fixed_bytes=fixed, **opts)
    got = int(measure(alloc.bits))
    if got <= budget_bytes:
      return alloc._replace(nbytes=got, fixed_bytes=fixed)
    fixed += got - budget_bytes
  raise RuntimeError(f"no allocation measured within {budget_bytes} bytes after {max_rounds} "
                     "rounds (does `measure` grow with the widths by more than their bytes?)")
