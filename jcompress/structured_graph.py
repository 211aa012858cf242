"""The channel graph of a Flax model, traced from its jaxpr: which convolutions, BatchNorms and
dense layers share channels (groups that must be pruned together), and the FLOP and parameter
counts of a model. `jcompress.structured` plans and removes filters over this graph."""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any
from typing import Mapping
from typing import Sequence

import jax
from jax.extend import core as jex_core
import jax.numpy as jnp
import numpy as np

PyTree = Any
LeafKey = tuple  # (collection, path tuple)

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
  `groups = cout` for a depthwise conv (its in-features per group stay 1). An "act" layer is a
  product of two activations (attention's `q k^T` and `probs v`): `cout` is its number of
  batch slices (one per head), each costing `spatial` MACs."""
  path: str              # module path, e.g. "stage1_block0/conv1" ("dot_general#k": "act")
  leaf: LeafKey          # ("params", (..., "kernel")); None for "act"
  kind: str              # "conv", "depthwise", "dense", "other", "act"
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
    if self.kind == "act":
      return self.spatial * cout
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
  #: "act" layer path -> {group name: batch slices (heads) of the layer per channel of the group}
  act: dict = dataclasses.field(default_factory=dict)

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
    for p, links in self.act.items():
      for name, per in links.items():
        cout[p] -= removed.get(name, 0) * per
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
    self.act: dict[str, np.ndarray] = {}      # "act" layer -> (slices,) atom of each slice
    self.reshapes: list[np.ndarray] = []      # (..., a, b) label blocks split from / merged to

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
    if name == "dot_general" and any(org is not None for org in orgs):
      return self.unknown(eqn, ins, "a kernel read by an unusual dot_general"), [None] * n_out
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
      if not lb and not rb and len(lc) == len(rc):
        # e.g. a patch embedding `einsum("nijabc,abcd->nijd")`: counted, never pruned.
        cin = math.prod(k_shape[a] for a in rc)
        cout = math.prod(k_shape[a] for a in range(len(k_shape)) if a not in rc)
        spatial = math.prod(x_shape[a] for a in range(1, len(x_shape)) if a not in lc)
        self.layers[path] = Layer(path, leaf, "other", -1, -1, cin, cout, 1, spatial, 1)
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

  def op_dot_general(self, eqn, ins, shapes_in, out_shape):
    """A product of two activations (attention's `q k^T`, `probs v`): in each batch slice
    (a head) every channel of both operands is one channel, which the slice's output carries.
    The layer's MACs are recorded per slice ("act" layers)."""
    (lc, _), (lb, rb) = eqn.params["dimension_numbers"]
    nb = len(lb)
    x = np.moveaxis(_full(ins[0], shapes_in[0]), list(lb), list(range(nb)))
    y = np.moveaxis(_full(ins[1], shapes_in[1]), list(rb), list(range(nb)))
    batch = x.shape[:nb]
    slices = math.prod(batch)
    x, y = x.reshape(slices, -1), y.reshape(slices, -1)
    rep = np.full((slices,), -1)
    for b in range(slices):
      atoms = np.unique(np.concatenate([x[b], y[b]]))
      atoms = atoms[atoms >= 0]
      for a in atoms[1:]:
        self.uf.union(int(atoms[0]), int(a))
      if atoms.size:
        rep[b] = atoms[0]
    path = f"dot_general#{len(self.act)}"
    per_slice = math.prod(out_shape) // max(slices, 1) * math.prod(
        shapes_in[0][a] for a in lc)
    self.layers[path] = Layer(path, None, "act", -1, -1, 1, slices, 1, per_slice, 1)
    self.act[path] = rep
    out = np.broadcast_to(rep.reshape(batch + (1,) * (len(out_shape) - nb)), out_shape)
    return [_trim(out)]

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
    full = np.broadcast_to(lab, old[len(old) - k:])
    new = full.reshape(out_shape[len(out_shape) - m:])
    a, b = _squeeze_shape(full.shape), _squeeze_shape(new.shape)
    if a != b:
      # Splitting the channel axis into (a, b) (attention's (heads, head_dim)) or merging
      # (a, b) back is kept apart only if every row ends up one channel (a whole head), which
      # `build_graph` checks once every union is known; any other reshape is a shuffle.
      if len(b) >= 2 and b[:-2] == a[:-1] and b[-2] * b[-1] == a[-1]:
        self.reshapes.append(new.reshape(b))
      elif len(a) >= 2 and a[:-2] == b[:-1] and a[-2] * a[-1] == b[-1]:
        self.reshapes.append(full.reshape(a))
      else:
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
        # A shuffle reorders the axes the labels vary along (moving heads past tokens is not).
        varying = [a for a in local if not _constant_along(full, a)]
        if varying != sorted(varying) and lab.size > 1:
          self.uf.protect(lab, "transpose of the channel axis (channel shuffle)")
        return [_trim(new)]
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
    inside = sorted((a - (nd - lab.ndim) for a in axes if a >= nd - lab.ndim), reverse=True)
    if inside and (len(inside) == lab.ndim
                   or not all(_constant_along(lab, a) for a in inside)):
      return self.unknown(eqn, ins, f"{eqn.primitive.name} over the channel axis")
    for a in inside:   # e.g. softmax over the keys of one head's scores: one channel
      lab = np.take(lab, 0, axis=a)
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


def _full(lab, shape) -> np.ndarray:
  """`lab` broadcast to the whole `shape` (-1 where it has no label)."""
  if lab is None:
    return np.full(shape, -1)
  return np.broadcast_to(lab, shape)


def _constant_along(lab: np.ndarray, axis: int) -> bool:
  return bool((lab == np.take(lab, [0], axis=axis)).all())


def _trim(lab: np.ndarray) -> np.ndarray:
  """`lab` without its leading axes along which it is constant (a smaller suffix)."""
  while lab.ndim > 1 and _constant_along(lab, 0):
    lab = lab[0]
  return np.array(lab)


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
  """`model` with every convolution a `conv_general_dilated` in its jaxpr: a BNN's binary
  convolutions computed as float32 convolutions (`binary_compute` "f32") and XLA's own
  convolutions (`conv_impl` "xla"), the same values. The jaxpr walkers here follow and count
  `conv_general_dilated`; the XNOR-popcount forward (`binary_compute="xnor"`, what "auto"
  trains with on a CPU) and the CPU impls' depthwise stencils (`fastconv.depthwise_conv`)
  have none."""
  changes = {}
  if getattr(model, "binary_compute", None) not in (None, "f32"):
    changes["binary_compute"] = "f32"
  if hasattr(model, "conv_impl") and model.conv_impl != "xla":
    changes["conv_impl"] = "xla"
  return model.clone(**changes) if changes else model


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
  for block in tracer.reshapes:
    for row in block.reshape(-1, block.shape[-1]):
      roots = {uf.find(int(a)) for a in row if a >= 0}
      if len(roots) > 1:
        uf.protect(block, "reshape of the channel axis (channel shuffle)")
        break
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
    entry = by_signature.setdefault(signature, {"classes": [], "kinds": kinds, "reasons": [],
                                                "roots": []})
    entry["classes"].append((lead_index, {k: sorted(v) for k, v in slots.items()}))
    entry["roots"].append(uf.find(atoms[0]))
    if reason:
      entry["reasons"].append(reason)
  groups: dict[str, Group] = {}
  group_of: dict[int, str] = {}
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
    for root in entry["roots"]:
      group_of[root] = name
  act = {}
  for path, rep in tracer.act.items():
    counts = collections.Counter(group_of.get(uf.find(int(a))) for a in rep if a >= 0)
    act[path] = {n: c / groups[n].size for n, c in counts.items() if n is not None}
  return ChannelGraph(groups, dict(tracer.layers), tuple(input_shape), act)


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
