"""Binary networks: sign quantizers and their gradients, activation quantizers, bit packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress import binary as bz
from jcompress import transforms
from jcompress.errors import ConfigError

pytestmark = pytest.mark.plumbing

# Exact zeros, the STE boundaries +-1, the Bi-Real kinks and points outside [-1, 1].
BOUNDARY = np.array([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 1e-7, -1e-7, 1.0001, -1.0001, 2.0, -3.0],
                    np.float32)


def _inputs(seed=0, n=200):
  x = np.random.default_rng(seed).normal(scale=1.5, size=n).astype(np.float32)
  return jnp.asarray(np.concatenate([BOUNDARY, x]))


def _cotangent(x, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=x.shape).astype(np.float32))


def _vjp(fn, x, g):
  """dL/dx for L = sum(g * fn(x)), through jax.grad."""
  return jax.grad(lambda v: jnp.sum(g * fn(v)))(x)


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("fn", [bz.binarize, bz.approx_sign, bz.swish_sign,
                                lambda x: bz.swish_sign(x, beta=1.0)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_sign_forward_is_exactly_plus_minus_one_with_sign0_plus(fn, dtype):
  x = _inputs().astype(dtype)
  y = fn(x)
  assert y.dtype == dtype
  yn = np.asarray(y, np.float32)
  assert set(np.unique(yn)) <= {-1.0, 1.0}
  np.testing.assert_array_equal(yn, np.where(np.asarray(x, np.float32) >= 0, 1.0, -1.0))
  assert float(fn(jnp.zeros((), dtype))) == 1.0
  assert float(fn(jnp.asarray(-0.0, dtype))) == 1.0


def test_sign_quantizers_under_jit_match_eager():
  x, g = _inputs(), _cotangent(_inputs())
  for fn in (bz.binarize, bz.approx_sign, bz.swish_sign):
    np.testing.assert_array_equal(jax.jit(fn)(x), fn(x))
    np.testing.assert_allclose(jax.jit(lambda v, fn=fn: _vjp(fn, v, g))(x), _vjp(fn, x, g),
                               rtol=1e-5, atol=1e-6)   # XLA may fuse swish_sign's math


# ----------------------------------------------------------------------------- gradients


def test_binarize_gradient_is_straight_through():
  x = _inputs()
  g = _cotangent(x)
  xn = np.asarray(x)
  expected = np.asarray(g) * (np.abs(xn) <= 1)
  np.testing.assert_array_equal(_vjp(bz.binarize, x, g), expected)
  # the boundaries themselves pass the gradient, just past them it is zero
  np.testing.assert_array_equal(jax.grad(lambda v: bz.binarize(v))(1.0), 1.0)
  np.testing.assert_array_equal(jax.grad(lambda v: bz.binarize(v))(-1.0), 1.0)
  np.testing.assert_array_equal(jax.grad(lambda v: bz.binarize(v))(0.0), 1.0)
  np.testing.assert_array_equal(jax.grad(lambda v: bz.binarize(v))(1.0001), 0.0)


def test_binarize_gradient_keeps_dtype():
  x = _inputs().astype(jnp.bfloat16)
  gx = jax.grad(lambda v: jnp.sum(bz.binarize(v).astype(jnp.float32)))(x)
  assert gx.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(gx, np.float32),
                                (np.abs(np.asarray(x, np.float32)) <= 1).astype(np.float32))


def _approx_sign_closed_form(x):
  x = np.asarray(x, np.float64)
  return np.select([(x >= -1) & (x < 0), (x >= 0) & (x < 1)], [2 + 2 * x, 2 - 2 * x], 0.0)


def test_approx_sign_gradient_closed_form():
  x = _inputs()
  g = _cotangent(x)
  expected = np.asarray(g, np.float64) * _approx_sign_closed_form(x)
  np.testing.assert_allclose(_vjp(bz.approx_sign, x, g), expected, rtol=1e-6, atol=1e-7)
  # exact values at the kinks: 2 at 0, 0 at +-1, 0 outside
  grad = jax.vmap(jax.grad(bz.approx_sign))
  np.testing.assert_array_equal(grad(jnp.array([0.0, 1.0, -1.0, 2.0, -0.5, 0.5])),
                                [2.0, 0.0, 0.0, 0.0, 1.0, 1.0])


def test_approx_sign_gradient_is_derivative_of_bireal_polynomial():
  def poly(x):
    return jnp.where(x < -1, -1.0, jnp.where(x < 0, 2 * x + x * x,
                                             jnp.where(x < 1, 2 * x - x * x, 1.0)))
  x = _inputs(seed=3)   # F is C^1 (F' = 0 at +-1, 2 at 0 from both sides): no point is skipped
  np.testing.assert_allclose(jax.vmap(jax.grad(bz.approx_sign))(x),
                             jax.vmap(jax.grad(poly))(x), atol=1e-6)


@pytest.mark.parametrize("beta", [5.0, 1.0, 10.0])
def test_swish_sign_gradient_closed_form(beta):
  x = _inputs(seed=4)
  g = _cotangent(x)
  xd = np.asarray(x, np.float64)
  # Larq's SwishSign: beta (2 - beta x tanh(beta x / 2)) / (1 + cosh(beta x))
  closed = beta * (2 - beta * xd * np.tanh(beta * xd / 2)) / (1 + np.cosh(beta * xd))
  got = _vjp(lambda v: bz.swish_sign(v, beta=beta), x, g)
  np.testing.assert_allclose(got, np.asarray(g, np.float64) * closed, rtol=1e-4, atol=1e-5)
  # and it is the derivative of the smooth sign 2 s (1 + beta x (1 - s)) - 1
  def smooth(v):
    s = jax.nn.sigmoid(beta * v)
    return 2 * s * (1 + beta * v * (1 - s)) - 1
  # (autodiff of the smooth form loses ~1e-5 absolute to cancellation in 1 - s, float32)
  np.testing.assert_allclose(got, _vjp(smooth, x, g), rtol=1e-4, atol=1e-5 * beta)
  # at 0 the gradient is beta (peak of the relaxation)
  np.testing.assert_allclose(jax.grad(lambda v: bz.swish_sign(v, beta))(0.0), beta, rtol=1e-6)


def test_swish_sign_default_beta_is_5():
  np.testing.assert_allclose(jax.grad(bz.swish_sign)(0.0), 5.0, rtol=1e-6)


# ----------------------------------------------------------------------------- stochastic


def test_stochastic_binarize_frequency_matches_hard_sigmoid():
  xs = jnp.array([-2.0, -1.0, -0.75, -0.3, 0.0, 0.2, 0.6, 1.0, 1.5])
  n = 40000
  y = bz.stochastic_binarize(jnp.broadcast_to(xs, (n, xs.size)), jax.random.PRNGKey(0))
  yn = np.asarray(y)
  assert set(np.unique(yn)) <= {-1.0, 1.0}
  freq = (yn == 1).mean(axis=0)
  p = np.clip((np.asarray(xs) + 1) / 2, 0, 1)
  np.testing.assert_allclose(freq, p, atol=4.5 * np.sqrt(0.25 / n))
  # outside (-1, 1) the draw is certain
  np.testing.assert_array_equal(freq[[0, 1, 7, 8]], [0.0, 0.0, 1.0, 1.0])


def test_stochastic_binarize_is_deterministic_for_a_key():
  x = _inputs()
  a = bz.stochastic_binarize(x, jax.random.PRNGKey(7))
  b = bz.stochastic_binarize(x, jax.random.PRNGKey(7))
  c = jax.jit(bz.stochastic_binarize)(x, jax.random.PRNGKey(7))
  d = bz.stochastic_binarize(x, jax.random.PRNGKey(8))
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, c)
  assert not np.array_equal(a, d)
  assert bz.stochastic_binarize(x.astype(jnp.bfloat16), jax.random.PRNGKey(0)).dtype == jnp.bfloat16


def test_stochastic_binarize_gradient_is_straight_through():
  x = _inputs()
  g = _cotangent(x)
  got = _vjp(lambda v: bz.stochastic_binarize(v, jax.random.PRNGKey(1)), x, g)
  np.testing.assert_array_equal(got, np.asarray(g) * (np.abs(np.asarray(x)) <= 1))


# ----------------------------------------------------------------------------- xnor


@pytest.mark.parametrize("shape", [(3, 3, 5, 4), (7, 6)])
def test_xnor_forward_is_per_output_channel_mean_abs_times_sign(shape):
  w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  w.flat[0] = 0.0
  out = np.asarray(bz.xnor_binarize_weights(jnp.asarray(w)))
  alpha = np.abs(w).reshape(-1, shape[-1]).mean(0)
  np.testing.assert_allclose(out, alpha * np.where(w >= 0, 1.0, -1.0), rtol=1e-6)
  np.testing.assert_allclose(bz.xnor_scale(jnp.asarray(w)), alpha, rtol=1e-6)
  # each output channel takes exactly two values, +-alpha_c
  flat = out.reshape(-1, shape[-1])
  for c in range(shape[-1]):
    assert set(np.round(np.abs(flat[:, c]) / alpha[c], 5)) == {1.0}


def _xnor_explicit(w):
  """alpha(w) * sign(w), STE through sign via stop_gradient, true gradient through alpha."""
  alpha = jnp.mean(jnp.abs(w), axis=tuple(range(w.ndim - 1)), keepdims=True)
  inside = jnp.abs(jax.lax.stop_gradient(w)) <= 1
  sign = jnp.where(jax.lax.stop_gradient(w) >= 0, 1.0, -1.0)
  ste = sign + jnp.where(inside, w - jax.lax.stop_gradient(w), 0.0)
  return alpha * ste


@pytest.mark.parametrize("shape", [(3, 3, 4, 5), (9, 3)])
def test_xnor_gradient_matches_explicit_formula_and_closed_form(shape):
  rng = np.random.default_rng(2)
  w = rng.normal(scale=1.2, size=shape).astype(np.float32)
  g = jnp.asarray(rng.normal(size=shape).astype(np.float32))
  wz = w.copy()
  wz.reshape(-1)[:4] = [0.0, 1.0, -1.0, 0.0]
  wz = jnp.asarray(wz)
  np.testing.assert_allclose(_vjp(bz.xnor_binarize_weights, wz, g), _vjp(_xnor_explicit, wz, g),
                             rtol=1e-5, atol=1e-6)
  # closed form (no exact zeros, where d|w|/dw is a convention):
  # alpha_c g_i 1{|w_i| <= 1} + sign(w_i) / N sum_j g_j sign(w_j)
  wd, gd = w.astype(np.float64), np.asarray(g, np.float64)
  n = wd.size // shape[-1]
  s = np.where(wd >= 0, 1.0, -1.0)
  alpha = np.abs(wd).reshape(-1, shape[-1]).mean(0)
  closed = alpha * gd * (np.abs(wd) <= 1) + s / n * (gd * s).reshape(-1, shape[-1]).sum(0)
  np.testing.assert_allclose(_vjp(bz.xnor_binarize_weights, jnp.asarray(w), g), closed,
                             rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- get_binarizer


def test_get_binarizer_names():
  assert bz.get_binarizer("ste_sign") is bz.binarize
  assert bz.get_binarizer("approx_sign") is bz.approx_sign
  assert bz.get_binarizer("swish_sign") is bz.swish_sign
  assert bz.get_binarizer("xnor") is bz.xnor_binarize_weights


def test_get_binarizer_unknown_names_key_and_known_names():
  with pytest.raises(ConfigError, match=r"'binary\.method'.*'sine'.*ste_sign, approx_sign, "
                                        r"swish_sign, xnor"):
    bz.get_binarizer("sine")


# ----------------------------------------------------------------------------- ParamTransform


def _params(seed=0):
  rng = np.random.default_rng(seed)
  def r(*shape):
    return jnp.asarray(rng.normal(scale=1.3, size=shape).astype(np.float32))
  return {
      "stem_conv": {"kernel": r(3, 3, 3, 8)},
      "stage1_block0": {"conv1": {"kernel": r(3, 3, 8, 40)},
                        "bn1": {"scale": r(40), "bias": r(40)}},
      "dense": {"kernel": r(37, 16), "bias": r(16)},
      "head": {"kernel": r(16, 10), "bias": r(10)},
  }


SELECTED = ("stage1_block0/conv1/kernel", "dense/kernel")


def _by_path(tree):
  return dict(zip(transforms.leaf_paths(tree), jax.tree.leaves(tree)))


def test_binary_weights_forward_sees_signs_on_selected_leaves_only():
  params = _params()
  t = bz.binary_weights(params)
  state = t.init(params, jax.random.PRNGKey(0))
  eff = _by_path(jax.jit(t.apply)(params, state))
  for path, w in _by_path(params).items():
    if path in SELECTED:
      np.testing.assert_array_equal(eff[path], np.where(np.asarray(w) >= 0, 1.0, -1.0))
    else:
      np.testing.assert_array_equal(eff[path], w)


def test_binary_weights_gradient_is_straight_through_onto_latent_weights():
  params = _params()
  t = bz.binary_weights(params)
  state = t.init(params, jax.random.PRNGKey(0))
  cot = jax.tree.map(lambda w: jnp.asarray(
      np.random.default_rng(w.size).normal(size=w.shape).astype(np.float32)), params)

  def loss(p):
    eff = t.apply(p, state)
    return sum(jnp.sum(c * e) for c, e in zip(jax.tree.leaves(cot), jax.tree.leaves(eff)))

  grads = _by_path(jax.grad(loss)(params))
  for (path, w), c in zip(_by_path(params).items(), jax.tree.leaves(cot)):
    want = np.asarray(c) * (np.abs(np.asarray(w)) <= 1) if path in SELECTED else c
    np.testing.assert_array_equal(grads[path], want)


def test_binary_weights_update_clips_only_selected_leaves():
  params = _params()
  t = bz.binary_weights(params)
  state = t.init(params, jax.random.PRNGKey(0))
  new, new_state = jax.jit(t.update)(params, state, 1)
  assert new_state == state
  new = _by_path(new)
  for path, w in _by_path(params).items():
    w = np.asarray(w)
    assert np.abs(w).max() > 1   # the test would prove nothing otherwise
    np.testing.assert_array_equal(new[path], np.clip(w, -1, 1) if path in SELECTED else w)


@pytest.mark.parametrize("method", ["ste_sign", "approx_sign", "swish_sign", "xnor"])
def test_binary_weights_export_packs_bits_and_unpacks_to_apply(method):
  params = _params()
  t = bz.binary_weights(params, method=method)
  state = t.init(params, jax.random.PRNGKey(0))
  art = t.export(params, state)
  packed = _by_path(art["params"])
  conv = art["params"]["stage1_block0"]["conv1"]["kernel"]
  assert conv["bits"].dtype == jnp.uint32 and conv["shape"] == (3, 3, 8, 40)
  assert conv["bits"].nbytes == 3 * 3 * 40 * 1 * 4           # 8 input channels -> 1 word
  assert art["params"]["dense"]["kernel"]["bits"].nbytes == 16 * 2 * 4   # 37 -> 2 words
  assert ("scale" in conv) == (method == "xnor")
  np.testing.assert_array_equal(packed["head/kernel"], params["head"]["kernel"])
  restored = _by_path(bz.unpack_export(art))
  for path, eff in _by_path(t.apply(params, state)).items():
    np.testing.assert_array_equal(restored[path], eff)


def test_binary_weights_float_steps_two_stages():
  """`float_steps`: kernels float (identity, identity gradient) until that many steps are done,
  then signs with the straight-through gradient."""
  params = _params()
  t = bz.binary_weights(params, float_steps=3)
  state = t.init(params, jax.random.PRNGKey(0))
  apply, update = jax.jit(t.apply), jax.jit(t.update)

  def grads(p, st):
    return _by_path(jax.grad(lambda q: sum(jnp.sum(e * e) for e in jax.tree.leaves(
        t.apply(q, st))))(p))

  for step in (1, 2):
    params, state = update(params, state, step)
    assert not bool(state["binary_on"])
    for path, w in _by_path(apply(params, state)).items():
      np.testing.assert_array_equal(w, _by_path(params)[path])
      np.testing.assert_allclose(grads(params, state)[path], 2 * _by_path(params)[path])
  params, state = update(params, state, 3)
  assert bool(state["binary_on"])
  eff, g = _by_path(apply(params, state)), grads(params, state)
  for path, w in _by_path(params).items():
    if path in SELECTED:
      sign = np.where(np.asarray(w) >= 0, 1.0, -1.0)
      np.testing.assert_array_equal(eff[path], sign)
      np.testing.assert_allclose(g[path], 2 * sign * (np.abs(np.asarray(w)) <= 1))
    else:
      np.testing.assert_array_equal(eff[path], w)
  assert t.init(params, None) == {"binary_on": False}
  assert bz.binary_weights(params).init(params, None) == {}   # no state without float_steps


@pytest.mark.parametrize("bad", [-1, 1.5, True, 100])
def test_binary_float_steps_config_errors(bad):
  import ml_collections  # noqa: PLC0415
  cfg = ml_collections.ConfigDict({"method": "ste_sign", "include": (r".*",),
                                   "exclude": transforms.DEFAULT_EXCLUDE, "float_steps": bad})
  with pytest.raises(ConfigError, match=r"'binary\.float_steps'"):
    bz.transform_from_config(cfg, _params(), ml_collections.ConfigDict({"total_steps": 100}))


def test_binary_weights_selection_errors():
  params = _params()
  with pytest.raises(ConfigError, match=r"'binary\.include'"):
    bz.binary_weights(params, include=r"bias$")     # only non-kernels: nothing selected
  with pytest.raises(ConfigError, match=r"'binary\.method'"):
    bz.binary_weights(params, method="tanh")
  t = bz.binary_weights(params, include=r"head/", exclude=())
  eff = t.apply(params, t.init(params, jax.random.PRNGKey(0)))
  assert set(np.unique(np.asarray(eff["head"]["kernel"]))) == {-1.0, 1.0}
  np.testing.assert_array_equal(eff["dense"]["kernel"], params["dense"]["kernel"])


def test_binary_weights_composes_in_chain():
  params = _params()
  t = transforms.chain(bz.binary_weights(params), transforms.identity())
  state = t.init(params, jax.random.PRNGKey(0))
  eff = t.apply(params, state)
  assert set(np.unique(np.asarray(eff["dense"]["kernel"]))) == {-1.0, 1.0}


# ----------------------------------------------------------------------------- packing


def _pm1(rng, shape):
  return np.where(rng.random(shape) < 0.5, -1, 1).astype(np.int32)


@pytest.mark.parametrize("n,axis", [(1, -2), (31, 0), (32, -1), (33, -2), (100, 0), (100, -1)])
def test_pack_roundtrip_and_size(n, axis):
  rng = np.random.default_rng(n)
  shape = [3, 5, 4]
  shape[axis] = n
  w = _pm1(rng, shape).astype(np.float32)
  words = bz.pack_signs(jnp.asarray(w), axis=axis)
  assert words.dtype == jnp.uint32
  expect_shape = list(shape)
  expect_shape[axis] = -(-n // 32)
  assert list(words.shape) == expect_shape
  assert words.nbytes == int(np.prod(shape)) // n * (-(-n // 32)) * 4
  np.testing.assert_array_equal(bz.unpack_signs(words, n, axis=axis), w)


def test_pack_bit_layout_and_zero_padding():
  w = -np.ones(40, np.float32)
  w[[0, 3, 31, 32, 39]] = 1.0
  words = np.asarray(bz.pack_signs(jnp.asarray(w), axis=0))
  assert words.tolist() == [(1 << 0) | (1 << 3) | (1 << 31), (1 << 0) | (1 << 7)]
  # padding bits (40..63) are 0; sign(0) packs as +1; latent floats pack by their sign
  assert int(bz.pack_signs(jnp.zeros(3), axis=0)[0]) == 0b111
  np.testing.assert_array_equal(bz.pack_signs(jnp.asarray(w * 0.3), axis=0), words)


@pytest.mark.parametrize("n", [37, 100])
def test_binary_dot_equals_integer_dot(n):
  rng = np.random.default_rng(n)
  a, b = _pm1(rng, (6, n)), _pm1(rng, (4, n))
  pa, pb = bz.pack_signs(jnp.asarray(a), axis=-1), bz.pack_signs(jnp.asarray(b), axis=-1)
  got = bz.binary_dot(pa[:, None, :], pb[None, :, :], n)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, a @ b.T)
  np.testing.assert_array_equal(jax.jit(bz.binary_dot, static_argnums=2)(pa[0], pb[0], n),
                                a[0] @ b[0])
  # a Dense layer: x (batch, n) @ kernel (n, out), the kernel packed along its input axis
  w = _pm1(rng, (n, 7))
  np.testing.assert_array_equal(bz.binary_matmul(pa, bz.pack_signs(jnp.asarray(w), -2), n), a @ w)


# ----------------------------------------------------------------------------- activations


def test_quantize_activation_one_bit_is_binarize():
  x = _inputs()
  g = _cotangent(x)
  np.testing.assert_array_equal(bz.quantize_activation(x, 1), bz.binarize(x))
  np.testing.assert_array_equal(_vjp(lambda v: bz.quantize_activation(v, 1), x, g),
                                np.asarray(g) * (np.abs(np.asarray(x)) <= 1))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_activation_dorefa_forward_and_gradient(bits):
  x = jnp.concatenate([_inputs(seed=bits) * 0.7, jnp.array([0.0, 1.0, -0.0, 1e-3, 0.999])])
  g = _cotangent(x)
  levels = 2 ** bits - 1
  y = np.asarray(bz.quantize_activation(x, bits))
  xn = np.asarray(x, np.float64)
  np.testing.assert_allclose(y, np.round(np.clip(xn, 0, 1) * levels) / levels, atol=1e-7)
  codes = y * levels
  np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
  assert codes.min() >= 0 and codes.max() <= levels + 1e-4
  assert len(np.unique(np.round(codes))) <= 2 ** bits
  got = _vjp(lambda v: bz.quantize_activation(v, bits), x, g)
  np.testing.assert_array_equal(got, np.asarray(g) * ((xn >= 0) & (xn <= 1)))


@pytest.mark.parametrize("bits", [2, 4])
def test_quantize_activation_signed_forward_and_gradient(bits):
  x = _inputs(seed=10)
  g = _cotangent(x)
  levels = 2 ** (bits - 1) - 1
  y = np.asarray(bz.quantize_activation(x, bits, signed=True))
  xn = np.asarray(x, np.float64)
  np.testing.assert_allclose(y, np.round(np.clip(xn, -1, 1) * levels) / levels, atol=1e-7)
  assert len(np.unique(y)) <= 2 ** bits - 1
  assert float(bz.quantize_activation(jnp.zeros(()), bits, signed=True)) == 0.0
  got = _vjp(lambda v: bz.quantize_activation(v, bits, signed=True), x, g)
  np.testing.assert_array_equal(got, np.asarray(g) * (np.abs(xn) <= 1))


def test_quantize_activation_keeps_dtype_and_jits():
  x = _inputs().astype(jnp.bfloat16)
  assert bz.quantize_activation(x, 4).dtype == jnp.bfloat16
  xf = _inputs()
  np.testing.assert_array_equal(jax.jit(bz.quantize_activation, static_argnums=1)(xf, 3),
                                bz.quantize_activation(xf, 3))


@pytest.mark.parametrize("bits", [0, 9, -1, 2.5, True, None])
def test_quantize_activation_bad_bits_names_key(bits):
  with pytest.raises(ConfigError, match=r"'num_bits'"):
    bz.quantize_activation(jnp.zeros(3), bits)
  with pytest.raises(ConfigError, match=r"'binary\.act_bits'"):
    bz.quantize_activation(jnp.zeros(3), 0, key="binary.act_bits")


def test_ternarize_threshold_gradient_and_export_round_trip():
  """TWN's threshold per output channel (0.7 mean |w|), -1/0/+1 values, straight-through
  gradient; the export's two planes give back what `apply` gives."""
  w = jnp.asarray([[0.05, -0.9, 0.3], [-0.2, 0.6, 1.5], [0.8, -0.01, -0.4]], jnp.float32)
  delta = 0.7 * jnp.mean(jnp.abs(w), axis=0)
  t = bz.ternarize(w)
  np.testing.assert_array_equal(t, jnp.where(jnp.abs(w) > delta, jnp.sign(w), 0.0))
  assert set(np.unique(np.asarray(t)).tolist()) == {-1.0, 0.0, 1.0}
  g = jax.grad(lambda v: jnp.sum(bz.ternarize(v) * jnp.arange(9.0).reshape(3, 3)))(w)
  np.testing.assert_array_equal(g, jnp.where(jnp.abs(w) <= 1, jnp.arange(9.0).reshape(3, 3), 0))
  params = {"conv": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (3, 3, 8, 4))}}
  tr = bz.binary_weights(params, method="ternary", exclude=())
  art = tr.export(params, {})
  assert set(art["params"]["conv"]["kernel"]) == {"bits", "shape", "nonzero"}
  np.testing.assert_array_equal(bz.unpack_export(art)["conv"]["kernel"],
                                tr.apply(params, {})["conv"]["kernel"])
