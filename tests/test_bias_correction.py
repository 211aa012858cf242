"""Bias correction (jcompress/bias_correction.py): after correction, every corrected layer's mean
output over the calibration batch equals the float model's; the correction lands in the layer's
bias or the following BatchNorm's beta; `quant.bias_correction` wires it into PTQ for any weight
quantizer; a layer with nowhere to put it is a ConfigError naming the key and the layer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress import bias_correction
from jcompress import quantize
from jcompress import transforms
from jcompress.errors import ConfigError
from jcompress.models.common import BatchNorm

pytestmark = pytest.mark.plumbing


class Tiny(nn.Module):
  """conv (no bias) -> BN -> relu -> conv (bias) -> relu -> conv (no bias) -> BN -> pool ->
  dense head."""
  bias_free_last: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(16, (3, 3), use_bias=False, name="conv1")(x)
    x = nn.relu(BatchNorm(use_running_average=not train, name="bn1")(x))
    x = nn.relu(nn.Conv(16, (3, 3), name="conv2")(x))
    x = nn.Conv(8, (3, 3), strides=2, use_bias=False, name="conv3")(x)
    if not self.bias_free_last:
      x = BatchNorm(use_running_average=not train, name="bn3")(x)
    return nn.Dense(4, name="head")(nn.relu(x).mean((1, 2))), {}


LAYERS = ("conv1", "conv2", "conv3")


@pytest.fixture(scope="module")
def setup():
  model = Tiny()
  x = jax.random.normal(jax.random.key(0), (48, 8, 8, 3)) + 0.5
  v = model.init(jax.random.key(1), x)
  params = jax.tree.map(lambda a: a, v["params"])
  stats = {k: {"mean": 0.1 * jax.random.normal(jax.random.key(i), s["mean"].shape),
               "var": 1.0 + jax.random.uniform(jax.random.key(i + 9), s["var"].shape)}
           for i, (k, s) in enumerate(v["batch_stats"].items())}
  params["bn1"] = {"scale": 1.0 + 0.3 * jax.random.normal(jax.random.key(5), (16,)),
                   "bias": 0.1 * jax.random.normal(jax.random.key(6), (16,))}
  params["conv2"] = {**params["conv2"], "bias": jnp.full((16,), 0.05)}
  return model, params, stats, x


def _outputs(model, variables, x):
  """{layer: its output as the next op sees it}: BN output where a BN follows."""
  out = {}

  def icpt(next_fun, args, kwargs, ctx):
    y = next_fun(*args, **kwargs)
    if ctx.method_name == "__call__":
      out["/".join(ctx.module.scope.path)] = y
    return y

  with nn.intercept_methods(icpt):
    model.apply(variables, x)
  return {"conv1": out["bn1"], "conv2": out["conv2"], "conv3": out["bn3"]}


# k-means (several seeded starts per tensor) is the slow case; its quantizer differs, not the
# correction: -m slow runs it.
@pytest.mark.parametrize("method", ["uniform", pytest.param("kmeans", marks=pytest.mark.slow)])
def test_corrected_means_equal_the_float_ones(setup, method):
  model, params, stats, x = setup
  t = quantize.quant_weights(params, method=method, bits=2 if method == "uniform" else 1,
                             per_channel=False, mode="ptq", exclude=(r"head/",))
  st = t.calibrate(params, t.init(params, jax.random.key(0)), None)[1]
  qp = t.apply(params, st)
  fixed, report = bias_correction.correct(model, params, qp, stats, x, LAYERS, target=params)
  assert report["conv1"]["into"] == "bn1/bias" and report["conv2"]["into"] == "conv2/bias"
  assert report["conv3"]["into"] == "bn3/bias"
  # only biases / betas moved; the latent kernels are the float ones
  for layer in LAYERS:
    np.testing.assert_array_equal(fixed[layer]["kernel"], params[layer]["kernel"])
  ref = _outputs(model, {"params": params, "batch_stats": stats}, x)
  before = _outputs(model, {"params": qp, "batch_stats": stats}, x)
  after = _outputs(model, {"params": t.apply(fixed, st), "batch_stats": stats}, x)
  for layer in LAYERS:
    m_ref, m_before, m_after = (o[layer].reshape(-1, o[layer].shape[-1]).mean(0)
                                for o in (ref, before, after))
    scale = float(jnp.max(jnp.abs(m_ref))) + 1e-3
    assert float(jnp.max(jnp.abs(m_before - m_ref))) > 1e-2 * scale, layer  # a real shift
    np.testing.assert_allclose(m_after, m_ref, atol=1e-5 * max(scale, 1.0), err_msg=layer)


def test_quant_method_wiring_and_bad_input(setup):
  model, params, stats, x = setup
  ctx = transforms.CalibrationContext(model=model, batch_stats=stats, batches=[{"image": x}],
                                      loss_fn=None, config=None)
  t = quantize.quant_weights(params, method="pow2", bits=3, mode="ptq", exclude=(r"head/",),
                             bias_correction=True)
  fixed, st = t.calibrate(params, {}, ctx)
  figures = t.metrics(fixed, st)
  assert int(figures["bias_corrected_layers"]) == 3
  ref = _outputs(model, {"params": params, "batch_stats": stats}, x)
  after = _outputs(model, {"params": t.apply(fixed, st), "batch_stats": stats}, x)
  for layer in LAYERS:
    np.testing.assert_allclose(after[layer].mean((0, 1, 2)), ref[layer].mean((0, 1, 2)),
                               atol=1e-4)
  # a bias-free conv with no BatchNorm after it: named, before anything runs
  bad = Tiny(bias_free_last=True)
  bparams = {k: v for k, v in params.items() if k != "bn3"}
  bstats = {k: v for k, v in stats.items() if k != "bn3"}
  tb = quantize.quant_weights(bparams, bits=4, mode="ptq", exclude=(r"head/",),
                              bias_correction=True)
  bctx = ctx._replace(model=bad, batch_stats=bstats)
  with pytest.raises(ConfigError, match=r"'quant\.bias_correction'.*'conv3'"):
    tb.calibrate(bparams, {}, bctx)
  with pytest.raises(ConfigError, match=r"'quant\.bias_correction'.*calibration_batches"):
    t.calibrate(params, {}, None)
  with pytest.raises(ConfigError, match=r"'quant\.bias_correction'"):
    quantize.quant_weights(params, method="none", bias_correction=True)
  with pytest.raises(ConfigError, match=r"'quant\.bias_correction'"):
    quantize.quant_weights(params, bias_correction="yes")
