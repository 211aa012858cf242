"""Distillation losses against numpy references, closed-form gradients, config validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jcompress import distill
from jcompress import train
from jcompress.errors import ConfigError

pytestmark = pytest.mark.plumbing

B, K = 6, 10


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(B, K)).astype(np.float64) * 3
  t = rng.normal(size=(B, K)).astype(np.float64) * 3
  y = rng.integers(0, K, size=B)
  return s, t, y


def _f32(x):
  return jnp.asarray(x, jnp.float32)


# ----------------------------------------------------------------------------- KD


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_matches_numpy_with_t2(data, temperature):
  s, t, _ = data
  p_t = _softmax(t / temperature)
  ref = temperature ** 2 * np.mean(
      np.sum(p_t * (np.log(p_t) - _log_softmax(s / temperature)), -1))
  got = distill.kd_loss(_f32(s), _f32(t), temperature)
  np.testing.assert_allclose(got, ref, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_gradient_closed_form(data, temperature):
  s, t, _ = data
  grad = jax.grad(distill.kd_loss)(_f32(s), _f32(t), temperature)
  ref = temperature * (_softmax(s / temperature) - _softmax(t / temperature)) / B
  np.testing.assert_allclose(grad, ref, atol=1e-6)
  # No gradient to the teacher.
  g_t = jax.grad(distill.kd_loss, argnums=1)(_f32(s), _f32(t), temperature)
  assert np.all(np.asarray(g_t) == 0)


def test_kd_loss_zero_for_identical_logits(data):
  s, _, _ = data
  assert abs(float(distill.kd_loss(_f32(s), _f32(s), 3.0))) < 1e-5


# ----------------------------------------------------------------------------- TF KD


@pytest.mark.parametrize("tempered_hard", [False, True])
def test_tf_kd_loss_matches_seed_formula(data, tempered_hard):
  s, t, y = data
  T, lam = 3.0, 0.3
  onehot = np.eye(K)[y]
  z = s / T if tempered_hard else s
  # tf.nn.sigmoid_cross_entropy_with_logits: max(z, 0) - z * y + log(1 + exp(-|z|))
  obj1 = np.maximum(z, 0) - z * onehot + np.log1p(np.exp(-np.abs(z)))
  obj2 = 0.5 * np.square(s / T - t / T)
  ref = (lam * obj1.sum() + (1 - lam) * obj2.sum()) / B
  loss, parts = distill.tf_kd_loss(_f32(s), _f32(t), _f32(y).astype(jnp.int32), T, lam,
                                   tempered_hard)
  np.testing.assert_allclose(loss, ref, rtol=1e-5)
  np.testing.assert_allclose(parts["logit_mse_loss"], obj2.sum() / B, rtol=1e-5)
  np.testing.assert_allclose(parts["sigmoid_ce_loss"], obj1.sum() / B, rtol=1e-5)


def test_tf_kd_gradient_closed_form(data):
  s, t, y = data
  T, lam = 2.0, 0.4
  fn = lambda x: distill.tf_kd_loss(x, _f32(t), jnp.asarray(y), T, lam)[0]
  grad = jax.grad(fn)(_f32(s))
  sig = 1 / (1 + np.exp(-s))
  ref = (lam * (sig - np.eye(K)[y]) + (1 - lam) * (s - t) / T ** 2) / B
  np.testing.assert_allclose(grad, ref, atol=1e-6)


def test_logit_mse(data):
  s, t, _ = data
  np.testing.assert_allclose(distill.logit_mse_loss(_f32(s), _f32(t)), np.mean((s - t) ** 2),
                             rtol=1e-5)
  grad = jax.grad(distill.logit_mse_loss)(_f32(s), _f32(t))
  np.testing.assert_allclose(grad, 2 * (s - t) / (B * K), atol=1e-6)


# ----------------------------------------------------------------------------- DKD


def _dkd_reference(s, t, y, alpha, beta, T):
  """mdistiller's dkd_loss, transcribed to numpy (probabilities, then log)."""
  gt = np.eye(K)[y].astype(bool)
  ps, pt = _softmax(s / T), _softmax(t / T)

  def cat(p):
    return np.stack([(p * gt).sum(1), (p * ~gt).sum(1)], 1)

  bs, bt = cat(ps), cat(pt)
  tckd = np.sum(bt * (np.log(bt) - np.log(bs))) * T ** 2 / B
  pt2 = _softmax(t / T - 1000.0 * gt)
  log_ps2 = _log_softmax(s / T - 1000.0 * gt)
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = np.where(pt2 > 0, pt2 * (np.log(pt2) - log_ps2), 0.0)
  nckd = terms.sum() * T ** 2 / B
  return alpha * tckd + beta * nckd, tckd, nckd


def test_dkd_matches_mdistiller(data):
  s, t, y = data
  ref, tckd, nckd = _dkd_reference(s, t, y, 1.0, 8.0, 4.0)
  got_t, got_n = distill.dkd_parts(_f32(s), _f32(t), jnp.asarray(y), 4.0)
  np.testing.assert_allclose(got_t, tckd, rtol=1e-4)
  np.testing.assert_allclose(got_n, nckd, rtol=1e-4)
  np.testing.assert_allclose(distill.dkd_loss(_f32(s), _f32(t), jnp.asarray(y), 4.0, 1.0, 8.0),
                             ref, rtol=1e-4)


def test_dkd_gradient_matches_finite_differences(data):
  s, t, y = data
  fn = lambda x: distill.dkd_loss(x, _f32(t), jnp.asarray(y), 2.0, 0.7, 3.0)
  grad = np.asarray(jax.grad(fn)(_f32(s)))
  eps = 1e-5
  num = np.zeros_like(s)
  for i in range(B):
    for k in range(K):
      d = np.zeros_like(s)
      d[i, k] = eps
      num[i, k] = (_dkd_reference(s + d, t, y, 0.7, 3.0, 2.0)[0]
                   - _dkd_reference(s - d, t, y, 0.7, 3.0, 2.0)[0]) / (2 * eps)
  np.testing.assert_allclose(grad, num, atol=2e-5)


def test_dkd_tckd_plus_nckd_decomposition(data):
  """Zhao et al. Eq. 7: KD = TCKD + (1 - p_t^g) NCKD, per example (here B = 1)."""
  s, t, y = data
  T = 2.0
  for b in range(B):
    sb, tb, yb = _f32(s[b:b + 1]), _f32(t[b:b + 1]), jnp.asarray(y[b:b + 1])
    tckd, nckd = distill.dkd_parts(sb, tb, yb, T)
    p_gt = _softmax(t[b] / T)[y[b]]
    np.testing.assert_allclose(distill.kd_loss(sb, tb, T), tckd + (1 - p_gt) * nckd, rtol=1e-4)


def test_dkd_is_finite_for_confident_teacher():
  s = jnp.array([[50.0, -50.0, 0.0]])
  t = jnp.array([[80.0, -80.0, 0.0]])
  loss, grad = jax.value_and_grad(distill.dkd_loss)(s, t, jnp.array([0]), 1.0, 1.0, 8.0)
  assert np.isfinite(loss) and np.all(np.isfinite(grad))


# ----------------------------------------------------------------------------- FitNets


def test_fitnet_loss_matches_numpy_and_gradient():
  rng = np.random.default_rng(1)
  fs = rng.normal(size=(2, 4, 4, 3))
  ft = rng.normal(size=(2, 4, 4, 5))
  reg = distill.init_regressor(jax.random.PRNGKey(0), 3, 5)
  assert reg["kernel"].shape == (1, 1, 3, 5) and reg["bias"].shape == (5,)
  reg = {"kernel": _f32(rng.normal(size=(1, 1, 3, 5))), "bias": _f32(rng.normal(size=5))}
  w, b = np.asarray(reg["kernel"], np.float64)[0, 0], np.asarray(reg["bias"], np.float64)
  diff = fs @ w + b - ft
  np.testing.assert_allclose(distill.fitnet_loss(_f32(fs), _f32(ft), reg), np.mean(diff ** 2),
                             rtol=1e-5)
  g = jax.grad(lambda r: distill.fitnet_loss(_f32(fs), _f32(ft), r))(reg)
  n = diff.size
  np.testing.assert_allclose(g["kernel"][0, 0], 2 * np.einsum("nhwc,nhwd->cd", fs, diff) / n,
                             atol=1e-5)
  np.testing.assert_allclose(g["bias"], 2 * diff.sum((0, 1, 2)) / n, atol=1e-5)


def test_fitnet_spatial_mismatch_is_config_error():
  reg = distill.init_regressor(jax.random.PRNGKey(0), 3, 5)
  with pytest.raises(ConfigError, match="spatial size"):
    distill.fitnet_loss(jnp.zeros((2, 8, 8, 3)), jnp.zeros((2, 4, 4, 5)), reg)


# ----------------------------------------------------------------------------- make_distill_loss


def _cfg(**kw):
  c = distill.default_config()
  for k, v in kw.items():
    c[k] = v
  return c


def _ce(s, y):
  return -np.mean(_log_softmax(s)[np.arange(len(y)), y])


def test_make_distill_loss_kd_mixture_and_metrics(data):
  s, t, y = data
  fn = distill.make_distill_loss(_cfg(loss="kd", alpha=0.75, temperature=4.0))
  loss, m = fn(_f32(s), {}, _f32(t), {}, jnp.asarray(y), {})
  kd = float(distill.kd_loss(_f32(s), _f32(t), 4.0))
  np.testing.assert_allclose(m["ce_loss"], _ce(s, y), rtol=1e-5)
  np.testing.assert_allclose(loss, 0.25 * _ce(s, y) + 0.75 * kd, rtol=1e-5)
  np.testing.assert_allclose(m["kd_loss"], kd, rtol=1e-6)


def test_make_distill_loss_dkd_and_warmup(data):
  s, t, y = data
  fn = distill.make_distill_loss(_cfg(loss="dkd", alpha=1.0, beta=8.0, warmup_steps=10))
  full, _, _ = _dkd_reference(s, t, y, 1.0, 8.0, 4.0)
  loss, m = fn(_f32(s), {}, _f32(t), {}, jnp.asarray(y), {})
  np.testing.assert_allclose(loss, _ce(s, y) + full, rtol=1e-4)
  loss5, _ = fn(_f32(s), {}, _f32(t), {}, jnp.asarray(y), {}, step=5)
  np.testing.assert_allclose(loss5, _ce(s, y) + 0.5 * full, rtol=1e-4)
  assert set(m) == {"ce_loss", "tckd_loss", "nckd_loss", "distill_loss"}


def test_make_distill_loss_tf_kd_uses_one_minus_alpha_as_lambda(data):
  s, t, y = data
  fn = distill.make_distill_loss(_cfg(loss="tf_kd", alpha=0.2, temperature=3.0))
  loss, _ = fn(_f32(s), {}, _f32(t), {}, jnp.asarray(y), {})
  ref, _ = distill.tf_kd_loss(_f32(s), _f32(t), jnp.asarray(y), 3.0, lam=0.8)
  np.testing.assert_allclose(loss, ref, rtol=1e-6)


def test_make_distill_loss_fitnet_trains_regressor_not_teacher():
  rng = np.random.default_rng(2)
  s_feats = {"stage2": _f32(rng.normal(size=(2, 4, 4, 3)))}
  t_feats = {"stage2": _f32(rng.normal(size=(2, 4, 4, 6)))}
  cfg = _cfg(loss="fitnet", alpha=0.0, fitnet_weight=10.0)
  aux = distill.init_aux(cfg, {"stage2": (2, 4, 4, 3)},
                         {"stage2": jax.ShapeDtypeStruct((2, 4, 4, 6), jnp.float32)},
                         jax.random.PRNGKey(0))
  assert aux["regressor"]["kernel"].shape == (1, 1, 3, 6)
  fn = distill.make_distill_loss(cfg)
  s, t, y = _f32(rng.normal(size=(2, K))), _f32(rng.normal(size=(2, K))), jnp.array([1, 2])

  def total(aux, t_feats):
    return fn(s, s_feats, t, t_feats, y, aux)[0]

  loss, m = fn(s, s_feats, t, t_feats, y, aux)
  hint = distill.fitnet_loss(s_feats["stage2"], t_feats["stage2"], aux["regressor"])
  np.testing.assert_allclose(loss, m["ce_loss"] + 10.0 * hint, rtol=1e-6)
  g_aux, g_teacher = jax.grad(total, argnums=(0, 1))(aux, t_feats)
  assert float(jnp.abs(g_aux["regressor"]["kernel"]).sum()) > 0
  assert float(jnp.abs(g_teacher["stage2"]).sum()) == 0
  assert distill.init_aux(_cfg(loss="kd"), {}, {}, jax.random.PRNGKey(0)) == {}


def test_dml_losses(data):
  s, t, y = data
  la, lb = distill.dml_losses(_f32(s), _f32(t), jnp.asarray(y), 1.0)
  ref_a = _ce(s, y) + np.mean(np.sum(_softmax(t) * (_log_softmax(t) - _log_softmax(s)), -1))
  np.testing.assert_allclose(la, ref_a, rtol=1e-5)
  # Each loss's gradient reaches only its own network's logits.
  ga = jax.grad(lambda b: distill.dml_losses(_f32(s), b, jnp.asarray(y))[0])(_f32(t))
  assert float(jnp.abs(ga).sum()) == 0
  gb = jax.grad(lambda b: distill.dml_losses(_f32(s), b, jnp.asarray(y))[1])(_f32(t))
  np.testing.assert_allclose(gb, (_softmax(t) - np.eye(K)[y] + _softmax(t) - _softmax(s)) / B,
                             atol=1e-6)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kw, key", [
    ({"temperature": 0.0}, "distill.temperature"),
    ({"temperature": -1.0}, "distill.temperature"),
    ({"alpha": 1.5}, "distill.alpha"),
    ({"alpha": -0.1}, "distill.alpha"),
    ({"loss": "crd"}, "distill.loss"),
    ({"beta": -1.0}, "distill.beta"),
])
def test_validate_refuses_bad_values(kw, key):
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    distill.validate_distill(_cfg(**kw))
  with pytest.raises(ConfigError):
    distill.make_distill_loss(_cfg(**kw))


def test_validate_unknown_key_feature_names_and_classes():
  c = _cfg()
  c.temprature = 2.0
  with pytest.raises(ConfigError, match="distill.temprature"):
    distill.validate_distill(c)
  names = ["stem", "stage1", "stage2", "stage3", "pre_logits"]
  with pytest.raises(ConfigError, match=r"distill\.student_feature.*stage1, stage2"):
    distill.validate_distill(_cfg(loss="fitnet", student_feature="stage4"), names, names)
  with pytest.raises(ConfigError, match=r"distill\.teacher_feature"):
    distill.validate_distill(_cfg(loss="fitnet", teacher_feature="conv_last"), names, names)
  with pytest.raises(ConfigError, match="10 classes"):
    distill.validate_distill(_cfg(), names, names, 100, 10)
  distill.validate_distill(_cfg(loss="fitnet"), names, names, 10, 10)   # fine
  distill.validate_distill(ml_collections.ConfigDict({"loss": "mse"}))  # defaults fill in


def test_init_aux_refuses_mismatched_spatial_sizes():
  with pytest.raises(ConfigError, match="distill.student_feature"):
    distill.init_aux(_cfg(loss="fitnet", student_feature="stage3", teacher_feature="stage2"),
                     {"stage3": (1, 8, 8, 64)}, {"stage2": (1, 16, 16, 32)},
                     jax.random.PRNGKey(0))


# ----------------------------------------------------------------------------- mixup labels


def test_mixed_labels_give_the_mix_of_the_two_labels_losses(data):
  """Cross-entropy and TF-KD's sigmoid term are linear in the targets: on mixup's class
  distributions they equal the ratio-weighted losses of the two integer labels."""
  s, t, y = data
  y2 = np.roll(y, 1)
  ratio = jnp.float32(0.3)
  targets = train.mixup_labels(jnp.asarray(y), K, ratio)
  np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
  want = 0.3 * distill.cross_entropy(_f32(s), y) + 0.7 * distill.cross_entropy(_f32(s), y2)
  np.testing.assert_allclose(distill.cross_entropy(_f32(s), targets), want, rtol=1e-5)
  mixed = distill.tf_kd_loss(_f32(s), _f32(t), targets, 4.0)[1]["sigmoid_ce_loss"]
  parts = [distill.tf_kd_loss(_f32(s), _f32(t), jnp.asarray(v), 4.0)[1]["sigmoid_ce_loss"]
           for v in (y, y2)]
  np.testing.assert_allclose(mixed, 0.3 * parts[0] + 0.7 * parts[1], rtol=1e-5)
  with pytest.raises(ConfigError, match="dkd.*one target class"):
    distill.dkd_parts(_f32(s), _f32(t), targets, 4.0)


def test_mixup_images_mixes_each_image_with_its_neighbour():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 4, 4, 3)), jnp.float32)
  ratios = []
  for i in range(20):
    ratio, mixed = train.mixup_images(jax.random.key(i), x, 0.4)
    np.testing.assert_allclose(mixed, ratio * x + (1 - ratio) * jnp.roll(x, 1, axis=0),
                               rtol=1e-6, atol=1e-6)
    ratios.append(float(ratio))
  assert all(0.0 <= r <= 1.0 for r in ratios) and np.std(ratios) > 0.1   # Beta(0.4, 0.4)


def test_mixup_with_dkd_is_refused_naming_the_key():
  from jcompress.methods import distill as distill_method  # noqa: PLC0415

  config = ml_collections.ConfigDict({"mixup": 1.0, "teacher": "t", "distill": _cfg(loss="dkd")})
  with pytest.raises(ConfigError, match="config key 'mixup'.*dkd"):
    distill_method.validate(config.distill, config)
  config.mixup = 0.0
  distill_method.validate(config.distill, config)
