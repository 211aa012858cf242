"""Tests for the binary ResNets (jcompress/models/bnn_resnet.py).

Shapes and parameter counts come from `jax.eval_shape` (no compile); real computation runs on a
bnn_resnet20 at width 0.25 (4/8/16 channels) on 2 images of 16x16.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jcompress.binary import binary_weights
from jcompress.errors import ConfigError
from jcompress.models import BNNResNet
from jcompress.models import count_params
from jcompress.models import get_model

pytestmark = pytest.mark.plumbing

KEY = jax.random.key(0, impl="rbg")
BINARY_CONVS = ("conv1", "conv2", "shortcut_conv")


def abstract_init(model, size=32, batch=2):
  x = jnp.zeros((batch, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init_with_output(KEY, x))


@pytest.fixture(scope="module")
def images():
  return jax.random.normal(jax.random.key(1, impl="rbg"), (2, 16, 16, 3), jnp.float32)


def run_capturing_conv_inputs(num_bits, images):
  """(features, {conv path: its input}) of a train-mode forward pass of a tiny bnn_resnet20."""
  model = get_model("bnn_resnet20", 10, width=0.25, num_bits=num_bits)
  variables = jax.jit(model.init)(KEY, images)

  @jax.jit
  def forward(variables, x):
    captured = {}

    def interceptor(next_fun, args, kwargs, context):
      if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
        captured["/".join(context.module.path)] = args[0]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      (_, feats), _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return feats, captured

  feats, captured = forward(variables, images)
  return jax.device_get(feats), jax.device_get(captured)


@pytest.mark.parametrize("num_bits", [1, 2, 4])
def test_every_block_conv_reads_exactly_quantized_inputs(num_bits, images):
  feats, captured = run_capturing_conv_inputs(num_bits, images)
  # bnn_resnet20: 9 blocks x (conv1, conv2) + 2 projection shortcuts + the stem.
  assert len(captured) == 9 * 2 + 2 + 1
  # The stem reads the raw (float) images.
  np.testing.assert_array_equal(captured["stem_conv"], images)
  m = 2 ** (num_bits - 1) - 1  # symmetric grid {-1, ..., -1/m, 0, 1/m, ..., 1} for k >= 2
  for path, x in captured.items():
    if path == "stem_conv":
      continue
    assert path.split("/")[-1] in BINARY_CONVS, path
    levels = np.unique(x)
    if num_bits == 1:
      assert set(levels.tolist()) == {-1.0, 1.0}, path
    else:
      assert np.all(np.abs(levels) <= 1), path
      # Every value is code / m for an integer code in -m..m, up to float32 rounding (XLA may
      # turn the division by m into a multiplication by 1/m), one float per code.
      codes = np.round(levels.astype(np.float64) * m)
      np.testing.assert_allclose(levels, codes / m, rtol=0, atol=1e-6, err_msg=path)
      assert len(np.unique(codes)) == len(levels), path
      # More than the two signs, fewer than the 2^k - 1 levels of the grid.
      assert 2 < len(levels) <= 2 * m + 1, (path, levels)
      # Signed, not DoReFa's [0, 1]: negative levels, zero and positive levels all occur.
      assert levels.min() < 0 < levels.max() and 0.0 in levels, (path, levels)
      if num_bits == 2:
        assert set(levels.tolist()) == {-1.0, 0.0, 1.0}, path
  # The block output is the plain (real-valued) sum, with no ReLU after it.
  assert feats["stage1"].min() < 0 and feats["stage3"].min() < 0


def test_shortcut_conv_is_3x3_where_the_shape_changes_and_absent_elsewhere():
  _, v = abstract_init(get_model("bnn_resnet20", 10))
  p = v["params"]
  blocks = sorted(k for k in p if k.startswith("stage"))
  assert blocks == [f"stage{s}_block{b}" for s in (1, 2, 3) for b in range(3)]
  for name in blocks:
    if name in ("stage2_block0", "stage3_block0"):
      assert set(p[name]) == {"bn1", "conv1", "bn2", "conv2", "shortcut_bn", "shortcut_conv"}
    else:
      assert set(p[name]) == {"bn1", "conv1", "bn2", "conv2"}, name
  assert p["stage2_block0"]["shortcut_conv"]["kernel"].shape == (3, 3, 16, 32)
  assert p["stage3_block0"]["shortcut_conv"]["kernel"].shape == (3, 3, 32, 64)
  assert p["stage2_block0"]["shortcut_bn"]["scale"].shape == (16,)  # BN before the conv
  _, v = abstract_init(get_model("bnn_resnet18_cifar", 10))
  p = v["params"]
  assert "shortcut_conv" not in p["stage1_block0"]  # the stem already has 64 channels
  for s, (cin, cout) in zip((2, 3, 4), ((64, 128), (128, 256), (256, 512))):
    assert p[f"stage{s}_block0"]["shortcut_conv"]["kernel"].shape == (3, 3, cin, cout)
    assert "shortcut_conv" not in p[f"stage{s}_block1"]
  # Every convolution but the stem is 3x3 (no 1x1 binary convolutions anywhere).
  flat = flax.traverse_util.flatten_dict(p)
  for path, w in flat.items():
    if path[-1] == "kernel" and w.ndim == 4:
      assert w.shape[:2] == (3, 3), path


def test_feature_shapes_32x32():
  expected = {
      "bnn_resnet20": {"stem": (2, 32, 32, 16), "stage1": (2, 32, 32, 16),
                       "stage2": (2, 16, 16, 32), "stage3": (2, 8, 8, 64), "pre_logits": (2, 64)},
      "bnn_resnet18_cifar": {"stem": (2, 32, 32, 64), "stage1": (2, 32, 32, 64),
                             "stage2": (2, 16, 16, 128), "stage3": (2, 8, 8, 256),
                             "stage4": (2, 4, 4, 512), "pre_logits": (2, 512)},
      # ImageNet stem: 7x7/2 conv then 3x3/2 max pool, 32 -> 16 -> 8.
      "bnn_resnet18": {"stem": (2, 8, 8, 64), "stage1": (2, 8, 8, 64),
                       "stage2": (2, 4, 4, 128), "stage3": (2, 2, 2, 256),
                       "stage4": (2, 1, 1, 512), "pre_logits": (2, 512)},
  }
  for name, want in expected.items():
    (logits, feats), _ = abstract_init(get_model(name, 10))
    assert {k: tuple(f.shape) for k, f in feats.items()} == want, name
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32


def test_bnn_resnet18_cifar_param_count_closed_form():
  def bn(c):  # gamma + beta (running mean/var are batch_stats, not params)
    return 2 * c

  def conv3x3(cin, cout):
    return 3 * 3 * cin * cout

  def block(cin, cout):
    n = bn(cin) + conv3x3(cin, cout) + bn(cout) + conv3x3(cout, cout)
    if cin != cout:  # first block of stages 2..4 (stride 2): BN(x) + 3x3 projection
      n += bn(cin) + conv3x3(cin, cout)
    return n

  stem = conv3x3(3, 64) + bn(64)  # 1,728 + 128 = 1,856
  # Identity block C -> C: 18 C^2 + 4 C; projection block C/2 -> C: 9/2 C^2 + 3 C + 9 C^2 +
  # 2 C + 9/2 C^2 = 18 C^2 + 5 C... written out per stage:
  stage1 = 2 * block(64, 64)  # 2 * (18 * 64^2 + 4 * 64) = 147,968
  stage2 = block(64, 128) + block(128, 128)  # 295,424 + 295,424 = 590,848
  stage3 = block(128, 256) + block(256, 256)  # 1,180,672 + 1,180,672 = 2,361,344
  stage4 = block(256, 512) + block(512, 512)  # 4,720,640 + 4,720,640 = 9,441,280
  final = bn(512) + 512 * 10 + 10  # final_bn 1,024 + head 5,130
  expected = stem + stage1 + stage2 + stage3 + stage4 + final
  assert (stage1, stage2, stage3, stage4) == (147_968, 590_848, 2_361_344, 9_441_280)
  assert expected == 12_549_450
  _, v = abstract_init(get_model("bnn_resnet18_cifar", 10))
  assert count_params(v["params"]) == expected
  # Same BN sites in batch_stats (mean + var): half the BN parameter count.
  bn_params = sum(x.size for p, x in flax.traverse_util.flatten_dict(v["params"]).items()
                  if p[-1] in ("scale", "bias") and p[0] != "head")
  assert count_params(v["batch_stats"]) == bn_params


def test_width_multiplier_2_doubles_channels():
  _, v1 = abstract_init(get_model("bnn_resnet20", 10))
  _, v2 = abstract_init(get_model("bnn_resnet20", 10, num_bits=2, width=2.0))
  f1 = flax.traverse_util.flatten_dict(v1["params"])
  f2 = flax.traverse_util.flatten_dict(v2["params"])
  assert set(f1) == set(f2)
  for path, w in f1.items():
    if path == ("stem_conv", "kernel"):
      want = (3, 3, 3, 2 * w.shape[3])
    elif path == ("head", "kernel"):
      want = (2 * w.shape[0], 10)
    elif path == ("head", "bias"):
      want = w.shape
    elif w.ndim == 4:
      want = w.shape[:2] + (2 * w.shape[2], 2 * w.shape[3])
    else:
      want = (2 * w.shape[0],)
    assert f2[path].shape == want, path
  assert f2[("stage3_block2", "conv2", "kernel")].shape == (3, 3, 128, 128)


@pytest.mark.parametrize("bad", [0, 9, 1.5, True, "2"])
def test_bad_num_bits_raises_config_error_naming_num_bits(bad):
  with pytest.raises(ConfigError, match="num_bits"):
    get_model("bnn_resnet20", 10, num_bits=bad)
  with pytest.raises(ConfigError, match="num_bits"):
    BNNResNet(num_classes=10, num_bits=bad)


def test_fields_fixed_by_name_and_bad_fields():
  with pytest.raises(ConfigError, match="stage_sizes"):
    get_model("bnn_resnet20", 10, stage_sizes=(1, 1, 1))
  with pytest.raises(ConfigError, match="width"):
    get_model("bnn_resnet18_cifar", 10, width=0)
  with pytest.raises(ConfigError, match="stage_sizes"):
    BNNResNet(num_classes=10, stage_sizes=(2, 0))
  m = get_model("bnn_resnet20", 10, num_bits=2, width=2.0)
  assert (m.num_bits, m.width, m.stage_sizes, m.num_filters) == (2, 2.0, (3, 3, 3), 16)


def test_gradients_reach_every_param_through_the_ste(images):
  model = get_model("bnn_resnet20", 10, width=0.25)
  variables = jax.jit(model.init)(KEY, images)
  params = variables["params"]
  transform = binary_weights(params)  # binarizes every kernel but stem_conv and head
  labels = jnp.array([3, 7])

  @jax.jit
  def loss_fn(params):
    eff = transform.apply(params, transform.init(params, None))
    (logits, _), _ = model.apply({"params": eff, "batch_stats": variables["batch_stats"]},
                                 images, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  grads = jax.device_get(jax.grad(loss_fn)(params))
  flat = flax.traverse_util.flatten_dict(grads)
  assert len(flat) == len(jax.tree.leaves(params))
  for path, g in flat.items():
    assert np.all(np.isfinite(g)), path
    # bn1 / bn2 / shortcut_bn feed only a quantizer: their gradient exists only through the STE.
    assert np.any(g != 0), path


def test_experiment_distills_with_the_distributional_loss_by_default():
  """bnn_resnet.py with a teacher: KD at T 1 with no hard-label term (ReActNet's distributional
  loss) unless temperature or alpha is given; other losses and configs without a teacher keep
  the `distill` defaults."""
  import os

  from jcompress import config as config_lib
  from jcompress import distill

  spec = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "experiments", "bnn_resnet.py")

  def dist(arg):
    c = config_lib.load_config_file(f"{spec}:data=digits,{arg}").distill
    return c.loss, c.temperature, c.alpha

  base = distill.default_config()
  assert dist("teacher=runs/t") == ("kd", 1.0, 1.0)
  assert dist("teacher=runs/t,temperature=4.0,alpha=0.9") == ("kd", 4.0, 0.9)
  assert dist("teacher=runs/t,alpha=0.5") == ("kd", 1.0, 0.5)
  assert dist("teacher=") == ("kd", base.temperature, base.alpha)
  assert dist("teacher=runs/t,loss=dkd") == ("dkd", base.temperature, base.alpha)


def test_experiment_trains_digits_hard_w1a1_in_two_stages_only():
  """bnn_resnet.py: digits_hard W1A1 keeps float kernels for the first 1500 of its 3000 steps;
  digits, W1A2 and an explicit float_steps keep theirs; the config validates."""
  import os

  from jcompress import config as config_lib

  spec = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "experiments", "bnn_resnet.py")

  def stages(arg):
    c = config_lib.load_config_file(f"{spec}:teacher=,{arg}")
    config_lib.validate(c)
    return c.binary.float_steps, c.total_steps

  assert stages("data=digits_hard,num_bits=1") == (1500, 3000)
  assert stages("data=digits_hard,num_bits=2") == (0, 3000)
  assert stages("data=digits,num_bits=1") == (0, 1500)
  assert stages("data=digits_hard,num_bits=1,float_steps=0") == (0, 3000)
  assert stages("data=digits_hard,num_bits=1,float_steps=500") == (500, 3000)
