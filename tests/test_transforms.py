"""ParamTransform composition and leaf selection by path pattern."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcompress import transforms
from jcompress.errors import ConfigError

PARAMS = {
    "stem_conv": {"kernel": jnp.ones((3, 3, 3, 8))},
    "stage1_block0": {"conv1": {"kernel": jnp.ones((3, 3, 8, 8))},
                      "bn1": {"scale": jnp.ones((8,)), "bias": jnp.zeros((8,))}},
    "head": {"kernel": jnp.ones((8, 10)), "bias": jnp.zeros((10,))},
}


def test_paths_are_slash_joined_in_tree_order():
  paths = transforms.leaf_paths(PARAMS)
  assert "stage1_block0/conv1/kernel" in paths
  assert "head/bias" in paths
  assert len(paths) == len(jax.tree.leaves(PARAMS))


def test_select_defaults_exclude_stem_and_head_and_non_kernels():
  sel = transforms.select(PARAMS)
  assert sel["stage1_block0"]["conv1"]["kernel"] is True
  assert sel["stem_conv"]["kernel"] is False
  assert sel["head"]["kernel"] is False
  assert sel["stage1_block0"]["bn1"]["scale"] is False


def test_select_include_exclude_patterns():
  sel = transforms.select(PARAMS, include=r"head", exclude=())
  assert sel["head"]["kernel"] is True and sel["stage1_block0"]["conv1"]["kernel"] is False
  sel = transforms.select(PARAMS, include=".*", exclude=(), kernels_only=False)
  assert all(jax.tree.leaves(sel))


def test_select_nothing_names_the_key_and_lists_leaves():
  with pytest.raises(ConfigError, match=r"config key 'quant.include'.*stage1_block0/conv1/kernel"):
    transforms.select(PARAMS, include="nonexistent", key="quant.include")


def _scale(factor):
  """A toy transform: the forward pass sees params * factor; update counts steps."""
  return transforms.ParamTransform(
      init=lambda p, rng: {"calls": jnp.zeros((), jnp.int32)},
      apply=lambda p, s: jax.tree.map(lambda x: x * factor, p),
      update=lambda p, s, step: (p, {"calls": s["calls"] + 1}),
      export=lambda p, s: {"first_leaf": jax.tree.leaves(p)[0]},
  )


def test_chain_applies_in_order_and_threads_state():
  t = transforms.chain(_scale(2.0), _scale(3.0))
  state = t.init({"w": jnp.ones(2)}, jax.random.PRNGKey(0))
  assert len(state) == 2
  out = t.apply({"w": jnp.ones(2)}, state)
  np.testing.assert_allclose(out["w"], 6.0)
  _, state = t.update({"w": jnp.ones(2)}, state, 1)
  assert [int(s["calls"]) for s in state] == [1, 1]
  art = t.export({"w": jnp.ones(2)}, state)
  # the second transform exports what the first one produced
  np.testing.assert_allclose(art[0]["first_leaf"], 1.0)
  np.testing.assert_allclose(art[1]["first_leaf"], 2.0)


def test_identity_changes_nothing():
  t = transforms.identity()
  s = t.init(PARAMS, jax.random.PRNGKey(0))
  assert t.apply(PARAMS, s) is PARAMS
  assert t.update(PARAMS, s, 3) == (PARAMS, s)
