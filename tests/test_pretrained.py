"""Tests for jcompress.pretrained: Keras Applications and torchvision (safetensors) weights."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import pytest

from jcompress import models
from jcompress import pretrained
from jcompress import teacher as teacher_lib
from jcompress.errors import ConfigError

safetensors_numpy = pytest.importorskip(
    "safetensors.numpy", reason="the `safetensors` package is needed to read torchvision weights"
)

# Numbers of entries of torchvision's state_dicts (parameters + BN buffers incl.
# num_batches_tracked): len(torchvision.models.<arch>().state_dict()).
TORCHVISION_STATE_DICT_SIZES = {"resnet18": 122, "resnet50": 320, "mobilenetv2": 314}


def _randomize_keras(keras_model, name, size, seed=0):
  """Random gammas/betas and (conv, dense) biases, and BN moving statistics that keep the
  activations of a random network in range (one training-mode pass with momentum 0, then
  perturbed), so that the logits depend on the input and the comparison is not trivial."""
  rng = np.random.default_rng(seed)
  bns = []
  for layer in keras_model.layers:
    for var in layer.weights:
      short = var.name.split("/")[-1]
      if short in ("beta", "bias"):
        var.assign(rng.normal(0.0, 0.3, tuple(var.shape)).astype(np.float32))
      elif short == "gamma":
        var.assign(rng.uniform(0.5, 1.5, tuple(var.shape)).astype(np.float32))
    if type(layer).__name__ == "BatchNormalization":
      bns.append((layer, layer.momentum))
      layer.momentum = 0.0
  images = rng.uniform(0, 255, (8, size, size, 3)).astype(np.float32)
  keras_model(pretrained.preprocess(name, images), training=True)
  for layer, momentum in bns:
    layer.momentum = momentum
    var = layer.moving_variance.numpy() * rng.uniform(0.7, 1.3, layer.moving_variance.shape)
    mean = layer.moving_mean.numpy() + 0.2 * np.sqrt(var) * rng.normal(
        size=layer.moving_mean.shape)
    layer.moving_variance.assign(var.astype(np.float32))
    layer.moving_mean.assign(mean.astype(np.float32))
  return keras_model


@pytest.fixture(scope="module")
def keras():
  return pytest.importorskip("keras", reason="Keras comes with tensorflow; needed for Keras tests")


@pytest.fixture(scope="module")
def keras_resnet50(keras):
  km = keras.applications.ResNet50(
      weights=None, input_shape=(64, 64, 3), classes=7, classifier_activation=None
  )
  return _randomize_keras(km, "ResNet50", 64, seed=1)


@pytest.fixture(scope="module")
def keras_mobilenetv2(keras):
  km = keras.applications.MobileNetV2(
      weights=None, input_shape=(96, 96, 3), classes=7, classifier_activation=None
  )
  return _randomize_keras(km, "MobileNetV2", 96, seed=2)


def _rel_err(out, ref):
  return float(np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)))


def _logits(model, params, batch_stats, x):
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
  return np.asarray(apply({"params": params, "batch_stats": batch_stats}, jnp.asarray(x)))


# ------------------------------------------------------------------------------------------------
# Keras Applications.


@pytest.mark.slow   # Keras builds and runs each network: 10-15 s a case
@pytest.mark.parametrize(
    "name, size, other_fields",
    [
        # Keras's ResNet50 is v1: with the stride on the 3x3 instead, the logits must differ.
        ("ResNet50", 64, {"stride_in_1x1": False}),  # 10 s
        # Keras's MobileNetV2 pads as TF "SAME": symmetric padding must give other logits.
        ("MobileNetV2", 96, {"padding": "torch"}),
    ],
)
def test_keras_logits_match(request, name, size, other_fields):
  km = request.getfixturevalue("keras_resnet50" if name == "ResNet50" else "keras_mobilenetv2")
  model, params, batch_stats = pretrained.from_keras(name, km)
  assert model.num_classes == 7
  images = np.random.default_rng(3).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
  x = pretrained.preprocess(name, images)
  ref = km(x, training=False).numpy()
  out = _logits(model, params, batch_stats, x)
  assert out.shape == ref.shape == (2, 7)
  assert _rel_err(out, ref) < 1e-4, (out, ref)
  assert _rel_err(ref[:1], ref[1:]) > 1e-2  # the logits depend on the image
  # The architecture fields are what makes it match: changing one breaks it.
  fields = {f: getattr(model, f) for f in ("bn_epsilon", "bn_momentum", "padding")}
  if name == "ResNet50":
    fields["stride_in_1x1"] = model.stride_in_1x1
  wrong = models.get_model(pretrained.KERAS_APPLICATIONS[name].model, 7,
                           **{**fields, **other_fields})
  assert _rel_err(_logits(wrong, params, batch_stats, x), ref) > 1e-2


def test_keras_bn_fields_and_bias_folding(keras_resnet50, keras_mobilenetv2):
  model, params, batch_stats = pretrained.from_keras("resnet50", keras_resnet50)
  assert model.bn_epsilon == pytest.approx(1.001e-5) and model.bn_momentum == pytest.approx(0.99)
  assert model.stride_in_1x1 and model.padding == "torch"
  # Conv bias c folded into the following BN: mean' = mean - c.
  layer = keras_resnet50.get_layer
  for jc, conv, bn in [
      (("stem_bn",), "conv1_conv", "conv1_bn"),
      (("stage3_block0", "shortcut_bn"), "conv4_block1_0_conv", "conv4_block1_0_bn"),
  ]:
    bias = layer(conv).get_weights()[1]
    moving_mean = layer(bn).get_weights()[2]
    stats = batch_stats
    for p in jc:
      stats = stats[p]
    np.testing.assert_allclose(stats["mean"], moving_mean - bias, rtol=1e-6, atol=1e-6)
    assert np.max(np.abs(bias)) > 0.1  # the test data really has biases
  np.testing.assert_array_equal(params["stage3_block0"]["conv1"]["kernel"],
                                layer("conv4_block1_1_conv").get_weights()[0])
  model, params, _ = pretrained.from_keras("MobileNetV2", keras_mobilenetv2)
  assert model.bn_epsilon == pytest.approx(1e-3) and model.bn_momentum == pytest.approx(0.999)
  assert model.padding == "same"
  # Depthwise (kh, kw, C, 1) -> (kh, kw, 1, C).
  dw = keras_mobilenetv2.get_layer("block_3_depthwise").get_weights()[0]
  assert dw.shape == (3, 3, 144, 1)
  np.testing.assert_array_equal(params["stage3_block0"]["dw_conv"]["kernel"],
                                np.transpose(dw, (0, 1, 3, 2)))


def test_keras_preprocess_matches_keras(keras):
  images = np.random.default_rng(4).uniform(0, 255, (2, 8, 8, 3)).astype(np.float32)
  np.testing.assert_allclose(
      pretrained.preprocess("ResNet50", images),
      keras.applications.resnet50.preprocess_input(images.copy()), rtol=1e-6, atol=1e-4)
  np.testing.assert_allclose(
      pretrained.preprocess("keras:MobileNetV2", images),
      keras.applications.mobilenet_v2.preprocess_input(images.copy()), rtol=1e-6, atol=1e-6)
  torch_mode = pretrained.preprocess("torchvision", images.astype(np.uint8))
  expect = (np.floor(images) / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array(
      [0.229, 0.224, 0.225])
  np.testing.assert_allclose(torch_mode, expect, rtol=1e-5, atol=1e-5)
  assert isinstance(pretrained.preprocess("tf", jnp.asarray(images)), jax.Array)
  with pytest.raises(ConfigError, match="channels"):
    pretrained.preprocess("ResNet50", images[..., :2])


def test_keras_unknown_application():
  with pytest.raises(ConfigError, match="unknown Keras application 'VGG16'.*ResNet50, MobileNetV2"):
    pretrained.from_keras("VGG16", None)
  with pytest.raises(ConfigError, match="keras:VGG16|VGG16"):
    pretrained.load_pretrained("keras:VGG16", models.get_model("resnet50", 10), 10,
                               jax.random.PRNGKey(0))


def test_keras_wrong_application_names_first_tensor(keras_mobilenetv2):
  with pytest.raises(ConfigError, match=r"no tensor 'conv1_conv/kernel' \(expected shape "
                                        r"\(7, 7, 3, 64\)"):
    pretrained.from_keras("ResNet50", keras_mobilenetv2)


def test_load_pretrained_keras(keras_mobilenetv2):
  fields = pretrained.model_fields("keras:MobileNetV2")
  assert fields == {"padding": "same", "bn_epsilon": 1e-3, "bn_momentum": 0.999}
  model = models.get_model("mobilenetv2", 7, **fields)
  params, batch_stats, msg = pretrained.load_pretrained(
      "keras:MobileNetV2", model, 7, jax.random.PRNGKey(0), keras_weights=keras_mobilenetv2)
  assert "re-initialised" not in msg and "keras:MobileNetV2" in msg
  _, ref_params, ref_stats = pretrained.from_keras("MobileNetV2", keras_mobilenetv2)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, ref_params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, batch_stats, ref_stats)
  # A model without the source's fields is refused, naming the field.
  with pytest.raises(ConfigError, match="`padding` = 'same'"):
    pretrained.load_pretrained("keras:MobileNetV2", models.get_model("mobilenetv2", 7), 7,
                               jax.random.PRNGKey(0), keras_weights=keras_mobilenetv2)
  with pytest.raises(ConfigError, match="resnet50.*mobilenetv2|mobilenetv2.*resnet50"):
    pretrained.load_pretrained("keras:ResNet50", model, 7, jax.random.PRNGKey(0),
                               keras_weights=keras_mobilenetv2)


def test_keras_headless_model(keras):
  km = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(32, 32, 3))
  with pytest.raises(ConfigError, match="no classifier 'predictions/kernel'.*include_top=True"):
    pretrained.from_keras("MobileNetV2", km)
  # init_from re-initialises the head and loads everything else.
  model = models.get_model("mobilenetv2", 4, **pretrained.model_fields("keras:MobileNetV2"))
  rng = jax.random.PRNGKey(3)
  params, _, msg = pretrained.load_pretrained("keras:MobileNetV2", model, 4, rng,
                                              keras_weights=km)
  assert "head re-initialised: the source has no classifier" in msg
  np.testing.assert_array_equal(params["conv_last"]["kernel"],
                                km.get_layer("Conv_1").get_weights()[0])
  assert params["head"]["kernel"].shape == (1280, 4)


# ------------------------------------------------------------------------------------------------
# torchvision / safetensors without torch: the inverse mapping, round trips and errors.


def _random_variables(model, seed):
  """Random float32 numpy variables of `model`'s shapes (no init: only shapes are traced)."""
  shapes = pretrained.target_shapes(model)
  rng = np.random.default_rng(seed)

  def draw(path, s):
    if path[-1].key in ("var", "scale"):
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    return rng.normal(0, 0.5, s.shape).astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(draw, shapes)
  return variables["params"], variables["batch_stats"]


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
  model = models.get_model("resnet18", 10)
  params, batch_stats = _random_variables(model, 0)
  state = pretrained.to_torch_state_dict("resnet18", params, batch_stats)
  path = str(tmp_path_factory.mktemp("weights") / "resnet18.safetensors")
  safetensors_numpy.save_file(state, path)
  return path, state, params, batch_stats


@pytest.mark.parametrize("arch", ["resnet50", "mobilenetv2"])
def test_torch_names_and_shapes(arch):
  model = models.get_model(arch, 1000)
  shapes = pretrained.target_shapes(model)
  state = pretrained.to_torch_state_dict(
      arch, *(jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes[c])
              for c in ("params", "batch_stats")))
  assert len(state) == TORCHVISION_STATE_DICT_SIZES[arch]
  expected = {
      "resnet50": {
          "conv1.weight": (64, 3, 7, 7),
          "layer1.0.conv1.weight": (64, 64, 1, 1),
          "layer2.0.conv2.weight": (128, 128, 3, 3),
          "layer2.0.downsample.0.weight": (512, 256, 1, 1),
          "layer4.2.bn3.running_var": (2048,),
          "fc.weight": (1000, 2048),
          "fc.bias": (1000,),
      },
      "mobilenetv2": {
          "features.0.0.weight": (32, 3, 3, 3),
          "features.1.conv.0.0.weight": (32, 1, 3, 3),
          "features.1.conv.1.weight": (16, 32, 1, 1),
          "features.1.conv.2.running_mean": (16,),
          "features.2.conv.0.0.weight": (96, 16, 1, 1),
          "features.2.conv.1.0.weight": (96, 1, 3, 3),
          "features.2.conv.3.weight": (24,),
          "features.17.conv.2.weight": (320, 960, 1, 1),
          "features.18.0.weight": (1280, 320, 1, 1),
          "classifier.1.weight": (1000, 1280),
      },
  }[arch]
  for name, shape in expected.items():
    assert state[name].shape == shape, name


def test_safetensors_round_trip_exact(resnet18_file):
  path, state, params, batch_stats = resnet18_file
  assert len(state) == TORCHVISION_STATE_DICT_SIZES["resnet18"]
  assert state["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
  model, got_params, got_stats = pretrained.from_safetensors(path, "resnet18")
  assert model.num_classes == 10
  jax.tree_util.tree_map(np.testing.assert_array_equal, got_params, params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got_stats, batch_stats)
  # OIHW -> HWIO by hand for one tensor, Linear (out, in) -> (in, out).
  np.testing.assert_array_equal(got_params["stage2_block1"]["conv2"]["kernel"],
                                np.transpose(state["layer2.1.conv2.weight"], (2, 3, 1, 0)))
  np.testing.assert_array_equal(got_params["head"]["kernel"], state["fc.weight"].T)


def test_safetensors_mobilenetv2_round_trip(tmp_path):
  model = models.get_model("mobilenetv2", 5, width=0.5)
  params, batch_stats = _random_variables(model, 1)
  state = pretrained.to_torch_state_dict("mobilenetv2", params, batch_stats)
  np.testing.assert_array_equal(state["features.2.conv.1.0.weight"][:, 0],
                                np.transpose(params["stage2_block0"]["dw_conv"]["kernel"][:, :, 0],
                                             (2, 0, 1)))
  path = str(tmp_path / "m.safetensors")
  safetensors_numpy.save_file(state, path)
  got_model, got_params, got_stats = pretrained.from_safetensors(path, "mobilenetv2", width=0.5)
  assert got_model.num_classes == 5
  jax.tree_util.tree_map(np.testing.assert_array_equal, got_params, params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got_stats, batch_stats)


def _save(tmp_path, state, name="bad.safetensors"):
  path = str(tmp_path / name)
  safetensors_numpy.save_file(state, path)
  return path


def test_safetensors_errors(tmp_path, resnet18_file):
  _, state, _, _ = resnet18_file
  bad = dict(state)
  bad["layer3.0.conv1.weight"] = np.zeros((256, 128, 1, 1), np.float32)
  with pytest.raises(ConfigError, match=r"'layer3.0.conv1.weight' has shape \(256, 128, 1, 1\), "
                                        r"expected \(256, 128, 3, 3\)"):
    pretrained.from_safetensors(_save(tmp_path, bad), "resnet18")
  missing = {k: v for k, v in state.items() if k != "layer4.1.bn2.running_var"}
  with pytest.raises(ConfigError, match=r"no tensor 'layer4.1.bn2.running_var' \(expected shape "
                                        r"\(512,\)"):
    pretrained.from_safetensors(_save(tmp_path, missing), "resnet18")
  extra = dict(state, **{"layer1.0.conv3.weight": np.zeros((64, 64, 1, 1), np.float32)})
  with pytest.raises(ConfigError, match="'layer1.0.conv3.weight'.*no place in model 'resnet18'"):
    pretrained.from_safetensors(_save(tmp_path, extra), "resnet18")
  # A resnet18 file is not a resnet50.
  with pytest.raises(ConfigError, match=r"'layer1.0.conv1.weight' has shape \(64, 64, 3, 3\), "
                                        r"expected \(64, 64, 1, 1\)"):
    pretrained.from_safetensors(_save(tmp_path, state), "resnet50")
  int8 = dict(state, **{"layer1.0.conv1.weight": state["layer1.0.conv1.weight"].astype(np.int8)})
  with pytest.raises(ConfigError, match="'layer1.0.conv1.weight' has dtype int8"):
    pretrained.from_safetensors(_save(tmp_path, int8), "resnet18")
  with pytest.raises(ConfigError, match="no torchvision mapping for model 'vgg16'.*resnet18"):
    pretrained.from_safetensors(_save(tmp_path, state), "vgg16")
  with pytest.raises(ConfigError, match="does not exist"):
    pretrained.from_safetensors(str(tmp_path / "nope.safetensors"), "resnet18")
  (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(ConfigError, match="not a readable safetensors file"):
    pretrained.from_safetensors(str(tmp_path / "junk.safetensors"), "resnet18")


def test_safetensors_half_precision_upcast(tmp_path, resnet18_file):
  _, state, _, _ = resnet18_file
  half = {k: (v.astype(np.float16) if k.startswith("layer1.") and v.dtype == np.float32 else v)
          for k, v in state.items()}
  half["fc.weight"] = state["fc.weight"].astype(ml_dtypes.bfloat16)
  _, params, batch_stats = pretrained.from_safetensors(_save(tmp_path, half), "resnet18")
  kernel = params["stage1_block0"]["conv1"]["kernel"]
  assert kernel.dtype == jnp.float32
  np.testing.assert_array_equal(
      kernel, np.transpose(state["layer1.0.conv1.weight"].astype(np.float16), (2, 3, 1, 0)))
  np.testing.assert_array_equal(batch_stats["stage1_block1"]["bn2"]["var"],
                                state["layer1.1.bn2.running_var"].astype(np.float16))
  np.testing.assert_array_equal(
      params["head"]["kernel"], state["fc.weight"].astype(ml_dtypes.bfloat16).astype(np.float32).T)


def test_load_pretrained_safetensors_head(resnet18_file):
  path, _, params, batch_stats = resnet18_file
  rng = jax.random.PRNGKey(7)
  # Same class count: everything loaded, head included.
  got, got_stats, msg = pretrained.load_pretrained(path, models.get_model("resnet18", 10), 10, rng)
  assert "re-initialised" not in msg
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, params)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got_stats, batch_stats)
  # 10 -> 3 classes: the head is the target model's own init, the rest is loaded.
  target = models.get_model("resnet18", 3)
  got, got_stats, msg = pretrained.load_pretrained(path, target, 3, rng)
  assert "head re-initialised" in msg and "10 classes" in msg and "3" in msg
  fresh = jax.jit(lambda r: target.init(r, jnp.zeros((1, 32, 32, 3)))["params"]["head"])(rng)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got["head"], fresh)
  assert got["head"]["kernel"].shape == (512, 3)
  rest = {k: v for k, v in got.items() if k != "head"}
  jax.tree_util.tree_map(np.testing.assert_array_equal, rest,
                         {k: v for k, v in params.items() if k != "head"})
  # Same structure as model.init's.
  init_struct = jax.tree_util.tree_structure(pretrained.target_shapes(target))
  assert jax.tree_util.tree_structure({"params": got, "batch_stats": got_stats}) == init_struct
  # Arch given explicitly, and inferred when it does not fit.
  with pytest.raises(ConfigError, match="arch 'resnet50' does not fit the model 'resnet18'"):
    pretrained.load_pretrained(path, target, 3, rng, arch="resnet50")
  with pytest.raises(ConfigError, match="`stride_in_1x1` = False"):
    pretrained.load_pretrained(path, models.get_model("resnet18", 3, stride_in_1x1=True), 3, rng)
  with pytest.raises(ConfigError, match="init_from 'weights.npz'.*safetensors"):
    pretrained.load_pretrained("weights.npz", target, 3, rng)


# ------------------------------------------------------------------------------------------------
# With torch: equal logits against torchvision itself (skipped where torch is not installed).


@pytest.mark.parametrize("arch, ctor", [("resnet18", "resnet18"), ("resnet50", "resnet50"),
                                        ("mobilenetv2", "mobilenet_v2")])
def test_torchvision_logits_match(tmp_path, arch, ctor):
  torch = pytest.importorskip(
      "torch", reason="torch is not installed: the torchvision equal-logits check needs it (the "
                      "torch-free round-trip tests cover the mapping)")
  torchvision = pytest.importorskip("torchvision", reason="torchvision is not installed")
  safetensors_torch = pytest.importorskip("safetensors.torch")
  torch.manual_seed(0)
  tm = getattr(torchvision.models, ctor)(num_classes=10).eval()
  with torch.no_grad():
    for m in tm.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.normal_(0.0, 0.5)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.5)
  path = str(tmp_path / f"{arch}.safetensors")
  safetensors_torch.save_file(tm.state_dict(), path)
  model, params, batch_stats = pretrained.from_safetensors(path, arch)
  images = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
  x = pretrained.preprocess("torchvision", images)
  with torch.no_grad():
    ref = tm(torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))).numpy()
  assert _rel_err(_logits(model, params, batch_stats, x), ref) < 1e-4


# ------------------------------------------------------------------------------------------------
# Published weights in runs: the input preprocessing they expect, init_from and teacher.


@pytest.mark.parametrize("source", ["keras:ResNet50", "keras:MobileNetV2", "w.safetensors"])
@pytest.mark.parametrize("data", ["digits", "cifar10", "imagenet2012"])
def test_input_norm_turns_dataset_normalisation_into_preprocess(source, data):
  from jcompress import data as data_lib  # noqa: PLC0415
  from jcompress.models import common  # noqa: PLC0415
  stats = data_lib.dataset_defaults(data)
  x = np.random.default_rng(0).uniform(0, 255, (2, 5, 5, 3))
  if stats.channels == 1:   # a grey dataset's 32x32x3 variant: the grey value on 3 channels
    x = np.repeat(x[..., :1], 3, axis=-1)
  mean, std = np.resize(stats.mean, 3), np.resize(stats.std, 3)
  z = ((x / 255.0 - mean) / std).astype(np.float32)   # what the data pipeline yields
  got = common.normalize_input(jnp.asarray(z), pretrained.input_norm(source, stats.mean,
                                                                     stats.std))
  want = pretrained.preprocess(source, x.astype(np.float32))
  scale = 255.0 if pretrained.preprocessing_of(source) == "caffe" else 1.0
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * scale)
  assert pretrained.input_norm(source, stats.mean, stats.std) != pretrained.input_norm(
      "keras:MobileNetV2" if source != "keras:MobileNetV2" else "w.safetensors", stats.mean,
      stats.std)


def _run_config(tmp_path, **keys):
  from jcompress import config as config_lib  # noqa: PLC0415
  c = config_lib.base_config()
  c.data, c.data_dir, c.image_size = "digits", str(tmp_path / "tfds"), 32
  c.batch_size, c.eval_batch_size = 32, 180
  c.log_every = c.checkpoint_every = 1
  c.eval_every = 0
  for k, v in keys.items():
    c[k] = v
  return c


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("digits")


@pytest.mark.slow
def test_init_from_safetensors_runs_with_the_sources_preprocessing(resnet18_file, digits_dir):
  from jcompress import data as data_lib  # noqa: PLC0415
  from jcompress import train  # noqa: PLC0415
  path, _, params, batch_stats = resnet18_file
  workdir = str(digits_dir / "from_file")
  results = train.train_and_evaluate(
      _run_config(digits_dir, model="resnet18", init_from=path, total_steps=0), workdir)
  exp, state = train.restore_run(workdir, "init_from")
  stats = data_lib.dataset_defaults("digits")
  assert exp.model.input_norm == pretrained.input_norm(path, stats.mean, stats.std)
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.params), params)
  # The run's accuracy is that of the source network fed torchvision-preprocessed pixels.
  plain = models.get_model("resnet18", 10, **pretrained.TORCHVISION_FIELDS)
  apply = jax.jit(lambda x: plain.apply({"params": params, "batch_stats": batch_stats}, x)[0])
  mean, std = np.resize(stats.mean, 3), np.resize(stats.std, 3)
  correct = count = 0
  for batch in data_lib.eval_iterator("digits", batch_size=180, image_size=32,
                                      data_dir=str(digits_dir / "tfds")):
    pixels = 255.0 * (batch["image"] * std + mean)
    pred = np.argmax(np.asarray(apply(pretrained.preprocess("torchvision", pixels))), -1)
    correct += int(np.sum((pred == batch["label"]) * batch["mask"]))
    count += int(np.sum(batch["mask"]))
  assert results["test_accuracy"] == results["float_test_accuracy"] == correct / count
  # A run that starts from that run inherits the source's fields and preprocessing.
  child = train.make_experiment(_run_config(digits_dir, model="resnet18", init_from=workdir,
                                            total_steps=1))
  assert child.model.input_norm == exp.model.input_norm
  assert child.model.padding == "torch" and child.model.bn_epsilon == 1e-5


def test_teacher_given_as_a_safetensors_file(resnet18_file, digits_dir):
  from jcompress import train  # noqa: PLC0415
  path, _, params, batch_stats = resnet18_file
  c = _run_config(digits_dir, model="resnet20", teacher=path, total_steps=2)
  c.distill = ml_collections.ConfigDict({"loss": "kd", "alpha": 1.0, "temperature": 4.0})
  exp = train.make_experiment(c)
  assert exp.teachers.experiments[0].config.model == "resnet18"   # read from the tensor names
  assert exp.teachers.models[0].input_norm is not None
  (teacher,) = teacher_lib.load_teacher_variables(exp)
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(teacher["params"]), params)
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         jax.device_get(teacher["batch_stats"]), batch_stats)


@pytest.mark.slow
def test_student_trains_with_a_safetensors_teacher(resnet18_file, digits_dir):
  """The full ResNet-18 teacher's forward compiled into the student's step (about 30 s)."""
  from jcompress import train  # noqa: PLC0415
  path = resnet18_file[0]
  c = _run_config(digits_dir, model="resnet20", teacher=path, total_steps=2)
  c.distill = ml_collections.ConfigDict({"loss": "kd", "alpha": 1.0, "temperature": 4.0})
  workdir = str(digits_dir / "student")
  results = train.train_and_evaluate(c, workdir)
  assert results["steps"] == 2
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert all(np.isfinite(m["train_loss"]) for m in lines if "train_loss" in m)


def test_pretrained_teacher_bad_input(tmp_path, digits_dir):
  from jcompress import train  # noqa: PLC0415
  model = models.get_model("resnet18", 3)
  p3, s3 = _random_variables(model, 1)
  three = str(tmp_path / "three.safetensors")
  safetensors_numpy.save_file(pretrained.to_torch_state_dict("resnet18", p3, s3), three)
  for teacher, fragment in [
      (three, "predicts 3 classes, the data has 10"),
      ("keras:NoSuchNet", "unknown Keras application 'NoSuchNet'; known: ResNet50"),
      (str(tmp_path / "missing.safetensors"), "config key 'teacher'.*is not a file")]:
    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=fragment):
      train.train_and_evaluate(_run_config(digits_dir, model="resnet20", teacher=teacher,
                                           total_steps=2), str(workdir))
    assert not workdir.exists()
