"""Vision Transformers (`jcompress/models/vit.py`, `experiments/vit.py`) and DeiT's hard
distillation (`jcompress/distill.py`).

Checked against references: the patch embedding against a VALID stride-p convolution, the
attention against flax's own `MultiHeadDotProductAttention` with the same weights (which also
pins the head layout: head h owns columns h*d:(h+1)*d), parameter counts against timm's
DeiT / ViT models and the published ones, DeiT's inference average, the DeiT hard loss on a
hand example. One tiny W4A4 QAT run on the digits trains through the ordinary train step and
its export predicts as the trained model.
"""

import json
import math
import os

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jcompress import config as config_lib
from jcompress import distill
from jcompress import export
from jcompress import intinfer
from jcompress import models
from jcompress import quantize
from jcompress import train
from jcompress.errors import ConfigError
from jcompress.models.vit import SelfAttention
from jcompress.models.vit import ViT

pytestmark = pytest.mark.plumbing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _experiment_module():
  return config_lib.load_experiment_module(os.path.join(ROOT, "experiments", "vit.py"), "test")


@pytest.fixture(scope="module")
def tiny():
  """A tiny ViT with a distillation token on 8x8x3 images (2x2 patches: 16 + 2 tokens), its
  variables, an input batch and its outputs in both modes."""
  model = ViT(num_classes=5, embed_dim=12, depth=2, num_heads=3, mlp_dim=24, patch_size=2,
              distill_token=True)
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  train_out = model.apply(variables, x, train=True)
  eval_out = model.apply(variables, x, train=False)
  return model, variables, x, train_out, eval_out


# ----------------------------------------------------------------------------- the model


def test_outputs_follow_the_model_contract(tiny):
  model, variables, x, (logits, feats), _ = tiny
  assert "batch_stats" not in variables
  assert logits.shape == (3, 5) and logits.dtype == jnp.float32
  assert list(feats) == ["stem", "block1", "block2", "pre_logits", "dist_logits"]
  assert feats["stem"].shape == (3, 4, 4, 12)
  assert feats["block1"].shape == feats["block2"].shape == (3, 18, 12)
  p = variables["params"]
  # pre_logits: the class token after the final LayerNorm; the logits: head on it.
  normed = nn.LayerNorm(epsilon=1e-6).apply({"params": p["norm"]}, feats["block2"])
  np.testing.assert_allclose(feats["pre_logits"], normed[:, 0], atol=1e-6)
  np.testing.assert_allclose(logits, normed[:, 0] @ p["head"]["kernel"] + p["head"]["bias"],
                             atol=1e-5)
  np.testing.assert_allclose(feats["dist_logits"],
                             normed[:, 1] @ p["head_dist"]["kernel"] + p["head_dist"]["bias"],
                             atol=1e-5)
  # Embedding, tokens and positions under stem_conv: the default exclusions keep them float.
  assert sorted(p["stem_conv"]) == ["bias", "cls", "dist", "kernel", "pos_embedding"]
  assert p["stem_conv"]["pos_embedding"].shape == (1, 18, 12)
  assert sorted(p["block1"]["attn"]) == ["key", "out", "query", "value"]
  assert sorted(p["block1"]["mlp"]) == ["fc1", "fc2"]


def test_patch_embedding_is_a_stride_p_convolution(tiny):
  _, variables, x, (_, feats), _ = tiny
  emb = variables["params"]["stem_conv"]
  ref = lax.conv_general_dilated(x, emb["kernel"], (2, 2), "VALID",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC")) + emb["bias"]
  np.testing.assert_allclose(feats["stem"], ref, atol=1e-5)


def test_attention_is_flax_multi_head_attention_with_heads_as_column_blocks(tiny):
  """Our query/key/value (D, D) kernels reshaped to (D, H, D/H), `out` to (H, D/H, D): flax's
  MultiHeadDotProductAttention computes the same block."""
  _, variables, x, _, _ = tiny
  p = variables["params"]["block1"]["attn"]
  h, d = 3, 12
  hd = d // h
  ref_params = {n: {"kernel": p[n]["kernel"].reshape(d, h, hd), "bias": p[n]["bias"].reshape(h, hd)}
                for n in ("query", "key", "value")}
  ref_params["out"] = {"kernel": p["out"]["kernel"].reshape(h, hd, d), "bias": p["out"]["bias"]}
  tokens = jax.random.normal(jax.random.PRNGKey(2), (3, 18, d))
  ref = nn.MultiHeadDotProductAttention(num_heads=h, qkv_features=d, out_features=d).apply(
      {"params": ref_params}, tokens, tokens)
  got = SelfAttention(num_heads=h).apply({"params": p}, tokens)
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_distillation_token_logits_at_inference_are_the_mean_of_the_two_heads(tiny):
  _, _, _, (cls_logits, feats), (eval_logits, eval_feats) = tiny
  np.testing.assert_allclose(eval_logits, (cls_logits + feats["dist_logits"]) / 2, atol=1e-6)
  np.testing.assert_allclose(eval_feats["dist_logits"], feats["dist_logits"], atol=1e-6)
  assert not np.allclose(cls_logits, feats["dist_logits"], atol=1e-3)   # two distinct heads


# Published parameter counts (DeiT paper, Table 1; ViT paper) and timm's exact counts.
PUBLISHED = [("vit_ti16", False, 5.7e6, 5_717_416), ("vit_s16", False, 22.1e6, 22_050_664),
             ("vit_b16", False, 86.6e6, 86_567_656), ("vit_ti16", True, 5.9e6, 5_910_800)]


@pytest.mark.parametrize("name,token,published,timm", PUBLISHED)
def test_parameter_counts_at_224_match_the_published_models(name, token, published, timm):
  model = models.get_model(name, 1000, distill_token=token)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 224, 224, 3)), train=False))
  n = models.count_params(shapes["params"])
  assert n == timm
  assert abs(n / published - 1) < 0.01


def test_cifar_and_digits_models_build():
  for name, params in (("vit_tiny_cifar", 5_362_762), ("vit_digits", 148_170)):
    shapes = jax.eval_shape(lambda name=name: models.get_model(name, 10).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
    assert models.count_params(shapes["params"]) == params


# ----------------------------------------------------------------------------- bad input


def test_heads_that_do_not_divide_the_width_are_refused_naming_the_field():
  with pytest.raises(ConfigError, match="num_heads.*5.*64"):
    ViT(num_classes=10, embed_dim=64, num_heads=5)
  with pytest.raises(ConfigError, match="num_heads"):
    models.get_model("vit_digits", 10, width=0.9)      # 58 features, 4 heads
  exp = _experiment_module()
  with pytest.raises(ConfigError, match="'width'.*num_heads"):
    exp.get_config("data=digits,width=0.9")


def test_patch_that_does_not_divide_the_image_is_refused_before_compiling():
  model = models.get_model("vit_digits", 10)         # 8x8 patches
  with pytest.raises(ConfigError, match="patch_size.*8.*28x28"):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 3))))
  exp = _experiment_module()
  with pytest.raises(ConfigError, match="'image_size'.*patch_size"):
    exp.get_config("data=cifar10,image_size=30")
  with pytest.raises(ConfigError, match="'method'"):
    exp.get_config("data=digits,method=int4")
  with pytest.raises(ConfigError, match="'teacher'"):
    exp.get_config("data=digits,method=kd")


def test_kd_recipe_defaults_and_refusals():
  """method=kd: the distillation token by default; on digits the teacher's soft labels on mixed
  images over 6,000 steps and 200 labels, elsewhere DeiT's hard distillation without mixup."""
  exp = _experiment_module()
  c = exp.get_config("data=digits,method=kd,teacher=runs/t")
  assert (c.distill.loss, c.model_kwargs.distill_token, c.mixup, c.total_steps,
          c.train_examples) == ("kd", True, 1.0, 6000, 200)
  c = exp.get_config("data=digits,method=kd,teacher=runs/t,token=false,mixup=0,steps=900")
  assert "distill_token" not in c.model_kwargs and (c.mixup, c.total_steps) == (0.0, 900)
  c = exp.get_config("data=cifar10,method=kd,teacher=runs/t")
  assert (c.distill.loss, c.model_kwargs.distill_token, c.mixup) == ("deit_hard", True, 0.0)
  assert exp.get_config("data=digits").mixup == 0.0
  assert exp.get_config("data=digits,mixup=0.4").mixup == 0.4
  with pytest.raises(ConfigError, match="'token'.*deit_hard"):
    exp.get_config("data=digits,method=kd,teacher=runs/t,loss=deit_hard,token=false")
  with pytest.raises(ConfigError, match="'mixup'"):
    exp.get_config("data=digits,mixup=-0.5")
  with pytest.raises(ConfigError, match="'loss'"):
    exp.get_config("data=digits,method=kd,teacher=runs/t,loss=soft")


def test_binary_and_lowrank_methods_take_the_blocks_dense_layers():
  """method=binary: fc1 and fc2 kernels only (attention, embedding, heads float); method=lowrank:
  every Dense of the blocks factorized, the embedding and heads kept; both need init_from."""
  from jcompress import lowrank  # noqa: PLC0415
  from jcompress import transforms  # noqa: PLC0415

  exp = _experiment_module()
  model = models.get_model("vit_digits", 10, distill_token=True)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  params = params["params"]
  c = exp.get_config("data=digits,method=binary,init_from=runs/x")
  picked = {p for p, on in zip(transforms.leaf_paths(params), jax.tree.leaves(
      transforms.select(params, c.binary.include, c.binary.exclude, key="binary.include")))
      if on}
  depth = models.MODELS["vit_digits"].keywords["depth"]
  assert picked == {f"block{b}/mlp/fc{i}/kernel" for b in range(1, depth + 1) for i in (1, 2)}
  c = exp.get_config("data=digits,method=lowrank,init_from=runs/x,rank_fraction=0.25")
  plan = lowrank.make_plan(params, c.lowrank)
  planned = {lp.path for lp in (plan.values() if isinstance(plan, dict) else plan)}
  assert planned == {f"block{b}/{m}" for b in range(1, depth + 1) for m in (
      "attn/query", "attn/key", "attn/value", "attn/out", "mlp/fc1", "mlp/fc2")}
  for bad, key in (("method=binary", "'init_from'"), ("method=lowrank", "'init_from'"),
                   ("method=lowrank,init_from=runs/x,rank_fraction=0", "'rank_fraction'")):
    with pytest.raises(ConfigError, match=key):
      exp.get_config("data=digits," + bad)


def test_unsigned_activation_quantizers_are_refused():
  for spec, key in (({"kind": "pact", "bits": 4}, "act_quant.kind"),
                    ({"kind": "lsq", "bits": 4}, "act_quant.signed")):
    with pytest.raises(ConfigError, match=key):
      ViT(num_classes=10, embed_dim=16, num_heads=2, act_quant=spec)


# ----------------------------------------------------------------------------- DeiT loss


def test_deit_hard_loss_on_a_hand_example():
  cls = jnp.array([[0.0, math.log(3.0)]])     # p(label 1) = 3/4
  dist = jnp.array([[math.log(3.0), 0.0]])    # p(teacher's class 1) = 1/4
  teacher = jnp.array([[0.0, 5.0]])
  labels = jnp.array([1])
  loss, parts = distill.deit_hard_loss(cls, dist, teacher, labels)
  np.testing.assert_allclose(parts["ce_loss"], math.log(4 / 3), rtol=1e-6)
  np.testing.assert_allclose(parts["deit_hard_loss"], math.log(4), rtol=1e-6)
  np.testing.assert_allclose(loss, 0.5 * math.log(16 / 3), rtol=1e-6)
  # Through the config: the trainer's loss reads the student's dist_logits feature; the
  # teacher gets no gradient.
  fn = distill.make_distill_loss(ml_collections.ConfigDict({"loss": "deit_hard"}))
  got, _ = fn(cls, {"dist_logits": dist}, teacher, {}, labels, {})
  np.testing.assert_allclose(got, loss, rtol=1e-6)
  g = jax.grad(lambda t: fn(cls, {"dist_logits": dist}, t, {}, labels, {})[0])(teacher)
  np.testing.assert_array_equal(g, 0.0)
  # dL/d dist = (softmax(dist) - onehot(argmax t)) / 2
  gd = jax.grad(lambda d: fn(cls, {"dist_logits": d}, teacher, {}, labels, {})[0])(dist)
  np.testing.assert_allclose(gd, [[0.75 / 2, -0.75 / 2]], rtol=1e-6)


def test_kd_with_a_distillation_token_distills_through_its_head():
  rng = np.random.RandomState(0)
  s, d, t = (jnp.asarray(rng.randn(4, 3), jnp.float32) for _ in range(3))
  labels = jnp.array([0, 1, 2, 0])
  cfg = ml_collections.ConfigDict({"loss": "kd", "alpha": 0.5, "temperature": 2.0})
  got, parts = distill.make_distill_loss(cfg)(s, {"dist_logits": d}, t, {}, labels, {})
  want = 0.5 * distill.cross_entropy(s, labels) + 0.5 * distill.kd_loss(d, t, 2.0)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(parts["kd_loss"], distill.kd_loss(d, t, 2.0), rtol=1e-6)


def test_deit_hard_without_a_distillation_token_names_the_key():
  cfg = ml_collections.ConfigDict({"loss": "deit_hard"})
  with pytest.raises(ConfigError, match="distill.loss.*dist_logits.*distill_token"):
    distill.validate_distill(cfg, ["stem", "stage1", "pre_logits"], ["stem"])
  fn = distill.make_distill_loss(cfg)
  with pytest.raises(ConfigError, match="dist_logits"):
    fn(jnp.zeros((1, 2)), {"pre_logits": jnp.zeros((1, 4))}, jnp.zeros((1, 2)), {},
       jnp.array([0]), {})


# ----------------------------------------------------------------------------- QAT and export


@pytest.fixture(scope="module")
def qat_run(data_dir, tmp_path_factory):
  """W4A4 QAT of a tiny ViT (vit_digits at width 0.25: D 16, 4 heads) from scratch on the
  digits, 24 steps through `train_and_evaluate`, then exported."""
  c = _experiment_module().get_config("data=digits,method=qat,width=0.25,steps=24,lr=0.003")
  c.data_dir = data_dir
  c.batch_size, c.eval_batch_size = 32, 128
  c.eval_every, c.log_every, c.checkpoint_every = 0, 4, 24
  c.schedule.warmup_steps = 0
  workdir = str(tmp_path_factory.mktemp("vit_qat"))
  results = train.train_and_evaluate(c, workdir)
  summary = export.export_run(workdir, check_examples=0)
  return workdir, results, summary


@pytest.mark.slow
def test_qat_trains_every_dense_kernel_on_the_4_bit_grid(qat_run):
  workdir, results, _ = qat_run
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [m["train_loss"] for m in map(json.loads, f) if "train_loss" in m]
  assert len(losses) == 6 and np.all(np.isfinite(losses))
  assert np.mean(losses[-2:]) < np.mean(losses[:2])
  assert results["weight_bits"] == 4.0 and results["act_bits"] == 4
  exp, state = train.restore_run(workdir, "workdir")
  p = state.params
  dense = [f"block{i}/{m}" for i in (1, 2, 3, 4)
           for m in ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/fc1", "mlp/fc2")]
  assert results["quantized_weights"] == sum(
      np.prod(np.shape(_leaf(p, f"{n}/kernel"))) for n in dense)
  for n in dense:   # every Dense input has its signed LSQ quantizer, calibrated and trained
    assert float(_leaf(p, f"{n}_act/step")) > 0
  eff = exp.transform.apply(p, state.compression)
  for n in dense:   # 4-bit symmetric narrow range: at most 15 levels per output channel
    w = np.asarray(_leaf(eff, f"{n}/kernel"))
    np.testing.assert_array_equal(
        w, np.asarray(quantize.fake_quant_weight(jnp.asarray(_leaf(p, f"{n}/kernel")), 4)))
    assert max(len(np.unique(w[:, j])) for j in range(w.shape[1])) <= 15
  for n in ("stem_conv/pos_embedding", "stem_conv/kernel", "head/kernel"):   # stay float
    np.testing.assert_array_equal(_leaf(eff, n), _leaf(p, n))


def _leaf(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


@pytest.mark.slow
def test_export_predicts_what_the_trained_model_predicts(qat_run, data_dir):
  workdir, results, summary = qat_run
  assert summary["compressed"] and summary["artifact_bytes"] == results["model_bytes"]
  exp, state = train.restore_run(workdir, "workdir")
  images = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (64, 32, 32, 3)))
  want = export._reference_logits(exp, state, images)   # noqa: SLF001
  fn = export.inference_fn(summary["export_dir"], integer=False)
  np.testing.assert_allclose(np.asarray(fn(images)), want, rtol=0, atol=1e-5)
  # The Dense layers as int8 x int8 products (min_depth 0: even these narrow ones).
  fn = export.inference_fn(summary["export_dir"], min_depth=0)
  assert len(fn.apply.integer_layers) == 24
  got = np.asarray(fn(images))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max())
  assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.98
  arrays = {k: jnp.asarray(v) for k, v in fn.arrays.items()}
  ops = intinfer.products(jax.make_jaxpr(fn.apply)(arrays, jnp.asarray(images)))
  assert sum(o[1] == ("int8", "int8") for o in ops) >= 24
