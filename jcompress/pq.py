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
import math
from typing import Any
from typing import Sequence

from absl import logging
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jcompress import packing
from jcompress import transforms
from jcompress.errors import ConfigError

PyTree = Any

METHODS = ("pq", "qcnn")
CODEWORD_UPDATES = ("sum", "mean")

#: Keys of the `pq` config sub-config (`transform_from_config`).
CONFIG_KEYS = ("enabled", "method", "subvector", "bits", "include", "exclude", "iters",
               "qcnn_iters", "calibration_samples", "ridge", "codeword_update")


@flax.struct.dataclass
class PQTensor:
  """A product-quantized kernel: what is stored, and nothing else.

  - codes: uint8 `(ceil(M n bits / 8),)`, the codes `b[m, i]` (C order over `(M, n)`) packed at
    `bits` bits each by `packing.pack`.
  - codebooks: float32 `(M, K, d)`.
  - shape: the kernel's shape `(*S, C_in, C_out)` (static, not an array).
  - bits: `log2 K` (static).
  """
  codes: Any
  codebooks: Any
  shape: tuple = flax.struct.field(pytree_node=False)
  bits: int = flax.struct.field(pytree_node=False)

  @property
  def subvector(self) -> int:
    return int(self.codebooks.shape[-1])

  @property
  def num_subspaces(self) -> int:
    return int(self.codebooks.shape[0])

  @property
  def num_codes(self) -> int:
    return int(np.prod(self.shape)) // self.subvector


def is_pq(x: Any) -> bool:
  return isinstance(x, PQTensor)


# ----------------------------------------------------------------------------- checks


def _divisors(n: int) -> list[int]:
  return [i for i in range(1, n + 1) if n % i == 0]


def _nearest_divisors(n: int, d: int) -> list[int]:
  divs = _divisors(n)
  below = [x for x in divs if x < d]
  above = [x for x in divs if x > d]
  return ([below[-1]] if below else []) + ([above[0]] if above else [])


def check_bits(bits: Any, key: str = "pq.bits") -> int:
  """`bits` as an int in 1..8 (K = 2^bits codewords), else ConfigError naming `key`."""
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
    raise ConfigError(f"config key '{key}': must be an int in 1..8 (codebooks of 2^bits "
                      f"codewords), got {bits!r}")
  return int(bits)


def bits_of_k(k: Any, key: str = "k") -> int:
  """log2(k) for a codebook size k in {2, 4, ..., 256}, else ConfigError naming `key`."""
  if (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2 or k > 256
      or k & (k - 1)):
    raise ConfigError(f"'{key}': the codebook size must be a power of two in 2..256 (codes of "
                      f"1..8 bits), got {k!r}")
  return int(k).bit_length() - 1


def check_layer(shape: Sequence[int], d: Any, k: int, name: str,
                key_d: str = "pq.subvector", key_k: str = "pq.bits") -> tuple[int, int]:
  """Checks that kernel `name` of `shape` can be product-quantized; returns `(M, n)`.

  Raises ConfigError naming the leaf and the key: a kernel of fewer than 2 dimensions, a
  sub-vector length that does not divide the input dimension (offering the nearest divisors),
  or a codebook larger than the `n` sub-vectors of a subspace.
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) < 2:
    raise ConfigError(f"cannot product-quantize '{name}' of shape {shape}: it is not a kernel "
                      f"(fewer than 2 dimensions)")
  if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
    raise ConfigError(f"config key '{key_d}': the sub-vector length must be an int >= 1, "
                      f"got {d!r}")
  c_in, c_out = shape[-2], shape[-1]
  if c_in % d:
    raise ConfigError(
        f"config key '{key_d}': sub-vector length {d} does not divide the input dimension "
        f"{c_in} of '{name}' (shape {shape}); the nearest divisors of {c_in} are "
        f"{_nearest_divisors(c_in, int(d))} (or exclude this layer)")
  m = c_in // d
  n = int(np.prod(shape[:-2], dtype=np.int64)) * c_out
  if k > n:
    raise ConfigError(
        f"config key '{key_k}': a codebook of {k} codewords is larger than the {n} sub-vectors "
        f"per subspace of '{name}' (shape {shape}); use at most {int(math.log2(n))} bits for "
        f"this layer, or exclude it")
  return m, n


def _check_finite(x: Any, name: str) -> None:
  if not bool(jnp.all(jnp.isfinite(jnp.asarray(x)))):
    raise ConfigError(f"cannot product-quantize '{name}': it holds NaN or Inf values")


# ----------------------------------------------------------------------------- layout


def to_subvectors(w: jax.Array, d: int) -> jax.Array:
  """`(*S, C_in, C_out)` -> `(M, n, d)`: `out[m, p * C_out + o] = w[p, m d : m d + d, o]`."""
  shape = w.shape
  c_in, c_out = shape[-2], shape[-1]
  p = int(np.prod(shape[:-2], dtype=np.int64))
  m = c_in // d
  v = w.reshape(p, m, d, c_out)
  return jnp.transpose(v, (1, 0, 3, 2)).reshape(m, p * c_out, d)


def from_subvectors(v: jax.Array, shape: Sequence[int]) -> jax.Array:
  """Inverse of `to_subvectors`: `(M, n, d)` -> the kernel of `shape`."""
  shape = tuple(shape)
  m, _, d = v.shape
  c_out = shape[-1]
  p = int(np.prod(shape[:-2], dtype=np.int64))
  w = jnp.transpose(v.reshape(m, p, c_out, d), (1, 0, 3, 2))
  return w.reshape(shape)


def reconstruct(codebooks: jax.Array, codes: jax.Array, shape: Sequence[int]) -> jax.Array:
  """The kernel of `shape` that codebooks `(M, K, d)` and codes `(M, n)` stand for."""
  v = jax.vmap(lambda cb, b: cb[b])(codebooks, codes.astype(jnp.int32))
  return from_subvectors(v, shape)


# ----------------------------------------------------------------------------- k-means


def _sq_dist(x: jax.Array, cents: jax.Array) -> jax.Array:
  """Squared distances `(n, K)` between rows of `x` `(n, d)` and `cents` `(K, d)`."""
  return jnp.sum(jnp.square(x[:, None, :] - cents[None, :, :]), axis=-1)


def _assign(x: jax.Array, cents: jax.Array) -> jax.Array:
  """Index of the nearest codeword of each row (ties to the lower index)."""
  return jnp.argmin(_sq_dist(x, cents), axis=1).astype(jnp.int32)


def _kmeans_pp(key: jax.Array, x: jax.Array, k: int) -> jax.Array:
  """k-means++ seeds: the first row uniformly, each next with probability ~ D^2."""
  n = x.shape[0]
  k0, rest = jax.random.split(key)
  first = x[jax.random.randint(k0, (), 0, n)]
  cents = jnp.broadcast_to(first, (k, x.shape[1]))
  d2 = jnp.sum(jnp.square(x - first), axis=1)

  def body(i, carry):
    cents, d2 = carry
    total = jnp.sum(d2)
    logits = jnp.where(total > 0, jnp.log(d2), jnp.zeros_like(d2))   # all at 0: uniform
    c = x[jax.random.categorical(jax.random.fold_in(rest, i), logits)]
    return cents.at[i].set(c), jnp.minimum(d2, jnp.sum(jnp.square(x - c), axis=1))

  cents, _ = jax.lax.fori_loop(1, k, body, (cents, d2))
  return cents


def _lloyd(x: jax.Array, cents: jax.Array, iters: int) -> tuple[jax.Array, jax.Array]:
  k = cents.shape[0]

  def body(_, cents):
    a = _assign(x, cents)
    sums = jax.ops.segment_sum(x, a, num_segments=k)
    counts = jax.ops.segment_sum(jnp.ones(x.shape[0], x.dtype), a, num_segments=k)
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], cents)

  cents = jax.lax.fori_loop(0, iters, body, cents)
  return cents, _assign(x, cents)


@functools.partial(jax.jit, static_argnames=("k", "iters"))
def _pq_kmeans(sub: jax.Array, key: jax.Array, *, k: int, iters: int):
  """k-means in every subspace of `sub` `(M, n, d)`: codebooks `(M, K, d)`, codes `(M, n)`."""
  keys = jax.random.split(key, sub.shape[0])

  def one(kk, x):
    return _lloyd(x, _kmeans_pp(kk, x, k), iters)

  cents, codes = jax.vmap(one)(keys, sub.astype(jnp.float32))
  return cents, codes.astype(jnp.uint8)


def _key(seed: int | jax.Array) -> jax.Array:
  return seed if isinstance(seed, jax.Array) else jax.random.key(int(seed))


def pq_fit(kernel: jax.Array, d: int, k: int, *, iters: int = 20, seed: int | jax.Array = 0,
           name: str = "kernel", key_d: str = "d", key_k: str = "k"):
  """The unpacked PQ of `kernel`: codebooks float32 `(M, K, d)` and codes uint8 `(M, n)`."""
  bits_of_k(k, key_k)
  kernel = jnp.asarray(kernel)
  check_layer(kernel.shape, d, k, name, key_d, key_k)
  _check_finite(kernel, name)
  if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 0:
    raise ConfigError(f"'iters': the number of Lloyd iterations must be an int >= 0, "
                      f"got {iters!r} (quantizing '{name}')")
  return _pq_kmeans(to_subvectors(kernel, int(d)), _key(seed), k=int(k), iters=int(iters))


def pack_pq(codebooks: Any, codes: Any, shape: Sequence[int]) -> PQTensor:
  """The stored artifact of unpacked codebooks `(M, K, d)` and codes `(M, n)`."""
  k = int(codebooks.shape[1])
  bits = bits_of_k(k)
  return PQTensor(codes=packing.pack(np.asarray(codes), bits),
                  codebooks=np.asarray(codebooks, np.float32),
                  shape=tuple(int(s) for s in shape), bits=bits)


def unpack_codes(t: PQTensor) -> np.ndarray:
  """The codes `(M, n)` (uint8) of a PQTensor."""
  m = t.num_subspaces
  count = t.num_codes
  return packing.unpack(np.asarray(t.codes), t.bits, count).reshape(m, count // m)


def pq_quantize(kernel: jax.Array, d: int, k: int, *, iters: int = 20,
                seed: int | jax.Array = 0, name: str = "kernel") -> PQTensor:
  """Product quantization of a Dense / Conv kernel (the module docstring has the layout).

  Args:
    kernel: `(*S, C_in, C_out)`; sub-vectors of length `d` along `C_in`.
    d: sub-vector length; must divide `C_in`.
    k: codewords per subspace, a power of two in 2..256 (codes of log2(k) bits).
    iters: Lloyd iterations after k-means++ seeding (jit-compiled).
    seed: an int or a jax key; the result is a function of (kernel, d, k, iters, seed).
    name: the leaf's path, for error messages.
  Returns:
    A PQTensor: codes packed at log2(k) bits, codebooks float32 `(C_in / d, k, d)`.
  Raises:
    ConfigError: `d` does not divide `C_in` (the message offers the nearest divisors), `k` is
      not a power of two in 2..256 or exceeds the sub-vectors of a subspace, NaN / Inf values.
  """
  cb, codes = pq_fit(kernel, d, k, iters=iters, seed=seed, name=name)
  return pack_pq(cb, codes, jnp.shape(kernel))


def pq_dequantize(t: PQTensor, dtype=jnp.float32) -> jax.Array:
  """The kernel a PQTensor stands for: `W_hat[p, m d + j, o] = c[m, b[m, p C_out + o], j]`."""
  return reconstruct(jnp.asarray(t.codebooks), jnp.asarray(unpack_codes(t)),
                     t.shape).astype(dtype)


def pq_nbytes(t: PQTensor) -> int:
  """Bytes stored for a PQTensor: `ceil(M n bits / 8)` for the codes + `4 M K d`."""
  return packing.packed_nbytes(t.num_codes, t.bits) + int(np.asarray(t.codebooks).nbytes)


def pq_layer_nbytes(shape: Sequence[int], d: int, bits: int) -> int:
  """The same count from the shape alone: `ceil((prod(shape) / d) bits / 8) + 4 (C_in/d) 2^b d`."""
  count = int(np.prod(shape, dtype=np.int64)) // d
  return packing.packed_nbytes(count, bits) + 4 * (int(shape[-2]) // d) * (2 ** bits) * d


# ----------------------------------------------------------------------------- trees


def _selected(params: PyTree, include, exclude, key: str) -> dict[str, tuple]:
  """{path: key path tuple} of the kernels `transforms.select` picks, in tree order."""
  mask = transforms.select(params, include, exclude, kernels_only=True, key=key)
  flat_mask = jax.tree_util.tree_leaves(mask)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  out = {}
  for (kp, _), chosen in zip(flat, flat_mask):
    if chosen:
      out[transforms.path_str(kp)] = tuple(_key_name(e) for e in kp)
  return out


def _key_name(entry: Any) -> Any:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return getattr(entry, attr)
  return entry


def _get(tree: PyTree, keys: Sequence[Any]) -> Any:
  for k in keys:
    tree = tree[k]
  return tree


def _nested(items: dict[tuple, Any]) -> dict:
  """A nested dict from {key tuple: value}."""
  out: dict = {}
  for keys, value in items.items():
    node = out
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = value
  return out


def _replace(params: PyTree, values: dict[str, Any]) -> PyTree:
  """`params` with the leaves at the paths of `values` replaced (a new tree)."""
  return transforms.map_with_path(lambda p, x: values.get(p, x), params)


def pq_tree(params: PyTree, d: int, k: int, *,
            include: str | Sequence[str] = (r".*",),
            exclude: str | Sequence[str] = transforms.DEFAULT_EXCLUDE,
            iters: int = 20, seed: int = 0, key: str = "pq.include") -> PyTree:
  """PQ of the selected kernels of `params`: a PQTensor there, the float leaf elsewhere.

  Leaves are chosen by `transforms.select(params, include, exclude, key=key)` (kernels only;
  `stem_conv` and `head` excluded by default); leaf i (in tree order) is seeded with
  `fold_in(key(seed), i)`. Every selected leaf is checked before any k-means runs. The input
  tree is not modified.
  """
  bits_of_k(k, "k")
  sel = _selected(params, include, exclude, key)
  leaves = {transforms.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  for path in sel:
    check_layer(jnp.shape(leaves[path]), d, k, path, "d", "k")
    _check_finite(leaves[path], path)
  base = jax.random.key(int(seed))
  order = {p: i for i, p in enumerate(leaves)}
  out = {p: pq_quantize(leaves[p], d, k, iters=iters, seed=jax.random.fold_in(base, order[p]),
                        name=p) for p in sel}
  return _replace(params, out)


def pq_dequantize_tree(qtree: PyTree, dtype=jnp.float32) -> PyTree:
  """The float tree that a `pq_tree` / `qcnn_tree` result (or an export's params) stands for."""
  return jax.tree.map(lambda x: pq_dequantize(x, dtype) if is_pq(x) else x, qtree,
                      is_leaf=is_pq)


def _nbytes(x: Any) -> int:
  if is_pq(x):
    return pq_nbytes(x)
  if hasattr(x, "dtype"):
    return int(np.dtype(x.dtype).itemsize * int(np.prod(np.shape(x), dtype=np.int64)))
  return 0


def compression_stats(qtree: PyTree) -> dict:
  """Exact sizes of a tree holding PQTensors, from the bytes stored.

  Returns:
    float_bytes: bytes of the float model (the PQ leaves counted as float32 kernels);
    stored_bytes: bytes stored (packed codes + codebooks for PQ leaves, the others as they
      are); ratio: float_bytes / stored_bytes; pq_float_bytes / pq_stored_bytes / pq_ratio: the
      same for the product-quantized kernels only; pq_bits_per_weight: 8 pq_stored_bytes /
      (number of PQ weights); pq_weights: that number.
  """
  leaves = jax.tree.leaves(qtree, is_leaf=is_pq)
  pq_leaves = [x for x in leaves if is_pq(x)]
  pq_float = sum(4 * int(np.prod(t.shape, dtype=np.int64)) for t in pq_leaves)
  pq_stored = sum(pq_nbytes(t) for t in pq_leaves)
  other = sum(_nbytes(x) for x in leaves if not is_pq(x))
  weights = pq_float // 4
  return {
      "float_bytes": pq_float + other,
      "stored_bytes": pq_stored + other,
      "ratio": (pq_float + other) / max(pq_stored + other, 1),
      "pq_float_bytes": pq_float,
      "pq_stored_bytes": pq_stored,
      "pq_ratio": pq_float / max(pq_stored, 1),
      "pq_bits_per_weight": 8 * pq_stored / max(weights, 1),
      "pq_weights": weights,
  }


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
  """The `pq` sub-config's transform (`train.build_transform`), see `pq_transform`.

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
