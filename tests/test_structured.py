"""Tests of structured filter pruning (jcompress/structured.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jcompress import config as config_lib
from jcompress import models
from jcompress import structured as st
from jcompress.errors import ConfigError

pytestmark = pytest.mark.plumbing

CASES = {
    "resnet20": (dict(width=0.25), 16),
    "resnet50": (dict(width=0.25), 16),
    "mobilenetv2": (dict(width=0.25), 16),
    "shufflenetv2": (dict(width=0.5), 16),
}


def _randomize(variables, seed=0):
  """BN params/statistics away from their init, so a wrong channel shows in the outputs."""
  rng = np.random.default_rng(seed)

  def visit(path, a):
    name = str(path[-1].key)
    if name == "scale":
      return jnp.asarray(rng.uniform(0.5, 1.5, a.shape), jnp.float32)
    if name == "bias":
      return jnp.asarray(rng.normal(0, 0.3, a.shape), jnp.float32)
    if name == "mean":
      return jnp.asarray(rng.normal(0, 0.1, a.shape), jnp.float32)
    if name == "var":
      return jnp.asarray(rng.uniform(0.5, 1.5, a.shape), jnp.float32)
    return a
  return jax.tree_util.tree_map_with_path(visit, variables)


_BUILT: dict = {}


def _build(name):
  """(model, randomized variables, input batch, graph), built once per test session."""
  if name not in _BUILT:
    kw, hw = CASES[name]
    model = models.get_model(name, 10, **kw)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, hw, hw, 3)), jnp.float32)
    v = _randomize(jax.jit(model.init)(jax.random.PRNGKey(0), x))   # eager: op by op, slower
    graph = st.build_graph(model, v["params"], v["batch_stats"], x.shape)
    _BUILT[name] = (model, v, x, graph)
  return _BUILT[name]


@pytest.fixture(scope="module")
def built():
  class Lazy(dict):
    def __missing__(self, name):
      return _build(name)
  return Lazy()


def _slot(group, path, axis, collection="params", leaf="kernel"):
  return group.slots[((collection, (*path.split("/"), leaf)), axis)][:, 0]


def test_resnet20_residual_groups(built):
  _, _, _, g = built["resnet20"]
  stream = g.groups["stem_conv"]
  assert stream.prunable and stream.size == 4
  assert stream.paths("out") == ["stage1_block0/conv2", "stage1_block1/conv2",
                                 "stage1_block2/conv2", "stem_conv"]
  assert stream.paths("in") == ["stage1_block0/conv1", "stage1_block1/conv1",
                                "stage1_block2/conv1", "stage2_block0/conv1",
                                "stage2_block0/shortcut_conv"]
  # Channel j of the stream is filter j of every producer and input j of every consumer.
  for path in ("stem_conv", "stage1_block2/conv2"):
    np.testing.assert_array_equal(_slot(stream, path, 3), np.arange(4))
  np.testing.assert_array_equal(_slot(stream, "stage2_block0/shortcut_conv", 2), np.arange(4))
  last = g.groups["stage3_block0/conv2"]
  assert "stage3_block0/shortcut_conv" in last.paths("out") and "head" in last.paths("in")
  np.testing.assert_array_equal(_slot(last, "head", 0), np.arange(16))
  assert not g.groups["head"].prunable and "logits" in g.groups["head"].reason
  inner = g.groups["stage2_block1/conv1"]
  assert inner.paths("out") == ["stage2_block1/conv1"]
  assert inner.paths("in") == ["stage2_block1/conv2"]
  vecs = {k[0][1][-2:] for k in inner.slots if k[0][1][-1] != "kernel"}
  assert vecs == {("bn1", "scale"), ("bn1", "bias"), ("bn1", "mean"), ("bn1", "var")}


def test_mobilenet_depthwise_follows_expand(built):
  _, _, _, g = built["mobilenetv2"]
  group = g.groups["stage3_block1/expand_conv"]
  assert group.prunable
  assert group.paths("out") == ["stage3_block1/dw_conv", "stage3_block1/expand_conv"]
  assert group.paths("in") == ["stage3_block1/project_conv"]
  np.testing.assert_array_equal(_slot(group, "stage3_block1/dw_conv", 3),
                                _slot(group, "stage3_block1/expand_conv", 3))
  # The stem's channels reach stage 1's depthwise conv (no expand conv when t = 1).
  assert "stage1_block0/dw_conv" in g.groups["stem_conv"].paths("out")
  # Stage 3's residual stream ties the three project convs.
  assert g.groups["stage3_block0/project_conv"].paths("out") == [
      f"stage3_block{b}/project_conv" for b in range(3)]


@pytest.mark.slow
def test_shufflenet_groups_and_shuffle_permutation(built):
  _, _, _, g = built["shufflenetv2"]
  assert g.groups["stem_conv"].prunable
  assert g.groups["stage1_block0/branch2_pw1_conv"].prunable
  assert g.groups["stage1_block0/branch2_pw1_conv"].paths("out") == [
      "stage1_block0/branch2_dw_conv", "stage1_block0/branch2_pw1_conv"]
  assert g.groups["conv_last"].prunable
  for name, group in g.groups.items():
    if "branch1_pw" in name or "pw2" in name:
      assert not group.prunable and "concatenation" in group.reason
  # Block 0's concat is [branch1 (24), branch2 (24)], shuffled: out[k] = cat[(k % 2) * 24 +
  # k // 2]; block 1 feeds out[24:] to its pw1 conv, so branch1 channel c (12 <= c < 24) is
  # input 2c - 24 of stage1_block1/branch2_pw1_conv.
  found = False
  for group in g.groups.values():
    key_out = (("params", ("stage1_block0", "branch1_pw_conv", "kernel")), 3)
    key_in = (("params", ("stage1_block1", "branch2_pw1_conv", "kernel")), 2)
    if key_out in group.slots and key_in in group.slots:
      np.testing.assert_array_equal(group.slots[key_in][:, 0], 2 * group.slots[key_out][:, 0] - 24)
      found = True
  assert found


@pytest.mark.parametrize("name", [
    "resnet20", "shufflenetv2",
    pytest.param("resnet50", marks=pytest.mark.slow),
    pytest.param("mobilenetv2", marks=pytest.mark.slow)])
def test_pruned_model_equals_masked_model(built, name):
  model, v, x, g = built[name]
  params_before = jax.tree.map(np.array, v["params"])
  keep = st.plan_for_flops(model, v["params"], v["batch_stats"], flops_target=0.5, graph=g)
  override, p2, b2 = st.prune_channels(model, v["params"], v["batch_stats"], keep, graph=g)
  # The caller's tree is untouched.
  jax.tree.map(np.testing.assert_array_equal, params_before, jax.tree.map(np.array, v["params"]))
  # The override lists every non-depthwise conv, and get_model builds exactly these shapes.
  convs = {p for p, layer in g.layers.items() if layer.kind == "conv"}
  assert set(override) == convs
  kw, _ = CASES[name]
  pruned = models.get_model(name, 10, channels=tuple(override.items()), **kw)
  shapes = jax.eval_shape(pruned.init, jax.random.PRNGKey(0), x)
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, np.shape(b)),
               shapes["params"], p2)
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, np.shape(b)),
               shapes["batch_stats"], b2)
  # Removing = masking the BN outputs (gamma = beta = 0) of the removed channels, in eval mode.
  masked = st.mask_channels(g, v["params"], keep)
  apply = jax.jit(lambda m, var: m.apply(var, x)[0], static_argnums=0)
  y_masked = apply(model, {"params": masked, "batch_stats": v["batch_stats"]})
  y_pruned = apply(pruned, {"params": p2, "batch_stats": b2})
  y_full = apply(model, v)
  scale = float(jnp.abs(y_masked).max())
  np.testing.assert_allclose(y_pruned, y_masked, atol=1e-5 * max(scale, 1.0), rtol=1e-4)
  assert float(jnp.abs(y_full - y_masked).max()) > 1e-3   # the masking did change the model
  f0 = st.count_flops(model, x.shape, v["params"], v["batch_stats"])
  f1 = st.count_flops(pruned, x.shape, p2, b2)
  per_image = g.flops({n: g.groups[n].size - k.size for n, k in keep.items()})
  assert f1 <= 0.5 * f0 and f1 == x.shape[0] * per_image and f0 == x.shape[0] * g.flops()
  assert st.count_params(p2) < st.count_params(v["params"])


def test_count_flops_closed_form():
  model = models.get_model("small_cnn", 10, width=0.25)   # 8 / 16 / 32 channels
  macs = st.count_flops(model, (8, 8, 3))
  want = 8 * 8 * 9 * 3 * 8 + 4 * 4 * 9 * 8 * 16 + 2 * 2 * 9 * 16 * 32 + 32 * 10
  assert macs == want
  v = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  g = st.build_graph(model, v["params"], v["batch_stats"], (1, 8, 8, 3))
  assert g.flops() == want
  # Removing 3 filters of stage1_conv: its MACs and stage2's input shrink.
  assert g.flops({"stage1_conv": 3}) == want - 4 * 4 * 9 * 8 * 3 - 2 * 2 * 9 * 3 * 32


def test_importance_criteria(built):
  model, v, x, g = built["resnet20"]
  p = v["params"]
  s = st.importance(g, p, "l1")["stage2_block1/conv1"]
  k = np.abs(np.asarray(p["stage2_block1"]["conv1"]["kernel"])).sum(axis=(0, 1, 2))
  np.testing.assert_allclose(s, k, rtol=1e-6)
  s = st.importance(g, p, "bn")["stage2_block1/conv1"]
  np.testing.assert_allclose(s, np.abs(p["stage2_block1"]["bn1"]["scale"]), rtol=1e-6)
  s = st.importance(g, p, "bn")["stage1_block0/conv2"] if "stage1_block0/conv2" in g.groups \
      else st.importance(g, p, "bn")["stem_conv"]
  gammas = sum(np.abs(np.asarray(p[b]["bn2"]["scale"])) for b in
               ("stage1_block0", "stage1_block1", "stage1_block2"))
  np.testing.assert_allclose(s, gammas + np.abs(p["stem_bn"]["scale"]), rtol=1e-6)
  # Taylor: (gamma dL/dgamma + beta dL/dbeta)^2 from jax.grad, for one batch.
  batch = {"image": np.asarray(x), "label": np.array([1, 7])}
  grads = st.taylor_grads(model, p, v["batch_stats"], [batch])
  s = st.importance(g, p, "taylor", grads=grads)["stage2_block1/conv1"]
  gb = grads[0]["stage2_block1"]["bn1"]
  pb = p["stage2_block1"]["bn1"]
  want = (np.asarray(pb["scale"]) * gb["scale"] + np.asarray(pb["bias"]) * gb["bias"]) ** 2
  np.testing.assert_allclose(s, want, rtol=1e-4)
  assert np.all(s >= 0) and np.any(s > 0)
  with pytest.raises(ConfigError, match="taylor"):
    st.importance(g, p, "taylor")
  with pytest.raises(ConfigError, match="criterion"):
    st.importance(g, p, "l2")


def test_plan_methods_and_targets(built):
  model, v, x, g = built["resnet20"]
  for method in ("global", "uniform"):
    for target in (0.7, 0.5, 0.3):
      keep = st.plan_for_flops(model, v["params"], v["batch_stats"], flops_target=target,
                               method=method, graph=g)
      removed = {n: g.groups[n].size - k.size for n, k in keep.items()}
      assert g.flops(removed) <= target * g.flops()
      assert all(k.size >= 1 for k in keep.values())
  for method in ("global", "uniform"):   # kept widths rounded up to multiples of 4
    keep = st.plan_for_flops(model, v["params"], v["batch_stats"], flops_target=0.6,
                             method=method, graph=g, round_to=4)
    assert all(k.size % 4 == 0 or k.size == g.groups[n].size for n, k in keep.items())
    assert g.flops({n: g.groups[n].size - k.size for n, k in keep.items()}) <= 0.6 * g.flops()
  keep = st.plan_for_flops(model, v["params"], v["batch_stats"], flops_target=1.0, graph=g)
  assert all(k.size == g.groups[n].size for n, k in keep.items())
  # The global ranking removes the lowest normalised L1 channels first.
  keep = st.plan_for_flops(model, v["params"], v["batch_stats"], flops_target=0.9, graph=g)
  scores = st.importance(g, v["params"], "l1")
  for n, k in keep.items():
    dropped = np.setdiff1d(np.arange(g.groups[n].size), k)
    if dropped.size:
      assert scores[n][dropped].max() <= scores[n][k].min()
  for bad in (0, 0.0, -0.5, 1.5, True, "half"):
    with pytest.raises(ConfigError, match="flops_target"):
      st.plan_for_flops(model, v["params"], v["batch_stats"], flops_target=bad, graph=g)
  with pytest.raises(ConfigError, match="criterion"):
    st.plan_for_flops(model, v["params"], v["batch_stats"], criterion="random", graph=g)
  with pytest.raises(ConfigError, match="out of reach"):
    st.plan_for_flops(model, v["params"], v["batch_stats"], flops_target=0.01, graph=g)


def test_bad_keep_is_refused(built):
  model, v, _, g = built["resnet20"]
  args = (model, v["params"], v["batch_stats"])
  with pytest.raises(ConfigError, match="every filter of layer stage2_block1/conv1"):
    st.prune_channels(*args, {"stage2_block1/conv1": []}, graph=g)
  with pytest.raises(ConfigError, match="every filter"):
    st.prune_channels(*args, {"stage2_block1/conv1": 0}, graph=g)
  with pytest.raises(ConfigError, match="protected"):
    st.prune_channels(*args, {"head": [0, 1]}, graph=g)
  with pytest.raises(ConfigError, match="no channel group 'nope'"):
    st.prune_channels(*args, {"nope": [0]}, graph=g)
  with pytest.raises(ConfigError, match="index 8"):
    st.prune_channels(*args, {"stage2_block1/conv1": [0, 8]}, graph=g)
  # An int keeps the n channels of largest L1 norm.
  override, p2, _ = st.prune_channels(*args, {"stage2_block1/conv1": 3}, graph=g)
  assert override["stage2_block1/conv1"] == 3 and override["stage2_block1/conv2"] == 8
  k = np.abs(np.asarray(v["params"]["stage2_block1"]["conv1"]["kernel"])).sum(axis=(0, 1, 2))
  kept = np.sort(np.argsort(-k)[:3])
  np.testing.assert_array_equal(p2["stage2_block1"]["conv1"]["kernel"],
                                np.asarray(v["params"]["stage2_block1"]["conv1"]["kernel"])
                                [..., kept])


def test_check_channels_and_model_widths():
  model = models.get_model("resnet20", 10, width=0.25)
  st.check_channels(model, {"stage1_block0/conv1": 2}, (1, 8, 8, 3))
  with pytest.raises(ConfigError, match="no conv 'stage9_block0/conv1'"):
    st.check_channels(model, {"stage9_block0/conv1": 2}, (1, 8, 8, 3))
  with pytest.raises(ConfigError, match="int >= 1"):
    st.check_channels(model, {"stage1_block0/conv1": 0}, (1, 8, 8, 3))
  # The model itself refuses a width < 1 and names the conv.
  bad = models.get_model("resnet20", 10, width=0.25, channels=(("stage1_block0/conv1", 0),))
  with pytest.raises(ConfigError, match="stage1_block0/conv1"):
    bad.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))


def test_slimming_penalty():
  model = models.get_model("resnet20", 10, width=0.25)
  v = _randomize(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3))))
  p = v["params"]
  want = 1e-3 * sum(float(jnp.abs(leaf["scale"]).sum()) for leaf in jax.tree.leaves(
      p, is_leaf=lambda t: isinstance(t, dict) and "scale" in t) if isinstance(leaf, dict))
  got = float(jax.jit(lambda q: st.slimming_l1_penalty(q, 1e-3))(p))
  assert got == pytest.approx(want, rel=1e-5) and got > 0
  grads = jax.grad(lambda q: st.slimming_l1_penalty(q, 1e-3))(p)
  np.testing.assert_allclose(grads["stem_bn"]["scale"], 1e-3 * np.sign(p["stem_bn"]["scale"]))
  np.testing.assert_array_equal(grads["stem_conv"]["kernel"], 0)
  with pytest.raises(ConfigError, match="weight"):
    st.slimming_l1_penalty(p, -1.0)


def test_apply_to_config_roundtrip(built):
  model, v, x, _ = built["resnet20"]
  c = config_lib.base_config()
  c.model = "resnet20"
  c.width = 0.25
  c.image_size = 16
  c.structured = st.default_config()
  new, p2, b2, report = st.apply_to_config(c, v["params"], v["batch_stats"])
  assert "channels" not in c.model_kwargs            # the input config is not modified
  assert report["flops_after"] <= 0.5 * report["flops_before"]
  assert report["params_after"] < report["params_before"]
  # The channels survive config.json (pairs become lists) and build the pruned model.
  back = config_lib.from_dict(config_lib.to_dict(new))
  kwargs = dict(back.model_kwargs)
  pruned = models.get_model("resnet20", 10, width=0.25, **kwargs)
  y = pruned.apply({"params": p2, "batch_stats": b2}, x)[0]
  assert y.shape == (2, 10)
  assert st.count_flops(pruned, (1, *x.shape[1:])) == report["flops_after"]   # per image
  bad = c.copy_and_resolve_references()
  bad.structured.flops_target = 0.0
  with pytest.raises(ConfigError, match="structured.flops_target"):
    st.apply_to_config(bad, v["params"], v["batch_stats"])
  bad.structured.flops_target = 0.5
  bad.structured.criterion = "magic"
  with pytest.raises(ConfigError, match="structured.criterion"):
    st.apply_to_config(bad, v["params"], v["batch_stats"])
  assert isinstance(new, ml_collections.ConfigDict)


def test_experiment_config():
  from experiments import filter_prune_resnet as exp  # noqa: PLC0415
  c = exp.get_config("data=digits,criterion=taylor,flops=0.4,init_from=/tmp/x,steps=50")
  assert (c.structured.criterion, c.structured.flops_target, c.total_steps) == ("taylor", 0.4, 50)
  config_lib.validate(c)
  with pytest.raises(ConfigError, match="flops"):
    exp.get_config("data=digits,flops=1.5")
  with pytest.raises(ConfigError, match="criterion"):
    exp.get_config("data=digits,criterion=random")
