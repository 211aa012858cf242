r"""Structured (filter) pruning with physical removal of channels.

Masking a filter to zero (JaxPruner's channel mode) leaves the layer as wide and as slow as it
was. This module removes filters for real: the pruned model is the same Flax class built with the
root field `channels` (`jcompress.models.common`), so every conv is narrower, and
`prune_channels` cuts the parameter and BatchNorm-statistics trees to match.

Dependency groups, found from the model's structure
---------------------------------------------------

Removing output channel `j` of a convolution touches every tensor that carries that channel: the
kernel's output axis, the BatchNorm params and statistics that follow, the input axis of every
conv or dense layer that reads it, and every other conv whose output is *added* to it in a
residual stream. Torch-Pruning's DepGraph (Fang et al. 2023) finds these groups by walking the
autograd graph; here we walk the jaxpr of `model.apply` (eval mode, traced on abstract shapes,
`build_graph`).

Every channel-carrying value `v` in the jaxpr gets a *label array* `L[v]`: an int array shaped
like a suffix of `v.shape` (usually just the last, channel, axis) whose entries are "atoms", and
atoms are merged with a union-find. Atoms are created for

* `('out', kernel, axis, j)`: filter `j` of a conv/dense kernel (its output-feature axis);
* `('in', kernel, axis, i)`: input channel `i` of a conv/dense kernel (its input-feature axis);
* `('vec', leaf, 0, j)`: entry `j` of every 1-D parameter or statistic (BN scale, bias, mean,
  var, a dense bias);
* `('input', -, -, c)` for the image channels and `('other', ...)` for anything we cannot
  follow: these are *protected*.

and propagated as follows (`x`, `y` operands, `z` result):

* conv `z = conv(x, K)`, feature_group_count 1: `L[z] = out(K)`; `union(in(K)_i, L[x]_i)`.
  Depthwise (groups = C_in = C_out): `L[z] = out(K)` and `union(out(K)_j, L[x]_j)` (a
  depthwise filter exists iff its input channel does). Other grouped convs: protected.
* dense `z = x @ W`: `union(in(W)_i, L[x]_i)`, `L[z] = out(W)`.
* elementwise `z = f(x, y, ...)` (add, mul, max, rsqrt, select, ...): labels are broadcast to
  a common suffix and unioned position-wise: `x + y` ties the channels of a residual stream,
  `x * scale` ties BN's gamma to the conv filter, `(x - mean) * rsqrt(var + eps)` its statistics.
* reshape / broadcast / transpose / concatenate / split / slice move the label array exactly
  like the data (a channel shuffle permutes it, a concatenation offsets it). Where one of these
  changes the channel axis itself (concatenation, split, shuffle) the channels involved are
  marked protected: the model's Python code fixes those widths (ShuffleNetV2's halves).
* reductions and pooling over non-channel axes keep the labels; anything else (an unknown
  primitive, a reduction over channels) protects every atom it touches and gives its result
  fresh protected atoms.
* nested jaxprs (`jit`, `custom_jvp_call`, `custom_vjp_call`) are entered.
* a `dot_general` of two activations (attention's `q k^T` over the head width, `probs v` over
  the keys, both batched over the heads): in each batch slice every atom of both operands is
  unioned into one, which the slice's output carries, so a head's query, key and value units,
  and through them the out-projection's input rows, are one channel. Its MACs are counted per
  slice ("act" layers), so removing a head removes its attention products too. A reduction
  over an axis the labels are constant along (softmax over one head's keys) keeps them.
* a reshape splitting the channel axis into (a, b) (the heads, `(H, D/H)`) or merging it back
  is allowed when, once every union is known, each row of b is one channel (a whole head);
  otherwise, and for any other reshape or a transpose reordering the channel axes, the
  channels are protected (a channel shuffle).

Vision Transformers: the groups are every block's heads (`blockN/attn/query`, H channels of
D/H units each) and MLP hidden units (`blockN/mlp/fc1`: fc1's column, its bias, fc2's row);
the token width (the residual stream, normalized by LayerNorm, a reduction over channels) is
protected. The model's `structured_fields` turns the pruned widths into `heads` and
`mlp_dims`; pruning a block down to no head or no MLP unit is a ConfigError naming that field.

The logits' atoms (the classifier's outputs) are protected. Each union-find class is one
"channel" that exists or not as a whole; classes that touch the same set of (leaf, axis) form a
`Group` (one per residual stream, one per inner conv of a block, ...), named after its first
producing conv. A group is prunable when none of its classes is protected and it produces at
least one filter.

Importance (per channel of a group)
-----------------------------------

* `l1` (Li et al. 2017): `s_c = sum over the group's filters f of ||K_f[..., c]||_1`.
* `bn` (network slimming, Liu et al. 2017): `s_c = sum over the group's BN |gamma_c|`; train
  with `slimming_l1_penalty` added to the loss to make it sparse.
* `taylor` (Molchanov et al. 2019): the first-order change of the loss when channel c is zeroed
  after its BNs, `s_c = mean over batches of (sum_{BN in group} gamma_c dL/dgamma_c +
  beta_c dL/dbeta_c)^2`; groups without a BN use the filters' `sum w dL/dw`.
* `gate` (Michel et al. 2019's attention-head importance, "Are Sixteen Heads Really Better
  than One?"): a gate `g_c` multiplies channel c where its consumers read it (a head's output
  before the out-projection, an MLP unit before fc2, a CNN channel before the next conv);
  `s_c = mean over batches of |dL/dg_c|` at g = 1, i.e. `|sum w dL/dw|` over the consumers'
  input rows of c (the producers' filters for a group without consumers).

`plan_for_flops` ranks channels globally by importance normalised by its group's mean (or cuts a
uniform fraction per group) until `count_flops` (multiply-accumulates of convs and dense
layers) is at most `flops_target` times the original.
"""

from __future__ import annotations

import collections
import math
from typing import Any
from typing import Iterable
from typing import Mapping
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jcompress.errors import ConfigError
from jcompress.structured_graph import _ELEMENTWISE  # noqa: F401
from jcompress.structured_graph import ChannelGraph  # noqa: F401
from jcompress.structured_graph import Group  # noqa: F401
from jcompress.structured_graph import Layer  # noqa: F401
from jcompress.structured_graph import LeafKey  # noqa: F401
from jcompress.structured_graph import _float_convs  # noqa: F401
from jcompress.structured_graph import _jaxpr_macs  # noqa: F401
from jcompress.structured_graph import _leaf_dict  # noqa: F401
from jcompress.structured_graph import _leaf_str  # noqa: F401
from jcompress.structured_graph import _make_groups  # noqa: F401
from jcompress.structured_graph import _path  # noqa: F401
from jcompress.structured_graph import _squeeze_shape  # noqa: F401
from jcompress.structured_graph import _sub_jaxpr  # noqa: F401
from jcompress.structured_graph import _suffix_match  # noqa: F401
from jcompress.structured_graph import _Tracer  # noqa: F401
from jcompress.structured_graph import _UnionFind  # noqa: F401
from jcompress.structured_graph import build_graph  # noqa: F401
from jcompress.structured_graph import count_flops  # noqa: F401
from jcompress.structured_graph import count_params  # noqa: F401
from jcompress.structured_graph import default_input_shape  # noqa: F401

PyTree = Any

CRITERIA = ("l1", "bn", "taylor", "gate")
#: Criteria computed from gradients on calibration batches.
_GRADIENT_CRITERIA = ("taylor", "gate")
METHODS = ("global", "uniform")


# ----------------------------------------------------------------------------- importance


def _per_channel(array, axis: int, idx: np.ndarray, fn) -> np.ndarray:
  """fn(array) summed over all axes but `axis`, gathered at idx (size, m) and summed over m."""
  a = np.asarray(array, np.float64)
  v = fn(a).sum(axis=tuple(i for i in range(a.ndim) if i != axis % a.ndim))
  return v[idx].sum(axis=1)


def _is_bn(leaf: LeafKey, name: str) -> bool:
  return leaf[0] == "params" and leaf[1][-1] == name


def check_criterion(criterion: str, key: str = "criterion") -> None:
  if criterion not in CRITERIA:
    raise ConfigError(f"config key '{key}': unknown criterion {criterion!r}; "
                      f"known: {', '.join(CRITERIA)}")


def importance(graph: ChannelGraph, params: PyTree, criterion: str = "l1", *,
               grads: Sequence[PyTree] | None = None, key: str = "criterion") -> dict:
  """{group name: (size,) scores} for every prunable group (see the module docstring).

  `grads` (for "taylor" and "gate"): a list of gradient trees of the loss w.r.t. `params`, one
  per batch (`taylor_grads` computes them).
  """
  check_criterion(criterion, key)
  leaves = _leaf_dict(params, "params")
  grad_leaves = [_leaf_dict(g, "params") for g in grads or ()]
  if criterion in _GRADIENT_CRITERIA and not grad_leaves:
    raise ConfigError(f"config key '{key}': criterion {criterion!r} needs calibration batches "
                      "(gradients of the loss)")
  scores = {}
  for name, group in graph.prunable.items():
    outs = [(k, idx) for k, idx in group.slots.items() if group.kinds[k] == "out"]
    gammas = [(k, idx) for k, idx in group.slots.items() if _is_bn(k[0], "scale")]
    s = np.zeros(group.size)
    if criterion == "l1" or (criterion == "bn" and not gammas):
      for (leaf, axis), idx in outs:
        s += _per_channel(leaves[leaf], axis, idx, np.abs)
    elif criterion == "bn":
      for (leaf, axis), idx in gammas:
        s += _per_channel(leaves[leaf], axis, idx, np.abs)
    elif criterion == "gate":
      # A gate g_c on channel c where its consumers read it: dL/dg_c at g = 1 is the sum of
      # w dL/dw over the consumers' input slices of c (the producers' filters without one).
      ins = [(k, idx) for k, idx in group.slots.items() if group.kinds[k] == "in"] or outs
      for g in grad_leaves:
        t = np.zeros(group.size)
        for (leaf, axis), idx in ins:
          w = np.asarray(leaves[leaf], np.float64)
          t += _per_channel(w * np.asarray(g[leaf], np.float64), axis, idx, lambda a: a)
        s += np.abs(t)
      s /= len(grad_leaves)
    else:
      chosen = [(k, idx) for k, idx in group.slots.items()
                if _is_bn(k[0], "scale") or _is_bn(k[0], "bias")] if gammas else outs
      for g in grad_leaves:
        t = np.zeros(group.size)
        for (leaf, axis), idx in chosen:
          w = np.asarray(leaves[leaf], np.float64)
          t += _per_channel(w * np.asarray(g[leaf], np.float64), axis, idx, lambda a: a)
        s += t ** 2
      s /= len(grad_leaves)
    scores[name] = s
  return scores


def taylor_grads(model, params: PyTree, batch_stats: PyTree, batches: Iterable[dict]) -> list:
  """Gradients of the cross-entropy w.r.t. `params`, one tree per batch (train mode: batch
  statistics in BN, the running ones untouched). Batches are dicts with "image" and "label"."""

  @jax.jit
  def grad_fn(p, images, labels):
    def loss(p):
      (logits, _), _ = model.apply({"params": p, "batch_stats": batch_stats}, images,
                                   train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(
          logits.astype(jnp.float32), labels).mean()
    return jax.grad(loss)(p)

  return [jax.device_get(grad_fn(params, jnp.asarray(b["image"]), jnp.asarray(b["label"])))
          for b in batches]


def slimming_l1_penalty(params: PyTree, weight: float) -> jax.Array:
  """Network slimming's sparsity term `weight * sum over BatchNorm gammas |gamma|`.

  Every 1-D leaf named `scale` is a BN gamma (Flax's BatchNorm). Add it to the task loss (Liu
  et al. 2017 use weight 1e-4 .. 1e-5); jit-safe. Raises ConfigError for a negative weight.
  """
  if not isinstance(weight, (int, float, np.floating)) or weight < 0:
    raise ConfigError(f"slimming_l1_penalty: `weight` must be a number >= 0, got {weight!r}")
  total = jnp.zeros((), jnp.float32)
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    last = path[-1]
    if str(getattr(last, "key", last)) == "scale" and jnp.ndim(leaf) == 1:
      total = total + jnp.sum(jnp.abs(leaf))
  return weight * total


# ----------------------------------------------------------------------------- pruning


def _check_keep(graph: ChannelGraph, keep: Mapping[str, Any], params, key: str) -> dict:
  """{group: sorted unique kept indices}, validated (ConfigError naming the group)."""
  out = {}
  for name, kept in dict(keep).items():
    if name not in graph.groups:
      raise ConfigError(f"config key '{key}': no channel group {name!r}; prunable groups: "
                        f"{', '.join(graph.prunable)}")
    group = graph.groups[name]
    if isinstance(kept, (int, np.integer)) and not isinstance(kept, bool):
      n = int(kept)
      if not 1 <= n <= group.size:
        raise ConfigError(f"config key '{key}': group {name!r} has {group.size} channels; "
                          f"keeping {n} would " + ("remove every filter of the layer"
                                                   if n < 1 else "exceed its width"))
      scores = importance(ChannelGraph({name: group}, graph.layers, graph.input_shape),
                          params, "l1")[name] if group.prunable else np.zeros(group.size)
      kept = np.sort(np.argsort(-scores, kind="stable")[:n])
    kept = np.unique(np.asarray(kept, dtype=np.int64).reshape(-1))
    if kept.size == 0:
      raise ConfigError(f"config key '{key}': pruning group {name!r} would remove every filter "
                        f"of layer {name} (keep at least 1 of {group.size})")
    if kept.min() < 0 or kept.max() >= group.size:
      raise ConfigError(f"config key '{key}': group {name!r} has channels 0..{group.size - 1}, "
                        f"got index {int(kept.max() if kept.max() >= group.size else kept.min())}")
    if kept.size < group.size and not group.prunable:
      raise ConfigError(f"config key '{key}': group {name!r} is protected ({group.reason})")
    out[name] = kept
  return out


def _removals(graph: ChannelGraph, keep: Mapping[str, np.ndarray]) -> dict:
  """{(leaf, axis): sorted indices to delete}."""
  remove: dict = collections.defaultdict(list)
  for name, kept in keep.items():
    group = graph.groups[name]
    drop = np.setdiff1d(np.arange(group.size), kept)
    if drop.size == 0:
      continue
    for slot, idx in group.slots.items():
      remove[slot].extend(idx[drop].reshape(-1).tolist())
  return {k: np.unique(v) for k, v in remove.items()}


def _rebuild(tree: PyTree, collection: str, remove: dict, fn) -> PyTree:
  by_leaf: dict = collections.defaultdict(list)
  for (leaf, axis), idx in remove.items():
    if leaf[0] == collection:
      by_leaf[leaf[1]].append((axis, idx))

  def visit(path, leaf):
    key = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    out = leaf
    for axis, idx in by_leaf.get(key, ()):
      out = fn(out, axis, idx)
    return out
  return jax.tree_util.tree_map_with_path(visit, tree)


def mask_channels(graph: ChannelGraph, params: PyTree, keep: Mapping[str, Any]) -> PyTree:
  """`params` with the channels not kept zeroed in place of removed: the filters and every
  parameter vector of their groups (BN gamma and beta), so each removed channel is exactly 0
  after its BatchNorms in eval mode. Same shapes; the input tree is not modified."""
  keep = _check_keep(graph, keep, params, "keep")
  remove = {k: v for k, v in _removals(graph, keep).items()
            if k[0][0] == "params" and graph.groups and _slot_kind(graph, k) in ("out", "vec")}

  def zero(a, axis, idx):
    a = np.array(a, copy=True)
    index = [slice(None)] * a.ndim
    index[axis] = idx
    a[tuple(index)] = 0
    return jnp.asarray(a)

  return _rebuild(params, "params", remove, zero)


def _slot_kind(graph: ChannelGraph, slot) -> str:
  for group in graph.groups.values():
    if slot in group.kinds:
      return group.kinds[slot]
  return ""


def prune_channels(model, params: PyTree, batch_stats: PyTree, keep: Mapping[str, Any], *,
                   graph: ChannelGraph | None = None, input_shape: Sequence[int] | None = None,
                   check: bool = True, key: str = "keep") -> tuple[dict, PyTree, PyTree]:
  """Physically removes the channels not in `keep`.

  Args:
    model: the (unpruned or already pruned) Flax model; it must have a `channels` field.
    params, batch_stats: its variables (not modified).
    keep: {group name (see `build_graph`): kept channel indices of the group}, or an int n
      (the n channels of largest L1 norm). Groups not named keep every channel.
    graph: `build_graph(model, params, batch_stats, input_shape)` if already computed.
    check: build the pruned model abstractly and verify that every leaf's shape matches.

  Returns:
    (channels_override, new_params, new_batch_stats): `channels_override` maps EVERY
    non-depthwise conv of the model to its new width (depthwise convs follow their input), so
    `get_model(name, ..., channels=channels_override)` builds the pruned architecture, with
    each projection shortcut kept explicitly; the kernel output axes, BN params and statistics,
    and the consumers' input axes (convs, and the dense `head`) are cut to match. A model
    with a `structured_fields(dense widths)` method (the ViT: whole attention heads and MLP
    hidden units) gets those fields instead (`{"heads": ..., "mlp_dims": ...}`);
    `with_channels` builds either.

  Raises:
    ConfigError: an unknown or protected group, an index out of range, or a keep that would
      remove every filter of a layer.
  """
  graph = graph or build_graph(model, params, batch_stats, input_shape)
  hook = getattr(model, "structured_fields", None)
  if hook is not None:
    # The model's own check first: its error names the field (`heads`, `mlp_dims`).
    counts = {}
    for name, kept in dict(keep).items():
      if name in graph.groups:
        if isinstance(kept, (int, np.integer)) and not isinstance(kept, bool):
          counts[name] = int(kept)
        else:
          counts[name] = int(np.unique(np.asarray(kept, dtype=np.int64).reshape(-1)).size)
    hook(_dense_widths(graph, {n: graph.groups[n].size - c for n, c in counts.items()}))
  keep = _check_keep(graph, keep, params, key)
  remove = _removals(graph, keep)

  def delete(a, axis, idx):
    return jnp.asarray(np.delete(np.asarray(a), idx, axis=axis))

  new_params = _rebuild(params, "params", remove, delete)
  new_stats = _rebuild(batch_stats or {}, "batch_stats", remove, delete)
  removed = {name: graph.groups[name].size - kept.size for name, kept in keep.items()}
  if hook is not None:
    override = hook(_dense_widths(graph, removed))
    if check:
      _check_pruned_shapes(model, override, new_params, new_stats, graph.input_shape)
    return override, new_params, new_stats
  _, cout = graph._widths(removed)   # noqa: SLF001
  override = {p: int(cout[p]) for p, layer in graph.layers.items() if layer.kind == "conv"}
  for p, n in override.items():
    if n < 1:
      raise ConfigError(f"config key '{key}': pruning would remove every filter of layer {p}")
  if check:
    _check_pruned_shapes(model, override, new_params, new_stats, graph.input_shape)
  return override, new_params, new_stats


def _dense_widths(graph: ChannelGraph, removed: Mapping[str, int]) -> dict:
  """{dense layer path: output width} after removing `removed[group]` channels per group."""
  _, cout = graph._widths(removed)   # noqa: SLF001
  return {p: int(cout[p]) for p, layer in graph.layers.items() if layer.kind == "dense"}


def model_fields(model, override: Mapping[str, Any]) -> dict:
  """The model fields (config `model_kwargs`) of a pruned model: `{"channels": sorted (conv,
  width) pairs}` for the CNNs, the `structured_fields` of a model that has them (a ViT's
  `heads` and `mlp_dims`)."""
  if getattr(model, "structured_fields", None) is not None:
    return {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in override.items()}
  return {"channels": tuple(sorted(dict(override).items()))}


def with_channels(model, channels: Mapping[str, int] | Sequence):
  """`model` built with the pruned widths `prune_channels` returned: its `channels` field
  replaced, or, for a model with a `structured_fields` method (the ViT), the fields it gave
  (`heads`, `mlp_dims`). ConfigError if it has neither."""
  if getattr(model, "structured_fields", None) is not None:
    return model.clone(**model_fields(model, dict(channels)))
  if not hasattr(model, "channels"):
    raise ConfigError(f"model {type(model).__name__} has no `channels` field: it cannot be built "
                      "with pruned widths")
  return model.clone(channels=tuple(sorted(dict(channels).items())))


def _check_pruned_shapes(model, override, params, batch_stats, input_shape) -> None:
  pruned = with_channels(model, override)
  want = jax.eval_shape(lambda x: pruned.init(jax.random.PRNGKey(0), x, train=False),
                        jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
  have = {"params": params, "batch_stats": batch_stats}
  w = {k: tuple(v.shape) for c in ("params", "batch_stats")
       for k, v in _leaf_dict(want.get(c, {}), c).items()}
  h = {k: tuple(np.shape(v)) for c in ("params", "batch_stats")
       for k, v in _leaf_dict(have[c], c).items()}
  for k in sorted(set(w) | set(h)):
    if w.get(k) != h.get(k):
      raise RuntimeError(f"structured pruning bug: {k[0]}/{_leaf_str(k)} is {h.get(k)} after "
                         f"pruning but the model with the new widths expects {w.get(k)}")


def check_channels(model, channels: Mapping[str, int] | Sequence | None,
                   input_shape: Sequence[int] = (1, 32, 32, 3), key: str = "channels") -> None:
  """ConfigError if `channels` names a conv the model does not have, or a width < 1."""
  if not channels:
    return
  items = dict(channels)
  for path, n in items.items():
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
      raise ConfigError(f"config key '{key}': width of {path!r} must be an int >= 1, got {n!r}")
  base = model.clone(channels=None)
  shapes = jax.eval_shape(lambda x: base.init(jax.random.PRNGKey(0), x, train=False),
                          jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
  convs = {_path(k) for k, v in _leaf_dict(shapes["params"], "params").items()
           if k[1][-1] == "kernel" and len(v.shape) == 4}
  unknown = sorted(set(items) - convs)
  if unknown:
    raise ConfigError(f"config key '{key}': the model has no conv {unknown[0]!r} "
                      f"(its convs: {', '.join(sorted(convs)[:6])}, ...)")


# ----------------------------------------------------------------------------- planning


def check_flops_target(flops_target: Any, key: str = "flops_target") -> float:
  if isinstance(flops_target, bool) or not isinstance(flops_target, (int, float, np.floating)) \
      or not 0.0 < float(flops_target) <= 1.0:
    raise ConfigError(f"config key '{key}': the FLOPs target is the fraction of the original "
                      f"FLOPs to keep, in (0, 1]; got {flops_target!r}")
  return float(flops_target)


def plan_for_flops(model, params: PyTree, batch_stats: PyTree | None = None, *,
                   flops_target: float = 0.5, criterion: str = "l1", method: str = "global",
                   batches: Iterable[dict] | None = None, graph: ChannelGraph | None = None,
                   input_shape: Sequence[int] | None = None, max_prune_ratio: float = 0.8,
                   scores: Mapping[str, np.ndarray] | None = None,
                   keys: Mapping[str, str] | None = None, round_to: int = 1) -> dict:
  """Chooses the channels to keep so that MACs <= flops_target * the original MACs.

  `method="global"`: channels of all prunable groups are ranked together by `s_c / mean(s)` (the
  importance normalised by its group's mean) and removed lowest first, skipping a group once it
  has lost `max_prune_ratio` of its channels (at least one channel always stays), until the
  target is met. `method="uniform"`: the same fraction p of every group is cut (its lowest
  scores), p the smallest that meets the target. Ties break by group then index.
  `round_to=k > 1` rounds the kept channels of every pruned group up to a multiple of k (or
  the whole group; a channel of m units, a ViT head, counts m, so heads of 16 are never
  rounded at k = 8), inside the search: the global ranking is aimed at a lower target until the
  rounded plan meets `flops_target`. CPU and
  accelerator convolutions run markedly faster on channel counts that are multiples of 8.

  Returns {group: sorted kept indices} for `prune_channels`. `keys` maps "flops_target",
  "criterion", "method" to the config keys named in errors.
  """
  keys = {"flops_target": "flops_target", "criterion": "criterion", "method": "method",
          **(keys or {})}
  target = check_flops_target(flops_target, keys["flops_target"])
  check_criterion(criterion, keys["criterion"])
  if method not in METHODS:
    raise ConfigError(f"config key '{keys['method']}': unknown method {method!r}; "
                      f"known: {', '.join(METHODS)}")
  if not 0.0 <= max_prune_ratio < 1.0:
    raise ConfigError(f"max_prune_ratio must be in [0, 1), got {max_prune_ratio!r}")
  graph = graph or build_graph(model, params, batch_stats, input_shape)
  if scores is None:
    grads = None
    if criterion in _GRADIENT_CRITERIA:
      grads = taylor_grads(model, params, batch_stats or {}, list(batches or ()))
    scores = importance(graph, params, criterion, grads=grads, key=keys["criterion"])
  groups = graph.prunable
  base = graph.flops()
  goal = target * base
  limit = {n: min(g.size - 1, int(math.floor(max_prune_ratio * g.size))) for n, g in
           groups.items()}
  order = {n: np.argsort(np.asarray(scores[n]), kind="stable") for n in groups}
  if isinstance(round_to, bool) or not isinstance(round_to, (int, np.integer)) or round_to < 1:
    raise ConfigError(f"round_to must be an int >= 1, got {round_to!r}")

  # Channels per rounding step: k units, a channel of m units (a head) counting m.
  step = {n: round_to // math.gcd(round_to, max(idx.shape[1] for idx in g.slots.values()))
          for n, g in groups.items()}

  def rounded(removed):
    if round_to == 1:
      return removed
    out = {}
    for n, r in removed.items():
      size, k = groups[n].size, step[n]
      if r == 0 or size <= k:
        out[n] = 0 if size <= k else r   # a group narrower than k is kept whole
        continue
      kept = min(size, -(-(size - r) // k) * k)
      out[n] = size - kept
    return out

  if method == "uniform":
    removed = _uniform(graph, groups, limit, goal, rounded)
  else:
    removed = rounded(_global(graph, groups, limit, goal, scores))
    if round_to > 1 and graph.flops(removed) > goal:
      # Rounding up kept channels adds FLOPs back: aim the ranking lower until it fits.
      lo, hi = 0.0, goal
      best = None
      for _ in range(30):
        mid = (lo + hi) / 2
        trial = rounded(_global(graph, groups, limit, mid, scores))
        if graph.flops(trial) <= goal:
          best, lo = trial, mid
        else:
          hi = mid
      removed = best if best is not None else removed
  if graph.flops(removed) > goal * (1 + 1e-9):
    raise ConfigError(
        f"config key '{keys['flops_target']}': {target} is out of reach; pruning at most "
        f"{max_prune_ratio:.0%} of every prunable group leaves "
        f"{graph.flops(removed) / base:.3f} of the FLOPs")
  return {n: np.sort(order[n][removed.get(n, 0):]) for n in groups}


def _uniform(graph, groups, limit, goal, rounded) -> dict:
  def removed_at(p):
    return rounded({n: min(limit[n], int(math.floor(p * g.size))) for n, g in groups.items()})
  lo, hi = 0.0, 1.0
  if graph.flops(removed_at(hi)) > goal:
    return removed_at(hi)
  for _ in range(40):
    mid = (lo + hi) / 2
    if graph.flops(removed_at(mid)) <= goal:
      hi = mid
    else:
      lo = mid
  return removed_at(hi)


def _global(graph, groups, limit, goal, scores) -> dict:
  entries = []
  for gi, name in enumerate(groups):
    s = np.asarray(scores[name], np.float64)
    norm = s / (s.mean() + 1e-12)
    for rank, c in enumerate(np.argsort(s, kind="stable")):
      entries.append((float(norm[c]), gi, rank, name))
  entries.sort()
  removed: dict = collections.defaultdict(int)
  # Incremental MACs: per layer (cin, cout), updated by each removal.
  cin, cout = graph._widths({})   # noqa: SLF001
  by_leaf = {layer.leaf: p for p, layer in graph.layers.items()}
  effects = {}
  for name, group in groups.items():
    eff = [(p, "out", per) for p, links in graph.act.items() for n, per in links.items()
           if n == name]
    for (leaf, axis), idx in group.slots.items():
      p = by_leaf.get(leaf)
      if p is None:
        continue
      layer = graph.layers[p]
      if axis == layer.out_axis:
        eff.append((p, "out", idx.shape[1]))
      elif axis == layer.in_axis:
        eff.append((p, "in", idx.shape[1]))
    effects[name] = eff
  total = graph.flops()
  for _, _, rank, name in entries:
    if total <= goal:
      break
    if removed[name] >= limit[name] or rank != removed[name]:
      continue
    for p, which, m in effects[name]:
      layer = graph.layers[p]
      before = layer.macs(cin[p], cout[p])
      if which == "out":
        cout[p] -= m
      else:
        cin[p] -= m
      total += layer.macs(cin[p], cout[p]) - before
    removed[name] += 1
  return dict(removed)


# ----------------------------------------------------------------------------- config entry


def default_config():
  """The `structured` sub-config: criterion, flops_target, method, max_prune_ratio."""
  import ml_collections  # noqa: PLC0415
  c = ml_collections.ConfigDict()
  c.criterion = "l1"          # l1 | bn | taylor | gate
  c.flops_target = 0.5        # fraction of the original MACs to keep, in (0, 1]
  c.method = "global"         # global | uniform
  c.max_prune_ratio = 0.8     # at most this fraction of one group is removed
  c.round_to = 1              # keep a multiple of this many channels per group (8: faster)
  return c


def apply_to_config(config, params: PyTree, batch_stats: PyTree,
                    calibration_batches: Sequence[dict] | None = None, *,
                    num_classes: int | None = None) -> tuple[Any, PyTree, PyTree, dict]:
  """Prunes a float model as `config.structured` asks; the single entry point for train.py.

  Builds `config.model` (with `config.width` and `config.model_kwargs`) for `params`, plans the
  pruning (`plan_for_flops` with `config.structured.{criterion, flops_target, method,
  max_prune_ratio, round_to}`; "taylor" and "gate" use `calibration_batches`, dicts with "image"
  and "label"),
  removes the channels, and returns
  `(config with model_kwargs.channels set, new_params, new_batch_stats, report)`. The returned
  config is a copy; `model_kwargs.channels` is a sorted tuple of (conv path, width) pairs (JSON:
  a list of pairs, which `dict()` reads back); a ViT gets `model_kwargs.heads` and
  `model_kwargs.mlp_dims` instead (`model_fields`). `report` holds flops/params before and after,
  their ratios, the criterion and the per-group widths.
  """
  from jcompress import models as models_lib  # noqa: PLC0415
  s = config.get("structured")
  if s is None:
    raise ConfigError("config key 'structured' is missing (criterion, flops_target, ...)")
  keys = {"flops_target": "structured.flops_target", "criterion": "structured.criterion",
          "method": "structured.method"}
  check_flops_target(s.get("flops_target", 0.5), keys["flops_target"])
  check_criterion(s.get("criterion", "l1"), keys["criterion"])
  if num_classes is None:
    num_classes = int(np.shape(params["head"]["kernel"])[-1])
  kwargs = dict(config.get("model_kwargs", {}))
  model = models_lib.get_model(config.model, num_classes, width=config.width, **kwargs)
  if calibration_batches:
    shape = np.shape(calibration_batches[0]["image"])
    input_shape = (1, *shape[1:])
  elif config.get("image_size"):
    input_shape = default_input_shape(params, int(config.image_size))
  else:
    input_shape = default_input_shape(params)
  graph = build_graph(model, params, batch_stats, input_shape)
  keep = plan_for_flops(model, params, batch_stats, flops_target=s.get("flops_target", 0.5),
                        criterion=s.get("criterion", "l1"), method=s.get("method", "global"),
                        batches=calibration_batches, graph=graph,
                        max_prune_ratio=s.get("max_prune_ratio", 0.8), keys=keys,
                        round_to=s.get("round_to", 1))
  override, new_params, new_stats = prune_channels(model, params, batch_stats, keep, graph=graph)
  flops_before = graph.flops()
  flops_after = count_flops(with_channels(model, override), input_shape, new_params, new_stats)
  params_before, params_after = count_params(params), count_params(new_params)
  new_config = config.copy_and_resolve_references()
  with new_config.unlocked():
    for field, value in model_fields(model, override).items():
      new_config.model_kwargs[field] = value
  report = {
      "criterion": s.get("criterion", "l1"),
      "method": s.get("method", "global"),
      "flops_target": float(s.get("flops_target", 0.5)),
      "round_to": int(s.get("round_to", 1)),
      "flops_before": int(flops_before),
      "flops_after": int(flops_after),
      "flops_ratio": flops_after / flops_before,
      "params_before": params_before,
      "params_after": params_after,
      "params_ratio": params_after / params_before,
      "group_widths": {n: [graph.groups[n].size, int(k.size)] for n, k in keep.items()},
  }
  return new_config, new_params, new_stats, report
