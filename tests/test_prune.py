"""Pruning: exact mask counts, ties, scopes, N:M, schedules, masks in training, sparse export."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jcompress import config as config_lib
from jcompress import metrics
from jcompress import prune
from jcompress import sensitivity as sens_lib
from jcompress import train
from jcompress import transforms
from jcompress.errors import ConfigError

pytestmark = pytest.mark.plumbing


def _params(seed=0):
  r = np.random.RandomState(seed)
  f = lambda *s: r.randn(*s).astype(np.float32)  # noqa: E731
  return {
      "stem_conv": {"kernel": f(3, 3, 3, 8)},
      "block/conv1": {"kernel": f(3, 3, 8, 16)},
      "block/bn1": {"scale": np.ones(16, np.float32), "bias": np.zeros(16, np.float32)},
      "block/conv2": {"kernel": f(1, 1, 16, 12)},
      "fc": {"kernel": f(12, 20), "bias": f(20)},
      "head": {"kernel": f(20, 10), "bias": f(10)},
  }


def _by_path(tree):
  return dict(zip(transforms.leaf_paths(tree), jax.tree.leaves(tree)))


SELECTED = ("block/conv1/kernel", "block/conv2/kernel", "fc/kernel")


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("s", [0.0, 0.29, 0.5, 0.9, 0.999])
def test_layerwise_removes_exactly_floor_s_n_and_keeps_the_largest(s):
  params = _params()
  masks = _by_path(prune.prune_mask_tree(params, s))
  flat = _by_path(params)
  for path, m in masks.items():
    m = np.asarray(m)
    assert m.dtype == bool and m.shape == flat[path].shape
    if path not in SELECTED:
      assert m.all(), path   # stem, head, biases, BatchNorm untouched
      continue
    n = m.size
    assert (~m).sum() == math.floor(round(s * 1000) * n / 1000), path
    w = np.abs(flat[path]).reshape(-1)
    if (~m).any() and m.any():
      assert w[m.reshape(-1)].min() >= w[~m.reshape(-1)].max()


def test_decimal_floor_count():
  w = {"a": {"kernel": np.arange(1, 101, dtype=np.float32).reshape(10, 10)}}
  m = prune.prune_mask_tree(w, 0.29, exclude=())
  assert int((~np.asarray(m["a"]["kernel"])).sum()) == 29   # 0.29 * 100 is 28.999... in binary
  np.testing.assert_array_equal(np.asarray(m["a"]["kernel"]).reshape(-1), np.arange(100) >= 29)


def test_ties_keep_lower_flat_index_first():
  w = {"a": {"kernel": np.ones((4, 5), np.float32)}}
  m = np.asarray(prune.prune_mask_tree(w, 0.6, exclude=())["a"]["kernel"]).reshape(-1)
  np.testing.assert_array_equal(m, np.arange(20) < 8)
  # Ties in the middle: the larger index of equal scores goes first.
  w = {"a": {"kernel": np.array([[3, 1, 2, 1], [1, 5, 1, 4]], np.float32)}}
  m = np.asarray(prune.prune_mask_tree(w, 0.5, exclude=())["a"]["kernel"]).reshape(-1)
  np.testing.assert_array_equal(m, [1, 0, 1, 0, 0, 1, 0, 1])
  w = {"a": {"kernel": np.array([[3, 1, 2, 1], [1, 5, 1, 4]], np.float32)}}
  m = np.asarray(prune.prune_mask_tree(w, 0.25, exclude=())["a"]["kernel"]).reshape(-1)
  np.testing.assert_array_equal(m, [1, 1, 1, 1, 0, 1, 0, 1])   # ones at 1, 3, 4, 6: 6, 4 go


def test_uniform_equals_layerwise_and_per_layer_mapping():
  params = _params()
  a = _by_path(prune.prune_mask_tree(params, 0.7, scope="uniform"))
  b = _by_path(prune.prune_mask_tree(params, 0.7, scope="layerwise"))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  m = _by_path(prune.prune_mask_tree(params, {"fc/kernel": 0.5, r"conv1": 0.25}))
  assert (~np.asarray(m["fc/kernel"])).sum() == 120
  assert (~np.asarray(m["block/conv1/kernel"])).sum() == 288
  assert np.asarray(m["block/conv2/kernel"]).all()


def test_global_removes_floor_s_total_with_scores_normalised_per_tensor():
  r = np.random.RandomState(1)
  base = np.abs(r.randn(16, 16)).astype(np.float32)
  # b is a 100x copy of a: after dividing by each tensor's mean, both rank identically,
  # so each loses exactly half of the global removals.
  params = {"a": {"kernel": base}, "b": {"kernel": 100 * base}}
  m = prune.prune_mask_tree(params, 0.5, scope="global", exclude=())
  ra, rb = (int((~np.asarray(m[k]["kernel"])).sum()) for k in "ab")
  assert ra + rb == 256
  assert ra == rb == 128
  # Exact total on unequal tensors.
  m = _by_path(prune.prune_mask_tree(_params(), 0.83, scope="global"))
  total = sum(m[p].size for p in SELECTED)
  assert sum(int((~np.asarray(m[p])).sum()) for p in SELECTED) == math.floor(0.83 * total)
  # Global ranking: within a tensor the smallest magnitudes go.
  w = _by_path(_params())
  for p in SELECTED:
    kept, cut = np.abs(w[p])[np.asarray(m[p])], np.abs(w[p])[~np.asarray(m[p])]
    assert kept.min() >= cut.max()


def test_erk_closed_form_and_capping():
  shapes = [(3, 3, 16, 16), (3, 3, 16, 32), (32, 10), (1, 1, 16, 32)]
  s = 0.8
  sp = prune.erk_sparsities(shapes, s)
  n = np.array([math.prod(x) for x in shapes], float)
  raw = np.array([sum(x) / math.prod(x) for x in shapes])
  d = 1 - np.array(sp)
  assert np.isclose(np.sum(d * n), (1 - s) * n.sum())
  dense = d >= 1 - 1e-12
  assert dense.any()   # the small Dense layer (density would exceed 1) is kept dense
  free = ~dense
  ratio = d[free] / raw[free]
  np.testing.assert_allclose(ratio, ratio[0], rtol=1e-9)   # density proportional to r_l
  assert np.all(raw[dense] * ratio[0] >= 1)
  # Without capping: density exactly eps * r_l for every layer.
  sp = prune.erk_sparsities([(3, 3, 64, 64), (3, 3, 64, 128)], 0.9)
  n = np.array([36864, 73728.0])
  raw = np.array([134 / 36864, 198 / 73728])
  eps = 0.1 * n.sum() / (raw * n).sum()
  np.testing.assert_allclose(1 - np.array(sp), eps * raw, rtol=1e-12)
  # In prune_mask_tree: each layer loses floor(s_l n_l).
  params = {"c1": {"kernel": np.random.RandomState(0).randn(3, 3, 64, 64).astype(np.float32)},
            "c2": {"kernel": np.random.RandomState(1).randn(3, 3, 64, 128).astype(np.float32)}}
  m = prune.prune_mask_tree(params, 0.9, scope="erk", exclude=())
  for (k, sl), nl in zip(zip(("c1", "c2"), sp), n):
    assert int((~np.asarray(m[k]["kernel"])).sum()) == math.floor(sl * nl)


@pytest.mark.parametrize("n_m", ["2:4", "1:4", "3:8"])
def test_n_m_keeps_the_n_largest_of_each_group_along_input(n_m):
  n, m = (int(v) for v in n_m.split(":"))
  r = np.random.RandomState(2)
  params = {"conv": {"kernel": r.randn(3, 3, 16, 6).astype(np.float32)},
            "dense": {"kernel": r.randn(24, 5).astype(np.float32)}}
  masks = prune.prune_mask_tree(params, None, n_m=n_m, exclude=())
  for name, axis_shape in (("conv", (3, 3, 16 // m, m, 6)), ("dense", (24 // m, m, 5))):
    w = np.abs(params[name]["kernel"]).reshape(axis_shape)
    k = np.asarray(masks[name]["kernel"]).reshape(axis_shape)
    gaxis = len(axis_shape) - 2
    np.testing.assert_array_equal(k.sum(gaxis), n)   # exactly N per group
    # kept entries are the N largest of the group
    order = np.sort(w, axis=gaxis)
    nth = np.take(order, m - n, axis=gaxis)          # smallest kept value
    np.testing.assert_array_equal(k, w >= np.expand_dims(nth, gaxis))
  # Ties: lower input index kept.
  tie = {"d": {"kernel": np.ones((8, 2), np.float32)}}
  k = np.asarray(prune.prune_mask_tree(tie, 0.5, n_m="2:4", exclude=())["d"]["kernel"])
  np.testing.assert_array_equal(k[:, 0], [1, 1, 0, 0, 1, 1, 0, 0])


def test_saliency_is_abs_w_times_g_and_random_is_exact_and_keyed():
  w = {"a": {"kernel": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)}}
  g = {"a": {"kernel": np.array([[4.0, 1.0], [1.0, 0.1]], np.float32)}}   # |wg| = 4, 2, 3, .4
  m = prune.prune_mask_tree(w, 0.5, criterion="saliency", grads=g, exclude=())
  np.testing.assert_array_equal(m["a"]["kernel"], [[True, False], [True, False]])
  p = _params()
  a = prune.prune_mask_tree(p, 0.6, criterion="random", rng=jax.random.PRNGKey(3))
  b = prune.prune_mask_tree(p, 0.6, criterion="random", rng=jax.random.PRNGKey(3))
  c = prune.prune_mask_tree(p, 0.6, criterion="random", rng=jax.random.PRNGKey(4))
  for x, y, z, path in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(c),
                           transforms.leaf_paths(a)):
    np.testing.assert_array_equal(x, y)
    if path in SELECTED:
      assert (~np.asarray(x)).sum() == math.floor(0.6 * x.size)
      assert not np.array_equal(x, z)


def test_inputs_not_modified_and_masks_tighten():
  p = _params()
  before = jax.tree.map(np.copy, p)
  m1 = prune.prune_mask_tree(p, 0.5, criterion="random", rng=jax.random.PRNGKey(0))
  m2 = prune.prune_mask_tree(p, 0.7, masks=m1)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)
  for path, a, b in zip(transforms.leaf_paths(m1), jax.tree.leaves(m1), jax.tree.leaves(m2)):
    a, b = np.asarray(a), np.asarray(b)
    assert not (b & ~a).any()   # never revived
    if path in SELECTED:
      assert (~b).sum() == math.floor(0.7 * b.size)


@pytest.mark.parametrize("kwargs, match", [
    ({"sparsity": 1.0}, "'sparsity'"),
    ({"sparsity": -0.1}, "'sparsity'"),
    ({"sparsity": None, "n_m": "4:4"}, "'n_m'"),
    ({"sparsity": None, "n_m": "2:x"}, "'n_m'"),
    ({"sparsity": 0.9, "n_m": "2:4"}, "'sparsity'"),
    ({"sparsity": None, "n_m": "2:5"}, "block/conv1/kernel"),
    ({"sparsity": 0.5, "include": "nothing_matches"}, "include"),
    ({"sparsity": 0.5, "criterion": "hessian"}, "'criterion'"),
    ({"sparsity": 0.5, "scope": "blockwise"}, "'scope'"),
    ({"sparsity": 0.5, "criterion": "saliency"}, "grads"),
    ({"sparsity": {"fc": 1.5}}, "fc/kernel"),
])
def test_bad_input_names_the_key_or_layer(kwargs, match):
  s = kwargs.pop("sparsity")
  with pytest.raises(ConfigError, match=match):
    prune.prune_mask_tree(_params(), s, **kwargs)


# ----------------------------------------------------------------------------- schedules


def test_schedules_closed_form():
  ev = prune.pruning_schedule("gradual", 0.9, begin_step=10, end_step=110, frequency=25,
                              initial_sparsity=0.1)
  assert [t for t, _ in ev] == [10, 35, 60, 85, 110]
  for t, s in ev:
    assert np.isclose(s, 0.9 + (0.1 - 0.9) * (1 - (t - 10) / 100) ** 3)
  assert ev[-1][1] == 0.9
  ev = prune.pruning_schedule("gradual", 0.5, begin_step=0, end_step=50, frequency=20)
  assert [t for t, _ in ev] == [0, 20, 40, 50]   # the end is an event
  ev = prune.pruning_schedule("iterative", 0.875, begin_step=5, frequency=10, rounds=3)
  assert [t for t, _ in ev] == [5, 15, 25]
  np.testing.assert_allclose([s for _, s in ev], [0.5, 0.75, 0.875])   # halve survivors
  assert prune.pruning_schedule("oneshot", 0.3, begin_step=7) == [(7, 0.3)]
  with pytest.raises(ConfigError, match="'prune.end_step'"):
    prune.pruning_schedule("gradual", 0.5, begin_step=10, end_step=5, prefix="prune.")
  with pytest.raises(ConfigError, match="'prune.schedule'"):
    prune.pruning_schedule("cosine", 0.5, prefix="prune.")
  with pytest.raises(ConfigError, match="'frequency'"):
    prune.pruning_schedule("gradual", 0.5, end_step=5, frequency=0)


# ----------------------------------------------------------------------------- training


def _mlp_params(seed=0):
  r = np.random.RandomState(seed)
  return {"l1": {"kernel": r.randn(8, 32).astype(np.float32), "bias": np.zeros(32, np.float32)},
          "l2": {"kernel": (r.randn(32, 4) / 4).astype(np.float32)}}


def _mlp_loss(params, x, y):
  h = jnp.tanh(x @ params["l1"]["kernel"] + params["l1"]["bias"])
  return jnp.mean((h @ params["l2"]["kernel"] - y) ** 2)


def _train(transform, tx, params, steps, calibrate_ctx=None):
  """A jit-compiled train loop shaped like train.make_train_step; returns history."""
  r = np.random.RandomState(0)
  x = jnp.asarray(r.randn(64, 8), jnp.float32)
  y = jnp.asarray(r.randn(64, 4), jnp.float32)
  state = transform.init(params, jax.random.PRNGKey(0))
  if calibrate_ctx is not None:
    params, state = transform.calibrate(params, state, calibrate_ctx)
  opt = tx.init(params)

  @jax.jit
  def step_fn(params, state, opt, step):
    grads = jax.grad(lambda p: _mlp_loss(transform.apply(p, state), x, y))(params)
    updates, opt = tx.update(grads, opt, params)
    params = optax.apply_updates(params, updates)
    params, state = transform.update(params, state, step + 1)
    return params, state, opt

  history = []
  for t in range(steps):
    params, state, opt = step_fn(params, state, opt, jnp.int32(t))
    history.append((params, state))
  return params, state, history


@pytest.mark.parametrize("tx", [optax.sgd(0.1, momentum=0.9), optax.adam(0.05)],
                         ids=["momentum", "adam"])
def test_pruned_weights_stay_exactly_zero_through_training(tx):
  p0 = _mlp_params()
  t = prune.pruning(p0, 0.75, schedule="gradual", begin_step=3, end_step=30, frequency=4,
                    exclude=())
  params, state, history = _train(t, tx, p0, 60)
  prev = None
  for step, (p, s) in enumerate(history, start=1):
    for path in ("l1/kernel", "l2/kernel"):
      w, m = np.asarray(_by_path(p)[path]), np.asarray(_by_path(s["masks"])[path])
      assert (w[~m] == 0).all() and not np.signbit(w[~m]).any(), (step, path)
      if prev is not None:
        assert not (m & ~_by_path(prev)[path]).any()   # masks only tighten
    prev = {k: np.asarray(v) for k, v in _by_path(s["masks"]).items()}
  # After the end step: exactly floor(0.75 n) zeros per layer, held to the last step.
  for p, _ in history[29:]:
    for path, n in (("l1/kernel", 256), ("l2/kernel", 128)):
      assert int((np.asarray(_by_path(p)[path]) == 0).sum()) == math.floor(0.75 * n)
  figures = t.metrics(params, state)
  assert float(figures["sparsity"]) == 0.75 and float(figures["target_sparsity"]) == 0.75
  # The bias is never touched; surviving weights still train.
  assert np.abs(np.asarray(params["l1"]["bias"])).max() > 0
  assert not np.array_equal(history[40][0]["l2"]["kernel"], params["l2"]["kernel"])


def test_gradual_sparsity_follows_the_cubic_schedule():
  p0 = _mlp_params()
  t = prune.pruning(p0, 0.9, schedule="gradual", begin_step=2, end_step=22, frequency=5,
                    exclude=())
  _, _, history = _train(t, optax.sgd(0.05), p0, 30)
  for step, (p, s) in enumerate(history, start=1):
    events = [e for e in (2, 7, 12, 17, 22) if e <= step]
    target = 0.0 if not events else prune.cubic_sparsity(events[-1], 0.9, 2, 22)
    for path, n in (("l1/kernel", 256), ("l2/kernel", 128)):
      zeros = int((np.asarray(_by_path(p)[path]) == 0).sum())
      assert zeros == math.floor(round(target * 1e7) * n / 1e7), (step, path)
    assert np.isclose(float(s["target"]), target, atol=1e-6)


def test_zero_sparsity_changes_nothing():
  p0 = _mlp_params()
  tx = optax.sgd(0.1, momentum=0.9)
  t = prune.pruning(p0, 0.0, schedule="gradual", begin_step=0, end_step=10, frequency=2,
                    exclude=())
  params, state, _ = _train(t, tx, p0, 15)
  ref, _, _ = _train(transforms.identity(), tx, p0, 15)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(a, b)
  assert all(np.asarray(m).all() for m in jax.tree.leaves(state["masks"]))
  assert float(t.metrics(params, state)["sparsity"]) == 0.0


def test_iterative_rewind_resets_survivors_to_the_rewind_weights():
  p0 = _mlp_params()
  t = prune.pruning(p0, 0.75, schedule="iterative", begin_step=10, frequency=10, rounds=2,
                    rewind_step=3, exclude=())
  _, _, history = _train(t, optax.sgd(0.1, momentum=0.9), p0, 25)
  at3 = history[2][0]
  for event in (10, 20):
    p, s = history[event - 1]
    np.testing.assert_array_equal(s["rewind"]["l1"]["kernel"], at3["l1"]["kernel"])
    for path in ("l1/kernel", "l2/kernel", "l1/bias"):
      m = np.asarray(_by_path(s["masks"])[path])
      np.testing.assert_array_equal(np.asarray(_by_path(p)[path]),
                                    np.where(m, np.asarray(_by_path(at3)[path]), 0))
  s = history[-1][1]
  assert int((~np.asarray(s["masks"]["l1"]["kernel"])).sum()) == 192
  assert int((~np.asarray(_by_path(history[12][1]["masks"])["l1/kernel"])).sum()) == 128


def test_snip_calibration_prunes_by_mean_gradient_before_step_0():
  p0 = _mlp_params()
  r = np.random.RandomState(5)
  batches = [{"x": jnp.asarray(r.randn(16, 8), jnp.float32),
              "y": jnp.asarray(r.randn(16, 4), jnp.float32)} for _ in range(3)]
  ctx = transforms.CalibrationContext(model=None, batch_stats={}, batches=batches,
                                      loss_fn=lambda p, b: _mlp_loss(p, b["x"], b["y"]),
                                      config=None)
  t = prune.pruning(p0, 0.8, criterion="snip", schedule="oneshot", exclude=())
  state = t.init(p0, jax.random.PRNGKey(0))
  params, state = t.calibrate(p0, state, ctx)
  grads = jax.tree.map(lambda *g: sum(g) / 3,
                       *[jax.jit(jax.grad(ctx.loss_fn))(p0, b) for b in batches])
  want = prune.prune_mask_tree(p0, 0.8, criterion="saliency", grads=grads, exclude=())
  for a, b in zip(jax.tree.leaves(state["masks"]), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  assert int(state["next_event"]) == 1
  assert float(t.metrics(params, state)["sparsity"]) == (204 + 102) / 384   # floor(0.8 n) each


def test_state_round_trip_through_orbax(tmp_path):
  p0 = _mlp_params()
  t = prune.pruning(p0, 0.6, schedule="oneshot", begin_step=2, exclude=())
  _, state, _ = _train(t, optax.adam(0.01), p0, 3)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(tmp_path, "s"), state)
  ckpt.wait_until_finished()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  back = ckpt.restore(os.path.join(tmp_path, "s"), abstract)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(back)):
    assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(a, b)
  assert int((~np.asarray(back["masks"]["l1"]["kernel"])).sum()) == math.floor(0.6 * 256)


def test_transform_from_config_builds_from_abstract_params_and_validates():
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _params())
  c = config_lib.base_config()
  c.total_steps = 100
  c.prune = prune.default_config()
  c.prune.schedule = "gradual"
  c.prune.end_step = 50
  c.prune.frequency = 10
  t = prune.transform_from_config(c.prune, abstract, c)
  shapes = jax.eval_shape(lambda: t.init(jax.tree.map(jnp.zeros_like, abstract),
                                         jax.random.PRNGKey(0)))
  assert _by_path(shapes["masks"])["fc/kernel"].shape == (12, 20)
  c.prune.end_step = 150
  with pytest.raises(ConfigError, match="'prune.end_step'.*total_steps"):
    prune.transform_from_config(c.prune, abstract, c)
  c.prune.end_step = 50
  for key, value, match in [("sparsity", 1.0, "'prune.sparsity'"),
                            ("criterion", "taylor", "'prune.criterion'"),
                            ("n_m", "3:3", "'prune.n_m'"),
                            ("rewind_step", 10, "'prune.rewind_step'")]:
    bad = prune.default_config()
    bad[key] = value
    with pytest.raises(ConfigError, match=match):
      prune.transform_from_config(bad, abstract, c)
  bad = prune.default_config()
  bad.n_m = "2:4"
  bad.sparsity = 0.5
  bad.include = ("conv2",)
  with pytest.raises(ConfigError, match="block/conv2/kernel"):   # input dim 16 ok, 12? no:
    prune.transform_from_config(bad, {"block/conv2": {"kernel": jax.ShapeDtypeStruct(
        (1, 1, 6, 12), jnp.float32)}}, c)
  bad = prune.default_config()
  bad.unknown = 1
  with pytest.raises(ConfigError, match="'prune.unknown'"):
    prune.transform_from_config(bad, abstract, c)


# ----------------------------------------------------------------------------- export


def test_sparse_encode_roundtrip_and_byte_count():
  r = np.random.RandomState(0)
  w = r.randn(3, 3, 16, 32).astype(np.float32)
  w[np.abs(w) < 1.0] = 0   # about 68% zeros: the bitmask is smaller
  e = prune.sparse_encode(w)
  nnz = int((w != 0).sum())
  assert set(e) == {"bitmask", "values", "shape"}
  assert prune.sparse_bytes(e) == math.ceil(w.size / 8) + 4 * nnz + 4 * 4
  np.testing.assert_array_equal(prune.sparse_decode(e), w)
  w[np.abs(w) < 2.6] = 0   # about 1% left: CSR is smaller
  e = prune.sparse_encode(w)
  nnz = int((w != 0).sum())
  assert set(e) == {"indptr", "indices", "values", "shape"}
  # 32 rows (output channels) of 144 columns: uint8 column indices, indptr in uint8/16.
  assert e["indices"].dtype == np.uint8
  ptr = e["indptr"].dtype.itemsize
  assert prune.sparse_bytes(e) == 33 * ptr + nnz * (1 + 4) + 16
  np.testing.assert_array_equal(prune.sparse_decode(e), w)
  dense = prune.sparse_encode(np.ones((4, 4), np.float32))
  np.testing.assert_array_equal(prune.sparse_decode(dense), np.ones((4, 4)))


def test_export_stores_arrays_only_and_decodes_to_apply():
  p0 = _params()
  t = prune.pruning(p0, 0.9, schedule="oneshot", begin_step=0)
  state = t.init(p0, jax.random.PRNGKey(0))
  params, state = t.update(p0, state, 1)   # the step-0 event, missed without calibrate
  art = t.export(params, state)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(art))
  back = prune.decode_export(art)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(t.apply(params, state))):
    np.testing.assert_array_equal(a, b)
  flat = _by_path(p0)
  want = sum(x.nbytes for path, x in flat.items() if path not in SELECTED)
  formats = {}
  for path in SELECTED:
    shape = flat[path].shape
    n, nnz = flat[path].size, flat[path].size - math.floor(0.9 * flat[path].size)
    bitmask = math.ceil(n / 8) + 4 * nnz + 4 * len(shape)
    csr = (shape[-1] + 1) * 1 + nnz * 1 + 4 * nnz + 4 * len(shape)   # uint8 indptr, indices
    formats[path] = "csr" if csr < bitmask else "bitmask"
    want += min(bitmask, csr)
  assert formats == {"block/conv1/kernel": "csr", "block/conv2/kernel": "bitmask",
                     "fc/kernel": "bitmask"}
  art_flat = _by_path(art["params"])
  assert "block/conv1/kernel/indptr" in art_flat and "fc/kernel/bitmask" in art_flat
  assert metrics.tree_bytes(art) == want


# ----------------------------------------------------------------------------- sensitivity


def test_sensitivity_table_report_and_pick(tmp_path):
  p0 = _params()

  def eval_fn(p):   # closed form: 1 - 0.2 * zeros(conv1) - 0.02 * zeros(fc), as fractions
    z1 = jnp.mean(p["block/conv1"]["kernel"] == 0)
    z2 = jnp.mean(p["fc"]["kernel"] == 0)
    return 1.0 - 0.2 * z1 - 0.02 * z2

  rows = sens_lib.sensitivity(jax.jit(eval_fn), p0, (0.25, 0.5, 0.9), out_dir=str(tmp_path))
  assert rows[0]["layer"] == "dense" and rows[0]["accuracy"] == 1.0
  assert [r["layer"] for r in rows[1:]] == [p for p in sorted(SELECTED) for _ in range(3)]
  for r in rows[1:]:
    frac = math.floor(r["sparsity"] * r["params"]) / r["params"]
    coef = {"block/conv1/kernel": 0.2, "fc/kernel": 0.02}.get(r["layer"], 0.0)
    assert np.isclose(r["drop"], coef * frac, atol=1e-6)
  picked = sens_lib.pick_sparsities(rows, max_drop=0.06)
  assert picked == {"block/conv1/kernel": 0.25, "block/conv2/kernel": 0.9, "fc/kernel": 0.9}
  noisy = [{"layer": "a", "sparsity": 0.5, "drop": 0.0}, {"layer": "a", "sparsity": 0.7,
                                                         "drop": 0.2},
           {"layer": "a", "sparsity": 0.9, "drop": 0.01}]
  assert sens_lib.pick_sparsities(noisy, 0.05) == {"a": 0.5}   # 0.9 lies behind a failure
  masks = _by_path(prune.prune_mask_tree(p0, picked))
  assert (~np.asarray(masks["block/conv1/kernel"])).sum() == 288
  assert os.path.getsize(tmp_path / "sensitivity.png") > 1000
  md = (tmp_path / "sensitivity.md").read_text()
  assert "| block/conv1/kernel | 1152 | 95.00 | 90.00 | 82.01 |" in md
  for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(_params())):
    np.testing.assert_array_equal(a, b)   # the caller's params are untouched


# ----------------------------------------------------------------------------- digits


def _digits_config(data_dir, **prune_keys):
  c = config_lib.base_config()
  c.data = "digits"
  c.data_dir = data_dir
  c.image_size = 0
  c.model = "small_cnn"
  c.width = 0.5
  c.batch_size = 32
  c.eval_batch_size = 360
  c.total_steps = 300
  c.log_every = 50
  c.eval_every = 0
  c.checkpoint_every = 300
  c.optimizer.learning_rate = 0.05
  c.schedule.warmup_steps = 10
  c.prune = prune.default_config()
  for k, v in prune_keys.items():
    c.prune[k] = v
  return c


@pytest.mark.slow
@pytest.mark.parametrize("keys, floor", [
    ({"sparsity": 0.8, "schedule": "gradual", "begin_step": 30, "end_step": 200,
      "frequency": 10}, 0.9),
    ({"sparsity": 0.5, "n_m": "2:4", "schedule": "oneshot", "begin_step": 50}, 0.9),
], ids=["gradual80", "nm24"])
def test_digits_training_reaches_accuracy_floor_at_exact_sparsity(tmp_path, keys, floor):
  import json  # noqa: PLC0415
  c = _digits_config(str(tmp_path / "tfds"), **keys)
  results = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert results["test_accuracy"] >= floor, results
  exp = train.make_experiment(c)
  sizes = [x.size for x, s in zip(jax.tree.leaves(exp.abstract_state.params),
                                  jax.tree.leaves(transforms.select(exp.abstract_state.params)))
           if s]
  want = sum(math.floor(round(keys["sparsity"] * 100) * n / 100) for n in sizes) / sum(sizes)
  assert abs(results["sparsity"] - want) < 1e-6, results
  assert results["model_bytes"] < results["float_bytes"]
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    logged = [json.loads(line) for line in f if "sparsity" in line]
  assert logged[-1]["sparsity"] == pytest.approx(want)


def test_per_layer_sparsities_in_training():
  p0 = _mlp_params()
  t = prune.pruning(p0, {"l1": 0.5, "l2": 0.25}, schedule="iterative", begin_step=2,
                    frequency=3, rounds=2, exclude=())
  _, _, history = _train(t, optax.sgd(0.05), p0, 8)
  first, last = history[2][1]["masks"], history[-1][1]["masks"]
  s1 = 1 - math.sqrt(0.5)   # round 1 of 2 toward 0.5; l2 scaled by 0.25 / 0.5
  assert int((~np.asarray(first["l1"]["kernel"])).sum()) == math.floor(s1 * 256)
  assert int((~np.asarray(first["l2"]["kernel"])).sum()) == math.floor(s1 / 2 * 128)
  assert int((~np.asarray(last["l1"]["kernel"])).sum()) == 128
  assert int((~np.asarray(last["l2"]["kernel"])).sum()) == 32


def test_n_m_gradual_removes_whole_weights_per_group_and_reports_what_it_reached():
  p0 = _mlp_params()
  t = prune.pruning(p0, 0.5, n_m="2:4", schedule="gradual", begin_step=1, end_step=9,
                    frequency=4, exclude=())
  _, _, history = _train(t, optax.sgd(0.05), p0, 10)
  # Events at 1, 5, 9: s = 0, 0.4375, 0.5 -> floor(s / 0.5 * 2) = 0, 1, 2 removed per group.
  for step, per_group in ((1, 0), (5, 1), (9, 2)):
    p, s = history[step - 1]
    groups = np.asarray(s["masks"]["l1"]["kernel"]).reshape(2, 4, 32)
    np.testing.assert_array_equal(groups.sum(1), 4 - per_group)
    assert float(s["target"]) == per_group / 4
    assert float(t.metrics(p, s)["sparsity"]) == per_group / 4
