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

`plan_for_flops` ranks channels globally by importance normalised by its group's mean (or cuts a
uniform fraction per group) until `count_flops` (multiply-accumulates of convs and dense
layers) is at most `flops_target` times the original.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any
from typing import Iterable
from typing import Mapping
from typing import Sequence

import jax
from jax.extend import core as jex_core
import jax.numpy as jnp
import numpy as np
import optax

from jcompress.errors import ConfigError

PyTree = Any
LeafKey = tuple  # (collection, path tuple)

CRITERIA = ("l1", "bn", "taylor")
METHODS = ("global", "uniform")

_ELEMENTWISE = frozenset("""
    add sub mul div max min neg abs sign exp exp2 log log1p expm1 tanh logistic sqrt rsqrt cbrt
    integer_pow pow square floor ceil round erf erfc erf_inv sin cos tan atan2 rem nextafter
    convert_element_type copy copy_p select_n clamp eq ne gt ge lt le and or not xor is_finite
    reduce_precision add_any stop_gradient imag real conj sinh cosh asinh acosh atanh asin acos
    atan square
""".split())


# ----------------------------------------------------------------------------- the graph


@dataclasses.dataclass(frozen=True)
class Layer:
  """A conv or dense layer seen in the trace (per image: the batch is divided out).

  `macs(cin, cout) = spatial * kernel_area * (cin / groups) * cout` multiply-accumulates, with
  `groups = cout` for a depthwise conv (its in-features per group stay 1)."""
  path: str              # module path, e.g. "stage1_block0/conv1"
  leaf: LeafKey          # ("params", (..., "kernel"))
  kind: str              # "conv", "depthwise", "dense", "other"
  in_axis: int           # kernel axis of the input features
  out_axis: int          # kernel axis of the output features
  cin: int
  cout: int
  groups: int
  spatial: int           # output positions per image (1 for dense)
  kernel_area: int

  def macs(self, cin: int | None = None, cout: int | None = None) -> int:
    cin = self.cin if cin is None else cin
    cout = self.cout if cout is None else cout
    if self.kind == "depthwise":
      return self.spatial * self.kernel_area * cout
    return self.spatial * self.kernel_area * (cin // max(self.groups, 1)) * cout


@dataclasses.dataclass
class Group:
  """Channels that exist or disappear together.

  `slots[(leaf, axis)]` is an int array (size, m): the indices along `axis` of `leaf` that
  channel c of the group occupies (m is 1 except where a channel is read twice). Channel c is
  ordered by its index in the group's lead conv (`name`)."""
  name: str
  size: int
  slots: dict
  prunable: bool
  reason: str = ""

  def paths(self, kind: str) -> list[str]:
    """Module paths of the group's producers ("out"), consumers ("in") or vectors ("vec")."""
    return sorted({_path(leaf) for (leaf, axis), k in self.kinds.items() if k == kind})

  kinds: dict = dataclasses.field(default_factory=dict)   # (leaf, axis) -> "out"/"in"/"vec"


@dataclasses.dataclass
class ChannelGraph:
  """The dependency groups and the layers of a model (see the module docstring)."""
  groups: dict          # name -> Group (prunable and protected ones)
  layers: dict          # module path -> Layer
  input_shape: tuple

  @property
  def prunable(self) -> dict:
    return {k: g for k, g in self.groups.items() if g.prunable}

  def flops(self, removed: Mapping[str, int] | None = None) -> int:
    """MACs per image after removing `removed[group]` channels of each group."""
    cin, cout = self._widths(removed or {})
    return int(sum(layer.macs(cin[p], cout[p]) for p, layer in self.layers.items()))

  def _widths(self, removed: Mapping[str, int]) -> tuple[dict, dict]:
    cin = {p: layer.cin for p, layer in self.layers.items()}
    cout = {p: layer.cout for p, layer in self.layers.items()}
    by_leaf = {layer.leaf: p for p, layer in self.layers.items()}
    for name, n in removed.items():
      group = self.groups[name]
      for (leaf, axis), idx in group.slots.items():
        p = by_leaf.get(leaf)
        if p is None:
          continue
        if axis == self.layers[p].out_axis:
          cout[p] -= n * idx.shape[1]
        elif axis == self.layers[p].in_axis:
          cin[p] -= n * idx.shape[1]
    return cin, cout


def _path(leaf: LeafKey) -> str:
  return "/".join(leaf[1][:-1])


def _leaf_str(leaf: LeafKey) -> str:
  return "/".join(leaf[1])


class _UnionFind:

  def __init__(self):
    self.parent: list[int] = []
    self.desc: list[tuple] = []
    self.protected: dict[int, str] = {}
    self.index: dict[tuple, int] = {}

  def atom(self, desc: tuple) -> int:
    """The atom of `desc`, created on first use (shared weights share atoms); "other" atoms
    are always fresh."""
    if desc[0] != "other" and desc in self.index:
      return self.index[desc]
    a = len(self.parent)
    self.parent.append(a)
    self.desc.append(desc)
    if desc[0] != "other":
      self.index[desc] = a
    return a

  def find(self, a: int) -> int:
    root = a
    while self.parent[root] != root:
      root = self.parent[root]
    while self.parent[a] != root:
      self.parent[a], a = root, self.parent[a]
    return root

  def union(self, a: int, b: int) -> None:
    ra, rb = self.find(a), self.find(b)
    if ra != rb:
      self.parent[max(ra, rb)] = min(ra, rb)

  def protect(self, labels, reason: str) -> None:
    if labels is None:
      return
    for a in np.unique(np.asarray(labels)):
      if a >= 0:
        self.protected.setdefault(int(a), reason)


def _sub_jaxpr(eqn):
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = eqn.params.get(key)
    if isinstance(sub, jex_core.ClosedJaxpr):
      return sub.jaxpr, sub.consts
    if isinstance(sub, jex_core.Jaxpr):
      return sub, ()
  return None


def _suffix_match(old_shape, lab_ndim, new_shape):
  """(k, m): the smallest k >= lab_ndim and m with prod(old[-k:]) == prod(new[-m:])."""
  for k in range(max(lab_ndim, 1), len(old_shape) + 1):
    target = math.prod(old_shape[len(old_shape) - k:])
    for m in range(1, len(new_shape) + 1):
      p = math.prod(new_shape[len(new_shape) - m:])
      if p == target:
        return k, m
      if p > target:
        break
  return None


class _Tracer:
  """Propagates channel labels through a jaxpr (see the module docstring)."""

  def __init__(self):
    self.uf = _UnionFind()
    self.layers: dict[str, Layer] = {}
    self.misused: set = set()

  # labels -------------------------------------------------------------------------------

  def fresh_protected(self, shape, reason):
    if not shape or shape[-1] <= 1:
      return None
    lab = np.array([self.uf.atom(("other", reason, 0, i)) for i in range(shape[-1])])
    self.uf.protect(lab, reason)
    return lab

  def channel_labels(self, lab, c: int, what: str):
    """The (c,) labels of the last axis, or -1s (protecting a label that varies elsewhere)."""
    if lab is None:
      return np.full((c,), -1)
    if lab.ndim == 1:
      return lab
    flat = lab.reshape(-1, c)
    if (flat == flat[:1]).all():
      return flat[0]
    self.uf.protect(lab, f"{what}: channels mixed with another axis")
    return np.full((c,), -1)

  def combine(self, labs, shape, reason="elementwise"):
    """Union position-wise after broadcasting to a common suffix of `shape`."""
    labs = [lab for lab in labs if lab is not None]
    if not labs:
      return None
    r = max(lab.ndim for lab in labs)
    suffix = tuple(shape[len(shape) - r:])
    try:
      labs = [np.broadcast_to(lab, suffix) for lab in labs]
    except ValueError:
      for lab in labs:
        self.uf.protect(lab, reason)
      return self.fresh_protected(shape, reason)
    out = labs[0].copy()
    for lab in labs[1:]:
      both = (out >= 0) & (lab >= 0)
      if both.any():
        pairs = np.unique(np.stack([out[both], lab[both]], -1), axis=0)
        for a, b in pairs:
          self.uf.union(int(a), int(b))
      out = np.where(out >= 0, out, lab)
    return out

  def unknown(self, eqn, ins, reason=None):
    reason = reason or f"primitive {eqn.primitive.name}"
    for lab in ins:
      self.uf.protect(lab, reason)
    return [self.fresh_protected(tuple(v.aval.shape), reason) for v in eqn.outvars]

  # the walk -----------------------------------------------------------------------------

  def run(self, jaxpr, in_labels, in_origins, consts=()):
    env: dict = {}
    origin: dict = {}

    def read(v):
      if isinstance(v, jex_core.Literal):
        return None, None
      return env.get(v), origin.get(v)

    for v, c in zip(jaxpr.constvars, consts):
      env[v] = self.fresh_protected(np.shape(c), "constant") if np.ndim(c) else None
    for v, lab, org in zip(jaxpr.invars, in_labels, in_origins):
      env[v], origin[v] = lab, org
    for eqn in jaxpr.eqns:
      pairs = [read(v) for v in eqn.invars]
      ins = [p[0] for p in pairs]
      orgs = [p[1] for p in pairs]
      outs, out_orgs = self.eqn(eqn, ins, orgs)
      for v, lab, org in zip(eqn.outvars, outs, out_orgs):
        env[v] = lab
        if org is not None:
          origin[v] = org
    outs = [read(v) for v in jaxpr.outvars]
    return [o[0] for o in outs], [o[1] for o in outs]

  def eqn(self, eqn, ins, orgs):
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    shapes_in = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
    out_shape = tuple(eqn.outvars[0].aval.shape) if n_out else ()
    sub = _sub_jaxpr(eqn)
    if sub is not None:
      jaxpr, consts = sub
      if len(jaxpr.invars) == len(ins):
        return self.run(jaxpr, ins, orgs, consts)
      return self.unknown(eqn, ins), [None] * n_out
    if name == "conv_general_dilated" and orgs[1] is not None:
      return [self.conv(eqn, ins, orgs)], [None]
    if name == "dot_general" and orgs[1] is not None and orgs[0] is None:
      return [self.dense(eqn, ins, orgs)], [None]
    for org in orgs:
      if org is not None and name not in ("convert_element_type", "copy", "copy_p"):
        self.misused.add(org)
    if name in ("convert_element_type", "copy", "copy_p") and orgs[0] is not None:
      return [ins[0]], [orgs[0]]
    if name in _ELEMENTWISE:
      return [self.combine(ins, out_shape)], [None]
    if all(lab is None for lab in ins) and name != "iota":
      return [None] * n_out, [None] * n_out
    handler = getattr(self, "op_" + name, None)
    if handler is None:
      return self.unknown(eqn, ins), [None] * n_out
    outs = handler(eqn, ins, shapes_in, out_shape)
    return outs, [None] * n_out

  def conv(self, eqn, ins, orgs):
    leaf = orgs[1]
    dn = eqn.params["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    x_shape = tuple(eqn.invars[0].aval.shape)
    k_shape = tuple(eqn.invars[1].aval.shape)
    z_shape = tuple(eqn.outvars[0].aval.shape)
    nd = len(x_shape)
    g = int(eqn.params["feature_group_count"])
    out_axis, in_axis = rhs_spec[0], rhs_spec[1]
    cin, cout, per_group = x_shape[lhs_spec[1]], k_shape[out_axis], k_shape[in_axis]
    spatial_axes = [a for a in range(len(k_shape)) if a not in (out_axis, in_axis)]
    area = math.prod(k_shape[a] for a in spatial_axes)
    spatial = math.prod(z_shape[a] for a in out_spec[2:])
    path = _path(leaf)
    ok = (lhs_spec[1] == nd - 1 and out_spec[1] == nd - 1
          and eqn.params.get("batch_group_count", 1) == 1)
    depthwise = g > 1 and g == cin and per_group == 1 and cout == g
    kind = "conv" if g == 1 else ("depthwise" if depthwise else "other")
    self.layers[path] = Layer(path, leaf, kind, in_axis, out_axis, cin, cout, g, spatial, area)
    out = np.array([self.uf.atom(("out", leaf, out_axis, j)) for j in range(cout)])
    if not ok or kind == "other":
      reason = f"layer {path}: grouped or unusual convolution"
      self.uf.protect(ins[0], reason)
      self.uf.protect(out, reason)
      return out
    x = self.channel_labels(ins[0], cin, f"layer {path}")
    if depthwise:
      for j in range(cout):
        if x[j] >= 0:
          self.uf.union(int(out[j]), int(x[j]))
    else:
      for i in range(cin):
        a = self.uf.atom(("in", leaf, in_axis, i))
        if x[i] >= 0:
          self.uf.union(a, int(x[i]))
    return out

  def dense(self, eqn, ins, orgs):
    leaf = orgs[1]
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    x_shape = tuple(eqn.invars[0].aval.shape)
    k_shape = tuple(eqn.invars[1].aval.shape)
    path = _path(leaf)
    if lb or rb or len(k_shape) != 2 or tuple(lc) != (len(x_shape) - 1,) or len(rc) != 1:
      return self.unknown(eqn, ins, f"layer {path}: unusual dot_general")[0]
    in_axis = int(rc[0])
    out_axis = 1 - in_axis
    cin, cout = k_shape[in_axis], k_shape[out_axis]
    self.layers[path] = Layer(path, leaf, "dense", in_axis, out_axis, cin, cout, 1,
                              math.prod(x_shape[1:-1]) if len(x_shape) > 2 else 1, 1)
    x = self.channel_labels(ins[0], cin, f"layer {path}")
    for i in range(cin):
      a = self.uf.atom(("in", leaf, in_axis, i))
      if x[i] >= 0:
        self.uf.union(a, int(x[i]))
    return np.array([self.uf.atom(("out", leaf, out_axis, j)) for j in range(cout)])

  # shape ops ----------------------------------------------------------------------------

  def op_reshape(self, eqn, ins, shapes_in, out_shape):
    lab = ins[0]
    if lab is None:
      return [None]
    match = _suffix_match(shapes_in[0], lab.ndim, out_shape)
    if match is None:
      return self.unknown(eqn, ins, "reshape mixing channels with other axes")
    k, m = match
    old = shapes_in[0]
    new = np.broadcast_to(lab, old[len(old) - k:]).reshape(out_shape[len(out_shape) - m:])
    if _squeeze_shape(new.shape) != _squeeze_shape(lab.shape):
      self.uf.protect(lab, "reshape of the channel axis (channel shuffle)")
    return [new]

  op_squeeze = op_reshape

  def op_broadcast_in_dim(self, eqn, ins, shapes_in, out_shape):
    lab = ins[0]
    if lab is None:
      return [None]
    a = len(shapes_in[0])
    r = lab.ndim
    dims = list(eqn.params["broadcast_dimensions"])[a - r:]
    k0 = min(dims) if dims else len(out_shape)
    view = [1] * (len(out_shape) - k0)
    for j, ax in enumerate(dims):
      view[ax - k0] = lab.shape[j]
    return [np.broadcast_to(lab.reshape(view), out_shape[k0:]).copy()]

  def op_transpose(self, eqn, ins, shapes_in, out_shape):
    lab = ins[0]
    perm = tuple(eqn.params["permutation"])
    nd = len(perm)
    for r in range(lab.ndim, nd + 1):
      if set(perm[nd - r:]) == set(range(nd - r, nd)):
        full = np.broadcast_to(lab, shapes_in[0][nd - r:])
        local = [p - (nd - r) for p in perm[nd - r:]]
        new = full.transpose(local)
        if local != sorted(local) and lab.size > 1:
          self.uf.protect(lab, "transpose of the channel axis (channel shuffle)")
        return [new]
    return self.unknown(eqn, ins, "transpose mixing channels with other axes")

  def _along(self, labs, shapes, axis, nd):
    r = max([nd - axis] + [lab.ndim for lab in labs if lab is not None])
    return [np.full(s[nd - r:], -1) if lab is None else np.broadcast_to(lab, s[nd - r:])
            for lab, s in zip(labs, shapes)], r

  def op_concatenate(self, eqn, ins, shapes_in, out_shape):
    d = int(eqn.params["dimension"])
    nd = len(out_shape)
    rmax = max(lab.ndim for lab in ins if lab is not None)
    if d < nd - rmax:
      return [self.combine(ins, out_shape, "concatenate")]
    labs, r = self._along(ins, shapes_in, d, nd)
    for lab in ins:
      self.uf.protect(lab, "concatenation along channels")
    return [np.concatenate(labs, axis=d - (nd - r))]

  def op_split(self, eqn, ins, shapes_in, out_shape):
    d = int(eqn.params["axis"])
    nd = len(shapes_in[0])
    lab = ins[0]
    if d < nd - lab.ndim:
      return [lab] * len(eqn.outvars)
    (full,), r = self._along([lab], shapes_in[:1], d, nd)
    self.uf.protect(lab, "split along channels")
    bounds = np.cumsum([int(s) for s in eqn.params["sizes"]])[:-1]
    return list(np.split(full, bounds, axis=d - (nd - r)))

  def op_slice(self, eqn, ins, shapes_in, out_shape):
    lab = ins[0]
    nd = len(shapes_in[0])
    start = eqn.params["start_indices"]
    limit = eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * nd
    cut = [a for a in range(nd) if (start[a], limit[a], strides[a]) != (0, shapes_in[0][a], 1)]
    label_cut = [a for a in cut if a >= nd - lab.ndim]
    if not label_cut:
      return [lab]
    (full,), r = self._along([lab], shapes_in[:1], min(label_cut), nd)
    self.uf.protect(lab, "slice of the channel axis")
    index = tuple(slice(start[a], limit[a], strides[a]) for a in range(nd - r, nd))
    return [full[index]]

  def _reduce(self, eqn, ins, axes):
    lab = ins[0]
    nd = len(eqn.invars[0].aval.shape)
    if any(a >= nd - lab.ndim for a in axes):
      return self.unknown(eqn, ins, f"{eqn.primitive.name} over the channel axis")
    return [lab]

  def op_reduce_sum(self, eqn, ins, shapes_in, out_shape):
    return self._reduce(eqn, ins, eqn.params["axes"])

  op_reduce_max = op_reduce_min = op_reduce_prod = op_reduce_sum

  def op_reduce_window_max(self, eqn, ins, shapes_in, out_shape):
    lab = ins[0]
    nd = len(shapes_in[0])
    p = eqn.params
    for a in range(nd - lab.ndim, nd):
      if (p["window_dimensions"][a] != 1 or p["window_strides"][a] != 1
          or tuple(p["padding"][a]) != (0, 0)):
        return self.unknown(eqn, ins, "pooling over the channel axis")
    return [lab]

  op_reduce_window_min = op_reduce_window_sum = op_reduce_window_max

  def op_pad(self, eqn, ins, shapes_in, out_shape):
    lab = ins[0]
    nd = len(shapes_in[0])
    config = eqn.params["padding_config"]
    if any(tuple(config[a]) != (0, 0, 0) for a in range(nd - lab.ndim, nd)):
      return self.unknown(eqn, ins, "padding of the channel axis")
    return [lab]


def _squeeze_shape(shape):
  return tuple(s for s in shape if s != 1)


def _leaf_dict(tree: PyTree, collection: str) -> dict:
  return {(collection, tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def default_input_shape(params: PyTree, image_size: int = 32) -> tuple:
  """(1, image_size, image_size, C): C from the `stem_conv` kernel's input axis (else 3)."""
  try:
    channels = int(np.shape(params["stem_conv"]["kernel"])[2])
  except (KeyError, TypeError, IndexError):
    channels = 3
  return (1, image_size, image_size, channels)


def _float_convs(model):
  """`model` with a BNN's binary convolutions computed as float32 convolutions (its
  `binary_compute` set to "f32": the same values). The jaxpr walkers here follow and count
  `conv_general_dilated`; the XNOR-popcount forward (`binary_compute="xnor"`, what "auto"
  trains with on a CPU) has none."""
  if getattr(model, "binary_compute", None) not in (None, "f32"):
    return model.clone(binary_compute="f32")
  return model


def build_graph(model, params: PyTree, batch_stats: PyTree | None = None,
                input_shape: Sequence[int] | None = None) -> ChannelGraph:
  """Traces `model.apply` (eval mode, abstract shapes) and returns its dependency groups.

  Args:
    model: a Flax module returning `(logits, features)`.
    params, batch_stats: its variables (arrays or `jax.ShapeDtypeStruct`s).
    input_shape: NHWC input to trace with; default `default_input_shape(params)`.
  """
  batch_stats = batch_stats or {}
  model = _float_convs(model)
  input_shape = tuple(input_shape or default_input_shape(params))
  variables = {"params": params, "batch_stats": batch_stats}
  spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), variables)
  x_spec = jax.ShapeDtypeStruct(input_shape, jnp.float32)

  def logits_fn(v, x):
    return model.apply(v, x, train=False)[0]

  closed = jax.make_jaxpr(logits_fn)(spec, x_spec)
  tracer = _Tracer()
  uf = tracer.uf
  leaves = {**_leaf_dict(params, "params"), **_leaf_dict(batch_stats, "batch_stats")}
  flat_keys = list(_leaf_dict(variables["params"], "params")) + list(
      _leaf_dict(variables["batch_stats"], "batch_stats"))
  # The jaxpr's inputs are the flattened (variables, x): params then batch_stats (dict order).
  flat_vars = jax.tree_util.tree_flatten_with_path(spec)[0]
  keys = [(str(getattr(p[0], "key", p[0])),
           tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in p[1:]))
          for p, _ in flat_vars]
  assert set(keys) == set(flat_keys) and len(keys) == len(leaves)
  in_labels, in_origins = [], []
  for key in keys:
    shape = np.shape(leaves[key])
    if len(shape) == 1:
      in_labels.append(np.array([uf.atom(("vec", key, 0, j)) for j in range(shape[0])]))
      in_origins.append(None)
    elif len(shape) >= 2:
      in_labels.append(None)
      in_origins.append(key)
    else:
      in_labels.append(None)
      in_origins.append(None)
  image = np.array([uf.atom(("input", None, 0, c)) for c in range(input_shape[-1])])
  uf.protect(image, "input image channels")
  in_labels.append(image)
  in_origins.append(None)
  outs, _ = tracer.run(closed.jaxpr, in_labels, in_origins, closed.consts)
  for lab in outs:
    uf.protect(lab, "reaches the logits")
  return _make_groups(tracer, leaves, input_shape)


def _make_groups(tracer: _Tracer, leaves: dict, input_shape) -> ChannelGraph:
  uf = tracer.uf
  classes: dict[int, list[int]] = collections.defaultdict(list)
  for a in range(len(uf.parent)):
    classes[uf.find(a)].append(a)
  kernel_layers = {layer.leaf: layer for layer in tracer.layers.values()}
  by_signature: dict = {}
  for atoms in classes.values():
    slots: dict = collections.defaultdict(list)
    kinds: dict = {}
    reason = ""
    for a in atoms:
      kind, leaf, axis, index = uf.desc[a]
      if a in uf.protected and not reason:
        reason = uf.protected[a]
      if kind in ("input", "other"):
        continue
      slots[(leaf, axis)].append(index)
      kinds[(leaf, axis)] = kind
      if leaf in tracer.misused and not reason:
        reason = f"kernel {_leaf_str(leaf)} is used outside a conv/dense"
      if kind == "in" and leaf not in kernel_layers and not reason:
        reason = f"{_leaf_str(leaf)} is read in an unexpected way"
    outs = [a for a in atoms if uf.desc[a][0] == "out"]
    if not outs:
      continue   # the image channels, or constants: nothing to prune
    if not reason and any(uf.desc[a][1] not in kernel_layers for a in outs):
      reason = "output of an untraced layer"
    lead = min(outs)
    lead_leaf, lead_axis, lead_index = uf.desc[lead][1:]
    signature = (lead_leaf, lead_axis,
                 tuple(sorted((k, len(v)) for k, v in slots.items())))
    entry = by_signature.setdefault(signature, {"classes": [], "kinds": kinds, "reasons": []})
    entry["classes"].append((lead_index, {k: sorted(v) for k, v in slots.items()}))
    if reason:
      entry["reasons"].append(reason)
  groups: dict[str, Group] = {}
  for (lead_leaf, _, _), entry in sorted(by_signature.items(), key=lambda kv: (
      min(uf.index[("out", kv[0][0], kv[0][1], c[0])] for c in kv[1]["classes"]))):
    members = sorted(entry["classes"], key=lambda c: c[0])
    slots = {k: np.array([c[1][k] for c in members]) for k in members[0][1]}
    name = _path(lead_leaf)
    if name in groups:
      suffix = 1
      while f"{name}#{suffix}" in groups:
        suffix += 1
      name = f"{name}#{suffix}"
    reason = entry["reasons"][0] if entry["reasons"] else ""
    groups[name] = Group(name, len(members), slots, prunable=not reason, reason=reason,
                         kinds=dict(entry["kinds"]))
  return ChannelGraph(groups, dict(tracer.layers), tuple(input_shape))


# ----------------------------------------------------------------------------- FLOPs


def count_flops(model, input_shape: Sequence[int], params: PyTree | None = None,
                batch_stats: PyTree | None = None) -> int:
  """Multiply-accumulates of every convolution and dot product of `model.apply` (eval mode).

  Counted from the jaxpr: a convolution costs `prod(out.shape) * prod(kernel spatial) *
  (C_in / groups)`, a `dot_general` `prod(out.shape) * prod(contracted sizes)`. BatchNorm,
  activations, additions and pooling are not counted (the usual convention of pruning papers,
  whose "FLOPs" are MACs). `input_shape` is NHWC (or HWC, counted for one image). Without
  `params` the model is initialised abstractly.
  """
  input_shape = tuple(input_shape)
  model = _float_convs(model)
  if len(input_shape) == 3:
    input_shape = (1, *input_shape)
  x_spec = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  if params is None:
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False),
                               x_spec)
  else:
    variables = {"params": params, "batch_stats": batch_stats or {}}
    if batch_stats is None:
      shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x_spec)
      variables["batch_stats"] = shapes.get("batch_stats", {})
  spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), variables)
  closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False)[0])(spec, x_spec)
  return int(_jaxpr_macs(closed.jaxpr))


def _jaxpr_macs(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      dn = eqn.params["dimension_numbers"]
      k = eqn.invars[1].aval.shape
      spatial = math.prod(k[a] for a in dn.rhs_spec[2:])
      total += math.prod(eqn.outvars[0].aval.shape) * spatial * k[dn.rhs_spec[1]]
    elif name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      x = eqn.invars[0].aval.shape
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(x[a] for a in lc)
    sub = _sub_jaxpr(eqn)
    if sub is not None:
      total += _jaxpr_macs(sub[0])
  return total


def count_params(params: PyTree) -> int:
  """Number of scalars in `params`."""
  return int(sum(math.prod(np.shape(x)) for x in jax.tree.leaves(params)))


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

  `grads` (for "taylor"): a list of gradient trees of the loss w.r.t. `params`, one per batch
  (`taylor_grads` computes them).
  """
  check_criterion(criterion, key)
  leaves = _leaf_dict(params, "params")
  grad_leaves = [_leaf_dict(g, "params") for g in grads or ()]
  if criterion == "taylor" and not grad_leaves:
    raise ConfigError(f"config key '{key}': criterion 'taylor' needs calibration batches "
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
    and the consumers' input axes (convs, and the dense `head`) are cut to match.

  Raises:
    ConfigError: an unknown or protected group, an index out of range, or a keep that would
      remove every filter of a layer.
  """
  graph = graph or build_graph(model, params, batch_stats, input_shape)
  keep = _check_keep(graph, keep, params, key)
  remove = _removals(graph, keep)

  def delete(a, axis, idx):
    return jnp.asarray(np.delete(np.asarray(a), idx, axis=axis))

  new_params = _rebuild(params, "params", remove, delete)
  new_stats = _rebuild(batch_stats or {}, "batch_stats", remove, delete)
  removed = {name: graph.groups[name].size - kept.size for name, kept in keep.items()}
  _, cout = graph._widths(removed)   # noqa: SLF001
  override = {p: int(cout[p]) for p, layer in graph.layers.items() if layer.kind == "conv"}
  for p, n in override.items():
    if n < 1:
      raise ConfigError(f"config key '{key}': pruning would remove every filter of layer {p}")
  if check:
    _check_pruned_shapes(model, override, new_params, new_stats, graph.input_shape)
  return override, new_params, new_stats


def with_channels(model, channels: Mapping[str, int] | Sequence):
  """`model` with its `channels` field replaced (ConfigError if it has none)."""
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
  the whole group), inside the search: the global ranking is aimed at a lower target until the
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
    if criterion == "taylor":
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

  def rounded(removed):
    if round_to == 1:
      return removed
    out = {}
    for n, r in removed.items():
      size = groups[n].size
      if r == 0 or size <= round_to:
        out[n] = 0 if size <= round_to else r   # a group narrower than k is kept whole
        continue
      kept = min(size, -(-(size - r) // round_to) * round_to)
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
    eff = []
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
  c.criterion = "l1"          # l1 | bn | taylor
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
  max_prune_ratio, round_to}`; "taylor" uses `calibration_batches`, dicts with "image" and "label"),
  removes the channels, and returns
  `(config with model_kwargs.channels set, new_params, new_batch_stats, report)`. The returned
  config is a copy; `model_kwargs.channels` is a sorted tuple of (conv path, width) pairs (JSON:
  a list of pairs, which `dict()` reads back). `report` holds flops/params before and after,
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
    new_config.model_kwargs.channels = tuple(sorted(override.items()))
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
