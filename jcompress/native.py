"""Native CPU kernels for the exported artifacts' inference, built on first use.

`int8_matmul` is the exact int8 product of `jcompress.intinfer` (uint8 activation codes times
int8 weight codes, int32 sums) as an XLA FFI custom call, written for AVX-512 VNNI
(`SOURCE`: one VPDPBUSD instruction sums four uint8 x int8 products into each of 16 int32
lanes). XLA:CPU hands an int8 `dot_general` to YNNPACK, which ran resnet18_cifar's im2col
products at 570-755 GOP/s on the 2-core AVX-512 VNNI EPYC (Zen 5), this kernel at 1,140-1,880
(`python benchmarks/int_rates.py`, four runs on 2026-12-08); the int8 ResNet-18 artifact's
images/s go from 1.15x to about 2x the float one's (benchmarks/inference.py,
docs/inference_zen5.md).

Nothing happens at import. `load()` (called by `available()`) compiles `SOURCE` with the
system's C++ compiler (`CXX`, default g++) against jaxlib's FFI headers into a cache directory
(`JCOMPRESS_CACHE`, default ~/.cache/jcompress; a file named by the digest of the source, the
flags and the jaxlib version, written atomically, so processes share it) and registers it with
jax for the CPU. Where the CPU has no AVX-512 VNNI, no compiler is found or the build fails,
`available()` is False with the reason (`unavailable_reason()`), and the integer inference
keeps XLA's `dot_general`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import logging
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp

#: The FFI target name the kernel is registered under.
TARGET = "jcompress_int8_matmul"
#: Columns per packed panel of the weights (the kernel's four 16-lane vectors).
PANEL = 64
#: The CPU features the kernel is compiled for (names as /proc/cpuinfo lists them).
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
#: The loaded library, once its target is registered.
_REGISTERED: list = []
#: The compiler's flags (the instruction sets of CPU_FLAGS; -w: jaxlib's headers warn).
_COMPILE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx512f", "-mavx512bw",
                  "-mavx512vl", "-mavx512vnni")


def cpu_flags() -> set[str]:
  """The feature flags /proc/cpuinfo lists for the first CPU (empty off Linux)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("flags"):
          return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return set()


def cache_dir() -> str:
  """Where built kernels are kept: JCOMPRESS_CACHE, else $XDG_CACHE_HOME/jcompress (default
  ~/.cache/jcompress)."""
  return os.environ.get("JCOMPRESS_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jcompress")


def _build(compiler: str) -> str:
  """The path of the compiled library (built here unless the cache has it)."""
  source = SOURCE.encode()
  include = jax.ffi.include_dir()
  key = hashlib.sha256(source + " ".join(_COMPILE_FLAGS).encode() + include.encode()
                       + importlib.metadata.version("jaxlib").encode()).hexdigest()[:16]
  out_dir = os.path.join(cache_dir(), "native")
  path = os.path.join(out_dir, f"int8_matmul-{key}.so")
  if os.path.exists(path):
    return path
  os.makedirs(out_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
    cc, so = os.path.join(tmp, "int8_matmul.cc"), os.path.join(tmp, "int8_matmul.so")
    with open(cc, "w") as f:
      f.write(SOURCE)
    proc = subprocess.run([compiler, *_COMPILE_FLAGS, "-w", f"-I{include}", cc, "-o", so],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
      raise RuntimeError(f"{compiler} failed: {proc.stderr.strip()[-500:]}")
    os.replace(so, path)
  return path


@functools.cache
def load() -> str | None:
  """Builds and registers the kernel once per process; None when that worked, else the
  reason it is unavailable (logged once)."""
  why = None
  if platform.machine().lower() not in ("x86_64", "amd64"):
    why = f"not an x86-64 CPU ({platform.machine()})"
  elif missing := [f for f in CPU_FLAGS if f not in cpu_flags()]:
    why = f"the CPU lacks {', '.join(missing)}"
  elif (compiler := shutil.which(os.environ.get("CXX", "g++"))) is None:
    why = f"no C++ compiler ({os.environ.get('CXX', 'g++')}) to build the kernel"
  else:
    try:
      lib = ctypes.cdll.LoadLibrary(_build(compiler))
      if not _REGISTERED:   # jax keeps a target for the process's life
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JcInt8Matmul),
                                    platform="cpu")
        _REGISTERED.append(lib)
    except (OSError, RuntimeError, AttributeError) as e:
      why = f"building the kernel failed: {e}"
  if why:
    logging.info("jcompress.native: the int8 kernel is unavailable (%s); integer layers use "
                 "XLA's dot_general", why)
  return why


def available() -> bool:
  """Whether `int8_matmul` runs here (the default backend is the CPU and `load()` worked)."""
  return jax.default_backend() == "cpu" and load() is None


def unavailable_reason() -> str | None:
  if jax.default_backend() != "cpu":
    return f"jax computes on {jax.default_backend()}, the kernel is for the CPU"
  return load()


def pack(w: jax.Array) -> jax.Array:
  """int8 (K, N) weights (K a multiple of 4) in the kernel's layout: panels of `PANEL`
  columns (the last zero-padded), in each, K / 4 rows of PANEL columns x 4 depths."""
  k, n = w.shape
  panels = -(-n // PANEL)
  wp = jnp.pad(w, ((0, 0), (0, panels * PANEL - n)))
  return wp.reshape(k // 4, 4, panels, PANEL).transpose(2, 0, 3, 1).reshape(-1)


def prepare(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """What `int8_matmul` needs of int8 (K, N) weights, computed once where they are constant
  (`export.inference_fn` does it when it decodes the artifact): the packed weights (K padded
  to a multiple of 4 with zeros) and their int32 column sums (padded to whole panels)."""
  k, n = w.shape
  if k % 4:
    w = jnp.pad(w, ((0, 4 - k % 4), (0, 0)))
  sums = jnp.sum(w.astype(jnp.int32), axis=0)
  return pack(w), jnp.pad(sums, (0, -(-n // PANEL) * PANEL - n))


def int8_matmul(a: jax.Array, w: jax.Array, offset: int = 0,
                prepared: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
  """(a - offset) @ w, exactly, in int32: uint8 (M, K) `a`, int8 (K, N) `w` (`prepared`:
  `prepare(w)`, else computed here); K is padded to a multiple of 4 with zeros. Requires
  `available()`."""
  if a.dtype != jnp.uint8 or w.dtype != jnp.int8:
    raise TypeError(f"int8_matmul takes uint8 x int8, got {a.dtype} x {w.dtype}")
  (m, k), n = a.shape, w.shape[1]
  if k % 4:
    a = jnp.pad(a, ((0, 0), (0, 4 - k % 4)))
  packed, sums = prepare(w) if prepared is None else prepared
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.int32))
  return call(a, packed, offset * sums)


#: The kernel's C++ source (an XLA FFI handler), compiled by `load`.
SOURCE = r"""// The exact int8 matrix product C = A B - comp of jcompress's integer inference
// (jcompress/native.py builds and registers it): A uint8 (M, K), B int8 packed by
// `pack` (panels of 64 columns, four depths per 32-bit lane), comp int32 per column (the
// offset of A's codes times B's column sums), C int32 (M, N). One VPDPBUSD (AVX-512 VNNI) sums
// four uint8 x int8 products into each int32 lane, without saturation, so C is exact.
// Row blocks are shared between the calling thread and XLA's intra-op thread pool.
#include <immintrin.h>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <algorithm>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// B packed: for each panel of 64 columns (zero-padded), K / 4 steps of 64 columns x 4 depths:
// panel p at offset p * K * 64.
constexpr int kNR = 64;

// Six rows x 64 columns of C, 24 accumulators in registers: named variables, one macro per
// row (GCC kept an array of accumulators on the stack).
#define JC_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define JC_INIT(r)                                                          \
  __m512i c##r##0 = _mm512_setzero_si512(), c##r##1 = c##r##0, c##r##2 = c##r##0, \
          c##r##3 = c##r##0;                                                \
  const uint8_t* a##r = a + r * lda;
#define JC_FMA(r)                                                           \
  {                                                                         \
    int32_t w;                                                              \
    std::memcpy(&w, a##r + 4 * k, 4);                                       \
    const __m512i v = _mm512_set1_epi32(w);                                 \
    c##r##0 = _mm512_dpbusd_epi32(c##r##0, v, b0);                          \
    c##r##1 = _mm512_dpbusd_epi32(c##r##1, v, b1);                          \
    c##r##2 = _mm512_dpbusd_epi32(c##r##2, v, b2);                          \
    c##r##3 = _mm512_dpbusd_epi32(c##r##3, v, b3);                          \
  }
#define JC_STORE(r) \
  store(r, 0, c##r##0); store(r, 1, c##r##1); store(r, 2, c##r##2); store(r, 3, c##r##3);

inline void micro6(const uint8_t* a, int64_t lda, int64_t K, const int8_t* bp, int32_t* c,
                   int64_t ldc, int ncols, const int32_t* comp) {
  JC_ROWS(JC_INIT)
  for (int64_t k = 0; k < K / 4; ++k) {
    const int8_t* b = bp + k * 256;
    const __m512i b0 = _mm512_loadu_si512(b), b1 = _mm512_loadu_si512(b + 64),
                  b2 = _mm512_loadu_si512(b + 128), b3 = _mm512_loadu_si512(b + 192);
    JC_ROWS(JC_FMA)
  }
  auto store = [&](int r, int v, __m512i x) {
    const int n = std::min(16, ncols - 16 * v);
    if (n <= 0) return;
    const __mmask16 m = n == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
    _mm512_mask_storeu_epi32(c + r * ldc + 16 * v, m,
                             _mm512_sub_epi32(x, _mm512_maskz_loadu_epi32(m, comp + 16 * v)));
  };
  JC_ROWS(JC_STORE)
}

// One row of C (the rows left over by micro6).
inline void micro1(const uint8_t* a, int64_t K, const int8_t* bp, int32_t* c, int ncols,
                   const int32_t* comp) {
  __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0;
  for (int64_t k = 0; k < (K + 3) / 4; ++k) {
    uint8_t w4[4] = {0, 0, 0, 0};
    std::memcpy(w4, a + 4 * k, std::min<int64_t>(4, K - 4 * k));
    int32_t w;
    std::memcpy(&w, w4, 4);
    const __m512i v = _mm512_set1_epi32(w);
    const int8_t* b = bp + k * 256;
    c0 = _mm512_dpbusd_epi32(c0, v, _mm512_loadu_si512(b));
    c1 = _mm512_dpbusd_epi32(c1, v, _mm512_loadu_si512(b + 64));
    c2 = _mm512_dpbusd_epi32(c2, v, _mm512_loadu_si512(b + 128));
    c3 = _mm512_dpbusd_epi32(c3, v, _mm512_loadu_si512(b + 192));
  }
  __m512i acc[4] = {c0, c1, c2, c3};
  for (int v = 0; v < 4; ++v) {
    const int n = std::min(16, ncols - 16 * v);
    if (n <= 0) break;
    const __mmask16 m = n == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1);
    _mm512_mask_storeu_epi32(c + 16 * v, m,
                             _mm512_sub_epi32(acc[v], _mm512_maskz_loadu_epi32(m, comp + 16 * v)));
  }
}

// Rows [r0, r1) of C = A B.
void rows(const uint8_t* a, const int8_t* bp, const int32_t* comp, int32_t* c, int64_t r0,
          int64_t r1, int64_t K, int64_t N) {
  constexpr int MR = 6;
  const int64_t K4 = K / 4;
  const int64_t panels = (N + kNR - 1) / kNR;
  // Row chunks whose A rows stay in L2 across the column panels.
  const int64_t mc =
      std::max<int64_t>(MR, (int64_t(256 * 1024) / std::max<int64_t>(K, 1)) / MR * MR);
  for (int64_t rc = r0; rc < r1; rc += mc) {
    int64_t re = std::min(r1, rc + mc);
    for (int64_t p = 0; p < panels; ++p) {
      const int8_t* bpp = bp + p * K4 * 256;
      int ncols = (int)std::min<int64_t>(kNR, N - p * kNR);
      int64_t r = rc;
      for (; r + MR <= re; r += MR)
        micro6(a + r * K, K, K, bpp, c + r * N + p * kNR, N, ncols, comp + p * kNR);
      for (; r < re; ++r)
        micro1(a + r * K, K, bpp, c + r * N + p * kNR, ncols, comp + p * kNR);
    }
  }
}

struct Job {
  const uint8_t* a; const int8_t* bp; const int32_t* comp; int32_t* c;
  int64_t M, K, N, parts;
  std::atomic<int64_t> next{0}, done{0};
  void work() {
    for (;;) {
      int64_t i = next.fetch_add(1);
      if (i >= parts) return;
      int64_t r0 = M * i / parts, r1 = M * (i + 1) / parts;
      rows(a, bp, comp, c, r0, r1, K, N);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer bp,
                      ffi::AnyBuffer comp, ffi::Result<ffi::AnyBuffer> c) {
  auto ad = a.dimensions();
  auto cd = c->dimensions();
  if (ad.size() != 2 || cd.size() != 2) return ffi::Error::InvalidArgument("rank 2 expected");
  int64_t M = ad[0], K = ad[1], N = cd[1];
  if (K % 4 != 0) return ffi::Error::InvalidArgument("depth K must be a multiple of 4");
  if (a.element_type() != ffi::DataType::U8 || bp.element_type() != ffi::DataType::S8 ||
      comp.element_type() != ffi::DataType::S32 || c->element_type() != ffi::DataType::S32)
    return ffi::Error::InvalidArgument("expected uint8 A, int8 packed B, int32 comp and C");
  if (cd[0] != M || (int64_t)comp.element_count() < N ||
      (int64_t)bp.element_count() < (N + kNR - 1) / kNR * kNR * K)
    return ffi::Error::InvalidArgument("operand sizes do not match");
  auto job = std::make_shared<Job>();
  job->a = reinterpret_cast<const uint8_t*>(a.untyped_data());
  job->bp = reinterpret_cast<const int8_t*>(bp.untyped_data());
  job->comp = reinterpret_cast<const int32_t*>(comp.untyped_data());
  job->c = reinterpret_cast<int32_t*>(c->untyped_data());
  job->M = M; job->K = K; job->N = N;
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t work = M * K * N;
  int64_t helpers = work < (int64_t(1) << 22) ? 0 : threads;   // small products: one thread
  job->parts = std::max<int64_t>(1, std::min<int64_t>((helpers + 1) * 4, M / 6));
  for (int64_t t = 0; t < helpers && t + 1 < job->parts; ++t)
    pool.Schedule([job] { job->work(); });
  job->work();
  while (job->done.load(std::memory_order_acquire) < job->parts) _mm_pause();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JcInt8Matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
"""
