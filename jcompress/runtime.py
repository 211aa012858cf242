"""Explicit device tuning for XLA:CPU: what `launch.py` and the benchmarks call before jax starts.

Importing jcompress changes nothing in the process. The CPU speed-ups are one call,

    import jcompress.runtime
    jcompress.runtime.configure_cpu()     # before the first jax computation

made by `launch.py` and `benchmarks/` (and the test suite's conftest), never by an import. It
changes, only where jax will compute on the CPU (`computes_on_cpu`):

  1. XLA_FLAGS: adds `XLA_CPU_FLAG` (YNNPACK for matmuls only, so convolutions run on XLA's
     Eigen kernels; `configure_xla_cpu`), unless the user's XLA_FLAGS already sets that option,
     jax's backends are already started (the flags are read once), or the installed jaxlib does
     not know the option (an unknown XLA flag aborts the process).
  2. glibc malloc: no `mmap` for large blocks and no trimming of the heap's top, so XLA:CPU's
     per-call temporaries are reused from the heap instead of being mapped and faulted in on
     every step; and jax's async CPU dispatch turned off, so computations allocate from the
     calling thread's (main) heap (`configure_cpu_malloc`). Skipped where the user chose a
     malloc setting (`MALLOC_ENV`), off Linux/glibc, and with JCOMPRESS_CPU_MALLOC=0.

docs/performance.md says what each buys (on the 2-core AVX2 CPU: convolutions 78 -> 115
GFLOP/s with 1; the float train step 29.7 -> 35.0 images/s with 2).
"""

from __future__ import annotations

import ctypes
import glob
import importlib.metadata
import importlib.util
import mmap
import os
import sys

import jax

#: The XLA:CPU option that chooses which operations go to the YNNPACK library.
YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"
#: What `configure_xla_cpu` adds to XLA_FLAGS: YNNPACK for matmuls only, so that convolutions
#: run on XLA's Eigen kernels. On the 2-core AVX2 CPU (benchmarks/conv_rates.py, batch 64)
#: resnet18_cifar's convolutions ran at 115 GFLOP/s with it against 78 without (stage 1's
#: 64-channel convs: 139/126 GFLOP/s forward/input gradient against 48-72), and XLA's own
#: kernel gradients (72-140 GFLOP/s) beat `fastconv.kernel_grad` (47-79) there. Standalone
#: dots go to YNNPACK as well (INDIVIDUAL_DOT): without it an int8 x int8 -> int32 matmul ran
#: on XLA's own loops at 42-83 GOP/s, with it at 250-690 (AVX-512 VNNI CPU; the integer
#: inference of `jcompress.intinfer` is such matmuls); the float train step was unchanged.
XLA_CPU_FLAG = (f"--{YNN_OPTION}=LIBRARY_FUSION_TYPE_DOT,"
                "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")

#: What `configure_cpu_malloc` sets: glibc `mallopt` parameter (malloc.h), value, and the
#: environment variable that sets the same in a process started with it (`malloc_env`).
MALLOC_SETTINGS = ((-4, 0, "MALLOC_MMAP_MAX_"),                  # M_MMAP_MAX
                   (-1, 2**31 - 1, "MALLOC_TRIM_THRESHOLD_"))    # M_TRIM_THRESHOLD
#: `configure_cpu` leaves malloc alone when this environment variable is "0".
MALLOC_OPT_OUT = "JCOMPRESS_CPU_MALLOC"
#: Environment variables by which a user chooses glibc's malloc behaviour: with any of them
#: set, `configure_cpu_malloc` leaves malloc alone.
MALLOC_ENV = ("GLIBC_TUNABLES", "MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
              "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "LD_PRELOAD")

#: Whether `configure_cpu_malloc` has applied `MALLOC_SETTINGS` in this process.
malloc_configured = False


def configure_cpu(xla_flags: bool = True, malloc: bool | None = None) -> dict:
  """Applies the CPU tuning of this module's docstring; returns what it changed.

  Args:
    xla_flags: add `XLA_CPU_FLAG` to XLA_FLAGS (`configure_xla_cpu`).
    malloc: apply the malloc settings (`configure_cpu_malloc`); None: unless the environment
      sets JCOMPRESS_CPU_MALLOC=0.

  Returns:
    {"xla_flags": bool, "malloc": bool}: which of the two were applied. Nothing is applied
    where jax will not compute on the CPU (`computes_on_cpu`). Calling it again is harmless.
  """
  applied = {"xla_flags": False, "malloc": False}
  if not computes_on_cpu():
    return applied
  if xla_flags:
    applied["xla_flags"] = configure_xla_cpu()
  if malloc is None:
    malloc = os.environ.get(MALLOC_OPT_OUT) != "0"
  if malloc:
    applied["malloc"] = configure_cpu_malloc()
  return applied


def compilation_cache(path: str, min_compile_secs: float = 0.0) -> str:
  """Turns on jax's persistent compilation cache in `path` (created if missing): a program
  compiled once, in this process or another one given the same `path` (the points of a sweep,
  a resumed run, the test session's workers), is read back instead of compiled again. Entries
  are keyed by the program, the jax/jaxlib version and the XLA flags, so a stale entry is never
  used. `min_compile_secs`: cache only compiles at least that long (jax's default is 1 s; 0
  caches the small programs too). Returns the absolute path."""
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def jaxlib_knows_option(option: str = YNN_OPTION) -> bool:
  """Whether the installed jaxlib's XLA library contains the flag `option` (an unknown flag in
  XLA_FLAGS aborts the process when jax starts its backend). Searches jaxlib's shared
  libraries for the name; about 0.03 s."""
  try:
    import jaxlib  # noqa: PLC0415
  except ImportError:
    return False
  needle = option.encode()
  root = os.path.dirname(jaxlib.__file__)
  for path in sorted(glob.glob(os.path.join(root, "**", "*.so"), recursive=True),
                     key=os.path.getsize, reverse=True):
    try:
      with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m.find(needle) >= 0:
          return True
    except (OSError, ValueError):
      continue
  return False


def _backends_started() -> bool:
  try:
    from jax._src import xla_bridge  # noqa: PLC0415
    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return False


def configure_xla_cpu() -> bool:
  """Adds `XLA_CPU_FLAG` to the XLA_FLAGS environment variable, unless the user's XLA_FLAGS
  already set that option (theirs wins), jax's backends are already initialized (too late:
  the flags are read once), or jaxlib does not know the option (`jaxlib_knows_option`).
  Returns whether it added the flag."""
  flags = os.environ.get("XLA_FLAGS", "")
  if YNN_OPTION in flags or _backends_started() or not jaxlib_knows_option():
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {XLA_CPU_FLAG}".strip()
  return True


def configure_cpu_malloc() -> bool:
  """Lets glibc's malloc keep and reuse the large blocks XLA:CPU allocates for every run.

  XLA:CPU allocates a compiled function's temporary buffer (336 MB for resnet18_cifar's train
  step at batch 64) on each call and frees it at the end. glibc serves a block that large with
  a fresh `mmap` and unmaps it on `free`, so every step touched 340 MB of new pages: 87,000
  page faults and 0.3 s of kernel time per step on the 2-core CPU. Here no `mmap` for large
  blocks and no trimming of the heap's top keep the freed buffer in the main heap, where the
  next step finds it; and jax's CPU computations run in the calling thread
  (`jax_cpu_enable_async_dispatch` off; single-device computations only), so that they
  allocate from that heap: run on jax's dispatch thread, from a thread arena whose heaps hold
  64 MB at most, glibc maps a large block whatever `mmap` limit is set. With both: 0-300 faults
  per step, float train step 29.7 -> 35.0 images/s, fed by the tf.data pipeline 29.1 -> 36.2
  (medians of 3 alternated processes; docs/performance.md). The process keeps its peak heap
  (2.2 against 1.6 GB of RSS for that benchmark). jax releases the GIL while a computation
  runs inline, so Python threads keep running.

  Linux with glibc only; only where jax computes on the CPU (`computes_on_cpu`: elsewhere the
  settings would only keep freed host memory); and only where the user chose nothing
  (`MALLOC_ENV` unset: their settings or a preloaded allocator win, and dispatch stays as it
  is). Calling it again is harmless. Returns whether the settings were applied.
  """
  if (not sys.platform.startswith("linux") or any(v in os.environ for v in MALLOC_ENV)
      or not computes_on_cpu()):
    return False
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    libc.gnu_get_libc_version()   # glibc, not musl: its mallopt ignores these parameters
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  global malloc_configured
  malloc_configured = all(mallopt(param, value) == 1 for param, value, _ in MALLOC_SETTINGS)
  if malloc_configured:
    jax.config.update("jax_cpu_enable_async_dispatch", False)
  return malloc_configured


def computes_on_cpu() -> bool:
  """Whether jax's default backend will be the CPU, without starting a backend: the first of
  `jax_platforms` (JAX_PLATFORMS) where set, else whether no GPU/TPU plugin is installed (jax
  finds them in the `jax_plugins` namespace or entry points; libtpu)."""
  platforms = str(jax.config.jax_platforms or "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  if any(importlib.util.find_spec(m) is not None for m in ("jax_plugins", "libtpu")):
    return False
  return not importlib.metadata.entry_points(group="jax_plugins")


def malloc_env() -> dict:
  """The environment variables that give a new process `configure_cpu_malloc`'s settings
  (benchmarks/suite.py --peer_malloc starts its peers with them)."""
  return {name: str(value) for _, value, name in MALLOC_SETTINGS}
