"""Reference checks of the quantizers: `fake_quant` bit for bit against TensorFlow's kernels
(ties included), per-tensor and per-channel `quantize` agreeing on one channel, and k-means
against scikit-learn's `KMeans(n_init=10)`."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress import quantize as Q

pytestmark = pytest.mark.plumbing


@pytest.fixture(scope="module")
def tf():
  import tensorflow as tf  # noqa: PLC0415
  tf.config.set_visible_devices([], "GPU")
  return tf


# ----------------------------------------------------------------------------- fake_quant vs TF

N_X = 1536     # one input length for every range: one compile per (bits, narrow_range)


def _tf_nudge(lo, hi, bits, narrow):
  """TF's `Nudge` in numpy float32, one rounded operation at a time."""
  f = np.float32
  q_min, q_max = f(1 if narrow else 0), f(2 ** bits - 1)
  lo, hi = f(lo), f(hi)
  scale = (hi - lo) / (q_max - q_min)
  zp = q_min - lo / scale
  z = q_min if zp < q_min else q_max if zp > q_max else f(np.floor(zp) + (zp - np.floor(zp) >= .5))
  return (q_min - z) * scale, (q_max - z) * scale, scale


def _ranges(seed, n):
  """Random ranges: straddling 0 at every scale, all-positive, all-negative, tiny."""
  rng = np.random.default_rng(seed)
  out = []
  while len(out) < n:
    kind = len(out) % 4
    mag = 10.0 ** rng.uniform(-3, 1)
    if kind == 0:
      lo, hi = -rng.uniform(0, 1) * mag, rng.uniform(0, 1) * mag
    elif kind == 1:
      lo, hi = np.sort(rng.uniform(0.1, 1, 2)) * mag
    elif kind == 2:
      lo, hi = -np.sort(rng.uniform(0.1, 1, 2))[::-1] * mag
    else:
      lo, hi = -rng.uniform(0, 1e-4), rng.uniform(0, 1e-4)
    lo, hi = np.float32(lo), np.float32(hi)
    if lo < hi:
      out.append((lo, hi))
  return out


def _tie_inputs(lo, hi, bits, narrow, seed):
  """The half-steps `lo' + (i + 1/2) s` of the nudged grid, their float32 neighbours, the
  grid points, the nudged ends and values beyond them (length N_X)."""
  n_lo, n_hi, s = _tf_nudge(lo, hi, bits, narrow)
  steps = 2 ** bits - 1 - int(narrow)
  i = np.arange(-2, steps + 2, dtype=np.float32)
  half = (n_lo + (i + np.float32(0.5)) * s).astype(np.float32)
  grid = (n_lo + i * s).astype(np.float32)
  x = np.concatenate([half, np.nextafter(half, np.float32(np.inf)),
                      np.nextafter(half, np.float32(-np.inf)), grid, [n_lo, n_hi, 0.0]])
  rng = np.random.default_rng(seed)
  fill = rng.uniform(n_lo - 2 * s, n_hi + 2 * s, N_X).astype(np.float32)
  x = np.concatenate([x.astype(np.float32), fill])[:N_X]
  return x


@pytest.mark.parametrize("narrow", [False, True])
def test_fake_quant_is_bitwise_tensorflow_at_ties(tf, narrow, default_emitters):
  with default_emitters():   # bitwise: XLA's own emitters
    _check_fake_quant_ties(tf, narrow)


def _check_fake_quant_ties(tf, narrow):
  fq = jax.jit(Q.fake_quant, static_argnums=(1, 4))
  ties = 0
  for bits in range(2, 9):
    for j, (lo, hi) in enumerate(_ranges(100 * bits + narrow, 6)):
      x = _tie_inputs(lo, hi, bits, narrow, j)
      expected = tf.quantization.fake_quant_with_min_max_vars(
          x, lo, hi, num_bits=bits, narrow_range=narrow).numpy()
      got = np.asarray(fq(x, bits, jnp.float32(lo), jnp.float32(hi), narrow))
      np.testing.assert_array_equal(got, expected, err_msg=f"bits={bits} range=({lo!r}, {hi!r})")
      # The same range given per channel goes through TF's per-channel kernel (x * 1/s).
      expected = tf.quantization.fake_quant_with_min_max_vars_per_channel(
          x[:, None], [lo], [hi], num_bits=bits, narrow_range=narrow).numpy()[:, 0]
      got = np.asarray(fq(x[:, None], bits, jnp.float32([lo]), jnp.float32([hi]), narrow))[:, 0]
      np.testing.assert_array_equal(got, expected, err_msg=f"per-channel bits={bits}")
      ties += int(np.sum(np.abs(expected - x) == np.abs(expected - x).max()))
  assert ties > 0


def test_fake_quant_per_channel_is_bitwise_tensorflow(tf):
  rng = np.random.default_rng(7)
  ranges = _ranges(7, 8)
  lo = np.float32([r[0] for r in ranges])
  hi = np.float32([r[1] for r in ranges])
  for bits in (2, 5, 8):
    for narrow in (False, True):
      cols = [_tie_inputs(a, b, bits, narrow, c)[:256] for c, (a, b) in enumerate(ranges)]
      x = np.stack(cols, axis=1)
      rng.shuffle(x, axis=0)
      expected = tf.quantization.fake_quant_with_min_max_vars_per_channel(
          x, lo, hi, num_bits=bits, narrow_range=narrow).numpy()
      np.testing.assert_array_equal(np.asarray(Q.fake_quant(x, bits, lo, hi, narrow)), expected)


@pytest.mark.parametrize("narrow", [False, True])
def test_fake_quant_gradient_mask_is_tensorflow_at_the_nudged_ends(tf, narrow):
  grad = jax.jit(jax.grad(lambda x, g, lo, hi, bits: jnp.sum(g * Q.fake_quant(x, bits, lo, hi,
                                                                                narrow)),
                          argnums=(0, 2, 3)), static_argnums=(4,))
  rng = np.random.default_rng(3)
  for bits in (2, 3, 8):
    for j, (lo, hi) in enumerate(_ranges(bits + 10 * narrow, 4)):
      x = _tie_inputs(lo, hi, bits, narrow, j)
      n_lo, n_hi, _ = _tf_nudge(lo, hi, bits, narrow)
      x[:4] = [n_lo, n_hi, np.nextafter(n_lo, np.float32(-1e9)), np.nextafter(n_hi, np.inf)]
      g = rng.standard_normal(x.shape).astype(np.float32)
      gx, glo, ghi = tf.quantization.fake_quant_with_min_max_vars_gradient(
          g, x, lo, hi, num_bits=bits, narrow_range=narrow)
      jx, jlo, jhi = grad(x, g, jnp.float32(lo), jnp.float32(hi), bits)
      np.testing.assert_array_equal(np.asarray(jx), gx.numpy())
      assert np.count_nonzero(gx.numpy()) not in (0, x.size)
      np.testing.assert_allclose(float(jlo), float(glo), rtol=1e-5, atol=1e-4)
      np.testing.assert_allclose(float(jhi), float(ghi), rtol=1e-5, atol=1e-4)


def test_fake_quant_zero_range_is_zero_with_a_pass_through_gradient(tf):
  x = np.float32([-1.0, 0.0, 0.3, 2.0])
  expected = tf.quantization.fake_quant_with_min_max_vars(x, 0.0, 0.0, num_bits=8).numpy()
  got = Q.fake_quant(x, 8, 0.0, 0.0)
  np.testing.assert_array_equal(np.asarray(got), expected)
  gx, glo, ghi = jax.grad(lambda x, lo, hi: jnp.sum(Q.fake_quant(x, 8, lo, hi)),
                          argnums=(0, 1, 2))(x, jnp.float32(0), jnp.float32(0))
  tgx, tglo, tghi = tf.quantization.fake_quant_with_min_max_vars_gradient(
      np.ones(4, np.float32), x, 0.0, 0.0, num_bits=8)
  np.testing.assert_array_equal(np.asarray(gx), tgx.numpy())
  assert float(glo) == float(tglo) == 0.0 and float(ghi) == float(tghi) == 0.0


# ----------------------------------------------------------------------------- one channel


def _adversarial_column(bits, narrow, seed):
  """A column whose asymmetric range puts the zero point at z + 1/2 (up to float rounding)
  and whose values sit on the half-steps of that grid and next to them."""
  rng = np.random.default_rng(seed)
  q_min, q_max = (1 if narrow else 0), 2 ** bits - 1
  s = np.float32(10.0 ** rng.uniform(-4, 1))
  z = int(rng.integers(q_min, q_max))
  lo = np.float32(-(z + 0.5 - q_min) * s)
  hi = np.float32(lo + (q_max - q_min) * s)
  half = (lo + (np.arange(q_max - q_min) + np.float32(0.5)) * s).astype(np.float32)
  x = np.concatenate([[lo, hi], half, np.nextafter(half, np.float32(np.inf)),
                      rng.uniform(lo, hi, 64)]).astype(np.float32)
  return np.resize(x, 640)[:, None]


@pytest.mark.parametrize("symmetric,narrow", [(False, False), (False, True), (True, False),
                                              (True, True)])
def test_one_channel_quantizes_the_same_per_tensor_and_per_channel(symmetric, narrow):
  rng = np.random.default_rng(11)
  for bits in (2, 4, 8):
    cols = [_adversarial_column(bits, narrow, s) for s in range(8)]
    cols += [(rng.standard_normal((640, 1)) * 10.0 ** rng.uniform(-3, 1)
              + rng.uniform(-1, 1)).astype(np.float32) for _ in range(2)]
    for i, x in enumerate(cols):
      for method in (("minmax", "mse", "percentile") if i % 5 == 0 else ("minmax",)):
        a = Q.quantize(x, bits, symmetric=symmetric, narrow_range=narrow, range_method=method)
        b = Q.quantize(x, bits, symmetric=symmetric, narrow_range=narrow, range_method=method,
                       per_channel=True)
        msg = f"bits={bits} column={i} method={method}"
        np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes), err_msg=msg)
        np.testing.assert_array_equal(np.asarray(a.scale).reshape(1), np.asarray(b.scale)[0],
                                      err_msg=msg)
        np.testing.assert_array_equal(np.asarray(a.zero_point).reshape(1),
                                      np.asarray(b.zero_point)[0], err_msg=msg)
        # The codes are round(x / s) + z with the IEEE quotient (ties to even).
        s, z = np.float32(a.scale), np.float32(a.zero_point)
        q_min, q_max = Q.code_range(bits, symmetric, narrow)
        if method == "minmax":
          np.testing.assert_array_equal(np.asarray(a.codes),
                                        np.clip(np.round(x / s) + z, q_min, q_max), err_msg=msg)


# ----------------------------------------------------------------------------- k-means vs sklearn


def _sse(a, b):
  return float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def _sklearn_sse(v, k):
  from sklearn.cluster import KMeans  # noqa: PLC0415
  v = np.asarray(v, np.float64).reshape(-1, 1)
  km = KMeans(n_clusters=k, n_init=10, random_state=0).fit(v)
  return _sse(v[:, 0], km.cluster_centers_[km.labels_, 0])


def _kmeans_cases():
  rng = np.random.default_rng(21)
  outlier = rng.standard_normal(20).astype(np.float32)
  outlier[3] = 25.0
  outlier40 = rng.standard_normal(40).astype(np.float32)
  outlier40[0] = -12.0
  return {
      "student_t3": rng.standard_t(3, 1500).astype(np.float32),
      "student_t2": rng.standard_t(2, 600).astype(np.float32),
      "bimodal": np.concatenate([rng.normal(-1, .1, 700), rng.normal(1.5, .3, 300)]
                                ).astype(np.float32),
      "outlier20": outlier,
      "outlier40": outlier40,
      "short12": rng.standard_t(2, 12).astype(np.float32),
      "short30": rng.laplace(size=30).astype(np.float32),
  }


@pytest.mark.slow
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_kmeans_sse_is_within_5_percent_of_sklearn_per_tensor(bits):
  k = 2 ** bits
  for name, x in _kmeans_cases().items():
    if k > x.size:
      continue
    q = Q.kmeans_quantize(x, bits, seed=0)
    ours, ref = _sse(Q.dequantize(q), x), _sklearn_sse(x, k)
    assert ours <= 1.05 * ref + 1e-12 * _sse(x, 0), f"{name}: SSE {ours} vs sklearn {ref}"


@pytest.mark.parametrize("bits", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_kmeans_sse_is_within_5_percent_of_sklearn_per_channel(bits):
  rng = np.random.default_rng(22)
  # Short channels (exact path, 3x3x4 = 36 values) and long ones (3x3x40 = 360 values: the
  # best of the k-means++ starts and the grouped exact start), heavy-tailed and bimodal.
  short = (rng.standard_t(3, (3, 3, 4, 3)) * 0.05).astype(np.float32)
  short[0, 0, 0, 1] = 1.0                                       # one outlier in channel 1
  long = np.concatenate([(rng.standard_t(2, (3, 3, 40, 2)) * 0.05),
                         np.where(rng.random((3, 3, 40, 1)) < .3, -1.0, 1.0)
                         + rng.normal(0, .1, (3, 3, 40, 1))], axis=-1).astype(np.float32)
  for x in (short, long):
    q = Q.kmeans_quantize(x, bits, per_channel=True, seed=1)
    x_hat = np.asarray(Q.dequantize(q))
    for c in range(x.shape[-1]):
      ours, ref = _sse(x_hat[..., c], x[..., c]), _sklearn_sse(x[..., c], 2 ** bits)
      assert ours <= 1.05 * ref + 1e-12, f"shape {x.shape} channel {c}"


def test_kmeans_short_vector_outlier_gets_its_own_centroid():
  x = np.float32([-0.3, -0.1, 0.0, 0.05, 0.1, 0.2, 0.25, 0.4, -0.2, 9.0])
  q = Q.kmeans_quantize(x, 2, seed=0)
  x_hat = np.asarray(Q.dequantize(q))
  assert x_hat[-1] == np.float32(9.0)
  assert 9.0 not in x_hat[:-1]


@pytest.mark.parametrize("n", [12, 40, 600])
def test_kmeans_ties_with_fewer_distinct_values_than_centroids_are_exact(n):
  rng = np.random.default_rng(n)
  values = rng.standard_normal(5).astype(np.float32) * 0.1
  x = values[rng.integers(0, 5, n)]
  x[:5] = values                                                # every value occurs
  for bits in (3, 4) if n >= 16 else (3,):
    q = Q.kmeans_quantize(x, bits, seed=0)
    np.testing.assert_array_equal(np.asarray(Q.dequantize(q)), x)
    cb = np.asarray(q.codebook)
    assert np.all(np.diff(cb) >= 0)
  # Equal values with more distinct values than centroids: ties never split a value.
  x = np.repeat(np.float32([0.0, 0.1, 0.2, 0.3, 1.0]), 8)
  q = Q.kmeans_quantize(x, 2, seed=0)
  x_hat = np.asarray(Q.dequantize(q)).reshape(5, 8)
  assert np.all(x_hat == x_hat[:, :1])


def test_kmeans_is_a_function_of_the_key_and_traces_under_jit():
  x = np.random.default_rng(5).standard_t(3, (3, 3, 8, 4)).astype(np.float32)   # 288 / channel
  a = Q.kmeans_quantize(x, 2, per_channel=True, seed=jax.random.key(3))
  b = Q.kmeans_quantize(x, 2, per_channel=True, seed=jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(a.codebook), np.asarray(b.codebook))
  np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
  jitted = jax.jit(lambda w, key: Q._kmeans(w, key, k=4, iters=20, axis=3))
  cents, codes = jitted(jnp.asarray(x), jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(cents), np.asarray(a.codebook))
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(a.codes))
