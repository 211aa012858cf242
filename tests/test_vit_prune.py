"""Structured pruning of Vision Transformers: whole attention heads and MLP hidden units found
in the jaxpr (`jcompress.structured_graph`), planned to a FLOPs target and removed physically
(`jcompress.structured`), the pruned model a smaller ViT built from its `heads` / `mlp_dims`."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jcompress import models
from jcompress import structured as st
from jcompress.errors import ConfigError
from jcompress.models.vit import ViT

pytestmark = pytest.mark.plumbing

SHAPE = (1, 16, 16, 3)


@pytest.fixture(scope="module")
def vit():
  """A 2-block ViT (D 32, 4 heads of 8, MLP 64, 4x4 patches: 16 tokens + class token)."""
  model = ViT(num_classes=5, embed_dim=32, depth=2, num_heads=4, mlp_dim=64, patch_size=4)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros(SHAPE))["params"]
  graph = st.build_graph(model, params, {}, SHAPE)
  return model, params, graph


def test_graph_groups_heads_and_mlp_units(vit):
  model, params, graph = vit
  hd = model.head_dim
  assert set(graph.prunable) == {"block1/attn/query", "block1/mlp/fc1", "block2/attn/query",
                                 "block2/mlp/fc1"}
  heads = graph.groups["block1/attn/query"]
  assert heads.size == 4
  # q, k, v columns and biases of head h and the out-projection's rows of head h: one channel.
  names = {"/".join(leaf[1]): axis for leaf, axis in heads.slots}
  assert names == {"block1/attn/query/kernel": 1, "block1/attn/key/kernel": 1,
                   "block1/attn/value/kernel": 1, "block1/attn/out/kernel": 0,
                   "block1/attn/query/bias": 0, "block1/attn/key/bias": 0,
                   "block1/attn/value/bias": 0}
  for idx in heads.slots.values():
    np.testing.assert_array_equal(idx, np.arange(4 * hd).reshape(4, hd))
  assert heads.paths("in") == ["block1/attn/out"]
  mlp = graph.groups["block2/mlp/fc1"]
  assert mlp.size == 64 and mlp.paths("in") == ["block2/mlp/fc2"]
  # The residual stream (token width) is protected; the FLOPs are the jaxpr's, attention
  # products included.
  protected = [g for g in graph.groups.values() if not g.prunable]
  assert any("block1/attn/out" in g.paths("out") for g in protected)
  assert graph.flops() == st.count_flops(model, SHAPE, params)
  assert sum(layer.kind == "act" for layer in graph.layers.values()) == 4


@pytest.mark.parametrize("method", ["global", "uniform"])
def test_plan_half_flops_prune_equals_masked_model(vit, method):
  model, params, graph = vit
  keep = st.plan_for_flops(model, params, {}, flops_target=0.5, method=method, graph=graph)
  removed = {n: graph.groups[n].size - k.size for n, k in keep.items()}
  assert any(removed[n] for n in removed if "attn" in n)
  assert any(removed[n] for n in removed if "mlp" in n)
  override, new_params, new_stats = st.prune_channels(model, params, {}, keep, graph=graph)
  assert new_stats == {}
  heads = tuple(keep[f"block{i}/attn/query"].size for i in (1, 2))
  mlp = tuple(keep[f"block{i}/mlp/fc1"].size for i in (1, 2))
  assert override == {"heads": heads, "mlp_dims": mlp}
  pruned = st.with_channels(model, override)
  assert isinstance(pruned, ViT) and pruned.heads == heads and pruned.mlp_dims == mlp

  x = jax.random.normal(jax.random.PRNGKey(1), (3, *SHAPE[1:]))
  masked = st.mask_channels(graph, params, keep)
  want = model.apply({"params": masked}, x)[0]
  got = pruned.apply({"params": new_params}, x)[0]
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)

  flops = st.count_flops(pruned, SHAPE, new_params)
  assert flops == graph.flops(removed) <= 0.5 * graph.flops()
  # Parameters: each removed head takes 3 (D x hd + hd) + hd x D, each MLP unit 2 D + 1.
  d, hd = model.dim, model.head_dim
  n_heads, n_units = sum(4 - h for h in heads), sum(64 - m for m in mlp)
  assert st.count_params(params) - st.count_params(new_params) == (
      n_heads * (3 * (d * hd + hd) + hd * d) + n_units * (2 * d + 1))
  shapes = jax.eval_shape(lambda: pruned.init(jax.random.PRNGKey(0), jnp.zeros(SHAPE)))
  assert jax.tree.map(np.shape, shapes["params"]) == jax.tree.map(np.shape, new_params)


def test_round_to_rounds_mlp_units_not_heads(vit):
  """round_to=8 (experiments/vit.py's default): every block's kept MLP units are a multiple of
  8; heads (8 channels each here) are a step of one head; the FLOPs target still holds."""
  model, params, graph = vit
  keep = st.plan_for_flops(model, params, {}, flops_target=0.5, method="global", graph=graph,
                           round_to=8)
  for i in (1, 2):
    assert keep[f"block{i}/mlp/fc1"].size % 8 == 0
  heads = [keep[f"block{i}/attn/query"].size for i in (1, 2)]
  assert min(heads) >= 1 and sum(heads) < 8   # some heads removed, one at a time
  removed = {n: graph.groups[n].size - k.size for n, k in keep.items()}
  assert graph.flops(removed) <= 0.5 * graph.flops()


def test_keep_by_count_takes_largest_l1_heads(vit):
  model, params, graph = vit
  p = jax.tree.map(np.array, params)
  p["block1"]["attn"]["value"]["kernel"][:, 8:16] *= 100.0    # head 1 the largest
  _, new_params, _ = st.prune_channels(model, p, {}, {"block1/attn/query": 1}, graph=graph)
  np.testing.assert_array_equal(new_params["block1"]["attn"]["value"]["kernel"],
                                p["block1"]["attn"]["value"]["kernel"][:, 8:16])
  np.testing.assert_array_equal(new_params["block1"]["attn"]["out"]["kernel"],
                                p["block1"]["attn"]["out"]["kernel"][8:16])


def test_errors_name_the_field(vit):
  model, params, graph = vit
  with pytest.raises(ConfigError, match="`heads`.*block1.*no attention heads"):
    st.prune_channels(model, params, {}, {"block1/attn/query": []}, graph=graph)
  with pytest.raises(ConfigError, match="`mlp_dims`.*block2"):
    st.prune_channels(model, params, {}, {"block2/mlp/fc1": 0}, graph=graph)
  assert not graph.groups["block1/attn/out"].prunable     # the residual stream
  with pytest.raises(ConfigError, match="block1/attn/out"):
    st.prune_channels(model, params, {}, {"block1/attn/out": []}, graph=graph)
  with pytest.raises(ConfigError, match="`heads`: block2 must keep at least one"):
    ViT(num_classes=5, embed_dim=32, depth=2, num_heads=4, mlp_dim=64, heads=(2, 0))
  with pytest.raises(ConfigError, match="`mlp_dims` has 3 entries for 2 blocks"):
    ViT(num_classes=5, embed_dim=32, depth=2, num_heads=4, mlp_dim=64, mlp_dims=(1, 2, 3))
  # JSON lists (a run's config.json) are accepted as tuples.
  assert ViT(num_classes=5, embed_dim=32, depth=2, num_heads=4, heads=[1, 2]).heads == (1, 2)


@pytest.mark.slow
def test_apply_to_config():
  """The `structured` method's entry point on the registered `vit_digits` (at width 0.5, 16x16
  images: D 32, 4 heads of 8, MLP 64, 4 blocks)."""
  config = ml_collections.ConfigDict({
      "model": "vit_digits", "width": 0.5, "image_size": 16, "model_kwargs": {},
      "structured": st.default_config()})
  net = models.get_model("vit_digits", 5, width=0.5)
  params = net.init(jax.random.PRNGKey(0), jnp.zeros(SHAPE))["params"]
  rng = np.random.default_rng(0)
  batches = [{"image": rng.normal(size=(4, 16, 16, 3)).astype(np.float32),
              "label": rng.integers(0, 5, 4)}]
  new_config, new_params, _, report = st.apply_to_config(config, params, {}, batches,
                                                         num_classes=5)
  assert report["flops_ratio"] <= 0.5 and report["params_after"] < report["params_before"]
  kwargs = new_config.model_kwargs
  assert len(kwargs.heads) == 4 and len(kwargs.mlp_dims) == 4 and "channels" not in kwargs
  pruned = models.get_model("vit_digits", 5, width=0.5, **kwargs)
  logits, _ = pruned.apply({"params": new_params}, batches[0]["image"])
  assert logits.shape == (4, 5) and np.isfinite(np.asarray(logits)).all()


def test_experiment_config_method_prune():
  from experiments import vit as vit_config  # noqa: PLC0415
  c = vit_config.get_config("data=digits,method=prune,init_from=runs/x,flops=0.4")
  assert c.structured.flops_target == 0.4 and c.structured.criterion == "taylor"
  assert c.structured.round_to == 8 and c.structured.method == "uniform"
  c = vit_config.get_config("data=digits,method=prune,init_from=runs/x,plan=global")
  assert c.structured.method == "global"
  assert c.init_from == "runs/x" and c.total_steps == 1_500
  with pytest.raises(ConfigError, match="init_from"):
    vit_config.get_config("data=digits,method=prune")
  with pytest.raises(ConfigError, match="'flops'"):
    vit_config.get_config("data=digits,method=prune,init_from=runs/x,flops=1.5")
  with pytest.raises(ConfigError, match="'plan'"):
    vit_config.get_config("data=digits,method=prune,init_from=runs/x,plan=layerwise")


def test_gradient_criteria_gate_is_the_head_gate_gradient(vit):
  """`gate` scores a head by |dL/dg| for a gate g on its output (Michel et al. 2019); `taylor`
  plans from the same gradients."""
  import optax  # noqa: PLC0415
  model, params, graph = vit
  rng = np.random.default_rng(1)
  batch = {"image": rng.normal(size=(4, *SHAPE[1:])).astype(np.float32),
           "label": rng.integers(0, 5, 4)}
  grads = st.taylor_grads(model, params, {}, [batch])
  scores = st.importance(graph, params, "gate", grads=grads)["block2/attn/query"]
  hd = model.head_dim

  def loss(gates):   # gates (4,): head h's output scaled by gates[h] before `out`
    p = jax.tree.map(lambda a: a, params)
    out = p["block2"]["attn"]["out"]
    p["block2"]["attn"]["out"] = {**out, "kernel": out["kernel"] * jnp.repeat(gates, hd)[:, None]}
    logits = model.apply({"params": p}, batch["image"])[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  want = np.abs(jax.jit(jax.grad(loss))(jnp.ones(4)))
  np.testing.assert_allclose(scores, want, rtol=1e-3, atol=1e-7)
  with pytest.raises(ConfigError, match="'gate' needs calibration batches"):
    st.importance(graph, params, "gate")
  taylor = st.importance(graph, params, "taylor", grads=grads)
  assert all(np.all(np.isfinite(v)) and np.any(v > 0) for v in taylor.values())
  keep = st.plan_for_flops(model, params, {}, flops_target=0.5, graph=graph, scores=taylor)
  assert graph.flops({n: graph.groups[n].size - k.size for n, k in keep.items()}) <= (
      0.5 * graph.flops())
