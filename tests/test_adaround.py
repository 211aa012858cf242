"""AdaRound (jcompress/adaround.py): learned rounding lowers the layer's output error below
round-to-nearest, stays on the quantizer's grid, and quantizing the result again gives its codes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress import adaround
from jcompress import quantize_core
from jcompress.errors import ConfigError

pytestmark = pytest.mark.plumbing   # the numbers a method gives: XLA optimizations off


class Tiny(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(16, (3, 3), use_bias=False, name="conv1")(x))
    x = nn.relu(nn.Conv(8, (3, 3), use_bias=False, name="conv2")(x))
    return nn.Dense(4, name="head")(x.mean((1, 2))), {}


@pytest.fixture(scope="module")
def setup():
  model = Tiny()
  # Correlated channels (as real activations are): under white inputs round-to-nearest is
  # already the best rounding, and there would be nothing to learn.
  z = jax.random.normal(jax.random.key(0), (64, 8, 8, 3))
  x = z @ jax.random.normal(jax.random.key(2), (3, 16)) + 0.05 * jax.random.normal(
      jax.random.key(3), (64, 8, 8, 16))
  params = model.init(jax.random.key(1), x)["params"]
  return model, params, x


def test_h_init_and_regularizer_closed_forms():
  frac = jnp.array([0.0, 0.25, 0.5, 0.9])
  np.testing.assert_allclose(adaround.rectified_sigmoid(adaround.init_v(frac))[1:], frac[1:],
                             atol=1e-5)
  v = jnp.array([-50.0, 50.0])   # h = 0 and 1: no regularizer
  assert float(adaround.round_reg(v, 2.0)) == 0.0
  assert float(adaround.round_reg(jnp.zeros(1), 2.0)) == pytest.approx(1 - 0.0 ** 2)
  assert float(adaround.beta_schedule(0, 100, 0.2)) == 20.0
  assert float(adaround.beta_schedule(100, 100, 0.2)) == 2.0


def test_adaround_beats_nearest_on_the_grid_and_requantizes_to_its_codes(setup):
  model, params, x = setup
  bits = {"conv1/kernel": 2, "conv2/kernel": 3}
  out, rep = adaround.adaround_tree(model, params, None, x, bits, iters=300, batch=32)
  for leaf, b in bits.items():
    r = rep[leaf]
    assert r["mse_adaround"] < 0.8 * r["mse_nearest"], r
    assert 0 < r["flipped"] < 0.5
    layer = leaf.split("/")[0]
    w = out[layer]["kernel"]
    q = quantize_core.quantize(w, b, symmetric=True, narrow_range=True, per_channel=True)
    np.testing.assert_allclose(quantize_core.dequantize(q), w, rtol=1e-6, atol=1e-7)
    q0 = quantize_core.quantize(params[layer]["kernel"], b, symmetric=True, narrow_range=True,
                                per_channel=True)
    np.testing.assert_allclose(q.scale, q0.scale, rtol=1e-6)   # the range is kept
  np.testing.assert_array_equal(out["head"]["kernel"], params["head"]["kernel"])


@pytest.mark.parametrize("layer,shape", [
    (nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), use_bias=False), (5, 9, 9, 6)),
    (nn.Conv(8, (3, 3), strides=2, padding="SAME"), (5, 9, 9, 6)),
    (nn.Conv(8, (3, 3), kernel_dilation=2, padding="VALID"), (5, 9, 9, 6)),
    (nn.Conv(6, (3, 3), feature_group_count=6, padding=1, use_bias=False), (5, 9, 9, 6)),
    (nn.Conv(8, (3, 3), feature_group_count=2, padding=1, input_dilation=2), (5, 5, 5, 6)),
    (nn.Dense(5), (5, 3, 6)),
], ids=["conv", "stride2_same_bias", "dilated", "depthwise", "grouped_input_dilated", "dense"])
def test_quadratic_form_equals_the_direct_error(layer, shape):
  """tr(Dᵀ G D) + 2 tr(Dᵀ c) + e0 over the patch Gram matrices = mean (f(W + D; x~) - y)^2
  computed by running the layer, within float32 rounding: asymmetric input x~ != x, a bias,
  strides, padding, dilation, groups; accumulated over chunks that do not divide the images."""
  key = jax.random.key(0)
  x = jax.random.normal(jax.random.fold_in(key, 1), shape)
  xq = x + 0.1 * jax.random.normal(jax.random.fold_in(key, 2), shape)
  p = layer.init(key, x)["params"]
  rest = {k: v + 0.3 for k, v in p.items() if k != "kernel"}
  w = p["kernel"]
  y = layer.apply({"params": {"kernel": w, **rest}}, x)
  quad = adaround.quadratic_form(layer, w, rest, xq, y, chunk=2)
  geo = adaround.layer_geometry(layer)
  for s in (0.0, 0.05, 0.5):
    d = s * jax.random.normal(jax.random.fold_in(key, 3), w.shape)
    direct = jnp.mean((layer.apply({"params": {"kernel": w + d, **rest}}, xq) - y) ** 2)
    np.testing.assert_allclose(quad.mean_error(adaround.kernel_matrix(d, geo)), direct,
                               rtol=2e-5)


def test_layers_the_patches_do_not_reproduce_take_the_direct_route():
  layer = nn.Conv(4, (3,), padding="CIRCULAR")
  x = jax.random.normal(jax.random.key(0), (6, 9, 3))
  p = layer.init(jax.random.key(1), x)["params"]
  y = layer.apply({"params": p}, x)
  assert adaround.quadratic_form(layer, p["kernel"], {"bias": p["bias"]}, x, y) is None
  w, rep = adaround.adaround_layer(layer, p["kernel"], {"bias": p["bias"]}, x, y, 3,
                                   jax.random.key(2), iters=20, batch=4)
  assert rep["route"] == "direct" and rep["mse_adaround"] <= 1.5 * rep["mse_nearest"]
  with pytest.raises(ConfigError, match="quadratic route"):
    adaround.adaround_layer(layer, p["kernel"], {"bias": p["bias"]}, x, y, 3,
                            jax.random.key(2), iters=20, route="quadratic")


def test_adaround_bad_input(setup):
  model, params, x = setup
  with pytest.raises(ConfigError, match="no quantized kernel"):
    adaround.adaround_tree(model, params, None, x, {})
  with pytest.raises(ConfigError, match="calibration_batches"):
    adaround.adaround_tree(model, params, None, x[:1], {"conv1/kernel": 2})
  with pytest.raises(ConfigError, match="nope/kernel"):
    adaround.adaround_tree(model, params, None, x, {"nope/kernel": 2})


def test_quant_method_calibrates_with_adaround(setup):
  """`quant.adaround`: PTQ's calibrate puts the weights on AdaRound's grid points; the uniform
  quantizer keeps them (apply == calibrated weights) and the model's output error drops."""
  from jcompress import quantize  # noqa: PLC0415
  from jcompress import transforms  # noqa: PLC0415

  model, params, x = setup
  ctx = transforms.CalibrationContext(model=model, batch_stats=None, batches=[{"image": x}],
                                      loss_fn=None, config=None)
  exclude = (r"(^|/)head/",)
  plain = quantize.quant_weights(params, bits=2, mode="ptq", exclude=exclude)
  ada = quantize.quant_weights(params, bits=2, mode="ptq", exclude=exclude, adaround=True,
                               adaround_iters=300)
  calibrated, state = ada.calibrate(params, {}, ctx)
  eff = ada.apply(calibrated, state)
  for layer in ("conv1", "conv2"):
    np.testing.assert_allclose(eff[layer]["kernel"], calibrated[layer]["kernel"], atol=1e-6)
  ref, _ = model.apply({"params": params}, x)

  def err(p):
    return float(jnp.mean((model.apply({"params": p}, x)[0] - ref) ** 2))

  assert err(eff) < 0.8 * err(plain.apply(params, {}))
  figures = ada.metrics(calibrated, state)     # report_summary: the figures of results.json
  assert int(figures["adaround_layers"]) == 2 and int(figures["adaround_images"]) == 64
  assert int(figures["adaround_quadratic_layers"]) == 2
  assert float(figures["adaround_mse"]) < float(figures["adaround_mse_nearest"])
  assert 0 < float(figures["adaround_flipped"]) < 0.5
  with pytest.raises(ConfigError, match=r"'quant\.adaround'"):
    quantize.quant_weights(params, method="kmeans", bits=2, adaround=True)
  with pytest.raises(ConfigError, match=r"'quant\.adaround_iters'"):
    quantize.quant_weights(params, bits=2, adaround=True, adaround_iters=0)
  with pytest.raises(ConfigError, match="calibration_batches"):
    ada.calibrate(params, {}, None)
