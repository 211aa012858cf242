"""BRECQ (jcompress/brecq.py): blocks are a ResNet's residual blocks, every learned code is the
floor or floor + 1 of W / s on the uniform quantizer's grid, and the block output error after
the joint optimisation is below round-to-nearest's on the calibration data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress import brecq
from jcompress import quantize
from jcompress import quantize_core
from jcompress import transforms
from jcompress.errors import ConfigError
from jcompress.models import resnet

pytestmark = pytest.mark.plumbing   # the numbers a method gives: XLA optimizations off


def _kernels(params, skip=("stem_conv", "head")):
  names = [transforms.path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  return [n for n in names if n.endswith("/kernel") and n.split("/")[0] not in skip]


def test_blocks_of_resnet20_are_its_residual_blocks():
  model = resnet.CifarResNet(num_classes=10, depth=20)
  x = jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  leaves = _kernels(variables["params"], skip=())
  blocks = brecq.find_blocks(model, variables, x, leaves[::-1])     # any order in
  expect = [f"stage{s}_block{b}" for s in (1, 2, 3) for b in range(3)]
  assert [b.path for b in blocks] == ["stem_conv", *expect, "head"]
  assert blocks[0].leaves == ("stem_conv/kernel",)
  assert blocks[-1].leaves == ("head/kernel",)
  for b in blocks[1:-1]:
    names = tuple(leaf.split("/")[1] for leaf in b.leaves)
    projection = b.path in ("stage2_block0", "stage3_block0")
    # forward order inside the block: conv1, conv2, then the shortcut
    assert names == (("conv1", "conv2", "shortcut_conv") if projection else ("conv1", "conv2"))
  assert sum(len(b.leaves) for b in blocks) == 22 == len(leaves)   # 1 + 9 x 2 + 2 + 1
  assert brecq.block_of("a/b/conv/kernel", depth=2) == "a/b"
  assert brecq.block_of("a/conv/kernel", depth=3) == "a"
  with pytest.raises(ConfigError, match="quant.brecq_depth"):
    brecq.find_blocks(model, variables, x, leaves, depth=0)
  with pytest.raises(ConfigError, match="not a kernel"):
    brecq.find_blocks(model, variables, x, ["stage1_block0/bn1/scale"])


@pytest.fixture(scope="module")
def tiny():
  """ResNet-8 at quarter width (4/4/8/16 channels) on 8x8 images; 2-bit weights."""
  model = resnet.CifarResNet(num_classes=4, depth=8, width=0.25)
  x = jax.random.normal(jax.random.key(0), (64, 8, 8, 3))
  labels = jax.random.randint(jax.random.key(2), (64,), 0, 4)
  # He-normal kernels, unit BatchNorms, filled in with numpy: no compile of `model.init`
  rng = np.random.default_rng(1)

  def fill(path, s):
    name = transforms.path_str(path)
    if name.endswith("kernel"):
      return jnp.asarray(rng.normal(0, np.sqrt(2 / np.prod(s.shape[:-1])), s.shape), s.dtype)
    return jnp.full(s.shape, 1.0 if name.endswith(("scale", "var")) else 0.0, s.dtype)

  shapes = jax.eval_shape(lambda: model.init(jax.random.key(1), x[:2], train=False))
  v = jax.tree_util.tree_map_with_path(fill, shapes)
  params, stats = v["params"], v["batch_stats"]
  bits = {leaf: 2 for leaf in _kernels(params)}
  return model, params, stats, x, labels, bits


@pytest.mark.slow
def test_block_error_below_nearest_and_codes_floor_or_ceil(tiny):
  model, params, stats, x, _, bits = tiny
  out, rep = brecq.brecq_tree(model, params, stats, x, bits, iters=100, batch=32)
  assert list(rep) == ["stage1_block0", "stage2_block0", "stage3_block0"]
  for r in rep.values():
    # the asymmetric reconstruction: the input already carries the earlier blocks' error
    assert r["mse_brecq"] < 0.9 * r["mse_nearest"], r
    assert 0 < r["flipped"] < 0.5
  for leaf, b in bits.items():
    w0 = _leaf(params, leaf)
    w = _leaf(out, leaf)
    q0 = quantize_core.quantize(w0, b, symmetric=True, narrow_range=True, per_channel=True)
    q = quantize_core.quantize(w, b, symmetric=True, narrow_range=True, per_channel=True)
    np.testing.assert_allclose(q.scale, q0.scale, rtol=1e-6)    # the range is kept
    np.testing.assert_allclose(quantize_core.dequantize(q), w, rtol=1e-6, atol=1e-7)
    floor = np.floor(np.asarray(w0) / np.asarray(q0.scale))
    codes = np.asarray(q.codes, np.float64)
    assert np.all((codes == floor) | (codes == floor + 1)), leaf
  np.testing.assert_array_equal(out["head"]["kernel"], params["head"]["kernel"])
  summary = brecq.report_summary(rep, x.shape[0])
  assert summary["brecq_blocks"] == 3 and summary["brecq_layers"] == len(bits)
  assert summary["brecq_mse"] < summary["brecq_mse_nearest"]


def _leaf(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def test_block_runner_reproduces_the_block_and_fisher_weights_follow_the_kl_gradient(tiny):
  """The block run inside the whole model (the rest dead) gives the block's captured output;
  the Fisher weights are (|g| + 1)^2 with g the gradient of KL(p_float || p_quant) with respect
  to the block output: 1 where the quantized model is the float one (the KL at its minimum),
  above 1 where the block's weights are rounded."""
  model, params, stats, x, _, bits = tiny
  variables = {"params": params, "batch_stats": stats}
  args, kw, y = brecq.capture_blocks(model, variables, x, ["stage2_block0"])["stage2_block0"]
  inputs, rebuild = brecq.split_call(args, kw, x.shape[0])
  assert len(inputs) == 1 and rebuild(inputs)[1] == kw
  run = brecq.block_runner(model, "stage2_block0", rebuild)
  np.testing.assert_allclose(jax.jit(lambda i: run(variables, i, x))(inputs), y, rtol=1e-5,
                             atol=1e-5)
  w = brecq.fisher_weights(model, variables, variables, "stage2_block0", x[:8], chunk=8)
  np.testing.assert_allclose(w, 1.0, atol=1e-6)
  quant = {"params": transforms.map_with_path(
      lambda n, a: brecq._nearest(a, 2, True, True, True, n) if n in bits else a, params),
      "batch_stats": stats}
  w = brecq.fisher_weights(model, quant, variables, "stage2_block0", x[:8], chunk=8)
  assert w.shape == y[:8].shape and float(jnp.min(w)) >= 1.0 and float(jnp.max(w)) > 1.0
def test_quant_transform_brecq_calibrates_onto_the_grid_and_checks_keys(tiny):
  model, params, stats, x, labels, bits = tiny
  """`quant.brecq` (here with the Fisher-weighted error, on the last block only) puts the
  weights on the grid the quantizer gives back; its keys are checked by name."""
  t = quantize.quant_weights(params, bits=2, brecq=True, brecq_iters=60, brecq_fisher=True,
                             include=("stage3",), mode="ptq")
  ctx = transforms.CalibrationContext(model, stats, [{"image": x, "label": labels}], None, None)
  new, _ = t.calibrate(params, t.init(params, None), ctx)
  kernel = new["stage3_block0"]["conv1"]["kernel"]
  np.testing.assert_allclose(t.apply(new, {})["stage3_block0"]["conv1"]["kernel"], kernel,
                             rtol=1e-6, atol=1e-7)
  assert not np.allclose(kernel, params["stage3_block0"]["conv1"]["kernel"])
  np.testing.assert_array_equal(new["stage2_block0"]["conv1"]["kernel"],
                                params["stage2_block0"]["conv1"]["kernel"])
  m = t.metrics(new, {})
  assert int(m["brecq_blocks"]) == 1 and float(m["brecq_mse"]) < float(m["brecq_mse_nearest"])
  with pytest.raises(ConfigError, match="'quant.brecq' and 'quant.adaround'"):
    quantize.quant_weights(params, bits=2, brecq=True, adaround=True)
  with pytest.raises(ConfigError, match="quant.brecq'"):
    quantize.quant_weights(params, bits=2, brecq=True, method="kmeans")
  with pytest.raises(ConfigError, match="quant.brecq'"):
    quantize.quant_weights(params, bits=2, brecq="yes")
  with pytest.raises(ConfigError, match="quant.brecq_depth"):
    quantize.quant_weights(params, bits=2, brecq=True, brecq_depth=0)
  with pytest.raises(ConfigError, match="quant.brecq_iters"):
    quantize.quant_weights(params, bits=2, brecq=True, brecq_iters=0)
  with pytest.raises(ConfigError, match="quant.brecq_fisher"):
    quantize.quant_weights(params, bits=2, brecq_fisher=True)
  with pytest.raises(ConfigError, match="calibration_batches"):
    quantize.quant_weights(params, bits=2, brecq=True).calibrate(params, {}, None)
