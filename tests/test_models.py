"""Tests for jcompress.models.

Parameter counts and shapes come from `jax.eval_shape` (tracing only, no XLA compile); real
computation runs only on tiny models (small_cnn, resnet20 at width 0.25) on 2 images of 16x16.
"""

import dataclasses
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress.errors import ConfigError
from jcompress.models import MODELS
from jcompress.models import BasicBlock
from jcompress.models import Bottleneck
from jcompress.models import InvertedResidual
from jcompress.models import ShuffleUnit
from jcompress.models import channel_shuffle
from jcompress.models import count_params
from jcompress.models import get_model
from jcompress.models import make_divisible
from jcompress.models.common import conv
from jcompress.transforms import leaf_paths

pytestmark = pytest.mark.plumbing

# RngBitGenerator keys: initialising a model with them compiles several times faster on CPU
# than with the default threefry keys, and the models do not care which PRNG they get.
KEY = jax.random.key(0, impl="rbg")


def abstract_init(model, size=32, batch=2, **apply_kwargs):
  """((logits, features), variables) as ShapeDtypeStructs, without compiling anything."""
  x = jnp.zeros((batch, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda: model.init_with_output(KEY, x, **apply_kwargs))


def numpy_variables(model, x, seed=0):
  """Variables of `model` on inputs like `x` drawn on the host (no compile): kernels and
  embeddings normal with variance 1/fan-in, BatchNorm scales and running variances in
  [0.5, 1.5], biases and running means small."""
  rng = np.random.default_rng(seed)

  def draw(path, s):
    name = getattr(path[-1], "key", None)
    if name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, s.shape)
    elif name in ("bias", "mean"):
      value = rng.normal(0.0, 0.1, s.shape)
    else:
      value = rng.normal(0.0, 1.0, s.shape) / np.sqrt(max(1, int(np.prod(s.shape[:-1]))))
    return jnp.asarray(value, s.dtype)

  return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(model.init, KEY, x))


def shapes(features):
  return {k: tuple(v.shape) for k, v in features.items()}


@pytest.fixture(scope="module")
def abstract_models():
  """name -> ((logits, features), variables) for every registered model, 10 classes, 32x32."""
  return {name: abstract_init(get_model(name, 10)) for name in MODELS}


def test_registry_names():
  assert set(MODELS) == {
      "resnet20", "resnet32", "resnet56", "resnet8x4", "resnet32x4", "resnet18", "resnet34",
      "resnet50", "resnet18_cifar", "resnet34_cifar", "resnet50_cifar", "mobilenetv2",
      "mobilenetv2_cifar", "shufflenetv2", "shufflenetv2_cifar", "small_cnn",
      "bnn_resnet18_cifar", "bnn_resnet18", "bnn_resnet20",
      "vit_tiny_cifar", "vit_digits", "vit_ti16", "vit_s16", "vit_b16",
  }


def _cnn(name):
  """The convolutional networks (the ViTs have their own contract: tests/test_vit.py)."""
  return not name.startswith("vit")


# ------------------------------------------------------------------------------------------------
# Parameter counts against published figures.

# He et al.'s CIFAR ResNets with option-A (parameter-free) shortcuts have 269,722 / 464,154 /
# 853,018 parameters for 10 classes (the "0.27M / 0.46M / 0.85M" of the paper). Ours use option-B
# projections: two of them (stages 2 and 3), 1x1 16->32 and 32->64 convs plus their BN gamma/beta:
OPTION_B_EXTRA = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)  # = 2,752


@pytest.mark.parametrize(
    "name,num_classes,kwargs,expected",
    [
        ("resnet20", 10, {}, 269_722 + OPTION_B_EXTRA),  # = 272,474
        ("resnet32", 10, {}, 464_154 + OPTION_B_EXTRA),
        ("resnet56", 10, {}, 853_018 + OPTION_B_EXTRA),
        # RepDistiller / CRD (Tian et al. 2020), CIFAR-100: 1.23M and 7.43M.
        ("resnet8x4", 100, {}, 1_233_540),
        ("resnet32x4", 100, {}, 7_433_860),
        # torchvision (BN running stats are buffers there and `batch_stats` here, not params).
        ("resnet18", 1000, {}, 11_689_512),
        ("resnet34", 1000, {}, 21_797_672),
        ("resnet50", 1000, {}, 25_557_032),
        ("mobilenetv2", 1000, {}, 3_504_872),
        ("shufflenetv2", 1000, {"width": 0.5}, 1_366_792),
        ("shufflenetv2", 1000, {}, 2_278_604),
        ("shufflenetv2", 1000, {"width": 1.5}, 3_503_624),
        ("shufflenetv2", 1000, {"width": 2.0}, 7_393_996),
        # kuangliu/pytorch-cifar ResNet18 (3x3 stem, no max pool), 10 classes.
        ("resnet18_cifar", 10, {}, 11_173_962),
    ],
)
def test_param_counts_match_published(name, num_classes, kwargs, expected):
  _, variables = abstract_init(get_model(name, num_classes, **kwargs))
  assert count_params(variables["params"]) == expected


def test_cifar_stem_changes_only_stem_and_head_params():
  # resnet18_cifar vs resnet18: the stem kernel shrinks 7x7 -> 3x3, nothing else changes.
  _, v_in = abstract_init(get_model("resnet18", 10))
  _, v_cifar = abstract_init(get_model("resnet18_cifar", 10))
  diff = count_params(v_in["params"]) - count_params(v_cifar["params"])
  assert diff == (49 - 9) * 3 * 64
  # MobileNetV2 / ShuffleNetV2: the CIFAR variant only changes strides, not parameters.
  for name in ("mobilenetv2", "shufflenetv2"):
    _, a = abstract_init(get_model(name, 10))
    _, b = abstract_init(get_model(name + "_cifar", 10))
    assert jax.tree.map(lambda s: s.shape, a) == jax.tree.map(lambda s: s.shape, b)


def test_count_params_on_arrays_and_structs():
  tree = {"a": jnp.zeros((2, 3)), "b": [np.ones(4), jax.ShapeDtypeStruct((5, 1, 2), jnp.float32)],
          "c": 1.0}
  assert count_params(tree) == 6 + 4 + 10 + 1


# ------------------------------------------------------------------------------------------------
# Feature names and spatial sizes (the stride pattern).


def test_cifar_feature_shapes(abstract_models):
  expected = {
      "resnet20": {"stem": (2, 32, 32, 16), "stage1": (2, 32, 32, 16),
                   "stage2": (2, 16, 16, 32), "stage3": (2, 8, 8, 64), "pre_logits": (2, 64)},
      "resnet8x4": {"stem": (2, 32, 32, 32), "stage1": (2, 32, 32, 64),
                    "stage2": (2, 16, 16, 128), "stage3": (2, 8, 8, 256),
                    "pre_logits": (2, 256)},
      "resnet18_cifar": {"stem": (2, 32, 32, 64), "stage1": (2, 32, 32, 64),
                         "stage2": (2, 16, 16, 128), "stage3": (2, 8, 8, 256),
                         "stage4": (2, 4, 4, 512), "pre_logits": (2, 512)},
      "resnet50_cifar": {"stem": (2, 32, 32, 64), "stage1": (2, 32, 32, 256),
                         "stage2": (2, 16, 16, 512), "stage3": (2, 8, 8, 1024),
                         "stage4": (2, 4, 4, 2048), "pre_logits": (2, 2048)},
      "mobilenetv2_cifar": {"stem": (2, 32, 32, 32), "stage1": (2, 32, 32, 16),
                            "stage2": (2, 32, 32, 24), "stage3": (2, 16, 16, 32),
                            "stage4": (2, 8, 8, 64), "stage5": (2, 8, 8, 96),
                            "stage6": (2, 4, 4, 160), "stage7": (2, 4, 4, 320),
                            "conv_last": (2, 4, 4, 1280), "pre_logits": (2, 1280)},
      "shufflenetv2_cifar": {"stem": (2, 32, 32, 24), "stage1": (2, 16, 16, 116),
                             "stage2": (2, 8, 8, 232), "stage3": (2, 4, 4, 464),
                             "conv_last": (2, 4, 4, 1024), "pre_logits": (2, 1024)},
      "small_cnn": {"stem": (2, 32, 32, 32), "stage1": (2, 16, 16, 64),
                    "stage2": (2, 8, 8, 128), "pre_logits": (2, 128)},
  }
  for name, want in expected.items():
    (logits, feats), _ = abstract_models[name]
    assert shapes(feats) == want, name
    assert logits.shape == (2, 10)


def test_imagenet_feature_shapes_224():
  expected = {
      "resnet18": {"stem": (1, 56, 56, 64), "stage1": (1, 56, 56, 64),
                   "stage2": (1, 28, 28, 128), "stage3": (1, 14, 14, 256),
                   "stage4": (1, 7, 7, 512), "pre_logits": (1, 512)},
      "resnet50": {"stem": (1, 56, 56, 64), "stage1": (1, 56, 56, 256),
                   "stage2": (1, 28, 28, 512), "stage3": (1, 14, 14, 1024),
                   "stage4": (1, 7, 7, 2048), "pre_logits": (1, 2048)},
      "mobilenetv2": {"stem": (1, 112, 112, 32), "stage1": (1, 112, 112, 16),
                      "stage2": (1, 56, 56, 24), "stage3": (1, 28, 28, 32),
                      "stage4": (1, 14, 14, 64), "stage5": (1, 14, 14, 96),
                      "stage6": (1, 7, 7, 160), "stage7": (1, 7, 7, 320),
                      "conv_last": (1, 7, 7, 1280), "pre_logits": (1, 1280)},
      "shufflenetv2": {"stem": (1, 56, 56, 24), "stage1": (1, 28, 28, 116),
                       "stage2": (1, 14, 14, 232), "stage3": (1, 7, 7, 464),
                       "conv_last": (1, 7, 7, 1024), "pre_logits": (1, 1024)},
  }
  for name, want in expected.items():
    (logits, feats), _ = abstract_init(get_model(name, 1000), size=224, batch=1)
    assert shapes(feats) == want, name
    assert logits.shape == (1, 1000)


def test_every_model_has_stem_conv_and_head_and_bias_free_convs(abstract_models):
  for name, ((_, feats), variables) in abstract_models.items():
    if not _cnn(name):
      continue
    params = variables["params"]
    assert "stem_conv" in params and "head" in params, name
    assert set(params["stem_conv"]) == {"kernel"}, name  # no bias: a BN follows
    assert params["stem_conv"]["kernel"].shape[2] == 3, name
    assert params["head"]["kernel"].shape == (feats["pre_logits"].shape[-1], 10), name
    assert params["head"]["bias"].shape == (10,), name
    flat = flax.traverse_util.flatten_dict(params)
    convs = [p for p, v in flat.items() if p[-1] == "kernel" and v.ndim == 4]
    # stem_conv is the only convolution that reads the RGB input.
    assert [p for p in convs if flat[p].shape[2] == 3] == [("stem_conv", "kernel")], name
    for p in convs:
      assert p[:-1] + ("bias",) not in flat, (name, p)
    # Every BatchNorm has gamma/beta in params and mean/var in batch_stats, nothing else there.
    bn_params = {p[:-1] for p in flat if p[-1] == "scale"}
    bn_stats = flax.traverse_util.flatten_dict(variables["batch_stats"])
    assert {p[:-1] for p in bn_stats} == bn_params, name
    assert {p[-1] for p in bn_stats} == {"mean", "var"}, name
    # Features follow the documented names, stages numbered from 1 without gaps.
    stages = sorted(int(k[5:]) for k in feats if k.startswith("stage"))
    assert stages == list(range(1, len(stages) + 1)) and len(stages) >= 2, name
    assert set(feats) - {f"stage{i}" for i in stages} <= {"stem", "conv_last", "pre_logits"}
    assert {"stem", "pre_logits"} <= set(feats), name


def test_block_parameter_names(abstract_models):
  p = abstract_models["resnet20"][1]["params"]
  assert set(p["stage1_block0"]) == {"conv1", "bn1", "conv2", "bn2"}
  assert set(p["stage2_block0"]) == {"conv1", "bn1", "conv2", "bn2", "shortcut_conv",
                                     "shortcut_bn"}
  assert p["stage2_block0"]["shortcut_conv"]["kernel"].shape == (1, 1, 16, 32)
  assert "stage3_block2" in p and "stage3_block3" not in p
  p = abstract_models["resnet50"][1]["params"]
  # torchvision v1.5: stride on the 3x3, shortcut in the first block of every stage.
  assert set(p["stage1_block0"]) == {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3",
                                     "shortcut_conv", "shortcut_bn"}
  assert p["stage4_block2"]["conv3"]["kernel"].shape == (1, 1, 512, 2048)
  p = abstract_models["mobilenetv2"][1]["params"]
  assert set(p["stage1_block0"]) == {"dw_conv", "dw_bn", "project_conv", "project_bn"}
  assert p["stage2_block0"]["dw_conv"]["kernel"].shape == (3, 3, 1, 96)  # depthwise, 16 * 6
  p = abstract_models["shufflenetv2"][1]["params"]
  assert "branch1_dw_conv" in p["stage1_block0"] and "branch1_dw_conv" not in p["stage1_block1"]
  assert p["stage2_block0"]["branch2_dw_conv"]["kernel"].shape == (3, 3, 1, 116)


def test_bfloat16_compute_keeps_float32_params():
  (logits, feats), variables = abstract_init(get_model("resnet20", 10, dtype="bfloat16"))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  assert all(f.dtype == jnp.bfloat16 for f in feats.values())
  assert logits.dtype == jnp.float32


# ------------------------------------------------------------------------------------------------
# Width multipliers.


@pytest.mark.parametrize(
    "value,expected", [(32 * 0.35, 16), (32 * 1.4, 48), (16 * 0.5, 8), (1280 * 1.4, 1792),
                       (24 * 0.75, 24), (3, 8), (100, 104), (60, 64)])
def test_make_divisible(value, expected):
  # torchvision's _make_divisible: nearest multiple of 8, at least 8, never > 10% below.
  assert make_divisible(value) == expected


def test_width_multiplier_channels():
  _, v = abstract_init(get_model("resnet20", 10, width=0.5))
  p = v["params"]
  assert p["stem_conv"]["kernel"].shape == (3, 3, 3, 8)
  assert p["stage2_block0"]["conv1"]["kernel"].shape == (3, 3, 8, 16)
  assert p["head"]["kernel"].shape == (32, 10)
  (_, feats), _ = abstract_init(get_model("small_cnn", 10, width=0.25))
  assert [feats[k].shape[-1] for k in ("stem", "stage1", "stage2")] == [8, 16, 32]
  (_, feats), _ = abstract_init(get_model("resnet18", 10, width=0.5))
  assert [feats[f"stage{i}"].shape[-1] for i in range(1, 5)] == [32, 64, 128, 256]
  # MobileNetV2: make_divisible(c * width, 8); the last conv scales only when width > 1.
  for width, stem, stage1, stage7, last in [(0.35, 16, 8, 112, 1280), (0.5, 16, 8, 160, 1280),
                                            (1.4, 48, 24, 448, 1792)]:
    (_, feats), _ = abstract_init(get_model("mobilenetv2_cifar", 10, width=width))
    got = [feats[k].shape[-1] for k in ("stem", "stage1", "stage7", "conv_last")]
    assert got == [stem, stage1, stage7, last], width
  for width, chans in [(0.5, [48, 96, 192, 1024]), (1.5, [176, 352, 704, 1024]),
                       (2.0, [244, 488, 976, 2048])]:
    (_, feats), _ = abstract_init(get_model("shufflenetv2_cifar", 10, width=width))
    assert [feats[k].shape[-1] for k in ("stage1", "stage2", "stage3", "conv_last")] == chans


# ------------------------------------------------------------------------------------------------
# Registry errors.


def test_unknown_model_name_lists_known_names():
  with pytest.raises(ConfigError) as e:
    get_model("resnet21", 10)
  msg = str(e.value)
  assert "resnet21" in msg and "`model`" in msg
  for name in MODELS:
    assert name in msg


@pytest.mark.parametrize(
    "name,kwargs,key",
    [
        ("resnet20", {"width": 0}, "width"),
        ("mobilenetv2", {"width": -1.0}, "width"),
        ("small_cnn", {"width": "wide"}, "width"),
        ("shufflenetv2", {"width": 0.75}, "width"),  # not one of 0.5 / 1.0 / 1.5 / 2.0
        ("resnet20", {"widht": 1.0}, "widht"),
        ("resnet20", {"depth": 56}, "depth"),  # fixed by the name
        ("resnet18_cifar", {"cifar_stem": False}, "cifar_stem"),
        ("small_cnn", {"zero_init_residual": True}, "zero_init_residual"),
        ("resnet20", {"dtype": "int8"}, "dtype"),
        ("resnet20", {"dtype": "float99"}, "dtype"),
    ],
)
def test_bad_kwargs_raise_config_error_naming_the_key(name, kwargs, key):
  with pytest.raises(ConfigError, match=key):
    get_model(name, 10, **kwargs)


def test_bad_num_classes_and_depth():
  with pytest.raises(ConfigError, match="num_classes"):
    get_model("resnet20", 0)
  with pytest.raises(ConfigError, match="depth"):
    MODELS["resnet20"].func(num_classes=10, depth=21)
  with pytest.raises(ConfigError, match="depth"):
    MODELS["resnet18"].func(num_classes=10, depth=19)


def test_get_model_passes_fields_through():
  m = get_model("resnet18_cifar", 7, width=0.5, bn_epsilon=1e-3, zero_init_residual=True,
                dtype="bfloat16")
  assert (m.num_classes, m.depth, m.cifar_stem, m.width, m.bn_epsilon, m.zero_init_residual,
          m.dtype) == (7, 18, True, 0.5, 1e-3, True, jnp.bfloat16)


# ------------------------------------------------------------------------------------------------
# Layers: channel shuffle, padding, initialisation.


def test_channel_shuffle_is_the_exact_permutation():
  np.testing.assert_array_equal(
      channel_shuffle(jnp.arange(8.0).reshape(1, 1, 1, 8), 2).ravel(),
      [0, 4, 1, 5, 2, 6, 3, 7])
  for groups in (2, 3, 4):
    x = np.arange(2 * 3 * 5 * 12, dtype=np.float32).reshape(2, 3, 5, 12)
    got = np.asarray(channel_shuffle(jnp.asarray(x), groups))
    k = np.arange(12)
    np.testing.assert_array_equal(got, x[..., (k % groups) * (12 // groups) + k // groups])
    # torchvision's NCHW view(b, g, c // g, h, w).transpose(1, 2), in numpy.
    nchw = x.transpose(0, 3, 1, 2)
    ref = nchw.reshape(2, groups, 12 // groups, 3, 5).swapaxes(1, 2).reshape(2, 12, 3, 5)
    np.testing.assert_array_equal(got, ref.transpose(0, 2, 3, 1))


def test_conv_padding_is_pytorch_symmetric():
  # A 3x3 stride-2 all-ones conv on an all-ones 4x4 input: PyTorch pads 1 on every side, so the
  # top-left output sees 2x2 real pixels (XLA "SAME" would pad bottom/right only and see 3x3).

  class Net(nn.Module):
    dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
      return conv(self, 1, 3, strides=2)(x)

  x = jnp.ones((1, 4, 4, 1))
  params = {"params": {"Conv_0": {"kernel": jnp.ones((3, 3, 1, 1))}}}
  y = Net().apply(params, x)
  np.testing.assert_array_equal(y[0, :, :, 0], [[4, 6], [6, 9]])


def test_he_fan_out_normal_init_and_zero_init_residual():
  block = BasicBlock(256, zero_init_residual=True)
  v = block.init(KEY, jnp.zeros((1, 4, 4, 64)))
  w = np.asarray(v["params"]["conv1"]["kernel"])
  assert w.shape == (3, 3, 64, 256)
  std = np.sqrt(2.0 / (3 * 3 * 256))  # fan_out = k_h * k_w * C_out (fan_in would be 9 * 64)
  assert abs(w.std() / std - 1) < 0.01 and abs(w.mean()) < 0.01 * std
  w = np.asarray(v["params"]["conv2"]["kernel"])
  assert abs(w.std() / std - 1) < 0.01
  assert np.abs(w).max() > 4 * std  # an untruncated normal (590k samples reach > 4 sigma)
  w = np.asarray(v["params"]["shortcut_conv"]["kernel"])
  assert w.shape == (1, 1, 64, 256) and abs(w.std() / np.sqrt(2.0 / 256) - 1) < 0.05
  assert np.all(v["params"]["bn2"]["scale"] == 0) and np.all(v["params"]["bn1"]["scale"] == 1)
  v = Bottleneck(16, zero_init_residual=True).init(KEY, jnp.zeros((1, 4, 4, 64)))
  assert np.all(v["params"]["bn3"]["scale"] == 0)
  assert np.all(v["params"]["bn2"]["scale"] == 1) and np.all(v["params"]["bn1"]["scale"] == 1)
  v = Bottleneck(16).init(KEY, jnp.zeros((1, 4, 4, 64)))
  assert np.all(v["params"]["bn3"]["scale"] == 1)
  # Depthwise: torchvision's fan_out for a (C, 1, 3, 3) weight is 9 * C.
  v = InvertedResidual(64, expansion=6).init(KEY, jnp.zeros((1, 4, 4, 64)))
  w = np.asarray(v["params"]["dw_conv"]["kernel"])
  assert w.shape == (3, 3, 1, 384)
  assert abs(w.std() / np.sqrt(2.0 / (9 * 384)) - 1) < 0.05


def test_inverted_residual_and_shuffle_unit_wiring():
  x = jax.random.normal(jax.random.key(3, impl="rbg"), (2, 4, 4, 16))
  # MobileNetV2: with the projection BN zeroed, a stride-1 block with equal channels is the
  # identity (residual connection), a block that changes channels or stride outputs 0.
  for features, strides, residual in [(16, 1, True), (24, 1, False), (16, 2, False)]:
    block = InvertedResidual(features, strides=strides, expansion=6)
    v = block.init(KEY, x)
    v["params"]["project_bn"] = jax.tree.map(jnp.zeros_like, v["params"]["project_bn"])
    y = block.apply(v, x)
    np.testing.assert_array_equal(y, x if residual else jnp.zeros_like(y))
  # ShuffleNetV2 stride-1 unit: the first half of the channels passes through untouched and the
  # shuffle interleaves it with the branch output: out[..., 2j] = x[..., j].
  unit = ShuffleUnit(16)
  v = unit.init(KEY, x)
  y = unit.apply(v, x)
  np.testing.assert_array_equal(y[..., 0::2], x[..., :8])
  assert np.all(y[..., 1::2] >= 0)  # the branch ends in a ReLU
  assert not np.allclose(y[..., 1::2], x[..., 8:])
  # Stride-2 unit: both halves are computed (no pass-through), each ends in a ReLU.
  unit = ShuffleUnit(32, strides=2)
  y = unit.apply(unit.init(KEY, x), x)
  assert y.shape == (2, 2, 2, 32) and np.all(y >= 0)


# ------------------------------------------------------------------------------------------------
# Real computation on tiny models.


@pytest.fixture(scope="module")
def images():
  return jax.random.normal(jax.random.key(1, impl="rbg"), (2, 16, 16, 3))


@pytest.fixture(scope="module")
def small():
  model = get_model("small_cnn", 10, width=0.25)
  variables = model.init(KEY, jnp.zeros((1, 16, 16, 3)))
  return model, variables


def test_batchnorm_train_updates_running_stats_eval_does_not(small, images):
  model, variables = small
  (_, _), state = model.apply(variables, images, train=True, mutable=["batch_stats"],
                              capture_intermediates=True)
  conv_out = state["intermediates"]["stem_conv"]["__call__"][0]
  new = state["batch_stats"]["stem_bn"]
  old = variables["batch_stats"]["stem_bn"]
  # ra = 0.9 * ra + 0.1 * batch statistic (biased variance).
  np.testing.assert_allclose(new["mean"], 0.9 * old["mean"] + 0.1 * conv_out.mean((0, 1, 2)),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["var"], 0.9 * old["var"] + 0.1 * conv_out.var((0, 1, 2)),
                             rtol=1e-4, atol=1e-6)
  for path in ("stage1_bn", "stage2_bn"):
    assert not np.allclose(state["batch_stats"][path]["mean"],
                           variables["batch_stats"][path]["mean"])
  # Eval: nothing is written, the output is deterministic and independent of the rest of the
  # batch (running statistics, not batch statistics).
  eval_fn = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["batch_stats"]))
  (logits, _), unchanged = eval_fn(variables, images)
  (logits2, _), _ = eval_fn(variables, images)
  (logits_one, _), _ = eval_fn(variables, images[:1])
  jax.tree.map(np.testing.assert_array_equal, unchanged["batch_stats"],
               variables["batch_stats"])
  np.testing.assert_array_equal(logits, logits2)
  np.testing.assert_allclose(logits_one[0], logits[0], rtol=1e-5, atol=1e-6)
  train_logits, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])[0]
  train_one, _ = model.apply(variables, images[:1], train=True, mutable=["batch_stats"])[0]
  assert not np.allclose(train_one[0], train_logits[0], atol=1e-3)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_equals_flax_batchnorm(dtype, train):
  """`common.BatchNorm` (closed-form gradient, channel sums as products on CPU) against flax's
  `nn.BatchNorm`: the same variables, outputs, running-average updates and gradients (input,
  scale, bias), train and eval, float32 and bfloat16 compute; also for a 2-D input (a Dense's
  output) and a channel whose values are all equal (variance 0)."""
  from jcompress.models.common import BatchNorm  # noqa: PLC0415
  x = jax.random.normal(jax.random.key(3, impl="rbg"), (8, 5, 5, 16)) * 3 + 1
  x = x.at[..., 0].set(2.0)
  for inp in (x, x[:, 0, 0, :]):
    kw = dict(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)
    ours, ref = BatchNorm(**kw), nn.BatchNorm(**kw)
    v_ref, v_ours = ref.init(KEY, inp), ours.init(KEY, inp)
    assert jax.tree.map(jnp.shape, v_ref) == jax.tree.map(jnp.shape, v_ours)
    c = inp.shape[-1]
    params = {"scale": jnp.linspace(-2.0, 2.0, c), "bias": jnp.arange(c, dtype=jnp.float32)}
    stats = {"mean": jnp.linspace(0.0, 1.0, c), "var": jnp.linspace(0.5, 2.0, c)}

    def loss(p, x, m, stats=stats, c=c):
      y, upd = m.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])
      weights = jnp.arange(c, dtype=jnp.float32)
      return jnp.sum(jnp.sin(y.astype(jnp.float32)) * weights), (y, upd["batch_stats"])

    out = {}
    for name, m in (("ref", ref), ("ours", ours)):
      fn = jax.jit(jax.value_and_grad(lambda p, x, m=m: loss(p, x, m), (0, 1), has_aux=True))
      (_, (y, upd)), grads = fn(params, inp)
      out[name] = (y, upd, grads)
    assert out["ours"][0].dtype == out["ref"][0].dtype == dtype
    np.testing.assert_allclose(np.asarray(out["ours"][0], np.float32),
                               np.asarray(out["ref"][0], np.float32), rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 out["ours"][1], out["ref"][1])
    for a, b in zip(jax.tree.leaves(out["ours"][2]), jax.tree.leaves(out["ref"][2])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(b))))


def test_batchnorm_channel_sums_are_products_on_cpu():
  """Train mode's four channel sums (mean, mean of squares; the gradient's two) are products
  with a ones vector on CPU (`common.channel_sum`), not XLA reductions."""
  from jcompress.jaxpr_utils import count_primitive  # noqa: PLC0415
  from jcompress.models.common import BatchNorm  # noqa: PLC0415
  bn = BatchNorm(use_running_average=False)
  x = jnp.ones((4, 3, 3, 8))
  v = bn.init(KEY, x)
  def grad(x):
    y, vjp = jax.vjp(lambda x: bn.apply(v, x, mutable=["batch_stats"])[0], x)
    return vjp(y)[0]

  jaxpr = jax.make_jaxpr(grad)(x).jaxpr
  if jax.default_backend() == "cpu":
    assert count_primitive(jaxpr, "dot_general") == 4
    assert count_primitive(jaxpr, "reduce_sum") == 0


def test_linear_batchnorm_equals_conv_then_batchnorm():
  """`linear_batch_norm_train(x, w, ...)` (statistics from the input's Gram matrix, BatchNorm
  folded into the kernel) against `batch_norm_train(x @ w, ...)`: the same output, batch mean
  and variance, and the same gradients for x, w, scale and bias, with cotangents on the
  statistics too (a zero-scale channel as zero_init gives), for inputs of moderate mean and for
  inputs whose mean is hundreds of times their spread (post-ReLU channels), where statistics from
  the uncentred Gram matrix cancel in float32. The two-step form cancels there too (its variance
  is E[z^2] - mean^2, as flax's), so that case is checked against it on the input less its
  offset: BatchNorm's output, variance and the gradients of x, scale and bias do not change when
  a constant c is added to x; the mean moves by c colsum(w) and w's gradient by c dmean."""
  from jcompress.models.common import batch_norm_train  # noqa: PLC0415
  from jcompress.models.common import linear_batch_norm_train  # noqa: PLC0415
  ks = jax.random.split(jax.random.key(7, impl="rbg"), 6)
  x0 = jax.random.normal(ks[0], (4, 6, 6, 8))
  w = jax.random.normal(ks[1], (8, 40)) / 3
  scale = jax.random.uniform(ks[2], (40,), minval=0.5, maxval=1.5).at[3].set(0.0)
  bias = jax.random.normal(ks[3], (40,))
  u, v = jax.random.normal(ks[4], (40,)), jax.random.normal(ks[5], (40,))
  weights = jnp.linspace(-1.0, 1.0, 40)

  def loss(fn):
    def f(x, w, scale, bias):
      y, mean, var = fn(x, w, scale, bias)
      return jnp.sum(jnp.sin(y) * weights) + jnp.sum(mean * u) + jnp.sum(var * v), (y, mean, var)
    return jax.jit(jax.value_and_grad(f, (0, 1, 2, 3), has_aux=True))

  ref = loss(lambda x, w, s, b: batch_norm_train(
      jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST), s, b, 1e-5))
  ours = loss(lambda x, w, s, b: linear_batch_norm_train(x, w, s, b, 1e-5))
  for spread, offset, ref_offset in ((2.0, 0.5, 0.5), (0.05, 20.0, 0.0)):
    x, c = x0 * spread + offset, offset - ref_offset
    (_, out_r), g_r = ref(x - c, w, scale, bias)   # x - c is exact in float32 here
    (_, out_o), g_o = ours(x, w, scale, bias)
    out_r = (out_r[0], out_r[1] + c * jnp.sum(w, axis=0), out_r[2])
    g_r = (g_r[0], g_r[1] + c * u[None, :], g_r[2], g_r[3])
    for name, a, b in zip(("y", "mean", "var"), out_o, out_r):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(b))),
                                 err_msg=f"{name}, offset {offset}")
    for name, a, b in zip(("dx", "dw", "dscale", "dbias"), g_o, g_r):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b))),
                                 err_msg=f"{name}, offset {offset}")


@pytest.mark.parametrize("name,kwargs,fused", [
    ("mobilenetv2_cifar", {"width": 0.25}, 17),   # 16 expand convs and conv_last
    ("resnet50", {"width": 0.125}, 16),           # every bottleneck's conv3
    ("shufflenetv2_cifar", {"width": 0.5}, 1),    # conv_last
    ("resnet20", {}, 0)])                         # no widening 1x1 conv
def test_widening_1x1_conv_batchnorms_are_fused_in_train_mode(monkeypatch, name, kwargs, fused):
  """Train mode on the CPU conv_impls computes the BatchNorm after every widening 1x1
  convolution with `linear_batch_norm_train` (logits and updated running statistics as the
  unfused model's); eval mode, conv_impl "xla" and a bfloat16 model never do."""
  from jcompress.models import common  # noqa: PLC0415
  calls = []
  real = common.linear_batch_norm_train
  monkeypatch.setattr(common, "linear_batch_norm_train",
                      lambda *a: calls.append(a[1].shape) or real(*a))
  x = jax.random.normal(KEY, (8, 32, 32, 3))
  logits, stats = {}, {}
  # the same variables for every conv_impl and dtype (float32 parameters), drawn on the host
  v = numpy_variables(get_model(name, 10, conv_impl="xla", **kwargs), x[:1])
  for impl, dtype, train in (("staged", jnp.float32, True), ("xla", jnp.float32, True),
                             ("staged", jnp.float32, False), ("staged", jnp.bfloat16, True)):
    calls.clear()
    model = get_model(name, 10, conv_impl=impl, dtype=dtype, **kwargs)
    apply = functools.partial(model.apply, train=train, mutable=["batch_stats"])
    if train and dtype == jnp.float32:
      (out, _), upd = jax.jit(apply)(v, x)
      logits[impl] = out
      stats[impl] = upd["batch_stats"]
    else:   # which BatchNorms are fused is decided while tracing: no compile needed
      jax.eval_shape(apply, v, x)
    expected = fused if (impl, dtype, train) == ("staged", jnp.float32, True) else 0
    assert len(calls) == expected, (impl, dtype, train, calls)
    assert all(cin < cout for cin, cout in calls)
  # every running mean and variance moved from its initial value as the unfused model's did
  # (batch means near zero carry float32 noise: hence the absolute tolerance)
  for (path, ours), ref in zip(jax.tree_util.tree_leaves_with_path(stats["staged"]),
                               jax.tree.leaves(stats["xla"])):
    np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  if name != "resnet50":   # its 1x1 last stage normalises over 8 values: rounding grows there
    # (its gradients are as exact as XLA's own: tests/test_depthwise.py, float64 reference)
    np.testing.assert_allclose(logits["staged"], logits["xla"], rtol=1e-4, atol=1e-4)


def test_pointwise_operands_only_for_a_plain_1x1_convolution():
  """`pointwise_operands` gives (input, kernel) only for the recorded call whose output is the
  very array given, and only for a 1x1 stride-1 unpadded ungrouped float32 convolution."""
  from jax import lax  # noqa: PLC0415

  from jcompress.models.common import pointwise_operands  # noqa: PLC0415
  x = jnp.ones((2, 4, 4, 8))
  dn = ("NHWC", "HWIO", "NHWC")

  def record(w, *args, x=x, **kwargs):
    out = lax.conv_general_dilated(x, w, *args, **kwargs)
    return [(x, w, out, args, kwargs)], out

  w1 = jnp.ones((1, 1, 8, 16))
  calls, y = record(w1, (1, 1), ((0, 0), (0, 0)), dimension_numbers=dn)
  lhs, rhs = pointwise_operands(calls, y)
  assert lhs is x and rhs.shape == (8, 16)
  assert pointwise_operands(calls, y + 0) is None                       # not the call's output
  assert pointwise_operands(calls + calls, y) is None                   # two calls
  for w, args, kw in ((w1, ((2, 2), ((0, 0), (0, 0))), {}),             # strided
                      (jnp.ones((3, 3, 8, 16)), ((1, 1), ((1, 1), (1, 1))), {}),   # 3x3
                      (w1, ((1, 1), ((1, 1), (1, 1))), {}),             # padded
                      (jnp.ones((1, 1, 4, 16)), ((1, 1), ((0, 0), (0, 0))),
                       {"feature_group_count": 2})):                     # grouped
    calls, y = record(w, *args, dimension_numbers=dn, **kw)
    assert pointwise_operands(calls, y) is None, (w.shape, args, kw)
  calls, y = record(w1.astype(jnp.bfloat16), (1, 1), ((0, 0), (0, 0)), dimension_numbers=dn,
                    x=x.astype(jnp.bfloat16))
  assert pointwise_operands(calls, y) is None                           # bfloat16


def test_bn_epsilon_field_reaches_batchnorm(images):
  # With running var 0.01, eps 1e-3 vs 1e-5 changes the output by ~5%: the field must be used.
  for eps in (1e-3, 1e-5):
    model = get_model("small_cnn", 10, width=0.25, bn_epsilon=eps)
    variables = model.init(KEY, images)
    stats = jax.tree.map(lambda a: jnp.full_like(a, 0.01), variables["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": stats}
    _, state = model.apply(variables, images, capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]
    x = inter["stem_conv"]["__call__"][0]
    y = inter["stem_bn"]["__call__"][0]
    bn = variables["params"]["stem_bn"]
    for ref_eps in (1e-3, 1e-5):
      ref = (x - 0.01) / jnp.sqrt(0.01 + ref_eps) * bn["scale"] + bn["bias"]
      assert np.allclose(y, ref, rtol=1e-5, atol=1e-5) == (ref_eps == eps)


def test_small_cnn_gradients_match_finite_differences(small, images):
  model, variables = small
  labels = jnp.array([3, 7])

  def loss_fn(params):
    (logits, feats), _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                     images, train=True, mutable=["batch_stats"])
    one_hot = jax.nn.one_hot(labels, 10)
    return -jnp.mean(jnp.sum(one_hot * jax.nn.log_softmax(logits), -1))

  loss_and_grad = jax.jit(jax.value_and_grad(loss_fn))
  loss, grads = loss_and_grad(variables["params"])
  assert np.isfinite(loss)
  for path, g in flax.traverse_util.flatten_dict(grads).items():
    assert np.all(np.isfinite(g)) and np.any(g != 0), path
  # Central differences along unit directions: the normalised gradient itself (the slope there
  # is |g|) and a random direction (slope <g, r>). float32 limits how small eps can be.
  loss_j = jax.jit(loss_fn)
  norm = lambda t: jnp.sqrt(sum(jnp.vdot(a, a) for a in jax.tree.leaves(t)))
  dot = lambda t, u: sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(t), jax.tree.leaves(u)))

  def slope(direction, eps):
    plus = loss_j(jax.tree.map(lambda p, d: p + eps * d, variables["params"], direction))
    minus = loss_j(jax.tree.map(lambda p, d: p - eps * d, variables["params"], direction))
    return (plus - minus) / (2 * eps)

  g_norm = norm(grads)
  g_hat = jax.tree.map(lambda g: g / g_norm, grads)
  np.testing.assert_allclose(slope(g_hat, 1e-3), g_norm, rtol=1e-3)
  leaves, treedef = jax.tree.flatten(variables["params"])
  keys = jax.random.split(jax.random.key(2, impl="rbg"), len(leaves))
  r = jax.tree.unflatten(treedef, [jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])
  r_norm = norm(r)
  r_hat = jax.tree.map(lambda a: a / r_norm, r)
  np.testing.assert_allclose(slope(r_hat, 1e-2), dot(grads, r_hat), atol=1e-3 * g_norm)


@pytest.fixture(scope="module")
def resnet20_tiny():
  model = get_model("resnet20", 10, width=0.25)
  apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
  return model, apply


def test_resnet20_forward_backward_finite_gradients(resnet20_tiny, images):
  model, apply = resnet20_tiny
  variables = model.init(KEY, images)

  def loss_fn(params):
    (logits, feats), new_state = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, images, train=True,
        mutable=["batch_stats"])
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[:, 0]), (feats, new_state)

  (loss, (feats, _)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      variables["params"])
  assert np.isfinite(loss)
  assert jax.tree.structure(grads) == jax.tree.structure(variables["params"])
  for path, g in flax.traverse_util.flatten_dict(grads).items():
    assert np.all(np.isfinite(g)) and np.any(g != 0), path
  assert shapes(feats) == {"stem": (2, 16, 16, 4), "stage1": (2, 16, 16, 4),
                           "stage2": (2, 8, 8, 8), "stage3": (2, 4, 4, 16), "pre_logits": (2, 16)}
  # pre_logits is the spatial mean of the last stage; features after ReLU are >= 0.
  np.testing.assert_allclose(feats["pre_logits"], feats["stage3"].mean((1, 2)), rtol=1e-5,
                             atol=1e-6)
  assert all(np.all(feats[k] >= 0) for k in ("stem", "stage1", "stage2", "stage3"))


def test_zero_init_residual_makes_identity_blocks(resnet20_tiny, images):
  # With the last BN gamma of each block at 0, a block without projection computes
  # relu(0 + x) = x on a non-negative input: stage 1 (no projections) returns its input.
  model, apply = resnet20_tiny
  zero_model = get_model("resnet20", 10, width=0.25, zero_init_residual=True)
  variables = zero_model.init(KEY, images)
  (_, feats), _ = apply(variables, images, train=False, mutable=("batch_stats",))
  np.testing.assert_array_equal(feats["stage1"], feats["stem"])
  assert not np.allclose(feats["stem"], 0)
  # The same module (zero_init_residual only changes init) with default init is not identity.
  (_, feats), _ = apply(model.init(KEY, images), images, train=False, mutable=("batch_stats",))
  assert not np.allclose(feats["stage1"], feats["stem"], atol=1e-3)


def test_module_fields_are_documented_defaults():
  # Every model takes the common fields with the documented defaults.
  for name, ctor in MODELS.items():
    fields = {f.name: f.default for f in dataclasses.fields(ctor.func)}
    assert fields["width"] == 1.0 and fields["dtype"] == jnp.float32, name
    if not _cnn(name):
      continue   # no BatchNorm
    assert fields["bn_momentum"] == 0.9, name
    assert fields["bn_epsilon"] == 1e-5 and fields["dtype"] == jnp.float32, name


# ----------------------------------------------------------------------------- root fields


def _conv_out_shapes(model, x):
  """{conv path: output shape} of every nn.Conv call in `model.init`, and the variables' shapes
  (`jax.eval_shape`: traced, nothing computed)."""
  shapes = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
      shapes["/".join(context.module.scope.path)] = out.shape
    return out

  with nn.intercept_methods(record):
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  return shapes, variables


def test_channels_override_shrinks_conv_bn_and_consumers():
  x = jnp.zeros((1, 8, 8, 3))
  model = get_model("resnet20", 10, width=0.5,
                           channels={"stage1_block0/conv1": 3, "stage3_block2/conv1": 5})
  shapes, variables = _conv_out_shapes(model, x)
  p = variables["params"]
  assert shapes["stage1_block0/conv1"][-1] == 3
  assert p["stage1_block0"]["conv1"]["kernel"].shape == (3, 3, 8, 3)
  assert p["stage1_block0"]["bn1"]["scale"].shape == (3,)
  assert variables["batch_stats"]["stage1_block0"]["bn1"]["mean"].shape == (3,)
  assert p["stage1_block0"]["conv2"]["kernel"].shape == (3, 3, 3, 8)   # its consumer
  assert p["stage3_block2"]["conv2"]["kernel"].shape == (3, 3, 5, 32)
  # Identity shortcuts stay identities: no projection appears where the widths still match.
  assert "shortcut_conv" not in p["stage1_block1"]


def test_channels_override_keeps_listed_projection_shortcut():
  # A pruned model lists every conv; a listed shortcut_conv is kept even if widths coincide.
  x = jnp.zeros((1, 8, 8, 3))
  base = get_model("resnet20", 10, width=0.5)
  params = jax.eval_shape(base.init, jax.random.PRNGKey(0), x)["params"]
  listed = {}
  for path in leaf_paths(params):
    if path.endswith("conv/kernel") or path.endswith("conv1/kernel") or path.endswith(
        "conv2/kernel"):
      listed[path[: -len("/kernel")]] = 4
  model = get_model("resnet20", 10, width=0.5, channels=listed)
  p = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
  assert "shortcut_conv" in p["stage2_block0"]       # stride 2: a projection in both
  assert p["stage2_block0"]["shortcut_conv"]["kernel"].shape == (1, 1, 4, 4)
  assert "shortcut_conv" not in p["stage2_block1"]


def test_same_padding_puts_the_extra_zero_row_after():
  # Stride-2 3x3 on an even input: torch pads (1, 1), TF/Keras "SAME" pads (0, 1).
  x = jnp.zeros((1, 8, 8, 3))
  for padding, want in (("torch", ((1, 1), (1, 1))), ("same", ((0, 1), (0, 1)))):
    # conv_impl "xla": the convolutions sit in the top-level jaxpr (not in a custom_vjp).
    model = get_model("small_cnn", 10, width=0.25, padding=padding, conv_impl="xla")
    variables = model.init(jax.random.PRNGKey(0), x)
    jaxpr = jax.make_jaxpr(model.apply)(variables, x)
    pads = [tuple(map(tuple, e.params["padding"])) for e in jaxpr.eqns
            if e.primitive.name == "conv_general_dilated" and e.params["window_strides"] == (2, 2)]
    assert pads and all(p == want for p in pads), (padding, pads)


def test_stride_in_1x1_moves_the_bottleneck_stride():
  x = jnp.zeros((1, 32, 32, 3))
  v15, _ = _conv_out_shapes(get_model("resnet50", 10, width=0.125), x)
  v1, _ = _conv_out_shapes(get_model("resnet50", 10, width=0.125, stride_in_1x1=True), x)
  assert v15["stage2_block0/conv1"][1:3] == (8, 8) and v15["stage2_block0/conv2"][1:3] == (4, 4)
  assert v1["stage2_block0/conv1"][1:3] == (4, 4) and v1["stage2_block0/conv2"][1:3] == (4, 4)
