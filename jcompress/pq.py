r"""Product quantization (PQ) of Dense / Conv kernels, and Q-CNN (Wu et al., CVPR 2016).

Layout. A kernel `W` of shape `(*S, C_in, C_out)` (HWIO convolutions: `S = (k_h, k_w)`; Dense
`(in, out)`: `S = ()`) is cut along its INPUT dimension into `M = C_in / d` subspaces of
sub-vector length `d`. For subspace `m`, spatial position `p` (C order over `S`, `P = prod(S)`
positions) and output channel `o`, the sub-vector is

  w[m, p, o] = W[p, m d : (m + 1) d, o]          (a vector in R^d)

so subspace `m` holds `n = P * C_out` sub-vectors, enumerated `i = p * C_out + o`. Each subspace
has its own codebook of `K = 2^b` codewords `c[m, k] in R^d` (shared over positions and output
channels, as in Gong et al. 2014 / Wu et al. 2016) and each sub-vector is replaced by one
codeword, named by its code `b[m, i] in {0..K-1}`:

  W_hat[p, m d : (m + 1) d, o] = c[m, b[m, p C_out + o]].

Stored: the codes packed at `b` bits each (`packing.pack`, C order over `(M, n)`) and the
codebooks as float32 `(M, K, d)`, so a kernel takes exactly

  ceil(M n b / 8) + 4 M K d   bytes   (versus 4 P C_in C_out as float32),

`b / d` bits per weight for the codes plus the codebooks. `PQTensor` is that artifact;
`pq_nbytes` / `compression_stats` count it.

PQ (`pq_quantize`, `pq_tree`): the codebook of each subspace is learnt by k-means on its `n`
sub-vectors (k-means++ seeding, then jit-compiled Lloyd iterations: assign each sub-vector to
its nearest codeword, move each codeword to the mean of its cluster; an empty cluster keeps its
codeword); it minimises the WEIGHT error `sum ||w - c[b]||^2`.

Q-CNN (`qcnn_tree`): codebooks and codes that minimise the layer's OUTPUT error on calibration
data instead. With `X` the layer's im2col input rows (a random subset of output positions of the
calibration batches; a Dense layer's rows are its input vectors) computed by the network whose
EARLIER selected layers are already quantized, and `T = X_float W` the float layer's response on
the float network's input at the same rows (error compensation, Wu et al. Sec. 3.2), it
minimises

  F(W_hat) = ||T - X W_hat||_F^2 = tr(W_hat^T G W_hat) - 2 tr(W_hat^T C) + ||T||^2,
  G = X^T X,  C = X^T T,

so only the Gram matrices `G`, `C` are accumulated over the batches. Starting from the PQ
solution, it sweeps the subspaces `m` in turn (`qcnn_iters` sweeps); with the other subspaces
fixed, F restricted to subspace m is, with `G_m[p, q] = G[(p, m), (q, m)]` (d x d blocks) and
`C_m[p, :, o] = (C - G W_hat)[(p, m), o] + sum_q G_m[p, q] w[m, q, o]`,

  f_m = sum_o sum_{p, q} w[m,p,o]^T G_m[p,q] w[m,q,o] - 2 sum_{p,o} w[m,p,o]^T C_m[p,:,o].

* codebook given the codes (least squares): with `B[p, o, k] = 1[b(p, o) = k]`,
  `H[k, :, l, :] = sum_{p, q, o} B[p,o,k] B[q,o,l] G_m[p, q]` and
  `r[k] = sum_{p, o} B[p,o,k] C_m[p, :, o]`, solve `(H + lam I) vec(c) = r + lam vec(c_old)`
  (a proximal ridge `lam = ridge * mean(diag H)`, so an unused codeword stays where it was);
* codes given the codebook (exhaustive search over the K codewords, position by position):
  `b(p, o) = argmin_k c_k^T G_m[p,p] c_k - 2 c_k^T v_o`, with
  `v_o = C_m[p, :, o] - sum_{q != p} G_m[p, q] w[m, q, o]`.

Both steps never increase F (exact block minimisation), so Q-CNN's output error on the
calibration rows is at most PQ's. Layers are processed in the order the forward pass calls them
(captured with `flax.linen.intercept_methods`).

Training (`pq_transform`, `transform_from_config` for the `pq` sub-config): the state holds the
codebooks and codes; `apply` gives the reconstructed kernels (straight-through: the gradient
w.r.t. `W_hat` reaches the latent kernel); the latent kernels are kept equal to `W_hat`, and
after each optimizer step `update` moves every codeword by the SUM of the changes of the
sub-vectors assigned to it and writes `W_hat` back into the latent kernel:

  c[m, k] <- c[m, k] + sum_{i : b[m, i] = k} (w'[m, i] - c[m, k]).

For SGD (`w' = w - lr g`, `g = dL/dW_hat`) this is exactly `c <- c - lr dL/dc`, because
`dL/dc[m, k] = sum_{i : b[m,i] = k} g[m, i]` (the gradient through `codebooks[codes]`); with
momentum it is momentum SGD on the codebooks (the sum is linear and the codes are fixed), and
weight decay `wd` on the latent kernel becomes `wd * n_k * c_k` (L2 on `W_hat`). Adam is not
linear, so with Adam the update is the sum of the per-weight Adam steps. `codeword_update =
"mean"` divides the sum by the cluster size instead. The codes stay fixed while fine-tuning.
"""

from __future__ import annotations

import functools
from typing import Any
from typing import Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jcompress import transforms
from jcompress.errors import ConfigError
from jcompress.pq_core import CODEWORD_UPDATES  # noqa: F401
from jcompress.pq_core import CONFIG_KEYS  # noqa: F401
from jcompress.pq_core import METHODS  # noqa: F401
from jcompress.pq_core import PQTensor  # noqa: F401
from jcompress.pq_core import _assign  # noqa: F401
from jcompress.pq_core import _check_finite  # noqa: F401
from jcompress.pq_core import _divisors  # noqa: F401
from jcompress.pq_core import _get  # noqa: F401
from jcompress.pq_core import _key  # noqa: F401
from jcompress.pq_core import _key_name  # noqa: F401
from jcompress.pq_core import _kmeans_pp  # noqa: F401
from jcompress.pq_core import _lloyd  # noqa: F401
from jcompress.pq_core import _nbytes  # noqa: F401
from jcompress.pq_core import _nearest_divisors  # noqa: F401
from jcompress.pq_core import _nested  # noqa: F401
from jcompress.pq_core import _pq_kmeans  # noqa: F401
from jcompress.pq_core import _replace  # noqa: F401
from jcompress.pq_core import _selected  # noqa: F401
from jcompress.pq_core import _sq_dist  # noqa: F401
from jcompress.pq_core import bits_of_k  # noqa: F401
from jcompress.pq_core import check_bits  # noqa: F401
from jcompress.pq_core import check_layer  # noqa: F401
from jcompress.pq_core import compression_stats  # noqa: F401
from jcompress.pq_core import from_subvectors  # noqa: F401
from jcompress.pq_core import is_pq  # noqa: F401
from jcompress.pq_core import pack_pq  # noqa: F401
from jcompress.pq_core import pq_dequantize  # noqa: F401
from jcompress.pq_core import pq_dequantize_tree  # noqa: F401
from jcompress.pq_core import pq_fit  # noqa: F401
from jcompress.pq_core import pq_layer_nbytes  # noqa: F401
from jcompress.pq_core import pq_nbytes  # noqa: F401
from jcompress.pq_core import pq_quantize  # noqa: F401
from jcompress.pq_core import pq_tree  # noqa: F401
from jcompress.pq_core import reconstruct  # noqa: F401
from jcompress.pq_core import to_subvectors  # noqa: F401
from jcompress.pq_core import unpack_codes  # noqa: F401

PyTree = Any


# ----------------------------------------------------------------------------- Q-CNN: data


def _pairs(padding: Any, in_spatial, window, strides, name: str) -> list[tuple[int, int]]:
  """Explicit (low, high) paddings of a flax Conv's `padding`."""
  if isinstance(padding, str):
    if padding.upper() in ("SAME", "VALID"):
      return [tuple(int(v) for v in p) for p in
              jax.lax.padtype_to_pads(in_spatial, window, strides, padding.upper())]
    raise ConfigError(f"Q-CNN cannot capture the input of '{name}': padding {padding!r} is not "
                      "supported (use pq.method=pq or exclude this layer)")
  if isinstance(padding, int):
    return [(padding, padding)] * len(window)
  out = []
  for p in padding:
    out.append((int(p), int(p)) if isinstance(p, int) else (int(p[0]), int(p[1])))
  return out


def _tuple(v: Any, n: int) -> tuple[int, ...]:
  if v is None:
    return (1,) * n
  if isinstance(v, int):
    return (v,) * n
  return tuple(int(x) for x in v)


def _sample_rows(x: jax.Array, mod: nn.Module, kshape: tuple, rows: int, key: jax.Array,
                 name: str) -> jax.Array:
  """`rows` random im2col rows (without replacement) of layer `mod`'s input `x`.

  A Dense layer: rows of `x` flattened to `(-1, in)`. A Conv: the input windows
  `(k_h, k_w, C_in)` of random output positions (n, i, j), flattened in HWI order, so that a
  row times `kernel.reshape(-1, C_out)` is the conv's output there.
  """
  x = x.astype(jnp.float32)
  if isinstance(mod, nn.Dense):
    flat = x.reshape(-1, x.shape[-1])
    r = min(rows, flat.shape[0])
    return flat[jax.random.choice(key, flat.shape[0], (r,), replace=False)]
  window = tuple(int(s) for s in kshape[:-2])
  if len(window) != 2 or x.ndim != 4:
    raise ConfigError(f"Q-CNN supports 2-D convolutions of NHWC inputs; '{name}' has kernel "
                      f"{kshape} and input {x.shape} (use pq.method=pq or exclude it)")
  if (mod.feature_group_count != 1 or _tuple(mod.kernel_dilation, 2) != (1, 1)
      or _tuple(mod.input_dilation, 2) != (1, 1)):
    raise ConfigError(f"Q-CNN supports ungrouped, undilated convolutions; '{name}' is not "
                      "(use pq.method=pq or exclude it with pq.exclude)")
  strides = _tuple(mod.strides, 2)
  pads = _pairs(mod.padding, x.shape[1:3], window, strides, name)
  xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  h_out = (xp.shape[1] - window[0]) // strides[0] + 1
  w_out = (xp.shape[2] - window[1]) // strides[1] + 1
  total = x.shape[0] * h_out * w_out
  r = min(rows, total)
  idx = jax.random.choice(key, total, (r,), replace=False)
  n, rem = jnp.divmod(idx, h_out * w_out)
  i, j = jnp.divmod(rem, w_out)

  def window_at(n, i, j):
    return jax.lax.dynamic_slice(xp, (n, i * strides[0], j * strides[1], 0),
                                 (1, window[0], window[1], x.shape[3]))

  return jax.vmap(window_at)(n, i, j).reshape(r, -1)


def _module_path(mod: nn.Module) -> str:
  return "/".join(str(s) for s in mod.path)


def layer_order(model: nn.Module, variables: PyTree, images: Any) -> list[str]:
  """Module paths of the Conv / Dense layers in the order the forward pass calls them."""
  order: list[str] = []

  def icpt(next_fun, args, kwargs, ctx):
    if ctx.method_name == "__call__" and isinstance(ctx.module, (nn.Conv, nn.Dense)):
      order.append(_module_path(ctx.module))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(icpt):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
  return order


def _make_capture(model: nn.Module, wanted: dict[str, int], kshapes: dict[str, tuple],
                  rows: int):
  """jit(params, batch_stats, images, key) -> {module path: sampled im2col rows}."""

  def capture(params, batch_stats, images, key):
    out = {}

    def icpt(next_fun, args, kwargs, ctx):
      mod = ctx.module
      if ctx.method_name == "__call__" and isinstance(mod, (nn.Conv, nn.Dense)):
        path = _module_path(mod)
        if path in wanted and path not in out:
          out[path] = _sample_rows(args[0], mod, kshapes[path], rows,
                                   jax.random.fold_in(key, wanted[path]), path + "/kernel")
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(icpt):
      model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)
    return out

  return jax.jit(capture)


def _images_of(batches: Any) -> list[jax.Array]:
  """The calibration inputs as a list of float arrays `(N, ...)` of one shape (NHWC images
  for a CNN; whether they fit the model is checked by running it)."""
  if isinstance(batches, (np.ndarray, jax.Array)):
    batches = [batches]
  if not isinstance(batches, (list, tuple)) or not batches:
    raise ConfigError("calibration data: expected a non-empty list of batches (config key "
                      "'calibration_batches' must be >= 1 for pq.method=qcnn)")
  images = []
  for i, b in enumerate(batches):
    x = b["image"] if isinstance(b, dict) else b
    x = jnp.asarray(x)
    if x.ndim < 2 or not jnp.issubdtype(x.dtype, jnp.floating) or not x.shape[0]:
      raise ConfigError(f"calibration batch {i}: expected a float array (N, ...), e.g. images "
                        f"(N, H, W, C), got {x.dtype} of shape {tuple(x.shape)}")
    if images and x.shape[1:] != images[0].shape[1:]:
      raise ConfigError(f"calibration batch {i}: images of shape {tuple(x.shape)} do not "
                        f"match batch 0's {tuple(images[0].shape)}")
    images.append(x)
  return images


# ----------------------------------------------------------------------------- Q-CNN: solve


@functools.partial(jax.jit, static_argnames=("shape", "sweeps"))
def _qcnn_solve(g, c, codebooks, codes, ridge, *, shape, sweeps):
  """Q-CNN's alternating minimisation of tr(W^T G W) - 2 tr(W^T C) (module docstring)."""
  m_sub, k, d = codebooks.shape
  c_out = shape[-1]
  p_pos = int(np.prod(shape[:-2], dtype=np.int64))
  dim = p_pos * m_sub * d
  g6 = g.reshape(p_pos, m_sub, d, p_pos, m_sub, d)
  codes = codes.astype(jnp.int32)

  def kernel_of(cb, b):
    return reconstruct(cb, b, shape).reshape(dim, c_out)

  def subspace(m, carry):
    cb, b_all = carry
    w = kernel_of(cb, b_all)
    e = (c - g @ w).reshape(p_pos, m_sub, d, c_out)
    gm = g6[:, m, :, :, m, :]                                   # (P, d, P, d)
    wm = w.reshape(p_pos, m_sub, d, c_out)[:, m]                # (P, d, C_out)
    cm = e[:, m] + jnp.einsum("piqj,qjo->pio", gm, wm)          # (P, d, C_out)
    b = b_all[m].reshape(p_pos, c_out)
    # Codebook by least squares given the codes (proximal ridge keeps unused codewords).
    onehot = jax.nn.one_hot(b, k, dtype=g.dtype)                # (P, C_out, K)
    pair = jnp.einsum("pok,qol->pqkl", onehot, onehot)          # (P, P, K, K)
    h = jnp.einsum("pqkl,piqj->kilj", pair, gm).reshape(k * d, k * d)
    rhs = jnp.einsum("pok,pio->ki", onehot, cm).reshape(k * d)
    lam = ridge * (jnp.trace(h) / (k * d) + 1e-30)
    old = cb[m].reshape(k * d)
    new = jnp.linalg.solve(h + lam * jnp.eye(k * d, dtype=h.dtype), rhs + lam * old)
    new = jnp.where(jnp.all(jnp.isfinite(new)), new, old).reshape(k, d)
    # Codes given the codebook: exhaustive search, one spatial position at a time.
    gpp = jnp.stack([gm[q, :, q, :] for q in range(p_pos)])    # (P, d, d)
    quad = jnp.einsum("ki,pij,kj->pk", new, gpp, new)           # (P, K)

    def position(p, b):
      w_cur = new[b]                                            # (P, C_out, d)
      s = jnp.einsum("iqj,qoj->io", gm[p], w_cur) - gpp[p] @ w_cur[p].T
      v = cm[p] - s                                             # (d, C_out)
      cost = quad[p][:, None] - 2.0 * new @ v                   # (K, C_out)
      return b.at[p].set(jnp.argmin(cost, axis=0).astype(jnp.int32))

    b = jax.lax.fori_loop(0, p_pos, position, b)
    return cb.at[m].set(new), b_all.at[m].set(b.reshape(-1))

  def sweep(_, carry):
    return jax.lax.fori_loop(0, m_sub, subspace, carry)

  cb, codes = jax.lax.fori_loop(0, sweeps, sweep, (codebooks.astype(g.dtype), codes))
  return cb, codes.astype(jnp.uint8)


def response_error(g, c, tt, w) -> float:
  """||T - X W||^2 / ||T||^2 from G = X^T X, C = X^T T and tt = ||T||^2 (W as `(D, C_out)`)."""
  w = jnp.asarray(w, jnp.float32)
  err = tt - 2.0 * jnp.sum(w * c) + jnp.sum(w * (g @ w))
  return float(err / jnp.maximum(tt, 1e-30))


def qcnn_fit(model: nn.Module, params: PyTree, batch_stats: PyTree, batches: Any,
             selected: dict[str, Any], d: int, k: int, *, iters: int = 20, qcnn_iters: int = 3,
             samples: int = 4096, ridge: float = 1e-4, seed: int | jax.Array = 0,
             key_d: str = "pq.subvector", key_k: str = "pq.bits"):
  """Q-CNN codebooks and codes of the `selected` kernels (paths), layer by layer.

  Returns `({path: (codebooks (M, K, d), codes (M, n) uint8)}, report)` where report maps each
  path to `{"pq_error", "qcnn_error"}`: the relative output error ||T - X W_hat||^2 / ||T||^2 on
  the calibration rows of the k-means PQ start and of the Q-CNN result. `samples` im2col rows
  per layer are drawn, spread evenly over the batches. The params are not modified.
  """
  images = _images_of(batches)
  if isinstance(samples, bool) or not isinstance(samples, (int, np.integer)) or samples < 1:
    raise ConfigError(f"config key 'pq.calibration_samples': must be an int >= 1, "
                      f"got {samples!r}")
  variables = {"params": params, "batch_stats": batch_stats}
  try:
    order = layer_order(model, variables, images[0])
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"calibration data: images of shape {tuple(images[0].shape)} do not fit "
                      f"the model ({type(e).__name__}: {str(e)[:200]})") from e
  leaves = {transforms.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  for path in selected:
    check_layer(jnp.shape(leaves[path]), d, k, path, key_d, key_k)
    _check_finite(leaves[path], path)
  mod_paths = [p + "/kernel" for p in order]
  missing = [p for p in selected if p not in mod_paths]
  if missing:
    raise ConfigError(f"Q-CNN: the selected kernel '{missing[0]}' is not the kernel of a "
                      "flax Conv / Dense layer that the forward pass calls (use pq.method=pq or "
                      "exclude it)")
  seen: list[str] = []
  for p in order:
    if p + "/kernel" in selected and p not in seen:
      seen.append(p)
  wanted = {p: i for i, p in enumerate(seen)}
  kshapes = {p: tuple(jnp.shape(leaves[p + "/kernel"])) for p in seen}
  rows = max(1, -(-int(samples) // len(images)))
  capture = _make_capture(model, wanted, kshapes, rows)
  base = _key(seed)
  batch_keys = [jax.random.fold_in(base, 10_000 + b) for b in range(len(images))]

  targets = []   # per batch: {path: T = X_float W_float}
  for x, bk in zip(images, batch_keys):
    got = capture(params, batch_stats, x, bk)
    targets.append({p: got[p] @ leaves[p + "/kernel"].reshape(-1, kshapes[p][-1]).astype(
        jnp.float32) for p in seen})

  result, report, current = {}, {}, dict(leaves)
  for i, p in enumerate(seen):
    path = p + "/kernel"
    shape = kshapes[p]
    q_params = _replace(params, {q: current[q] for q in result})
    g = c = tt = 0.0
    for x, bk, tgt in zip(images, batch_keys, targets):
      xq = capture(q_params, batch_stats, x, bk)[p]
      g = g + xq.T @ xq
      c = c + xq.T @ tgt[p]
      tt = tt + jnp.sum(jnp.square(tgt[p]))
    cb0, codes0 = _pq_kmeans(to_subvectors(jnp.asarray(leaves[path], jnp.float32), d),
                             jax.random.fold_in(base, i), k=int(k), iters=int(iters))
    cb, codes = _qcnn_solve(g, c, cb0, codes0, jnp.float32(ridge), shape=shape,
                            sweeps=int(qcnn_iters))
    dim = int(np.prod(shape[:-1]))
    report[path] = {
        "pq_error": response_error(g, c, tt, reconstruct(cb0, codes0, shape).reshape(dim, -1)),
        "qcnn_error": response_error(g, c, tt, reconstruct(cb, codes, shape).reshape(dim, -1)),
    }
    logging.info("Q-CNN %s: relative output error %.4g (k-means PQ: %.4g)", path,
                 report[path]["qcnn_error"], report[path]["pq_error"])
    result[path] = (cb, codes)
    current[path] = reconstruct(cb, codes, shape).astype(leaves[path].dtype)
  return result, report


def qcnn_tree(model: nn.Module, variables: PyTree, batches: Any, d: int, k: int, *,
              include: str | Sequence[str] = (r".*",),
              exclude: str | Sequence[str] = transforms.DEFAULT_EXCLUDE,
              iters: int = 20, qcnn_iters: int = 3, samples: int = 4096, ridge: float = 1e-4,
              seed: int = 0, key: str = "pq.include") -> tuple[PyTree, dict]:
  """Q-CNN of the selected kernels of `variables["params"]`: `(qtree, report)`.

  `batches`: calibration images, a list of NHWC float arrays or of dicts with "image".
  `qtree` holds a PQTensor at each selected kernel and the float leaves elsewhere (as
  `pq_tree`); `report` maps each path to the relative output errors of PQ and Q-CNN
  (`qcnn_fit`). Raises ConfigError for bad `d` / `k` (naming the layer), calibration images of
  the wrong shape, NaN / Inf weights, or layers Q-CNN cannot capture (grouped convolutions).
  """
  bits_of_k(k, "k")
  params = variables["params"]
  sel = _selected(params, include, exclude, key)
  fit, report = qcnn_fit(model, params, variables.get("batch_stats", {}), batches, sel, d, k,
                         iters=iters, qcnn_iters=qcnn_iters, samples=samples, ridge=ridge,
                         seed=seed, key_d="d", key_k="k")
  leaves = {transforms.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  out = {p: pack_pq(cb, codes, jnp.shape(leaves[p])) for p, (cb, codes) in fit.items()}
  return _replace(params, out), report


# ----------------------------------------------------------------------------- transform


@jax.custom_vjp
def _straight_through(w, w_hat):
  return w_hat


def _st_fwd(w, w_hat):
  return w_hat, None


def _st_bwd(_, g):
  return g, None


_straight_through.defvjp(_st_fwd, _st_bwd)


def codeword_sums(delta: jax.Array, codes: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Per-codeword sums `(M, K, d)` of `delta` `(M, n, d)` and cluster sizes `(M, K)`."""
  b = codes.astype(jnp.int32)
  sums = jax.vmap(lambda x, a: jax.ops.segment_sum(x, a, num_segments=k))(delta, b)
  counts = jax.vmap(lambda a: jax.ops.segment_sum(jnp.ones_like(a, jnp.float32), a,
                                                   num_segments=k))(b)
  return sums, counts


def _distinct(key: jax.Array, *, n: int, k: int) -> jax.Array:
  return jax.random.choice(key, n, (k,), replace=False)


def pq_transform(params_like: PyTree, *, method: str = "pq", subvector: int = 4, bits: int = 4,
                 include: str | Sequence[str] = (r".*",),
                 exclude: str | Sequence[str] = transforms.DEFAULT_EXCLUDE,
                 iters: int = 20, qcnn_iters: int = 3, calibration_samples: int = 4096,
                 ridge: float = 1e-4, codeword_update: str = "sum",
                 seed: int = 0) -> transforms.ParamTransform:
  """PQ / Q-CNN as a ParamTransform: codebooks fine-tuned, codes fixed.

  `params_like` (arrays or ShapeDtypeStructs) fixes the selection and every shape, which is
  checked here (ConfigError naming the leaf and the key `pq.subvector` / `pq.bits`).

  - init(params, rng): state `{path...: {"codebooks": (M, K, d) f32, "codes": (M, n) uint8}}`
    nested like the params; a placeholder PQ (codewords = K random distinct sub-vectors,
    nearest assignment) so that `apply` is defined before `calibrate`.
  - calibrate(params, state, ctx): the real codebooks and codes from the given (trained float)
    params: k-means PQ (`method="pq"`, `iters` Lloyd iterations) or Q-CNN (`method="qcnn"`,
    on `ctx.batches` with `ctx.model` / `ctx.batch_stats`); returns the params with the selected
    kernels set to their reconstruction (the latent kernels track `W_hat`).
  - apply(params, state): the selected kernels replaced by `codebooks[codes]` (straight-through:
    their gradient goes to the latent kernel unchanged).
  - update(params, state, step): each codeword moves by the sum (or mean) over its cluster of
    `latent - W_hat`, the latent kernel is reset to the new `W_hat` (module docstring: exact
    (momentum) SGD on the codebooks).
  - export(params, state): `{"params": tree}`, a `PQTensor` (packed codes + codebooks, arrays
    only) at each selected kernel, the float leaves elsewhere.
  - metrics: `pq_bits_per_weight` (stored bits per weight of the PQ kernels, codebooks
    included), `pq_compression_ratio` (float32 bytes / stored bytes of those kernels).
  """
  if method not in METHODS:
    raise ConfigError(f"config key 'pq.method': must be one of {list(METHODS)}, got {method!r}")
  if codeword_update not in CODEWORD_UPDATES:
    raise ConfigError(f"config key 'pq.codeword_update': must be one of "
                      f"{list(CODEWORD_UPDATES)}, got {codeword_update!r}")
  bits = check_bits(bits)
  for name, v, lo in (("iters", iters, 0), ("qcnn_iters", qcnn_iters, 0),
                      ("calibration_samples", calibration_samples, 1)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
      raise ConfigError(f"config key 'pq.{name}': must be an int >= {lo}, got {v!r}")
  if not ridge >= 0:
    raise ConfigError(f"config key 'pq.ridge': must be >= 0, got {ridge!r}")
  k = 2 ** bits
  d = subvector
  sel = _selected(params_like, include, exclude, "pq.include")
  shapes = {p: tuple(x.shape) for p, x in
            ((transforms.path_str(kp), x) for kp, x in
             jax.tree_util.tree_flatten_with_path(params_like)[0]) if p in sel}
  dims = {p: check_layer(shapes[p], d, k, p) for p in sel}
  float_bytes = sum(4 * int(np.prod(s, dtype=np.int64)) for s in shapes.values())
  stored_bytes = sum(pq_layer_nbytes(s, d, bits) for s in shapes.values())
  weights = float_bytes // 4

  def init(params, rng):
    leaves = {transforms.path_str(p): x for p, x in
              jax.tree_util.tree_flatten_with_path(params)[0]}
    items = {}
    for i, (path, keys) in enumerate(sel.items()):
      m, n = dims[path]
      sub = to_subvectors(jnp.asarray(leaves[path], jnp.float32), d)
      rk = jax.random.split(jax.random.fold_in(rng, i), m)
      pick = jax.vmap(functools.partial(_distinct, n=n, k=k))(rk)
      cb = jax.vmap(lambda x, ix: x[ix])(sub, pick)
      codes = jax.vmap(_assign)(sub, cb).astype(jnp.uint8)
      items[keys] = {"codebooks": cb, "codes": codes}
    return _nested(items)

  def state_of(state, path):
    return _get(state, sel[path])

  def apply(params, state):
    def leaf(path, w):
      if path not in sel:
        return w
      s = state_of(state, path)
      w_hat = reconstruct(s["codebooks"], s["codes"], w.shape).astype(w.dtype)
      return _straight_through(w, w_hat)
    return transforms.map_with_path(leaf, params)

  def update(params, state, step):
    del step
    new_state, new_w = {}, {}
    for path, keys in sel.items():
      s = state_of(state, path)
      w = _get(params, keys)
      cb, codes = s["codebooks"], s["codes"]
      sub = to_subvectors(w.astype(jnp.float32), d)
      old = jax.vmap(lambda c, b: c[b])(cb, codes.astype(jnp.int32))
      sums, counts = codeword_sums(sub - old, codes, k)
      if codeword_update == "mean":
        sums = sums / jnp.maximum(counts, 1.0)[..., None]
      cb = cb + sums
      new_state[keys] = {"codebooks": cb, "codes": codes}
      new_w[path] = reconstruct(cb, codes, w.shape).astype(w.dtype)
    return _replace(params, new_w), _nested(new_state)

  def calibrate(params, state, ctx):
    del state
    leaves = {transforms.path_str(p): x for p, x in
              jax.tree_util.tree_flatten_with_path(params)[0]}
    base = jax.random.key(seed)
    if method == "qcnn":
      fit, report = qcnn_fit(ctx.model, params, ctx.batch_stats, ctx.batches, sel, d, k,
                             iters=iters, qcnn_iters=qcnn_iters, samples=calibration_samples,
                             ridge=ridge, seed=base)
      del report
    else:
      fit = {p: pq_fit(leaves[p], d, k, iters=iters, seed=jax.random.fold_in(base, i), name=p,
                       key_d="pq.subvector", key_k="pq.bits")
             for i, p in enumerate(sel)}
    items, new_w = {}, {}
    for path, keys in sel.items():
      cb, codes = fit[path]
      items[keys] = {"codebooks": jnp.asarray(cb, jnp.float32),
                     "codes": jnp.asarray(codes, jnp.uint8)}
      new_w[path] = reconstruct(cb, codes, shapes[path]).astype(leaves[path].dtype)
    return _replace(params, new_w), _nested(items)

  def export(params, state):
    out = {}
    for path in sel:
      s = jax.device_get(state_of(state, path))
      out[path] = pack_pq(s["codebooks"], s["codes"], shapes[path])
    return {"params": _replace(jax.device_get(params), out)}

  def metrics(params, state):
    del params, state
    return {"pq_bits_per_weight": 8.0 * stored_bytes / max(weights, 1),
            "pq_compression_ratio": float_bytes / max(stored_bytes, 1)}

  return transforms.ParamTransform(init, apply, update, export, calibrate, metrics)


def transform_from_config(cfg, params_like: PyTree, config=None) -> transforms.ParamTransform:
  """The `pq` sub-config's transform (`experiment.build_transform`), see `pq_transform`.

  Keys: method ("pq" | "qcnn"), subvector (d), bits (log2 K, 1..8), include, exclude, iters
  (Lloyd iterations), qcnn_iters (Q-CNN sweeps), calibration_samples (im2col rows per layer),
  ridge, codeword_update ("sum" | "mean"); all but method/subvector/bits optional. The seed is
  the experiment's `seed`. An unknown key raises ConfigError naming it.
  """
  unknown = sorted(set(cfg.keys()) - set(CONFIG_KEYS))
  if unknown:
    raise ConfigError(f"config key 'pq.{unknown[0]}' is unknown; the pq sub-config accepts: "
                      f"{', '.join(CONFIG_KEYS)}")
  for req in ("method", "subvector", "bits"):
    if req not in cfg:
      raise ConfigError(f"config key 'pq.{req}' is missing")
  seed = int(config.seed) if config is not None and "seed" in config else 0
  return pq_transform(
      params_like, method=cfg.method, subvector=cfg.subvector, bits=cfg.bits,
      include=tuple(cfg.get("include", (r".*",))),
      exclude=tuple(cfg.get("exclude", transforms.DEFAULT_EXCLUDE)),
      iters=cfg.get("iters", 20), qcnn_iters=cfg.get("qcnn_iters", 3),
      calibration_samples=cfg.get("calibration_samples", 4096), ridge=cfg.get("ridge", 1e-4),
      codeword_update=cfg.get("codeword_update", "sum"), seed=seed)


def default_config():
  """A `pq` sub-config with every key (`transform_from_config`)."""
  import ml_collections  # noqa: PLC0415

  c = ml_collections.ConfigDict()
  c.method = "pq"
  c.subvector = 4
  c.bits = 4
  c.include = (r".*",)
  c.exclude = transforms.DEFAULT_EXCLUDE
  c.iters = 20
  c.qcnn_iters = 3
  c.calibration_samples = 4096
  c.ridge = 1e-4
  c.codeword_update = "sum"
  return c
