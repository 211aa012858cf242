"""Activation quantizers (DoReFa, PACT, LSQ): closed-form values and gradients, in models."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress import actquant as A
from jcompress import models
from jcompress.errors import ConfigError

pytestmark = pytest.mark.plumbing


def _x(n=2000, lo=-1.0, hi=8.0, seed=0):
  return np.random.default_rng(seed).uniform(lo, hi, (n,)).astype(np.float32)


def _w(n=2000, seed=1):
  return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


@pytest.fixture(scope="module")
def tf():
  import tensorflow as tf  # noqa: PLC0415
  tf.config.set_visible_devices([], "GPU")
  return tf


# ----------------------------------------------------------------------------- DoReFa


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_dorefa_values_and_gradient_closed_form(bits):
  x = _x(lo=-0.5, hi=1.5, seed=bits)
  w = _w()
  n = 2 ** bits - 1
  y = np.asarray(A.dorefa_quantize(x, bits))
  np.testing.assert_allclose(y, np.round(np.clip(x, 0, 1) * n) / n, atol=1e-7)
  assert len(np.unique(y)) == n + 1 or bits == 8   # 2000 samples hit every level below 8
  g = np.asarray(jax.grad(lambda x: jnp.sum(w * A.dorefa_quantize(x, bits)))(x))
  np.testing.assert_array_equal(g, np.where((x >= 0) & (x <= 1), w, 0.0))


# ----------------------------------------------------------------------------- PACT


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pact_values_and_gradients_closed_form(bits):
  x = _x(seed=bits)
  w = _w()
  alpha = np.float32(3.7)
  n = 2 ** bits - 1
  s = alpha / n
  y = np.asarray(A.pact_quantize(x, jnp.float32(alpha), bits))
  np.testing.assert_allclose(y, np.round(np.clip(x, 0, alpha) / s) * s, atol=1e-6)
  assert y.min() == 0.0 and abs(y.max() - alpha) < 1e-6
  gx, ga = jax.grad(lambda x, a: jnp.sum(w * A.pact_quantize(x, a, bits)), argnums=(0, 1))(
      x, jnp.float32(alpha))
  np.testing.assert_array_equal(np.asarray(gx), np.where((x >= 0) & (x < alpha), w, 0.0))
  np.testing.assert_allclose(float(ga), w[x >= alpha].sum(), rtol=1e-5)
  assert 0 < (x >= alpha).sum() < x.size


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pact_equals_tensorflow_fake_quant_on_0_alpha(tf, bits):
  # On [0, alpha] TF's nudging changes nothing: the grids are the same.
  x = _x(seed=10 + bits)
  alpha = 2.5
  expected = tf.quantization.fake_quant_with_min_max_vars(x, 0.0, alpha, num_bits=bits).numpy()
  got = np.asarray(A.pact_quantize(x, jnp.float32(alpha), bits))
  np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_signed_pact_and_dorefa_are_symmetric_grids(bits):
  """Signed PACT: round(clip(x, -alpha, alpha) n / alpha) alpha / n, n = 2^(k-1) - 1, dy/dx
  inside (-alpha, alpha), dy/dalpha +1 above alpha and -1 below -alpha; signed DoReFa on
  [-1, 1]."""
  x = _x(lo=-6.0, hi=6.0, seed=20 + bits)
  w = _w()
  alpha = np.float32(3.7)
  n = 2 ** (bits - 1) - 1
  s = alpha / n
  y = np.asarray(A.pact_quantize(x, jnp.float32(alpha), bits, True))
  np.testing.assert_allclose(y, np.round(np.clip(x, -alpha, alpha) / s) * s, atol=1e-6)
  assert abs(y.min() + alpha) < 1e-6 and abs(y.max() - alpha) < 1e-6
  gx, ga = jax.grad(lambda x, a: jnp.sum(w * A.pact_quantize(x, a, bits, True)),
                    argnums=(0, 1))(x, jnp.float32(alpha))
  np.testing.assert_array_equal(np.asarray(gx), np.where(np.abs(x) < alpha, w, 0.0))
  np.testing.assert_allclose(float(ga), w[x >= alpha].sum() - w[x <= -alpha].sum(), rtol=1e-5)
  xd = _x(lo=-1.5, hi=1.5, seed=30 + bits)
  yd = np.asarray(A.dorefa_quantize(xd, bits, True))
  np.testing.assert_allclose(yd, np.round(np.clip(xd, -1, 1) * n) / n, atol=1e-7)
  gd = np.asarray(jax.grad(lambda x: jnp.sum(w * A.dorefa_quantize(x, bits, True)))(xd))
  np.testing.assert_array_equal(gd, np.where(np.abs(xd) <= 1, w, 0.0))


def test_signed_pact_calibrate_picks_the_mse_clip_over_both_signs():
  x = np.random.default_rng(5).laplace(size=5000).astype(np.float32)
  alpha = float(A.pact_init_alpha(jnp.asarray(x), 4, signed=True))
  m = np.abs(x).max()

  def err(a):
    s = a / 7
    return np.mean((np.round(np.clip(x, -a, a) / s) * s - x) ** 2)

  errs = [err(m * r / 100) for r in range(1, 101)]
  assert err(alpha) <= min(errs) * (1 + 1e-4) and alpha < 0.8 * m
  with pytest.raises(ConfigError, match="act_quant.bits"):
    A.make_quantizer({"kind": "pact", "bits": 1, "signed": True})


@pytest.mark.slow
def test_mobilenetv2_quantizes_its_linear_bottleneck_with_signed_codes():
  """MobileNetV2's expand convolutions and conv_last read the linear bottleneck (negative
  values): their quantizers are signed, the depthwise and projection inputs (after ReLU6) are
  not; with 8-bit PACT calibrated on the data the features stay near the float model's (an
  unsigned grid there zeroed half the residual stream: a trained network's output collapsed
  to one class)."""
  x = jax.random.normal(jax.random.key(0, impl="rbg"), (16, 32, 32, 3))
  spec = {"kind": "pact", "bits": 8, "calibrate": True}
  qmodel = models.get_model("mobilenetv2_cifar", 10, width=0.35, act_quant=spec,
                          conv_impl="xla")   # eager: XLA's convolutions dispatch fastest
  fmodel = models.get_model("mobilenetv2_cifar", 10, width=0.35, conv_impl="xla")
  v = jax.jit(qmodel.init)(jax.random.key(1, impl="rbg"), x[:1])   # eager: each op compiles
  signs = A.collect_inputs(qmodel, v, x[:2], lambda m, _: m.signed)
  assert signs and all(signs[p] == (p.endswith("expand_conv_act") or p == "conv_last_act")
                       for p in signs), signs
  assert any(signs.values())
  params = A.calibrate(qmodel, v["params"], v["batch_stats"], [{"image": x}])
  fparams = {k: ({n: w for n, w in sub.items() if not n.endswith("_act")}
                 if isinstance(sub, dict) else sub)
             for k, sub in v["params"].items() if not k.endswith("_act")}
  # the pooled features (the classifier starts near zero): 2% apart, 100% with unsigned codes
  ref = fmodel.apply({"params": fparams, "batch_stats": v["batch_stats"]}, x)[1]["pre_logits"]
  got = qmodel.apply({"params": params, "batch_stats": v["batch_stats"]}, x)[1]["pre_logits"]
  assert float(jnp.max(jnp.abs(got - ref))) < 0.05 * float(jnp.max(jnp.abs(ref)))


# ----------------------------------------------------------------------------- LSQ


@pytest.mark.parametrize("bits,signed", [(2, False), (4, False), (3, True), (8, True)])
def test_lsq_values_and_gradients_closed_form(bits, signed):
  x = _x(lo=-3.0, hi=3.0, seed=20 + bits)
  w = _w()
  s = np.float32(0.3 if bits < 8 else 0.01)
  gscale = 0.37
  q_n, q_p = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
  assert A.lsq_code_range(bits, signed) == (q_n, q_p)
  v = x / s
  y = np.asarray(A.lsq_quantize(x, jnp.float32(s), bits, signed, gscale))
  np.testing.assert_allclose(y, np.round(np.clip(v, q_n, q_p)) * s, atol=1e-6)
  gx, gs = jax.grad(lambda x, s: jnp.sum(w * A.lsq_quantize(x, s, bits, signed, gscale)),
                    argnums=(0, 1))(x, jnp.float32(s))
  inside = (v > q_n) & (v < q_p)
  np.testing.assert_array_equal(np.asarray(gx), np.where(inside, w, 0.0))
  dv = np.where(v <= q_n, q_n, np.where(v >= q_p, q_p, np.round(v) - v))
  np.testing.assert_allclose(float(gs), gscale * np.sum(w * dv), rtol=1e-4, atol=1e-5)
  assert 0 < inside.sum() < x.size


def test_lsq_module_scales_the_step_gradient_by_one_over_sqrt_n_qp():
  x = np.abs(np.random.default_rng(3).standard_normal((2, 4, 4, 3))).astype(np.float32)
  m = A.LSQ(bits=4)
  p = m.init(jax.random.key(0), x)
  assert float(p["params"]["step"]) == pytest.approx(4.0 / 15)
  g = jax.grad(lambda p: jnp.sum(m.apply(p, x)))(p)["params"]["step"]
  raw = jax.grad(lambda s: jnp.sum(A.lsq_quantize(x, s, 4, False, 1.0)))(jnp.float32(4.0 / 15))
  np.testing.assert_allclose(float(g), float(raw) / np.sqrt(4 * 4 * 3 * 15), rtol=1e-5)


# ----------------------------------------------------------------------------- specs


@pytest.mark.parametrize("bits", [0, 9, "4", 2.0, True, None])
def test_bad_bits_name_the_config_key(bits):
  with pytest.raises(ConfigError, match=r"model_kwargs\.act_quant\.bits"):
    A.make_quantizer({"kind": "pact", "bits": bits})


def test_unknown_kind_lists_the_known_ones_and_unknown_keys_are_refused():
  with pytest.raises(ConfigError, match="dorefa, pact, lsq"):
    A.make_quantizer({"kind": "apot", "bits": 4})
  with pytest.raises(ConfigError, match=r"act_quant\.bit'"):
    A.make_quantizer({"kind": "pact", "bit": 4})
  with pytest.raises(ConfigError, match=r"act_quant\.init"):
    A.make_quantizer({"kind": "pact", "bits": 4, "init": -1.0})
  assert A.make_quantizer({"kind": "none"})(3.5) == 3.5


# ----------------------------------------------------------------------------- in a model


@pytest.fixture(scope="module")
def pact_resnet():
  model = models.get_model("resnet20", 10, width=0.25, act_quant={"kind": "pact", "bits": 4})
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(0))
  return model, variables, x


def test_resnet20_pact_has_act_params_beside_every_conv_but_the_stem(pact_resnet):
  model, variables, _ = pact_resnet
  params = variables["params"]
  from jcompress import transforms  # noqa: PLC0415
  paths = transforms.leaf_paths(params)
  convs = [p[:-len("/kernel")] for p in paths if p.endswith("/kernel") and "head" not in p]
  acts = [p for p in paths if p.endswith("_act/alpha")]
  assert "stage1_block0/conv1_act/alpha" in acts
  assert sorted(acts) == sorted(f"{c}_act/alpha" for c in convs if c != "stem_conv")
  assert all(float(v) == 6.0 for v in A.quantizer_params(params).values())
  np.testing.assert_allclose(float(A.pact_alpha_l2(params)), 36.0 * len(acts), rtol=1e-6)


def test_resnet20_pact_conv_inputs_are_on_the_4_bit_grid(pact_resnet):
  model, variables, x = pact_resnet
  params = jax.tree.map(lambda a: a, variables["params"])
  # A smaller clip than the init so that clipping happens: alpha = 0.9.
  params = {k: ({**v, "conv1_act": {"alpha": jnp.float32(0.9)}}
                if k == "stage2_block1" else v) for k, v in params.items()}
  inputs = {}

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
      inputs["/".join(context.module.scope.path)] = args[0]
    return next_fun(*args, **kwargs)

  @jax.jit
  def run(params):
    with nn.intercept_methods(interceptor):
      model.apply({**variables, "params": params}, x, train=False)
    return dict(inputs)

  inputs = {k: np.asarray(v) for k, v in run(params).items()}
  assert len(inputs) == 1 + 3 * 6 + 2          # stem, 9 blocks x 2, 2 projection shortcuts
  for path, v in inputs.items():
    if path == "stem_conv":
      assert len(np.unique(v)) > 100           # the stem sees the float image
      continue
    alpha = 0.9 if path == "stage2_block1/conv1" else 6.0
    levels = np.unique(v)
    assert len(levels) <= 16 and levels.min() >= 0 and levels.max() <= alpha + 1e-6, path
    np.testing.assert_allclose(levels / (alpha / 15), np.round(levels / (alpha / 15)),
                               atol=1e-4, err_msg=path)
  assert len(np.unique(inputs["stage2_block1/conv1"])) == 16   # clipped at 0.9: all levels used


def test_gradient_reaches_alpha_in_a_model(pact_resnet):
  model, variables, x = pact_resnet
  params = variables["params"]

  def loss(p):
    logits, _ = model.apply({**variables, "params": p}, x, train=False)
    return jnp.sum(logits ** 2)

  grads = A.quantizer_params(jax.jit(jax.grad(loss))(params))
  assert len(grads) == 20 and any(float(g) != 0.0 for g in grads.values())


def test_lsq_calibrate_sets_the_step_from_the_float_inputs():
  model = models.get_model("small_cnn", 10, act_quant={"kind": "lsq", "bits": 3})
  x = jax.random.uniform(jax.random.key(2), (2, 8, 8, 3))
  variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(0))
  seen = jax.jit(lambda x: A.collect_inputs(model, variables, x, lambda m, v: v))
  inputs, inputs_half = seen(x), seen(x * 0.5)
  assert inputs, "the model has LSQ quantizers"
  batches = [{"image": x}, {"image": x * 0.5}]
  new = A.calibrate(model, variables["params"], variables.get("batch_stats", {}), batches)
  steps = A.quantizer_params(new)
  assert set(steps) == {f"{p}/step" for p in inputs}
  for path, v in inputs.items():
    v, v2 = np.asarray(v), np.asarray(inputs_half[path])
    expected = (2 * np.abs(v).mean() / np.sqrt(7) + 2 * np.abs(v2).mean() / np.sqrt(7)) / 2
    np.testing.assert_allclose(float(steps[f"{path}/step"]), expected, rtol=1e-5)
  # The input tree is untouched.
  for v in A.quantizer_params(variables["params"]).values():
    assert float(v) == pytest.approx(4.0 / 7)


def test_pact_calibrate_picks_the_mse_clip():
  x = np.abs(np.random.default_rng(4).laplace(size=5000)).astype(np.float32)
  alpha = float(A.pact_init_alpha(jnp.asarray(x), 2))
  m = x.max()

  def err(a):
    s = a / 3
    return np.mean((np.round(np.minimum(x, a) / s) * s - x) ** 2)

  errs = [err(m * r / 100) for r in range(1, 101)]
  assert err(alpha) <= min(errs) * (1 + 1e-4) and alpha < 0.5 * m
