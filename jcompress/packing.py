"""Bit packing of integer codes at their real width, and the stored size of a QTensor.

`pack(codes, bits)` writes the low `bits` bits of each code into one little-endian bit stream:
code i occupies bits [i*bits, (i+1)*bits) of the stream, bit j of the stream is bit (j % 8) of
byte j // 8. So two 4-bit codes share a byte (the first in the low nibble), four 2-bit codes
share a byte, and 3-bit codes straddle byte boundaries. `n` codes take exactly
`ceil(n * bits / 8)` bytes.
"""

from __future__ import annotations

import math

import numpy as np

from jcompress.errors import ConfigError


def packed_nbytes(count: int, bits: int) -> int:
  """Bytes that `count` codes of `bits` bits take once packed: ceil(count * bits / 8)."""
  return math.ceil(count * bits / 8)


def _check_bits(bits):
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
    raise ConfigError(f"`bits` must be an int in 1..8 to pack codes, got {bits!r}")
  return int(bits)


def pack(codes, bits: int, signed: bool = False) -> np.ndarray:
  """Packs integer `codes` (any shape, flattened in C order) into a uint8 array.

  Args:
    codes: integers in [0, 2^bits - 1], or in [-2^(bits-1), 2^(bits-1) - 1] with `signed`
      (stored offset by 2^(bits-1)).
  Raises:
    ValueError: a code outside that range.
  """
  bits = _check_bits(bits)
  c = np.asarray(codes).reshape(-1).astype(np.int64)    # a copy: the input is never modified
  if signed:
    c = c + (1 << (bits - 1))
  if c.size and (c.min() < 0 or c.max() >= (1 << bits)):
    raise ValueError(f"codes outside [0, {(1 << bits) - 1}] cannot be packed in {bits} bits"
                     f"{' (after the signed offset)' if signed else ''}: "
                     f"min {c.min()}, max {c.max()}")
  if bits == 8:
    return c.astype(np.uint8)
  stream = np.unpackbits(c.astype(np.uint8)[:, None], axis=1, bitorder="little")[:, :bits]
  return np.packbits(stream.reshape(-1), bitorder="little")


def unpack(packed, bits: int, count: int, signed: bool = False) -> np.ndarray:
  """The first `count` codes of `packed` (inverse of `pack`): uint8, or int8 with `signed`."""
  bits = _check_bits(bits)
  packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
  if packed.size < packed_nbytes(count, bits):
    raise ValueError(f"{packed.size} bytes hold fewer than {count} codes of {bits} bits")
  if bits == 8:
    c = packed[:count].astype(np.int16)
  else:
    stream = np.unpackbits(packed, bitorder="little")[:count * bits].reshape(count, bits)
    c = (stream.astype(np.int16) << np.arange(bits, dtype=np.int16)).sum(axis=1)
  if signed:
    return (c - (1 << (bits - 1))).astype(np.int8)
  return c.astype(np.uint8)


def qtensor_nbytes(q) -> int:
  """Bytes a stored `quantize.QTensor` takes: packed codes plus scales, zero points, codebook.

  Codes count at `q.bits` bits each; zero points only for asymmetric uniform tensors (a
  symmetric quantizer's zero point is 0 by definition and is not stored), one byte each.
  """
  n = packed_nbytes(int(np.prod(q.codes.shape)), q.bits)
  if q.scale is not None:
    n += int(np.asarray(q.scale).nbytes)
  if q.zero_point is not None and q.kind == "uniform" and not q.symmetric:
    n += int(np.asarray(q.zero_point).size)
  if q.codebook is not None:
    n += int(np.asarray(q.codebook).nbytes)
  return n
