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

Two optional hooks (None when a method has no use for them):

  params, state = t.calibrate(params, state, ctx)   # once, on a fresh run, after
                                          # init and before step 0, with data: SNIP
                                          # scores, Q-CNN's calibration batches,
                                          # activation ranges (`CalibrationContext`)
  figures = t.metrics(params, state)      # {name: scalar}: sparsity, bits, ...;
                                          # logged with the train metrics and
                                          # written into results.json at the end

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


class CalibrationContext(NamedTuple):
  """What `ParamTransform.calibrate` may use: the model, data and a loss.

  - model: the Flax module; `model.apply({"params": p, "batch_stats": batch_stats},
    images, train=False)` returns `(logits, features)`.
  - batch_stats: the model's BatchNorm statistics at calibration time.
  - batches: a list of training batches (dicts with "image" float32 NHWC and
    "label" int32), `config.calibration_batches` of them.
  - loss_fn: `loss_fn(params, batch) -> scalar` cross-entropy of the model with
    `params` in train mode (for gradient-based scores: `jax.grad(loss_fn)`).
  - config: the whole experiment config.
  """
  model: Any
  batch_stats: PyTree
  batches: list
  loss_fn: Callable[[PyTree, dict], jax.Array]
  config: Any


class ParamTransform(NamedTuple):
  """A compression method over a parameter tree (see the module docstring)."""
  init: Callable[[PyTree, jax.Array], PyTree]
  apply: Callable[[PyTree, PyTree], PyTree]
  update: Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, PyTree]]
  export: Callable[[PyTree, PyTree], Any]
  calibrate: Callable[[PyTree, PyTree, CalibrationContext], tuple[PyTree, PyTree]] | None = None
  metrics: Callable[[PyTree, PyTree], dict] | None = None


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

  def calibrate(params, state, ctx):
    new_states = []
    for t, s in zip(transforms, state):
      if t.calibrate is not None:
        params, s = t.calibrate(params, s, ctx)
      new_states.append(s)
    return params, tuple(new_states)

  def metrics(params, state):
    out = {}
    for t, s in zip(transforms, state):
      if t.metrics is not None:
        out.update(t.metrics(params, s))
      params = t.apply(params, s)
    return out

  has_calibrate = any(t.calibrate is not None for t in transforms)
  has_metrics = any(t.metrics is not None for t in transforms)
  return ParamTransform(init, apply, update, export,
                        calibrate if has_calibrate else None,
                        metrics if has_metrics else None)


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
