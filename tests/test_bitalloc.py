"""Mixed-precision bit allocation (jcompress.bitalloc): exact optimum, exact stored bytes."""

import itertools

import jax
import ml_collections
import numpy as np
import pytest

from jcompress import artifact
from jcompress import bitalloc
from jcompress import quantize as Q
from jcompress import transforms
from jcompress.errors import ConfigError


def _random_instance(seed, layers=None, cands=bitalloc.DEFAULT_BITS):
  """Random kernel shapes (plus a bias each, a stem and a head, excluded), sensitivities that
  fall with the width, and a budget between the smallest and the largest allocation."""
  rng = np.random.default_rng(seed)
  n_layers = int(rng.integers(2, 7)) if layers is None else layers
  params = {"stem_conv": {"kernel": np.zeros((3, 3, 3, 4), np.float32)},
            "head": {"kernel": np.zeros((8, 10), np.float32), "bias": np.zeros(10, np.float32)}}
  for i in range(n_layers):
    shape = tuple(int(d) for d in rng.integers(1, 9, size=int(rng.integers(2, 5))))
    params[f"layer{i}"] = {"kernel": rng.standard_normal(shape).astype(np.float32),
                           "bias": np.zeros(shape[-1], np.float32)}
  paths = [f"layer{i}/kernel" for i in range(n_layers)]
  sens = {}
  for p in paths:
    base = rng.exponential()
    sens[p] = {b: float(base * 4.0 ** -b * rng.uniform(0.5, 2.0)) for b in cands}
  return params, paths, sens, rng


def _cost(params, path, b):
  shape = dict(zip(transforms.leaf_paths(params), (np.shape(x) for x in jax.tree.leaves(params))))
  return bitalloc.layer_nbytes(shape[path], b)


def _brute_force(params, paths, sens, cands, capacity, weight):
  best = None
  for combo in itertools.product(cands, repeat=len(paths)):
    if sum(weight(p, b) for p, b in zip(paths, combo)) <= capacity:
      value = sum(sens[p][b] for p, b in zip(paths, combo))
      if best is None or value < best[0]:
        best = (value, combo)
  return best


@pytest.mark.parametrize("solver", ["dp", "milp"])
@pytest.mark.parametrize("seed", range(12))
def test_byte_budget_optimum_equals_brute_force(seed, solver):
  cands = (2, 3, 4, 8) if seed % 3 else (1, 2, 5)
  params, paths, sens, rng = _random_instance(seed, cands=cands)
  method = "kmeans" if 1 in cands else "uniform"
  if method == "kmeans":   # k-means stores a codebook: the bytes are not those of uniform
    weight = lambda p, b: bitalloc.layer_nbytes(  # noqa: E731
        dict(zip(transforms.leaf_paths(params),
                 (np.shape(x) for x in jax.tree.leaves(params))))[p], b, method="kmeans",
        per_channel=False)
  else:
    weight = lambda p, b: _cost(params, p, b)  # noqa: E731
  fixed = bitalloc.fixed_nbytes(params, paths)
  lo = fixed + sum(weight(p, min(cands)) for p in paths)
  hi = fixed + sum(weight(p, max(cands)) for p in paths)
  budget = int(rng.integers(lo, hi + 1))
  a = bitalloc.allocate_bits(sens, params, budget_bytes=budget, bits_candidates=cands,
                             method=method, per_channel=method == "uniform", solver=solver)
  value, combo = _brute_force(params, paths, sens, cands, budget - fixed, weight)
  assert a.nbytes <= budget
  assert a.nbytes == fixed + sum(weight(p, b) for p, b in a.bits.items())
  assert list(a.bits) == paths                     # stem, head and biases not allocated
  np.testing.assert_allclose(a.objective, value, rtol=1e-12)
  np.testing.assert_allclose(a.objective, sum(sens[p][b] for p, b in a.bits.items()),
                             rtol=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_avg_bits_budget_optimum_equals_brute_force(seed):
  params, paths, sens, rng = _random_instance(100 + seed)
  sizes = {p: int(np.prod(_shape)) for p, _shape in
           ((p, np.shape(params[p.split("/")[0]]["kernel"])) for p in paths)}
  avg = float(rng.uniform(2.0, 8.0))
  a = bitalloc.allocate_bits(sens, params, avg_bits=avg)
  value, _ = _brute_force(params, paths, sens, bitalloc.DEFAULT_BITS,
                          avg * sum(sizes.values()), lambda p, b: b * sizes[p])
  assert a.avg_bits <= avg
  np.testing.assert_allclose(a.objective, value, rtol=1e-12)


def test_dp_and_milp_agree_on_a_resnet20_sized_problem():
  rng = np.random.default_rng(7)
  params = {}
  for i, (cin, cout) in enumerate([(16, 16)] * 6 + [(16, 32)] + [(32, 32)] * 5 + [(32, 64)]
                                  + [(64, 64)] * 5):
    params[f"conv{i:02d}"] = {"kernel": rng.standard_normal((3, 3, cin, cout)).astype(np.float32)}
  sens = {f"conv{i:02d}/kernel": {b: float(rng.exponential() * 4.0 ** -b) for b in (2, 3, 4, 8)}
          for i in range(len(params))}
  for avg in (2.5, 3.3, 4.0, 6.1):
    dp = bitalloc.allocate_bits(sens, params, avg_bits=avg, solver="dp")
    milp = bitalloc.allocate_bits(sens, params, avg_bits=avg, solver="milp")
    np.testing.assert_allclose(dp.objective, milp.objective, rtol=1e-6)
    assert dp.avg_bits <= avg and milp.avg_bits <= avg


def test_budget_extremes():
  params, paths, sens, _ = _random_instance(3, layers=4)
  fixed = bitalloc.fixed_nbytes(params, paths)
  lo = fixed + sum(_cost(params, p, 2) for p in paths)
  hi = fixed + sum(_cost(params, p, 8) for p in paths)
  assert set(bitalloc.allocate_bits(sens, params, budget_bytes=lo).bits.values()) == {2}
  # the sensitivities fall with the width: the largest budget takes 8 bits everywhere
  a = bitalloc.allocate_bits(sens, params, budget_bytes=hi + 1000)
  assert set(a.bits.values()) == {8} and a.nbytes == hi and a.avg_bits == 8.0
  assert set(bitalloc.allocate_bits(sens, params, avg_bits=2).bits.values()) == {2}


def test_allocation_bytes_are_the_bytes_quantize_exports():
  """The allocation's bytes equal what `quant_weights(bits_by_path=...)` exports, encoded as the
  artifact encodes it (weights.bin without the BatchNorm statistics), and every layer gets
  the width allocated to it."""
  params, paths, sens, _ = _random_instance(11, layers=5)
  fixed = bitalloc.fixed_nbytes(params, paths)
  mid = fixed + sum(_cost(params, p, 3) + _cost(params, p, 4) for p in paths) // 2
  a = bitalloc.allocate_bits(sens, params, budget_bytes=mid)
  assert len(set(a.bits.values())) > 1                 # really mixed
  assert Q.parse_bits_by_path(a.bits_by_path, "uniform") == [
      (f"^{p}$", b) for p, b in a.bits.items()]
  quant = ml_collections.ConfigDict({"method": "uniform", "mode": "ptq", "bits": 8,
                                     "bits_by_path": a.bits_by_path})
  t = Q.transform_from_config(quant, params)
  exported = artifact._flat(t.export(params, t.init(params, jax.random.key(0)))["params"])  # noqa: SLF001
  stored, per_layer = 0, {}
  for path, leaf in exported.items():
    arrays, entry = artifact._encode_leaf(path, leaf, None)  # noqa: SLF001
    nbytes = sum(int(np.asarray(x).nbytes) for x in arrays.values())
    stored += nbytes
    if entry["encoding"] == "quant":
      assert entry["bits"] == a.bits[path]
      per_layer[path] = nbytes
  assert per_layer == a.layer_nbytes
  assert stored == a.nbytes == bitalloc.allocation_nbytes(a.bits, params)
  assert a.nbytes <= mid


def test_kmeans_and_asymmetric_storage_match_the_quantizer():
  params = {"x": {"kernel": np.random.default_rng(0).standard_normal((3, 3, 4, 6))
                  .astype(np.float32)}}
  for method, per_channel, symmetric in [("kmeans", False, True), ("kmeans", True, True),
                                         ("uniform", True, False), ("pow2", True, True)]:
    for b in (2, 3):
      t = Q.quant_weights(params, method=method, bits=b, per_channel=per_channel,
                          symmetric=symmetric, mode="ptq", exclude=(),
                          kmeans_iters=2)
      out = t.export(params, t.init(params, jax.random.key(0)))["params"]["x"]["kernel"]
      arrays, _ = artifact._encode_leaf("x/kernel", out, None)  # noqa: SLF001
      assert sum(int(v.nbytes) for v in arrays.values()) == bitalloc.layer_nbytes(
          (3, 3, 4, 6), b, method=method, per_channel=per_channel, symmetric=symmetric)


def test_budget_below_the_minimum_names_the_minimum():
  params, paths, sens, _ = _random_instance(5, layers=3)
  fixed = bitalloc.fixed_nbytes(params, paths)
  lo = fixed + sum(_cost(params, p, 2) for p in paths)
  with pytest.raises(ConfigError, match=rf"budget_bytes.*{lo} bytes"):
    bitalloc.allocate_bits(sens, params, budget_bytes=lo - 1)
  with pytest.raises(ConfigError, match="avg_bits.*2 bits"):
    bitalloc.allocate_bits(sens, params, avg_bits=1.9)


@pytest.mark.parametrize("bits", [0, 9, 3.0, "4", True])
def test_candidate_widths_outside_1_to_8_are_rejected(bits):
  params, _, sens, _ = _random_instance(5, layers=2)
  with pytest.raises(ConfigError, match="bits_candidates"):
    bitalloc.allocate_bits(sens, params, avg_bits=4, bits_candidates=(2, bits))


def test_bad_selection_sensitivities_and_budgets():
  params, paths, sens, _ = _random_instance(5, layers=2)
  with pytest.raises(ConfigError, match="include"):
    bitalloc.allocate_bits(sens, params, avg_bits=4, include="nothing_matches")
  with pytest.raises(ConfigError, match="'layer1/kernel'"):
    bitalloc.allocate_bits({paths[0]: sens[paths[0]]}, params, avg_bits=4)
  with pytest.raises(ConfigError, match="3 bits"):
    bitalloc.allocate_bits({p: {2: 1.0, 4: 0.5, 8: 0.1} for p in paths}, params, avg_bits=4)
  with pytest.raises(ConfigError, match="exactly one"):
    bitalloc.allocate_bits(sens, params)
  with pytest.raises(ConfigError, match="exactly one"):
    bitalloc.allocate_bits(sens, params, avg_bits=4, budget_bytes=10 ** 6)
  with pytest.raises(ConfigError, match="bits_candidates.*'uniform'"):
    bitalloc.allocate_bits(sens, params, avg_bits=4, bits_candidates=(1, 2))
  with pytest.raises(ConfigError, match="solver"):
    bitalloc.allocate_bits(sens, params, avg_bits=4, solver="greedy")


def test_measured_budget_holds_the_measured_bytes_and_refuses_too_small_ones():
  """`allocate_bits_measured`: with a measure that adds a fixed manifest to the modelled bytes
  the result is the exact optimum; with a width-dependent overhead beyond the layers' bytes
  (as the manifest's digits) it stays within the budget, by solving again."""
  params, paths, sens, _ = _random_instance(5, layers=5)
  fixed = bitalloc.fixed_nbytes(params, paths)
  cost = {(p, b): _cost(params, p, b) for p in paths for b in bitalloc.DEFAULT_BITS}

  def measure(bits, extra=0):
    return (fixed + 100 + sum(cost[p, b] for p, b in bits.items())
            + extra * sum(b == 8 for b in bits.values()))

  def skewed(bits):       # 7 bytes more per layer at 8 bits than the model counts
    return measure(bits, 7)

  low, high = measure({p: 2 for p in paths}), skewed({p: 8 for p in paths})
  for budget in np.linspace(low, high, 9).astype(int):
    budget = int(budget)
    exact = bitalloc.allocate_bits_measured(sens, params, budget, measure)
    best = _brute_force(params, paths, sens, bitalloc.DEFAULT_BITS, budget - fixed - 100,
                        lambda p, b: cost[p, b])
    assert exact.nbytes == measure(exact.bits) <= budget
    np.testing.assert_allclose(exact.objective, best[0], rtol=1e-12)
    alloc = bitalloc.allocate_bits_measured(sens, params, budget, skewed)
    best = _brute_force(params, paths, sens, bitalloc.DEFAULT_BITS, budget - fixed - 100,
                        lambda p, b: cost[p, b] + 7 * (b == 8))
    assert alloc.nbytes == skewed(alloc.bits) <= budget
    assert alloc.objective >= best[0] * (1 - 1e-12)
    assert alloc.bits_by_path == tuple(f"^{p}$={b}" for p, b in alloc.bits.items())
  with pytest.raises(ConfigError, match=rf"`quant.budget_bytes`={low - 1} is below the "
                                        rf"smallest achievable size, {low} bytes"):
    bitalloc.allocate_bits_measured(sens, params, low - 1, measure, key="quant.budget_bytes")
