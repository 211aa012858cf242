"""Low-rank factorization: exact full-rank models, Eckart-Young errors, rank selection, parameter
counts, the factorized Flax model (tree, no original kernel, gradients), config errors."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress import lowrank
from jcompress import models
from jcompress import transforms
from jcompress.errors import ConfigError

pytestmark = pytest.mark.plumbing


def _cfg(**kw):
  c = lowrank.default_config()
  for k, v in kw.items():
    c[k] = v
  return c


def _random_variables(model, x, seed=0):
  """Variables of `model`'s tree filled with numpy draws (faster than `model.init` on a busy
  CPU): He-normal kernels, BatchNorm scales / biases / statistics away from the identity."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)

  def fill(path, s):
    name = path.rsplit("/", 1)[-1]
    if name == "kernel":
      return jnp.asarray(rng.normal(size=s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1])),
                         jnp.float32)
    base = 1.0 if name in ("scale", "var") else 0.0
    return jnp.asarray(base + 0.1 * np.abs(rng.normal(size=s.shape)), jnp.float32)

  return transforms.map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def resnet():
  """A quarter-width ResNet-20 with non-trivial BatchNorm statistics, on 8x8 inputs."""
  model = models.get_model("resnet20", 10, width=0.25)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
  variables = _random_variables(model, x)
  logits, _ = model.apply(variables, x)
  return model, variables, x, logits


@pytest.mark.parametrize("method", lowrank.METHODS)
def test_full_rank_reproduces_logits(resnet, method):
  model, variables, x, ref = resnet
  fm, fp = lowrank.factorized_model(model, variables["params"], _cfg(method=method, energy=1.0))
  # energy = 1.0 keeps every singular value: the factorization is exact.
  for p in fm.plan:
    assert p.ranks == lowrank.max_ranks(p.kernel_shape, p.method)
  out, feats = jax.jit(fm.apply)({"params": fp, "batch_stats": variables["batch_stats"]}, x)
  np.testing.assert_allclose(out, ref, atol=2e-5 * float(jnp.abs(ref).max()))
  assert set(feats) == {"stem", "stage1", "stage2", "stage3", "pre_logits"}


@pytest.mark.parametrize("method", lowrank.METHODS)
def test_truncated_model_params_tree_and_count(resnet, method):
  model, variables, x, _ = resnet
  params = variables["params"]
  fm, fp = lowrank.factorized_model(model, params, _cfg(method=method, param_fraction=0.5))
  # The factorized model creates exactly this tree when traced, without the original kernels.
  init = jax.eval_shape(fm.init, jax.random.PRNGKey(3), x)
  assert jax.tree.map(jnp.shape, init["params"]) == jax.tree.map(jnp.shape, fp)
  assert jax.tree.structure(init["batch_stats"]) == jax.tree.structure(variables["batch_stats"])
  names = set(lowrank.FACTOR_NAMES[method]) | set(lowrank.FACTOR_NAMES["svd"])
  for p in fm.plan:
    node = init["params"]
    for part in p.path.split("/"):
      node = node[part]
    assert "kernel" not in node and set(node) <= names
  # Exact count: the original minus the planned kernels plus the factor formula.
  removed = sum(math.prod(p.kernel_shape) for p in fm.plan)
  added = sum(lowrank.factor_param_count(p.kernel_shape, p.method, p.ranks) for p in fm.plan)
  assert models.count_params(init["params"]) == models.count_params(params) - removed + added
  assert models.count_params(fp) == models.count_params(init["params"])
  assert added <= 0.5 * removed
  # stem and head are excluded by default; the 3x3 convs use the method, 1x1 shortcuts SVD.
  paths = {p.path: p for p in fm.plan}
  assert "stem_conv" not in paths and "head" not in paths
  assert paths["stage2_block0/shortcut_conv"].method == "svd"
  assert paths["stage2_block0/conv1"].method == method
  summary = lowrank.plan_summary(fm.plan)
  assert summary["factorized_params"] == added and summary["original_params"] == removed


def test_explicit_counts_for_a_3x3_conv():
  """kernel (3, 3, 32, 32); the formulas of the module docstring, by hand."""
  shape = (3, 3, 32, 32)
  assert lowrank.factor_param_count(shape, "svd", (5,)) == 5 * (9 * 32 + 32)
  assert lowrank.factor_param_count(shape, "spatial", (5,)) == 5 * (3 * 32 + 3 * 32)
  assert lowrank.factor_param_count(shape, "tucker", (4, 6)) == 32 * 4 + 9 * 4 * 6 + 6 * 32
  assert lowrank.max_ranks(shape, "svd") == (32,)
  assert lowrank.max_ranks(shape, "spatial") == (96,)
  assert lowrank.max_ranks(shape, "tucker") == (32, 32)
  assert lowrank.max_ranks((64, 10), "tucker") == (10,)   # Dense: SVD whatever the method
  # Half the parameters: svd floor(0.5 * 9216 / 320) = 14, spatial floor(4608 / 192) = 24.
  assert lowrank.rank_for_param_fraction(shape, "svd", 0.5) == (14,)
  assert lowrank.rank_for_param_fraction(shape, "spatial", 0.5) == (24,)
  r1, r2 = lowrank.rank_for_param_fraction(shape, "tucker", 0.5)
  assert r1 == r2
  assert lowrank.factor_param_count(shape, "tucker", (r1, r2)) <= 4608
  assert lowrank.factor_param_count(shape, "tucker", (r1 + 1, r2 + 1)) > 4608


@pytest.mark.parametrize("method", lowrank.METHODS)
def test_truncation_error_is_eckart_young(method):
  rng = np.random.default_rng(0)
  w = rng.normal(size=(3, 3, 8, 12))
  ranks = (3,) if method != "tucker" else (3, 5)
  factors = lowrank.factorize_kernel(w, method, ranks)
  approx = lowrank.reconstruct_kernel(factors, method)
  err = np.sum((w - approx) ** 2)
  s = lowrank.spectra(w, method)
  if method == "tucker":
    # HOSVD: error at most the sum of the discarded energies of both modes (and at least each).
    assert err <= np.sum(s[0][3:] ** 2) + np.sum(s[1][5:] ** 2) + 1e-6
    assert err >= max(np.sum(s[0][3:] ** 2), np.sum(s[1][5:] ** 2)) - 1e-6
  else:
    np.testing.assert_allclose(err, np.sum(s[0][3:] ** 2), rtol=1e-5)


def test_dense_svd_is_best_rank_r():
  rng = np.random.default_rng(1)
  w = rng.normal(size=(20, 7))
  f = lowrank.factorize_kernel(w, "svd", (4,))
  assert f["kernel_in"].shape == (20, 4) and f["kernel_out"].shape == (4, 7)
  u, s, vt = np.linalg.svd(w, full_matrices=False)
  np.testing.assert_allclose(np.asarray(f["kernel_in"]) @ np.asarray(f["kernel_out"]),
                             (u[:, :4] * s[:4]) @ vt[:4], atol=1e-5)


def test_rank_for_energy_is_smallest_rank_meeting_target():
  s = np.sqrt([50.0, 30.0, 15.0, 5.0])   # energies 0.5, 0.8, 0.95, 1.0
  assert lowrank.rank_for_energy(s, 0.5) == 1
  assert lowrank.rank_for_energy(s, 0.51) == 2
  assert lowrank.rank_for_energy(s, 0.8) == 2
  assert lowrank.rank_for_energy(s, 0.9) == 3
  assert lowrank.rank_for_energy(s, 1.0) == 4
  rng = np.random.default_rng(2)
  for _ in range(5):
    sv = np.sort(rng.random(30))[::-1]
    target = rng.uniform(0.05, 1.0)
    r = lowrank.rank_for_energy(sv, target)
    kept = np.cumsum(sv ** 2) / np.sum(sv ** 2)
    assert kept[r - 1] >= target - 1e-12 and (r == 1 or kept[r - 2] < target)


def test_energy_plan_uses_the_kernels_spectra(resnet):
  _, variables, _, _ = resnet
  plan = lowrank.make_plan(variables["params"], _cfg(method="tucker", energy=0.9))
  p = plan[0]
  node = variables["params"]
  for part in p.path.split("/"):
    node = node[part]
  s_in, s_out = lowrank.spectra(node["kernel"], "tucker")
  assert p.ranks == (lowrank.rank_for_energy(s_in, 0.9), lowrank.rank_for_energy(s_out, 0.9))
  assert lowrank.plan_from_json(lowrank.plan_to_json(plan)) == plan


class _TwoLayers(nn.Module):
  """A strided SAME conv and a Dense with bias: the layers' own padding/stride/bias paths."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(6, (3, 3), strides=(2, 2), padding="SAME", use_bias=True, name="conv")(x)
    x = nn.Conv(5, (3, 5), strides=(1, 2), padding=((2, 0), (1, 3)), use_bias=False,
                name="conv_b")(x)
    return nn.Dense(4, name="dense")(x.reshape(x.shape[0], -1)), {}


@pytest.mark.parametrize("method", lowrank.METHODS)
def test_truncated_layers_equal_the_reconstructed_kernels(method):
  """A rank-r factorized layer computes exactly the conv/dense with its rank-r kernel, for
  SAME and asymmetric explicit padding and non-square strides and kernels."""
  model = _TwoLayers()
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 10, 3))
  params = model.init(jax.random.PRNGKey(1), x)["params"]
  cfg = _cfg(method=method, rank=2, include=(".*",), exclude=())
  fm, fp = lowrank.factorized_model(model, params, cfg)
  if method == "tucker":   # parameters are created under jit with the planned shapes
    init = jax.jit(fm.init)(jax.random.PRNGKey(2), x)["params"]
    assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, fp)
  assert {p.path for p in fm.plan} == {"conv", "conv_b", "dense"}
  rebuilt = {k: dict(v) for k, v in fp.items()}
  for p in fm.plan:
    factors = {k: v for k, v in fp[p.path].items() if k != "bias"}
    rebuilt[p.path] = {**{k: v for k, v in fp[p.path].items() if k == "bias"},
                       "kernel": jnp.asarray(lowrank.reconstruct_kernel(factors, p.method),
                                             jnp.float32)}
  want, _ = model.apply({"params": rebuilt}, x)
  got, _ = fm.apply({"params": fp}, x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_factorized_model_fine_tunes(resnet):
  model, variables, x, _ = resnet
  fm, fp = lowrank.factorized_model(model, variables["params"], _cfg(method="spatial", rank=2))
  labels = jnp.array([1, 2])

  def loss(p):
    (logits, _), _ = fm.apply({"params": p, "batch_stats": variables["batch_stats"]}, x,
                              train=True, mutable=["batch_stats"])
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])

  loss_fn = jax.jit(jax.value_and_grad(loss))
  l0, g = loss_fn(fp)
  gv = g["stage2_block1"]["conv1"]["kernel_v"]
  assert gv.shape == fp["stage2_block1"]["conv1"]["kernel_v"].shape
  assert np.all(np.isfinite(gv)) and float(jnp.abs(gv).sum()) > 0
  p = fp
  for _ in range(5):
    _, g = loss_fn(p)
    p = jax.tree.map(lambda a, b: a - 0.05 * b, p, g)
  assert float(loss_fn(p)[0]) < float(l0)


def test_padding_same_root_field_is_forwarded():
  """Factorized forwards the base model's root fields: a `padding="same"` ResNet stays SAME."""
  model = models.get_model("resnet20", 10, width=0.25, padding="same")
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 6, 6, 3))
  variables = _random_variables(model, x, seed=1)
  ref, _ = model.apply(variables, x)
  fm, fp = lowrank.factorized_model(model, variables["params"], _cfg(method="svd", energy=1.0))
  assert fm.padding == "same"
  out, _ = fm.apply({"params": fp, "batch_stats": variables["batch_stats"]}, x)
  np.testing.assert_allclose(out, ref, atol=1e-5 * float(jnp.abs(ref).max()) + 1e-6)


def test_transform_reports_factor_params(resnet):
  model, variables, _, _ = resnet
  cfg = _cfg(method="svd", param_fraction=0.5)
  fm, fp = lowrank.factorized_model(model, variables["params"], cfg)
  t = lowrank.transform_from_config(cfg, fp, None)
  assert t.apply(fp, t.init(fp, None)) is fp
  want = lowrank.plan_summary(fm.plan)["factorized_params"]
  assert t.metrics(fp, {})["lowrank_factor_params"] == want


# ----------------------------------------------------------------------------- errors


def test_rank_too_large_names_layer_and_max(resnet):
  _, variables, _, _ = resnet
  with pytest.raises(ConfigError, match=r"lowrank\.rank.*stage1_block0/conv1.*max rank 4"):
    lowrank.make_plan(variables["params"], _cfg(method="svd", rank=5))
  with pytest.raises(ConfigError, match=r"max rank \(4, 4\)"):
    lowrank.make_plan(variables["params"], _cfg(method="tucker", rank=5))


@pytest.mark.parametrize("kw, key", [
    ({"energy": 1.5}, "lowrank.energy"),
    ({"energy": -0.2}, "lowrank.energy"),
    ({"param_fraction": 2.0}, "lowrank.param_fraction"),
    ({"rank": -1}, "lowrank.rank"),
    ({"rank": 2, "energy": 0.9}, "lowrank.rank"),
    ({}, "lowrank.param_fraction"),
    ({"method": "cp", "rank": 2}, "lowrank.method"),
    ({"rank": 2, "include": ("nothing_matches",)}, "lowrank.include"),
])
def test_bad_config_is_config_error(resnet, kw, key):
  _, variables, _, _ = resnet
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    lowrank.make_plan(variables["params"], _cfg(**kw))


def test_energy_outside_unit_interval_and_unknown_key():
  with pytest.raises(ConfigError, match="lowrank.energy"):
    lowrank.rank_for_energy([1.0, 0.5], 0.0)
  c = _cfg(rank=2)
  c.ranks = 3
  with pytest.raises(ConfigError, match="lowrank.ranks"):
    lowrank.validate_lowrank(c)


def test_energy_needs_weights_not_shapes(resnet):
  _, variables, _, _ = resnet
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables["params"])
  with pytest.raises(ConfigError, match="init_from"):
    lowrank.make_plan(abstract, _cfg(energy=0.9))
  assert lowrank.make_plan(abstract, _cfg(param_fraction=0.5))   # shapes suffice
