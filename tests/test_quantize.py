"""Uniform / k-means / power-of-two quantizers, fake_quant against TensorFlow, bit packing."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress import experiment
from jcompress import packing
from jcompress import quantize as Q
from jcompress.errors import ConfigError

pytestmark = pytest.mark.plumbing


def _normal(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _mse(a, b):
  return float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


# ----------------------------------------------------------------------------- uniform


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("narrow", [True, False])
def test_symmetric_codes_closed_form(bits, narrow):
  x = _normal((64, 5), seed=bits)
  q = Q.quantize(x, bits, symmetric=True, narrow_range=narrow)
  q_max = 2 ** (bits - 1) - 1
  q_min = -q_max if narrow else -(2 ** (bits - 1))
  scale = np.abs(x).max() / q_max
  expected = np.clip(np.round(x / scale), q_min, q_max)
  assert q.codes.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(q.codes), expected)
  assert int(np.asarray(q.zero_point)) == 0
  np.testing.assert_allclose(float(q.scale), scale, rtol=1e-6)
  # The extreme value sits on the largest code; the error is at most half a step.
  assert np.abs(np.asarray(q.codes)).max() == q_max
  assert np.abs(np.asarray(Q.dequantize(q)) - x).max() <= scale / 2 + 1e-6


def test_narrow_range_4_bits_is_minus7_to_7():
  x = np.linspace(-1.0, 1.0, 101, dtype=np.float32)
  assert sorted(set(np.asarray(Q.quantize(x, 4, narrow_range=True).codes).tolist())) == list(
      range(-7, 8))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("lo,hi", [(-1.0, 3.0), (0.5, 2.0), (-4.0, -1.0)])
def test_asymmetric_zero_is_exact_and_codes_in_range(bits, lo, hi):
  x = np.random.default_rng(1).uniform(lo, hi, (200,)).astype(np.float32)
  x[:3] = 0.0
  q = Q.quantize(x, bits, symmetric=False)
  codes = np.asarray(q.codes)
  assert q.codes.dtype == jnp.uint8 and codes.min() >= 0 and codes.max() <= 2 ** bits - 1
  zp = int(np.asarray(q.zero_point))
  assert 0 <= zp <= 2 ** bits - 1
  x_hat = np.asarray(Q.dequantize(q))
  np.testing.assert_array_equal(x_hat[:3], 0.0)      # 0.0 exactly representable
  # Closed form: the range widened to contain 0, then the affine step.
  lo_, hi_ = min(x.min(), 0.0), max(x.max(), 0.0)
  scale = (hi_ - lo_) / (2 ** bits - 1)
  np.testing.assert_allclose(float(q.scale), scale, rtol=1e-6)
  assert np.abs(x_hat - x).max() <= scale * 0.5 + 1e-5


def test_asymmetric_narrow_range_codes_start_at_1():
  x = np.append(np.linspace(-0.5, 2.0, 300, dtype=np.float32), np.float32(0.0))
  q = Q.quantize(x, 4, symmetric=False, narrow_range=True)
  codes = np.asarray(q.codes)
  assert codes.min() == 1 and codes.max() == 15
  np.testing.assert_allclose(float(q.scale), 2.5 / 14, rtol=1e-6)
  assert float(Q.dequantize(q)[-1]) == 0.0


def test_per_channel_scales_use_the_last_axis():
  x = _normal((3, 3, 4, 6)) * np.arange(1, 7, dtype=np.float32)
  q = Q.quantize(x, 8, per_channel=True, narrow_range=True)
  assert q.scale.shape == (1, 1, 1, 6)
  np.testing.assert_allclose(np.asarray(q.scale).reshape(-1),
                             np.abs(x).max(axis=(0, 1, 2)) / 127, rtol=1e-6)
  # Every channel reaches its extreme code.
  np.testing.assert_array_equal(np.abs(np.asarray(q.codes)).max(axis=(0, 1, 2)), 127)


def test_compute_range_percentile_matches_numpy():
  x = _normal((500, 4))
  lo, hi = Q.compute_range(x, method="percentile", percentile=99.0, axis=-1)
  np.testing.assert_allclose(np.asarray(hi).reshape(-1),
                             np.percentile(np.abs(x), 99.0, axis=0), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(lo), -np.asarray(hi))
  lo, hi = Q.compute_range(x, method="percentile", percentile=95.0, symmetric=False)
  np.testing.assert_allclose([float(lo), float(hi)],
                             [np.percentile(x, 5.0), np.percentile(x, 95.0)], rtol=1e-5)


def test_compute_range_mse_is_the_grid_minimum():
  x = np.random.default_rng(3).laplace(size=(2000,)).astype(np.float32)
  lo, hi = Q.compute_range(x, method="mse", bits=4, symmetric=True, narrow_range=True)
  m = np.abs(x).max()

  def err(r):   # the 4-bit narrow symmetric quantizer on [-r m, r m], in float64
    s = r * m / 7
    return np.mean((np.clip(np.round(x / s), -7, 7) * s - x) ** 2)

  ratios = np.arange(1, 101) / 100
  errs = np.array([err(r) for r in ratios])
  r_found = float(hi) / m
  assert err(r_found) <= errs.min() * (1 + 1e-4)
  assert r_found < 0.9                       # heavy tails: clipping pays
  assert err(r_found) < err(1.0)
  np.testing.assert_allclose(float(lo), -float(hi))


def test_mse_range_beats_minmax_per_channel():
  x = np.random.default_rng(4).laplace(size=(300, 3)).astype(np.float32)
  q_mm = Q.quantize(x, 3, per_channel=True, range_method="minmax")
  q_mse = Q.quantize(x, 3, per_channel=True, range_method="mse")
  for c in range(3):
    assert _mse(Q.dequantize(q_mse)[:, c], x[:, c]) <= _mse(Q.dequantize(q_mm)[:, c], x[:, c])


@pytest.mark.parametrize("bits", [0, 1, 9, 4.0, True])
def test_bad_bits_is_a_config_error_naming_bits(bits):
  with pytest.raises(ConfigError, match="`bits`.*'w'"):
    Q.quantize(np.ones((4, 4), np.float32), bits, name="w")


def test_unknown_range_method_is_a_config_error():
  with pytest.raises(ConfigError, match="range_method"):
    Q.quantize(np.ones((4, 4), np.float32), 4, range_method="max")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_names_the_leaf(bad):
  x = np.ones((4, 4), np.float32)
  x[1, 2] = bad
  with pytest.raises(ConfigError, match="'layer/kernel'.*NaN or Inf"):
    Q.quantize(x, 8, name="layer/kernel")
  with pytest.raises(ConfigError, match="'layer/kernel'"):
    Q.kmeans_quantize(x, 2, name="layer/kernel")


def test_all_zero_tensor_roundtrips():
  x = np.zeros((3, 3, 2, 4), np.float32)
  for sym in (True, False):
    np.testing.assert_array_equal(
        np.asarray(Q.dequantize(Q.quantize(x, 4, symmetric=sym, per_channel=True))), x)


# ----------------------------------------------------------------------------- fake_quant vs TF


@pytest.fixture(scope="module")
def tf():
  import tensorflow as tf  # noqa: PLC0415
  tf.config.set_visible_devices([], "GPU")
  return tf


RANGES = [(-1.0, 1.0), (-0.3, 0.8), (0.2, 1.5), (-2.0, -0.5), (-0.1, 0.05), (-6.0, 0.0)]


@pytest.mark.parametrize("lo,hi", RANGES)
def test_fake_quant_matches_tensorflow(tf, lo, hi):
  rng = np.random.default_rng(5)
  x = rng.uniform(lo - 0.5 * (hi - lo), hi + 0.5 * (hi - lo), (257,)).astype(np.float32)
  fq = jax.jit(Q.fake_quant, static_argnums=(1, 4))
  for bits in range(2, 9):
    for narrow in (False, True):
      expected = tf.quantization.fake_quant_with_min_max_vars(
          x, lo, hi, num_bits=bits, narrow_range=narrow).numpy()
      got = np.asarray(fq(x, bits, lo, hi, narrow))
      np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * max(1.0, hi - lo),
                                 err_msg=f"bits={bits} narrow={narrow}")


@pytest.mark.parametrize("lo,hi", [(-1.0, 1.0), (0.2, 1.5), (-2.0, -0.5)])
@pytest.mark.parametrize("narrow", [False, True])
def test_fake_quant_gradients_match_tensorflow(tf, lo, hi, narrow):
  rng = np.random.default_rng(6)
  x = rng.uniform(lo - (hi - lo), hi + (hi - lo), (300,)).astype(np.float32)
  w = rng.standard_normal(300).astype(np.float32)     # a non-trivial upstream gradient
  bits = 3
  xt, lot, hit = tf.Variable(x), tf.Variable(lo), tf.Variable(hi)
  with tf.GradientTape() as tape:
    y = tf.reduce_sum(w * tf.quantization.fake_quant_with_min_max_vars(
        xt, lot, hit, num_bits=bits, narrow_range=narrow))
  gx, glo, ghi = [g.numpy() for g in tape.gradient(y, [xt, lot, hit])]
  f = lambda x, lo, hi: jnp.sum(w * Q.fake_quant(x, bits, lo, hi, narrow))
  jx, jlo, jhi = jax.grad(f, argnums=(0, 1, 2))(x, jnp.float32(lo), jnp.float32(hi))
  np.testing.assert_array_equal(np.asarray(jx), gx)
  assert np.count_nonzero(gx) not in (0, x.size)      # the test sees both sides of the clip
  np.testing.assert_allclose(float(jlo), glo, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(jhi), ghi, rtol=1e-5, atol=1e-5)


def test_fake_quant_per_channel_matches_tensorflow(tf):
  x = (_normal((7, 4)) * 2).astype(np.float32)
  lo = np.array([-1.0, -0.5, 0.1, -3.0], np.float32)
  hi = np.array([1.0, 2.0, 1.0, -0.2], np.float32)
  expected = tf.quantization.fake_quant_with_min_max_vars_per_channel(x, lo, hi, num_bits=4)
  np.testing.assert_allclose(np.asarray(Q.fake_quant(x, 4, lo, hi)), expected.numpy(),
                             atol=1e-6)
  glo = jax.grad(lambda lo: jnp.sum(Q.fake_quant(x, 4, lo, hi)))(lo)
  assert glo.shape == (4,)
  # d/dlo = number of values below the nudged min, per channel.
  n_lo = np.asarray(Q._nudge(jnp.asarray(lo), jnp.asarray(hi), 4, False)[0])
  np.testing.assert_array_equal(np.asarray(glo), (x < n_lo).sum(axis=0))


# ----------------------------------------------------------------------------- trees

PARAMS = {
    "stem_conv": {"kernel": _normal((3, 3, 3, 8), 10)},
    "block": {"conv": {"kernel": _normal((3, 3, 8, 8), 11)},
              "bn": {"scale": np.ones((8,), np.float32), "bias": np.zeros((8,), np.float32)}},
    "dense": {"kernel": _normal((8, 16), 12), "bias": np.zeros((16,), np.float32)},
    "head": {"kernel": _normal((16, 10), 13), "bias": np.zeros((10,), np.float32)},
}


@pytest.mark.parametrize("method", ["uniform", "kmeans", "pow2"])
def test_quantize_tree_selects_and_roundtrips(method):
  before = jax.tree.map(np.copy, PARAMS)
  # k-means per channel would need 2^4 <= 8 values per channel of dense/kernel: per tensor.
  qt = Q.quantize_tree(PARAMS, 4, method=method, per_channel=method != "kmeans")
  assert Q.is_qtensor(qt["block"]["conv"]["kernel"]) and Q.is_qtensor(qt["dense"]["kernel"])
  assert qt["stem_conv"]["kernel"] is PARAMS["stem_conv"]["kernel"]
  assert qt["head"]["kernel"] is PARAMS["head"]["kernel"]
  assert qt["block"]["bn"]["scale"] is PARAMS["block"]["bn"]["scale"]
  deq = Q.dequantize_tree(qt)
  assert jax.tree.structure(deq) == jax.tree.structure(PARAMS)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(PARAMS)):
    np.testing.assert_array_equal(a, b)                   # the input is untouched
  w = PARAMS["block"]["conv"]["kernel"]
  assert 0 < _mse(deq["block"]["conv"]["kernel"], w) < 0.1 * np.var(w)
  if method == "uniform":   # per-channel, symmetric, narrow by default: the same as quantize
    q = Q.quantize(w, 4, per_channel=True, narrow_range=True)
    np.testing.assert_array_equal(np.asarray(qt["block"]["conv"]["kernel"].codes),
                                  np.asarray(q.codes))


def test_quantize_tree_errors_name_key_and_leaf():
  with pytest.raises(ConfigError, match="quant.include"):
    Q.quantize_tree(PARAMS, 8, include=r"nothing_here")
  bad = jax.tree.map(np.copy, PARAMS)
  bad["dense"]["kernel"][0, 0] = np.nan
  with pytest.raises(ConfigError, match="'dense/kernel'"):
    Q.quantize_tree(bad, 8)
  with pytest.raises(ConfigError, match="method"):
    Q.quantize_tree(PARAMS, 8, method="log")


def test_quantize_tree_is_a_pytree_through_jit():
  qt = Q.quantize_tree(PARAMS, 8)
  deq = jax.jit(Q.dequantize_tree)(qt)
  np.testing.assert_array_equal(np.asarray(deq["dense"]["kernel"]),
                                np.asarray(Q.dequantize_tree(qt)["dense"]["kernel"]))


# ----------------------------------------------------------------------------- k-means / pow2


@pytest.mark.parametrize("dist", ["normal", "laplace"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kmeans_beats_uniform_and_uses_only_codebook_values(dist, bits):
  rng = np.random.default_rng(7)
  x = getattr(rng, dist)(size=(32, 32)).astype(np.float32)
  k = Q.kmeans_quantize(x, bits, seed=0)
  u = Q.quantize(x, bits)
  assert _mse(Q.dequantize(k), x) <= _mse(Q.dequantize(u), x)
  codes = np.asarray(k.codes)
  assert k.codebook.shape == (2 ** bits,) and codes.min() >= 0 and codes.max() < 2 ** bits
  x_hat = np.asarray(Q.dequantize(k))
  assert set(np.unique(x_hat)) <= set(np.asarray(k.codebook).tolist())
  # Lloyd's fixed point: each value goes to its nearest centroid.
  cb = np.asarray(k.codebook)
  nearest = np.abs(x[..., None] - cb).min(-1)
  np.testing.assert_allclose(np.abs(x_hat - x), nearest, atol=1e-6)


def test_kmeans_converges_to_a_lloyd_fixed_point():
  x = np.random.default_rng(11).laplace(size=(600,)).astype(np.float32)
  k = Q.kmeans_quantize(x, 3, iters=300, seed=2)
  codes, cb = np.asarray(k.codes), np.asarray(k.codebook)
  assert np.all(np.diff(cb) > 0)                          # sorted, no duplicate centroids
  for j in range(8):                                      # each centroid is its cluster's mean
    np.testing.assert_allclose(cb[j], x[codes == j].mean(), rtol=1e-5, atol=1e-6)


def test_kmeans_finds_separated_clusters_exactly():
  centers = np.array([-3.0, -1.0, 0.5, 4.0], np.float32)
  rng = np.random.default_rng(8)
  x = (np.repeat(centers, 50) + rng.uniform(-0.1, 0.1, 200)).astype(np.float32)
  k = Q.kmeans_quantize(x, 2, seed=3)
  expected = np.array([x[i * 50:(i + 1) * 50].mean() for i in range(4)])
  np.testing.assert_allclose(np.asarray(k.codebook), expected, rtol=1e-5)


def test_kmeans_is_deterministic_per_seed_and_per_channel():
  x = _normal((3, 3, 4, 5), 9)
  a = Q.kmeans_quantize(x, 3, seed=1, per_channel=True)
  b = Q.kmeans_quantize(x, 3, seed=1, per_channel=True)
  np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
  np.testing.assert_array_equal(np.asarray(a.codebook), np.asarray(b.codebook))
  assert a.codebook.shape == (5, 8)
  x_hat = np.asarray(Q.dequantize(a))
  for c in range(5):   # each channel reconstructs from its own codebook only
    assert set(np.unique(x_hat[..., c])) <= set(np.asarray(a.codebook[c]).tolist())


def test_kmeans_handles_fewer_distinct_values_than_centroids():
  x = np.array([0.0] * 10 + [1.0] * 10 + [2.0] * 12, np.float32)
  k = Q.kmeans_quantize(x, 3, seed=0)
  np.testing.assert_array_equal(np.asarray(Q.dequantize(k)), x)


def test_kmeans_codebook_larger_than_tensor_names_the_leaf():
  with pytest.raises(ConfigError, match="'tiny/kernel'.*codebook of 16"):
    Q.kmeans_quantize(np.ones((3, 4), np.float32), 4, name="tiny/kernel")
  with pytest.raises(ConfigError, match="per channel"):
    Q.kmeans_quantize(np.ones((3, 3, 1, 4), np.float32), 4, per_channel=True)


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_power_of_two_picks_the_nearest_level(bits):
  x = np.random.default_rng(10).laplace(scale=0.3, size=(1000,)).astype(np.float32)
  p = Q.power_of_two_quantize(x, bits)
  L = 2 ** (bits - 1) - 1
  codes = np.asarray(p.codes)
  assert codes.min() >= -L and codes.max() <= L
  e_max = np.floor(np.log2(4 * np.abs(x).max() / 3))
  mags = 2.0 ** (e_max - np.arange(L))
  levels = np.concatenate([-mags, [0.0], mags])
  x_hat = np.asarray(Q.dequantize(p))
  assert set(np.unique(x_hat)) <= set(levels.tolist())
  best = np.abs(x[:, None] - levels[None, :]).min(1)
  np.testing.assert_allclose(np.abs(x_hat - x), best, atol=1e-7)


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [1, 7, 13, 1001])
def test_pack_roundtrip_and_exact_size(bits, count):
  rng = np.random.default_rng(bits * 1000 + count)
  codes = rng.integers(0, 2 ** bits, count).astype(np.uint8)
  packed = packing.pack(codes, bits)
  assert packed.dtype == np.uint8 and packed.size == -(-count * bits // 8)
  np.testing.assert_array_equal(packing.unpack(packed, bits, count), codes)
  signed = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), count)
  back = packing.unpack(packing.pack(signed, bits, signed=True), bits, count, signed=True)
  np.testing.assert_array_equal(back, signed)


def test_pack_layout():
  np.testing.assert_array_equal(packing.pack([1, 2, 3], 4), [0x21, 0x03])
  # 3-bit codes straddle bytes: 0b111, 0b000, 0b101 -> stream 111 000 101 (LSB first).
  np.testing.assert_array_equal(packing.pack([7, 0, 5], 3), [0b01000111, 0b1])
  with pytest.raises(ValueError):
    packing.pack([4], 2)
  with pytest.raises(ValueError):
    packing.pack([-3], 2, signed=True)


def test_qtensor_nbytes():
  x = _normal((3, 3, 16, 8))
  q = Q.quantize(x, 4, per_channel=True)
  assert packing.qtensor_nbytes(q) == 3 * 3 * 16 * 8 // 2 + 8 * 4
  q = Q.quantize(x, 3, symmetric=False)
  assert packing.qtensor_nbytes(q) == -(-x.size * 3 // 8) + 4 + 1
  k = Q.kmeans_quantize(x, 4)
  assert packing.qtensor_nbytes(k) == x.size // 2 + 16 * 4


# ----------------------------------------------------------------------------- the quant transform


def _tree_bytes(tree):   # as metrics.tree_bytes: array leaves only
  return sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
             for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def _cfg(**kw):
  import ml_collections  # noqa: PLC0415
  return ml_collections.ConfigDict(kw)


def test_uniform_qat_value_is_the_stored_quantizer_with_a_straight_through_gradient():
  t = Q.quant_weights(PARAMS, bits=4)
  state = t.init(PARAMS, jax.random.key(0))
  assert state == {}
  eff = jax.jit(t.apply)(PARAMS, state)
  w = PARAMS["block"]["conv"]["kernel"]
  q = Q.quantize(w, 4, per_channel=True, narrow_range=True)
  np.testing.assert_array_equal(np.asarray(eff["block"]["conv"]["kernel"]),
                                np.asarray(Q.dequantize(q)))
  assert len(np.unique(np.asarray(q.codes))) <= 15
  np.testing.assert_array_equal(eff["head"]["kernel"], PARAMS["head"]["kernel"])
  np.testing.assert_array_equal(eff["stem_conv"]["kernel"], PARAMS["stem_conv"]["kernel"])
  u = jax.tree.map(lambda x: np.random.default_rng(x.size).standard_normal(x.shape)
                   .astype(np.float32), PARAMS)
  grads = jax.grad(lambda p: sum(jnp.sum(a * b) for a, b in
                                 zip(jax.tree.leaves(t.apply(p, state)), jax.tree.leaves(u))))(
                                     PARAMS)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(u)):   # minmax: nothing is clipped
    np.testing.assert_array_equal(np.asarray(a), b)


def test_uniform_qat_matches_tensorflow_per_channel_fake_quant(tf):
  w = PARAMS["block"]["conv"]["kernel"]
  eff = Q.fake_quant_weight(jnp.asarray(w), 4, per_channel=True)
  m = np.abs(w).max(axis=(0, 1, 2))
  expected = tf.quantization.fake_quant_with_min_max_vars_per_channel(
      w, -m, m, num_bits=4, narrow_range=True).numpy()
  np.testing.assert_allclose(np.asarray(eff), expected, atol=1e-6)


def test_uniform_qat_gradient_is_zero_where_the_percentile_range_clips():
  w = np.random.default_rng(2).laplace(size=(64, 4)).astype(np.float32)
  g = np.asarray(jax.grad(lambda w: jnp.sum(Q.fake_quant_weight(
      w, 3, per_channel=False, range_method="percentile", percentile=90.0)))(w))
  m = np.percentile(np.abs(w), 90.0)
  s = m / 3
  np.testing.assert_array_equal(g, (np.abs(w) <= 3.5 * s).astype(np.float32))
  assert 0 < (g == 0).sum() < w.size


@pytest.mark.parametrize("method,bits", [("uniform", 4), ("uniform", 3), ("kmeans", 2),
                                         ("pow2", 4)])
def test_export_holds_packed_codes_and_dequantizes_to_apply(method, bits):
  before = jax.tree.map(np.copy, PARAMS)
  t = Q.quant_weights(PARAMS, method=method, bits=bits)
  state = t.init(PARAMS, jax.random.key(0))
  eff = t.apply(PARAMS, state)
  art = t.export(PARAMS, state)
  back = Q.dequantize_export(art)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(eff)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))   # bit for bit
  conv = art["params"]["block"]["conv"]["kernel"]
  assert conv["codes"].dtype == np.uint8 and conv["codes"].size == -(-576 * bits // 8)
  # Exact stored bytes: packed codes + per-channel scales (or a per-tensor codebook) + floats.
  per_leaf = {"uniform": lambda n, c: -(-n * bits // 8) + 4 * c,
              "pow2": lambda n, c: -(-n * bits // 8) + 4 * c,
              "kmeans": lambda n, c: -(-n * bits // 8) + 4 * 2 ** bits}[method]
  floats = sum(x.nbytes for x in (PARAMS["stem_conv"]["kernel"], PARAMS["head"]["kernel"],
                                  PARAMS["head"]["bias"], PARAMS["dense"]["bias"],
                                  PARAMS["block"]["bn"]["scale"], PARAMS["block"]["bn"]["bias"]))
  assert _tree_bytes(art) == floats + per_leaf(576, 8) + per_leaf(128, 16)
  m = t.metrics(PARAMS, state)
  assert float(m["weight_bits"]) == bits and int(m["quantized_weights"]) == 704
  assert float(m["weight_storage_bits"]) == pytest.approx(
      8 * (per_leaf(576, 8) + per_leaf(128, 16)) / 704)
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(PARAMS)):
    np.testing.assert_array_equal(a, b)                     # the input is untouched


def test_asymmetric_export_stores_uint8_zero_points():
  t = Q.quant_weights(PARAMS, bits=4, symmetric=False)
  art = t.export(PARAMS, {})
  conv = art["params"]["block"]["conv"]["kernel"]
  assert conv["zero_point"].dtype == np.uint8 and conv["zero_point"].shape == (8,)
  assert _tree_bytes(conv) == 288 + 4 * 8 + 8
  np.testing.assert_array_equal(np.asarray(Q.dequantize_export(art)["block"]["conv"]["kernel"]),
                                np.asarray(t.apply(PARAMS, {})["block"]["conv"]["kernel"]))


@pytest.mark.parametrize("grad_mode", ["sum", "mean"])
def test_kmeans_centroids_train_as_deep_compression_under_sgd(grad_mode):
  rng = np.random.default_rng(3)
  params = {"layer": {"kernel": rng.standard_normal((3, 3, 8, 8)).astype(np.float32)},
            "head": {"kernel": rng.standard_normal((8, 4)).astype(np.float32)}}
  target = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
  weight = rng.uniform(0.5, 2.0, (3, 3, 8, 8)).astype(np.float32)
  loss = lambda w: jnp.sum(weight * (w - target) ** 2)
  t = Q.quant_weights(params, method="kmeans", bits=2, kmeans_grad=grad_mode)
  state = t.init(params, jax.random.key(0))
  params, state = t.calibrate(params, state, None)
  cb = np.asarray(state["layer"]["kernel"]["codebook"])
  codes = np.asarray(state["layer"]["kernel"]["codes"]).astype(np.int32)
  np.testing.assert_array_equal(params["layer"]["kernel"], cb[codes])   # latent = C[codes]
  lr = 1e-3
  tx = __import__("optax").sgd(lr)
  opt = tx.init(params)
  for step in range(2):
    grads = jax.grad(lambda p, s=state: loss(t.apply(p, s)["layer"]["kernel"]))(params)
    updates, opt = tx.update(grads, opt, params)
    moved = jax.tree.map(lambda a, b: a + b, params, updates)
    params, state = jax.jit(t.update)(moved, state, step + 1)
    g_c = np.asarray(jax.grad(lambda c: loss(c[codes]))(jnp.asarray(cb)))
    if grad_mode == "mean":
      g_c = g_c / np.bincount(codes.reshape(-1), minlength=4)
    expected = cb - lr * g_c
    new_cb = np.asarray(state["layer"]["kernel"]["codebook"])
    np.testing.assert_allclose(new_cb, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(state["layer"]["kernel"]["codes"]), codes)
    np.testing.assert_array_equal(np.asarray(params["layer"]["kernel"]), new_cb[codes])
    assert np.abs(new_cb - cb).max() > 1e-4
    cb = new_cb


def test_kmeans_ptq_keeps_the_codebook_and_per_channel_codebooks():
  t = Q.quant_weights(PARAMS, method="kmeans", bits=2, per_channel=True, mode="ptq")
  state = t.init(PARAMS, jax.random.key(0))
  assert state["block"]["conv"]["kernel"]["codebook"].shape == (8, 4)
  moved = jax.tree.map(lambda x: x + 1.0, PARAMS)
  params, new_state = t.update(moved, state, 1)
  assert params is moved and new_state is state
  eff = np.asarray(t.apply(PARAMS, state)["dense"]["kernel"])
  cb = np.asarray(state["dense"]["kernel"]["codebook"])
  for c in range(16):
    assert set(np.unique(eff[:, c])) <= set(cb[c].tolist())


def test_bits_by_path_mixes_bit_widths_first_match_wins():
  t = Q.transform_from_config(
      _cfg(bits=8, bits_by_path=("block/conv=2", ("conv", 4), ("dense", 3))), PARAMS)
  eff = t.apply(PARAMS, {})
  codes = np.asarray(Q.quantize(PARAMS["block"]["conv"]["kernel"], 2, per_channel=True).codes)
  assert set(np.unique(codes)) <= {-1, 0, 1}
  np.testing.assert_array_equal(
      np.asarray(eff["block"]["conv"]["kernel"]),
      np.asarray(Q.dequantize(Q.quantize(PARAMS["block"]["conv"]["kernel"], 2,
                                         per_channel=True, narrow_range=True))))
  assert float(t.metrics(PARAMS, {})["weight_bits"]) == pytest.approx((2 * 576 + 3 * 128) / 704)
  art = t.export(PARAMS, {})
  assert art["params"]["dense"]["kernel"]["bits"] == 3
  with pytest.raises(ConfigError, match=r"quant\.bits_by_path.*'nothing'"):
    Q.transform_from_config(_cfg(bits_by_path=("nothing=4",)), PARAMS)
  with pytest.raises(ConfigError, match=r"quant\.bits_by_path"):
    Q.transform_from_config(_cfg(bits_by_path=("conv=9",)), PARAMS)


def test_transform_config_errors_name_the_key_or_leaf():
  with pytest.raises(ConfigError, match=r"quant\.bits.*2\.\.8"):
    Q.transform_from_config(_cfg(bits=1), PARAMS)
  with pytest.raises(ConfigError, match=r"quant\.bits"):
    Q.transform_from_config(_cfg(bits=9, method="kmeans"), PARAMS)
  Q.transform_from_config(_cfg(bits=1, method="kmeans"), PARAMS)        # 2 centroids: fine
  with pytest.raises(ConfigError, match=r"'dense/kernel'.*codebook of 256"):
    Q.transform_from_config(_cfg(bits=8, method="kmeans"), PARAMS)
  with pytest.raises(ConfigError, match=r"quant\.include"):
    Q.transform_from_config(_cfg(include=("nothing",)), PARAMS)
  with pytest.raises(ConfigError, match=r"quant\.bitz"):
    Q.transform_from_config(_cfg(bitz=4), PARAMS)
  with pytest.raises(ConfigError, match=r"quant\.mode"):
    Q.transform_from_config(_cfg(mode="int8"), PARAMS)
  with pytest.raises(ConfigError, match=r"quant\.method.*uniform"):
    Q.transform_from_config(_cfg(method="apot"), PARAMS)
  bad = jax.tree.map(np.copy, PARAMS)
  bad["block"]["conv"]["kernel"][0, 0, 0, 0] = np.inf
  with pytest.raises(ConfigError, match=r"'block/conv/kernel'.*NaN or Inf"):
    Q.transform_from_config(_cfg(bits=4), bad)
  t = Q.transform_from_config(_cfg(bits=4, method="kmeans"), PARAMS)
  with pytest.raises(ConfigError, match=r"'block/conv/kernel'.*NaN or Inf"):
    t.calibrate(bad, t.init(PARAMS, jax.random.key(0)), None)


def test_transform_state_shapes_follow_from_abstract_params():
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), PARAMS)
  t = Q.transform_from_config(_cfg(method="kmeans", bits=3), abstract)
  shapes = jax.eval_shape(t.init, abstract, jax.random.key(0))
  assert shapes["block"]["conv"]["kernel"]["codebook"].shape == (8,)
  assert shapes["block"]["conv"]["kernel"]["codes"].shape == (3, 3, 8, 8)
  assert "head" not in shapes and "stem_conv" not in shapes
  real = t.init(PARAMS, jax.random.key(0))
  assert jax.tree.structure(real) == jax.tree.structure(shapes)


# ----------------------------------------------------------------------------- digits (slow)


@pytest.mark.slow
def test_ptq_on_a_trained_digits_cnn_keeps_accuracy(tmp_path):
  import optax  # noqa: PLC0415

  from jcompress import data as data_lib  # noqa: PLC0415
  from jcompress import models  # noqa: PLC0415

  data_dir = str(tmp_path)
  model = models.get_model("small_cnn", 10, width=0.5)
  it = data_lib.train_iterator("digits", batch_size=64, seed=0, data_dir=data_dir)
  shape = next(iter(data_lib.eval_iterator("digits", batch_size=1, data_dir=data_dir)))["image"]
  variables = jax.jit(lambda k: model.init(k, jnp.zeros(shape.shape), train=False))(
      jax.random.key(0))
  params, stats = variables["params"], variables["batch_stats"]
  tx = optax.sgd(0.05, momentum=0.9)
  opt = tx.init(params)

  @jax.jit
  def step(params, stats, opt, batch):
    def loss(p):
      (logits, _), new = model.apply({"params": p, "batch_stats": stats}, batch["image"],
                                     train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), new
    (_, new), g = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), new["batch_stats"], opt

  for _ in range(300):
    params, stats, opt = step(params, stats, opt, next(it))
  batches = list(data_lib.eval_iterator("digits", batch_size=360, data_dir=data_dir))

  @jax.jit
  def correct(p, b):
    logits, _ = model.apply({"params": p, "batch_stats": stats}, b["image"], train=False)
    return jnp.sum((jnp.argmax(logits, -1) == b["label"]) * b["mask"])

  acc = lambda p: sum(float(correct(p, b)) for b in batches) / 360
  float_acc = acc(params)
  assert float_acc >= 0.93
  results = {}
  for method, bits in [("uniform", 8), ("uniform", 2), ("kmeans", 2)]:
    t = Q.quant_weights(params, method=method, bits=bits, mode="ptq")
    p, st = t.calibrate(params, t.init(params, jax.random.key(0)), None)
    results[(method, bits)] = acc(t.apply(p, st))
  assert results[("uniform", 8)] >= float_acc - 0.005
  assert results[("kmeans", 2)] >= results[("uniform", 2)]


def test_quant_resnet_configs_build_their_transform_and_model():
  import importlib.util  # noqa: PLC0415

  from jcompress import config as config_lib  # noqa: PLC0415
  from jcompress import models  # noqa: PLC0415

  path = os.path.join(os.path.dirname(__file__), "..", "experiments", "quant_resnet.py")
  spec = importlib.util.spec_from_file_location("quant_resnet", path)
  exp = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(exp)
  c = exp.get_config("data=digits,method=kmeans,bits=4,abits=4,act=lsq")
  config_lib.validate(c)
  assert c.quant.method == "kmeans" and c.total_steps == 300 and c.optimizer.weight_decay == 0
  model = models.get_model("resnet20", 10, width=0.25, **dict(c.model_kwargs))
  abstract = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 8, 8, 3)), train=False),
                            jax.random.key(0))["params"]
  assert "stage1_block0" in abstract and "conv1_act" in abstract["stage1_block0"]
  t = experiment.build_transform(c, abstract)
  st = jax.eval_shape(t.init, abstract, jax.random.key(0))
  assert st["stage3_block2"]["conv2"]["kernel"]["codebook"].shape == (16,)
  assert "stem_conv" not in st and "head" not in st
  c = exp.get_config("data=digits,mode=ptq,bits=8,init_from=/x")
  assert c.total_steps == 0 and c.quant.mode == "ptq" and "act_quant" not in c.model_kwargs
  assert {(d["quant.method"], d["quant.bits"]) for d in exp.get_sweep()} == {
      (m, b) for m in ("uniform", "kmeans") for b in (8, 4, 2)}
  with pytest.raises(ConfigError, match="per_channel"):
    exp.get_config("per_channel=maybe")
