"""Product quantization as pure functions: `PQTensor` (codes + codebooks), sub-vector layout,
k-means over sub-vectors, packing, sizes, and `pq_tree` / `pq_dequantize_tree` over parameter
pytrees. `jcompress.pq` adds Q-CNN (codebooks fit to a layer's responses) and the transform."""

from __future__ import annotations

import functools
import math
from typing import Any
from typing import Sequence

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
