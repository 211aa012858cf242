"""Cross-layer equalization (jcompress/equalize.py): the equalized float model computes the same
logits within float32 rounding, the channel ranges of the equalized kernels even out, only
exact pairs are taken (ReLU6, residual additions refused), per-tensor PTQ with
`quant.equalize` has a smaller output error, and a model with no exact pair is a ConfigError
naming the key and the layers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress import equalize
from jcompress import quantize
from jcompress import transforms
from jcompress.errors import ConfigError
from jcompress.models import get_model
from jcompress.models.common import BatchNorm

pytestmark = pytest.mark.plumbing


def _perturb(variables, seed=0):
  """Trained-looking variables: BN statistics and affine params away from the init, and kernels
  whose output channels have ranges spread over a factor ~20 (what equalization is for)."""
  rng = np.random.default_rng(seed)

  def stats(path, a):
    if path[-1].key == "mean":
      return jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype)
    return jnp.asarray(np.exp(0.5 * rng.standard_normal(a.shape)), a.dtype)

  def par(path, a):
    if path[-1].key == "kernel":
      return a * jnp.asarray(np.exp(rng.uniform(-1.5, 1.5, a.shape[-1:])), a.dtype)
    return a + jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype)

  return (jax.tree_util.tree_map_with_path(par, variables["params"]),
          jax.tree_util.tree_map_with_path(stats, variables["batch_stats"]))


@pytest.fixture(scope="module")
def mnv2():
  model = get_model("mobilenetv2_cifar", num_classes=10, width=0.25, activation="relu")
  x = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
  # jitted: eager init and apply dispatch every op of the network one at a time (tens of seconds)
  params, stats = _perturb(jax.jit(model.init)(jax.random.key(1), x))
  return model, params, stats, x


@pytest.mark.slow
def test_equalized_mobilenetv2_has_the_same_logits(mnv2):
  model, params, stats, x = mnv2
  new, report = equalize.equalize(params, stats, model, x)
  apply = jax.jit(lambda p: model.apply({"params": p, "batch_stats": stats}, x)[0])
  ref, out = apply(params), apply(new)
  np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5 * float(jnp.max(jnp.abs(ref))))
  assert report["range_ratio_after"] > report["range_ratio_before"] + 0.1
  pairs = set(report["pairs"])
  assert "stage2_block0/expand_conv -> stage2_block0/dw_conv" in pairs     # ReLU
  assert "stage2_block0/dw_conv -> stage2_block0/project_conv" in pairs    # depthwise -> 1x1
  assert "stage3_block0/project_conv -> stage3_block1/expand_conv" not in pairs  # + residual
  assert "stage2_block0/project_conv -> stage2_block1/expand_conv" not in pairs
  assert "conv_last -> head" in pairs                                      # through the pool
  # the depthwise kernels' per-channel ranges: equal to the next layer's input ranges
  w1 = np.asarray(new["stage2_block0"]["dw_conv"]["kernel"])
  w2 = np.asarray(new["stage2_block0"]["project_conv"]["kernel"])
  r1 = np.abs(w1).reshape(-1, w1.shape[-1]).max(0)
  r2 = np.abs(w2).reshape(-1, *w2.shape[-2:]).max((0, 2))
  np.testing.assert_allclose(r1, r2, rtol=2e-2)


class Chain(nn.Module):
  act: str = "relu"
  residual: bool = False

  @nn.compact
  def __call__(self, x, train=False):
    act = {"relu": nn.relu, "relu6": nn.relu6}[self.act]
    y = act(BatchNorm(use_running_average=True, name="bn1")(
        nn.Conv(16, (3, 3), use_bias=False, name="conv1")(x)))
    y = act(nn.Conv(16, (3, 3), name="conv2")(y))          # a bias, no BN
    if self.residual:
      y = y + x[..., :1]
    y = nn.Conv(8, (1, 1), use_bias=False, name="conv3")(y)
    return nn.Dense(4, name="head")(y.mean((1, 2))), {}


def test_per_tensor_ptq_with_equalize_has_a_smaller_error():
  model = Chain()
  x = jax.random.normal(jax.random.key(0), (32, 8, 8, 3))
  params, stats = _perturb(model.init(jax.random.key(1), x), seed=3)
  ctx = transforms.CalibrationContext(model=model, batch_stats=stats, batches=[{"image": x}],
                                      loss_fn=None, config=None)
  ref = model.apply({"params": params, "batch_stats": stats}, x)[0]

  def err(eq):
    t = quantize.quant_weights(params, bits=4, per_channel=False, mode="ptq",
                               exclude=(r"head/",), equalize=eq)
    p, st = t.calibrate(params, {}, ctx)
    out = model.apply({"params": t.apply(p, st), "batch_stats": stats}, x)[0]
    return float(jnp.mean((out - ref) ** 2)), t.metrics(p, st), p

  plain, _, _ = err(False)
  equalized, figures, p = err(True)
  assert int(figures["equalized_pairs"]) == 3      # conv1 -> conv2 -> conv3 -> head
  assert equalized < 0.5 * plain, (equalized, plain)
  same = model.apply({"params": p, "batch_stats": stats}, x)[0]   # float, equalized
  np.testing.assert_allclose(same, ref, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(ref))))


class Relu6Net(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    y = nn.relu6(BatchNorm(use_running_average=True, name="bn1")(
        nn.Conv(16, (3, 3), use_bias=False, name="conv1")(x)))
    y = nn.relu6(nn.Conv(8, (3, 3), name="conv2")(y))
    return nn.Dense(4, name="head")(y.mean((1, 2))), {}


def test_no_exact_pair_is_a_config_error_naming_the_layers():
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
  model = Relu6Net()
  params, stats = _perturb(model.init(jax.random.key(1), x))
  pairs, refused = equalize.find_pairs(model, params, stats, x)
  assert pairs == [] and [r[0] for r in refused] == ["conv1 -> conv2", "conv2 -> head"]
  t = quantize.quant_weights(params, bits=8, per_channel=False, mode="ptq", equalize=True)
  ctx = transforms.CalibrationContext(model=model, batch_stats=stats,
                                      batches=[{"image": x}], loss_fn=None, config=None)
  with pytest.raises(ConfigError,
                     match=r"'quant\.equalize'.*conv1 -> conv2.*positively homogeneous"):
    t.calibrate(params, {}, ctx)
  with pytest.raises(ConfigError, match=r"'quant\.equalize'.*calibration_batches"):
    t.calibrate(params, {}, None)
  # ReLU with a residual: conv2 -> conv3 is refused (another reader / not homogeneous)
  model = Chain(residual=True)
  params, stats = _perturb(model.init(jax.random.key(1), x))
  pairs, refused = equalize.find_pairs(model, params, stats, x)
  assert [(p.first, p.second) for p in pairs] == [("conv1", "conv2"), ("conv3", "head")]
  assert any(r[0] == "conv2 -> conv3" for r in refused)
  with pytest.raises(ConfigError, match=r"'quant\.equalize'"):
    quantize.quant_weights(params, equalize=1)
