"""The ParamTransform protocol, `chain`, and leaf selection by path pattern.

A compression method that acts during training is a `ParamTransform`, shaped
like an optax `GradientTransformation`:

  state = t.init(params, rng)
  eff = t.apply(params, state)            # the weights the forward pass sees;
                                          # gradients flow (straight-through)
                                          # onto the latent float `params`
  params, state = t.update(params, state, step)   # after each optimizer step:
                                          # masks tighten on a schedule, codebooks
                                          # move, latent weights are projected
                                          # (clipped to [-1, 1], pruned weights
                                          # held at zero)
  artifact = t.export(params, state)      # the compressed artifact

`update` returns the params as well as the state (DESIGN.md has it return the
state alone) because several methods must project the latent weights after the
optimizer has moved them, and one hook for both keeps the train step to one
line per phase.

Leaves are named by their path, `/`-joined: `stage1_block0/conv1/kernel`.
`select` turns include/exclude regular expressions into a boolean tree; by
default only kernels (ndim >= 2) are selected and the first convolution
(`stem_conv`) and the classifier (`head`) are excluded, as the literature does.
"""

from __future__ import annotations

import re
from typing import Any
from typing import Callable
from typing import NamedTuple
from typing import Sequence

import jax

from jcompress.errors import ConfigError

PyTree = Any

#: Paths excluded by default: the first convolution and the classifier.
DEFAULT_EXCLUDE = (r"(^|/)stem_conv/", r"(^|/)head/")


class ParamTransform(NamedTuple):
  """A compression method over a parameter tree (see the module docstring)."""
  init: Callable[[PyTree, jax.Array], PyTree]
  apply: Callable[[PyTree, PyTree], PyTree]
  update: Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, PyTree]]
  export: Callable[[PyTree, PyTree], Any]


def identity() -> ParamTransform:
  """No compression: the forward pass sees the params as they are."""
  return ParamTransform(
      init=lambda params, rng: {},
      apply=lambda params, state: params,
      update=lambda params, state, step: (params, state),
      export=lambda params, state: {"params": params},
  )


def chain(*transforms: ParamTransform) -> ParamTransform:
  """Composes transforms: `apply` runs them in order, each on the last's output.

  The state is a tuple with one entry per transform. `export` returns the list
  of the transforms' artifacts, the i-th exported from the weights that the
  first i transforms produce.
  """
  if len(transforms) == 1:
    return transforms[0]

  def init(params, rng):
    rngs = jax.random.split(rng, len(transforms))
    states = []
    for t, r in zip(transforms, rngs):
      states.append(t.init(params, r))
      params = t.apply(params, states[-1])
    return tuple(states)

  def apply(params, state):
    for t, s in zip(transforms, state):
      params = t.apply(params, s)
    return params

  def update(params, state, step):
    new_states = []
    for t, s in zip(transforms, state):
      params, s = t.update(params, s, step)
      new_states.append(s)
    return params, tuple(new_states)

  def export(params, state):
    artifacts = []
    for t, s in zip(transforms, state):
      artifacts.append(t.export(params, s))
      params = t.apply(params, s)
    return artifacts

  return ParamTransform(init, apply, update, export)


def path_str(path: Sequence[Any]) -> str:
  """A key path from `jax.tree_util` as `a/b/kernel`."""
  parts = []
  for entry in path:
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return "/".join(parts)


def leaf_paths(tree: PyTree) -> list[str]:
  """The `/`-joined paths of the leaves of `tree`, in tree order."""
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def map_with_path(fn: Callable[[str, Any], Any], tree: PyTree, *rest: PyTree) -> PyTree:
  """`jax.tree.map` whose function also receives the leaf's `/`-joined path."""
  return jax.tree_util.tree_map_with_path(lambda p, x, *r: fn(path_str(p), x, *r), tree, *rest)


def select(params: PyTree,
           include: str | Sequence[str] = (r".*",),
           exclude: str | Sequence[str] = DEFAULT_EXCLUDE,
           kernels_only: bool = True,
           key: str = "include") -> PyTree:
  """A boolean tree: True where a leaf's path matches `include` and not `exclude`.

  Patterns are regular expressions searched in the `/`-joined path. With
  `kernels_only`, leaves of fewer than 2 dimensions (biases, BatchNorm scales)
  are never selected. A selection that matches no leaf raises ConfigError
  naming `key` (the config key that holds the pattern) and listing the paths.
  """
  include = (include,) if isinstance(include, str) else tuple(include)
  exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
  inc = [re.compile(p) for p in include]
  exc = [re.compile(p) for p in exclude]

  def pick(path, leaf):
    if kernels_only and getattr(leaf, "ndim", 0) < 2:
      return False
    return any(r.search(path) for r in inc) and not any(r.search(path) for r in exc)

  mask = map_with_path(pick, params)
  if not any(jax.tree_util.tree_leaves(mask)):
    paths = leaf_paths(params)
    shown = ", ".join(paths[:12]) + (", ..." if len(paths) > 12 else "")
    raise ConfigError(
        f"config key '{key}': the patterns include={list(include)} exclude={list(exclude)} "
        f"select no {'kernel ' if kernels_only else ''}leaf; leaves are: {shown}")
  return mask
