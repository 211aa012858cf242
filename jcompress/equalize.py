r"""Cross-layer equalization (Nagel et al., "Data-Free Quantization Through Weight Equalization
and Bias Correction", ICCV 2019, section 4.1): per-tensor quantization of networks whose
channels have very different weight ranges (depthwise convolutions: MobileNetV2).

For two consecutive layers, y = W2 f(BN1(W1 x)) with f positively homogeneous per channel
(f(c z) = c f(z) for c > 0: ReLU, the identity of a linear bottleneck, average pooling), scaling
output channel i of layer 1 by 1/s_i and input channel i of layer 2 by s_i leaves the function
unchanged. With r1_i the range (max |w|) of W1's output channel i and r2_i that of W2's input
channel i,

  s_i = sqrt(r1_i r2_i) / r2_i        makes both ranges sqrt(r1_i r2_i),

which maximises the summed relative precision of the two layers' channels under per-tensor
quantization. Pairs are equalized in forward order and the sweep repeats until the scales
settle (a layer may end one pair and start the next: expand -> depthwise -> project).

BatchNorm is not folded: jcompress quantizes the raw kernels and keeps BatchNorm in float, so
the ranges equalized are those of the raw kernels, and BN1 absorbs the 1/s_i exactly. With
a = gamma / sqrt(var + eps), BN1(z) = a (z - mu) + beta, and BN1(z / s) must equal BN1(z) / s:

  gamma' = gamma,   beta' = beta / s + a mu (1 - 1 / s)

(the running statistics stay as they are; a bias of layer 1 is divided by s as well). Exact in
real arithmetic, so the equalized float model computes the same logits up to float32 rounding.

ReLU6 is not positively homogeneous (min(c z, 6) != c min(z, 6)): DFQ replaces it by ReLU before
equalizing, and so does jcompress: MobileNetV2 takes `activation="relu"` (`model_kwargs`), a
model of its own (a float run trained with it, or a ReLU6 run evaluated with ReLU, which changes
its accuracy). A pair is only equalized where that is exact: each candidate (a Conv, its
BatchNorm if any, then the next Conv / Dense whose input has those channels) is probed by
replacing the first layer's output with a random tensor T and with T c (c > 0 per channel) and
checking that (1) the second layer's input scales by c and (2) the logits do not change when the
second layer's input is held fixed, i.e. the first layer reaches the output only through it.
ReLU6 (saturating), a residual addition, a channel shuffle or a second reader fail the probe and
the pair is left alone; a model where no pair passes is a ConfigError naming the key and the
first pair refused with its reason.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jcompress import adaround
from jcompress.errors import ConfigError

PyTree = Any


class Pair(NamedTuple):
  """Two layers equalized together."""
  first: str             # module path of the producing Conv
  bn: str | None         # its BatchNorm (None: the first layer's own bias, or none)
  epsilon: float
  second: str            # module path of the consuming Conv / Dense
  second_kind: str       # "conv", "depthwise" or "dense"


def _get(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree


def _set(tree, path, value):
  head, _, rest = path.partition("/")
  new = dict(tree)
  new[head] = value if not rest else _set(tree[head], rest, value)
  return new


def _candidates(calls) -> tuple[list, list]:
  """(candidate pairs with the index of the call whose output is probed, refusals)."""
  cands, refused = [], []
  for i, c in enumerate(calls):
    if c.kind != "conv":
      continue
    bn = next((j for j in range(i + 1, len(calls))
               if calls[j].kind == "bn" and calls[j].source == i), None)
    out_idx = i if bn is None else bn
    ch = c.out_shape[-1]
    nxt = next((j for j in range(out_idx + 1, len(calls))
                if calls[j].kind in ("conv", "dense")), None)
    if nxt is None:
      continue
    second = calls[nxt]
    name = f"{c.path} -> {second.path}"
    if second.in_shape[-1] != ch:
      refused.append((name, f"'{second.path}' reads {second.in_shape[-1]} channels, "
                            f"'{c.path}' writes {ch}"))
      continue
    kind = second.kind
    if kind == "conv":
      g = int(second.module.feature_group_count)
      if g == ch and second.out_shape[-1] == ch:
        kind = "depthwise"
      elif g != 1:
        refused.append((name, f"'{second.path}' is a grouped convolution"))
        continue
    eps = float(calls[bn].module.epsilon) if bn is not None else 0.0
    cands.append((Pair(c.path, None if bn is None else calls[bn].path, eps, second.path, kind),
                  out_idx, nxt))
  return cands, refused


def _probe_run(model, variables, images, replace_out: dict, replace_in: dict, record: dict):
  """Logits and {(path, slot): input as computed} for the (path, slot) pairs of `record`, with
  image `slot` of the output (`replace_out`) or input (`replace_in`) of a call replaced:
  {path: [(slot, array), ...]}. Image slots never mix in eval mode, so each slot is a probe of
  its own."""
  seen = {}

  def put(v, items):
    for slot, value in items:
      v = v.at[slot].set(value.astype(v.dtype))
    return v

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__" or adaround._kind(context.module) is None:  # noqa: SLF001
      return next_fun(*args, **kwargs)
    path = "/".join(str(p) for p in context.module.scope.path)
    for slot in record.get(path, ()):
      seen[(path, slot)] = args[0][slot]
    if path in replace_in:
      args = (put(args[0], replace_in[path]),) + tuple(args[1:])
    out = next_fun(*args, **kwargs)
    return put(out, replace_out[path]) if path in replace_out else out

  with nn.intercept_methods(interceptor):
    logits, _ = model.apply(variables, images, train=False)
  return logits, seen


def _close(a, b, rtol=1e-5):
  a, b = np.asarray(a), np.asarray(b)
  return bool(np.allclose(a, b, rtol=rtol, atol=rtol * float(np.max(np.abs(b)) + 1e-30)))


def find_pairs(model: nn.Module, params: PyTree, batch_stats: PyTree, images: jax.Array,
               *, seed: int = 0) -> tuple[list[Pair], list[tuple[str, str]]]:
  """The pairs that equalize exactly (see the module docstring), and the refused candidates
  with their reasons. `images`: inputs for the probes (the first is used). Two forward
  passes on a batch with one copy of the image per candidate: in copy k only candidate k's
  tensors are replaced, so that no other replacement cuts the paths under test (one compile)."""
  extra = {} if batch_stats is None else {"batch_stats": batch_stats}
  variables = {"params": params, **extra}
  x1 = jnp.asarray(images[:1])
  calls = adaround.trace_calls(model, variables, x1)
  cands, refused = _candidates(calls)
  if not cands:
    return [], refused
  x = jnp.repeat(x1, len(cands), axis=0)
  rng = np.random.default_rng(seed)
  t, c, record = [], [], {}
  for k, (pair, out_idx, _) in enumerate(cands):
    shape = calls[out_idx].out_shape[1:]
    t.append((10.0 * rng.standard_normal(shape)).astype(np.float32))
    c.append(np.exp(rng.uniform(-2.0, 2.0, shape[-1:])).astype(np.float32))
    record.setdefault(pair.second, []).append(k)
  # run A: the first layer's output replaced by T; run C: by T c, with the second layer's input
  # held at run A's. (1) the second layer's input in C (before it is held) is c times A's;
  # (2) the logits do not change: the first layer reaches the output only through the second.
  @jax.jit
  def probe(variables, x, t, c):
    out_a = {}
    for k, (_, out_idx, _) in enumerate(cands):
      out_a.setdefault(calls[out_idx].path, []).append((k, t[k]))
    logits_a, in_a = _probe_run(model, variables, x, out_a, {}, record)
    out_c = {p: [(k, v * c[k]) for k, v in items] for p, items in out_a.items()}
    in_c = {}
    for k, (pair, _, _) in enumerate(cands):
      in_c.setdefault(pair.second, []).append((k, in_a[(pair.second, k)]))
    logits_c, in_b = _probe_run(model, variables, x, out_c, in_c, record)
    return logits_a, in_a, logits_c, in_b

  logits_a, in_a, logits_c, in_b = jax.device_get(probe(variables, x, t, c))
  pairs = []
  for k, (pair, _, _) in enumerate(cands):
    name = f"{pair.first} -> {pair.second}"
    if not _close(in_b[(pair.second, k)], in_a[(pair.second, k)] * c[k]):
      refused.append((name, "what lies between is not positively homogeneous per channel "
                            "(ReLU6? a residual addition?)"))
    elif not _close(logits_c[k], logits_a[k]):
      refused.append((name, f"the output of '{pair.bn or pair.first}' has another reader (a "
                            "residual connection?)"))
    else:
      pairs.append(pair)
  return pairs, refused


def _in_range(w: np.ndarray, kind: str) -> np.ndarray:
  """max |w| per input channel of the consuming layer."""
  if kind == "dense":
    return np.max(np.abs(w), axis=1)
  if kind == "depthwise":
    return np.max(np.abs(w.reshape(-1, w.shape[-1])), axis=0)
  return np.max(np.abs(np.moveaxis(w, -2, -1).reshape(-1, w.shape[-2])), axis=0)


def _scale_in(w: np.ndarray, s: np.ndarray, kind: str) -> np.ndarray:
  return w * s if kind == "depthwise" else w * s[:, None]   # (.., C_in, C_out) / (in, out)


def equalize_pair(params: PyTree, batch_stats: PyTree, pair: Pair) -> tuple[PyTree, np.ndarray]:
  """One DFQ step on `pair`: (params with the pair's leaves as float32 numpy arrays, s)."""
  node1 = {k: np.asarray(v, np.float32) for k, v in _get(params, pair.first).items()}
  node2 = {k: np.asarray(v, np.float32) for k, v in _get(params, pair.second).items()}
  w1, w2 = node1["kernel"], node2["kernel"]
  r1 = np.max(np.abs(w1.reshape(-1, w1.shape[-1])), axis=0)
  r2 = _in_range(w2, pair.second_kind)
  ok = (r1 > 0) & (r2 > 0)
  s = np.where(ok, np.sqrt(np.where(ok, r1, 1.0) / np.where(ok, r2, 1.0)), 1.0).astype(np.float32)
  node1["kernel"] = w1 / s
  if "bias" in node1:
    node1["bias"] = node1["bias"] / s
  params = _set(params, pair.first, node1)
  if pair.bn is not None:
    bn = {k: np.asarray(v, np.float32) for k, v in _get(params, pair.bn).items()}
    stats = _get(batch_stats, pair.bn)
    mean, var = np.asarray(stats["mean"], np.float32), np.asarray(stats["var"], np.float32)
    a = bn["scale"] / np.sqrt(var + np.float32(pair.epsilon))
    bn["bias"] = bn["bias"] / s + a * mean * (1.0 - 1.0 / s)
    params = _set(params, pair.bn, bn)
  node2["kernel"] = _scale_in(w2, s, pair.second_kind)
  return _set(params, pair.second, node2), s


def equalize(params: PyTree, batch_stats: PyTree, model: nn.Module, images: jax.Array, *,
             max_sweeps: int = 100, tol: float = 1e-3, key: str = "quant.equalize",
             pairs: list[Pair] | None = None) -> tuple[PyTree, dict]:
  """Cross-layer equalization of every pair of `model` where it is exact: (params, report).

  `images`: inputs for the probes (`find_pairs`; not for the scales, which come from the
  weights alone: DFQ is data-free). Sweeps over the pairs in forward order until no scale moves
  by more than `tol` (relative) or `max_sweeps`. The report: the pairs, the sweeps, the mean
  over the equalized kernels of mean(channel range) / tensor range before and after, and the
  refused candidates. ConfigError naming `key` when no pair applies.
  """
  refused: list = []
  if pairs is None:
    pairs, refused = find_pairs(model, params, batch_stats, images)
  if not pairs:
    first = refused[0] if refused else ("-", "no Conv followed by another Conv / Dense")
    raise ConfigError(f"config key '{key}': no pair of layers of {type(model).__name__} can be "
                      f"equalized exactly: {first[0]}: {first[1]} (DFQ replaces ReLU6 by ReLU: "
                      "MobileNetV2 takes model_kwargs.activation='relu')")
  touched = sorted({q.first for q in pairs} | {q.second for q in pairs}
                   | {q.bn for q in pairs if q.bn is not None})
  dtypes = {p: {k: v.dtype for k, v in _get(params, p).items()} for p in touched}

  def spread(p):
    vals = []
    for path in sorted({q.first for q in pairs}):
      w = np.abs(np.asarray(_get(p, path)["kernel"]))
      r = np.max(w.reshape(-1, w.shape[-1]), axis=0)
      vals.append(float(np.mean(r) / max(float(np.max(r)), 1e-30)))
    return float(np.mean(vals))

  before = spread(params)
  sweeps = 0
  while sweeps < max_sweeps:
    sweeps += 1
    moved = 0.0
    for pair in pairs:
      params, s = equalize_pair(params, batch_stats, pair)
      moved = max(moved, float(np.max(np.abs(np.log(s)))))
    if moved < tol:
      break
  for p in touched:
    params = _set(params, p, {k: jnp.asarray(v, dtypes[p][k]) for k, v in _get(params, p).items()})
  return params, {"pairs": [f"{p.first} -> {p.second}" for p in pairs], "sweeps": sweeps,
                  "range_ratio_before": before, "range_ratio_after": spread(params),
                  "refused": [f"{a}: {b}" for a, b in refused]}


def report_summary(report: dict) -> dict:
  """Scalar figures for metrics.jsonl / results.json."""
  if not report:
    return {}
  return {"equalized_pairs": len(report["pairs"]), "equalize_sweeps": int(report["sweeps"]),
          "equalize_range_ratio_before": float(report["range_ratio_before"]),
          "equalize_range_ratio_after": float(report["range_ratio_after"])}
