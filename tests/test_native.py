"""The native int8 kernel (`jcompress.native`): exact against numpy's int64 products, and
the reasons it reports where it cannot be built."""

import jax
import numpy as np
import pytest

from jcompress import native

pytestmark = pytest.mark.plumbing

needs_kernel = pytest.mark.skipif(not native.available(),
                                  reason=f"jcompress.native: {native.unavailable_reason()}")


@needs_kernel
@pytest.mark.parametrize("m,k,n", [(1, 4, 1), (7, 27, 3), (13, 36, 64), (50, 576, 70),
                                   (301, 1152, 130)])
@pytest.mark.parametrize("offset", [0, 128])
def test_int8_matmul_is_exact(m, k, n, offset):
  """Row counts off the kernel's blocks of 6, depths off multiples of 4, column counts off
  its panels of 64; the extremes of both ranges included."""
  rng = np.random.RandomState(m + k + n)
  a = rng.randint(0, 256, (m, k)).astype(np.uint8)
  w = rng.randint(-128, 128, (k, n)).astype(np.int8)
  a[0, :] = 255
  w[:, 0] = -128
  want = (a.astype(np.int64) - offset) @ w.astype(np.int64)
  got = jax.jit(native.int8_matmul, static_argnums=2)(a, w, offset)
  assert got.dtype == np.int32
  np.testing.assert_array_equal(np.asarray(got), want)
  prepared = native.prepare(w)   # packed once, as inference_fn does when it decodes
  np.testing.assert_array_equal(np.asarray(native.int8_matmul(a, w, offset, prepared)), want)


def test_int8_matmul_refuses_other_dtypes():
  with pytest.raises(TypeError, match="uint8 x int8"):
    native.int8_matmul(np.zeros((2, 4), np.int8), np.zeros((4, 2), np.int8))


def test_unavailable_kernel_says_why(monkeypatch):
  """Not x86, no VNNI, or no compiler: load() returns the reason instead of raising; the cache
  is cleared around the test so the process's own answer is unchanged."""
  native.load.cache_clear()
  try:
    monkeypatch.setattr(native.platform, "machine", lambda: "aarch64")
    assert native.load() == "not an x86-64 CPU (aarch64)"
    native.load.cache_clear()
    monkeypatch.setattr(native.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(native, "cpu_flags", lambda: {"avx2"})
    assert "lacks avx512f" in native.load()
    native.load.cache_clear()
    monkeypatch.setattr(native, "cpu_flags", lambda: set(native.CPU_FLAGS))
    monkeypatch.setenv("CXX", "no-such-compiler-jc")
    assert "no C++ compiler (no-such-compiler-jc)" in native.load()
  finally:
    native.load.cache_clear()
