"""Fixtures shared by the test modules, and the session's compilation cache."""

import contextlib
import os
import shutil
import tempfile

import jax
from jax._src import compiler  # the one private module the tests patch (`_with_plumbing_options`)
import pytest

from jcompress import runtime

# The tests run with the CPU tuning that launch.py applies (XLA:CPU convolutions on Eigen,
# malloc settings): the same compiled code paths as the runs they stand for. Importing
# jcompress applies nothing by itself (tests/test_runtime.py checks that in fresh processes).
runtime.configure_cpu()

# One persistent compilation cache for the session: the tests' tiny runs compile the same
# programs again and again (each `train_and_evaluate` builds its step afresh; the launcher
# tests start new processes; xdist runs two workers), and every repeat is read back instead.
# The controller makes the directory and hands it on by jax's environment variables, which
# the workers and every `launch.py` subprocess read; a directory the user set is kept.
_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_OWN_CACHE = None


def pytest_configure(config):
  global _OWN_CACHE
  # xdist's `--dist loadfile` reorders the files by their number of tests (most first) unless
  # told not to, which ignores `LONG_FILES`. Keep the collection order (pytest-xdist >= 3.8
  # reads this option; `--loadscope-reorder` on the command line asks for xdist's order).
  if (hasattr(config.option, "loadscopereorder")
      and "--loadscope-reorder" not in config.invocation_params.args):
    config.option.loadscopereorder = False
  if not os.environ.get(_CACHE_ENV):
    _OWN_CACHE = tempfile.mkdtemp(prefix="jcompress-tests-xla-cache-")
    os.environ[_CACHE_ENV] = _OWN_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  runtime.compilation_cache(os.environ[_CACHE_ENV])


def pytest_unconfigure(config):
  if _OWN_CACHE and not hasattr(config, "workerinput"):
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


#: XLA:CPU option set with XLA's optimizations off: its legacy elemental emitters compile the
#: unoptimized programs in about half the time of the default MLIR fusion emitters (ResNet-20,
#: MobileNetV2 and BNN train steps: 6.4 -> 3.4 s; optimized programs gain little). Their float
#: rounding differs in places: a check of bitwise results or of two programs' agreement over a
#: training run compiles with the default emitters (the `default_emitters` fixture).
_PLUMBING_XLA_OPTIONS = {"xla_cpu_use_fusion_emitters": False}
_PLUMBING_XLA_FLAGS = [f"--{k}={str(v).lower()}" for k, v in _PLUMBING_XLA_OPTIONS.items()]


def _with_plumbing_options(get_compile_options):
  """`jax._src.compiler.get_compile_options` with `_PLUMBING_XLA_OPTIONS` added to each
  compile's option overrides (part of the persistent cache's key, so no program compiled one
  way is read back for the other)."""
  def wrapped(*args, env_options_overrides=None, **kwargs):
    options = {**_PLUMBING_XLA_OPTIONS, **(env_options_overrides or {})}
    return get_compile_options(*args, env_options_overrides=options, **kwargs)
  wrapped.unpatched = get_compile_options
  return wrapped


@contextlib.contextmanager
def _without_xla_optimizations():
  jax.devices()   # the backend starts with the session's XLA_FLAGS, not those set below
  before = jax.config.read("jax_disable_most_optimizations")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    # launch.py subprocesses get the emitter option through XLA_FLAGS
    flags = [os.environ.get("XLA_FLAGS", "")] + _PLUMBING_XLA_FLAGS
    mp.setenv("XLA_FLAGS", " ".join(flags).strip())
    mp.setattr(compiler, "get_compile_options",
               _with_plumbing_options(compiler.get_compile_options))
    jax.config.update("jax_disable_most_optimizations", True)
    try:
      yield
    finally:
      jax.config.update("jax_disable_most_optimizations", before)


@contextlib.contextmanager
def _default_emitters():
  with pytest.MonkeyPatch.context() as mp:
    get = compiler.get_compile_options
    mp.setattr(compiler, "get_compile_options", getattr(get, "unpatched", get))
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f not in _PLUMBING_XLA_FLAGS]
    mp.setenv("XLA_FLAGS", " ".join(flags))
    yield


@pytest.fixture(scope="session")
def default_emitters():
  """A context manager: inside it, a plumbing module compiles with XLA:CPU's default emitters
  (still unoptimized), for checks of bitwise results or of two programs that must agree."""
  return _default_emitters


@pytest.fixture(scope="module", autouse=True)
def _plumbing_without_xla_optimizations(request):
  """A module marked `plumbing` (`pytestmark = pytest.mark.plumbing`: it checks the loop,
  checkpoints, artifacts, reports and the numbers the methods give, not what XLA makes of the
  code) runs with XLA's optimizations off, as flax's own train_test does: compiles take a
  fraction of the time. Its `launch.py` subprocesses get the same setting. Modules that check
  the compiled code itself (kernels, narrow dtypes, the CPU tuning) are not marked, nor
  test_pretrained.py, whose full-size networks run faster optimized than they compile; in
  those, a test of a whole model's wiring can carry the mark itself (`_plumbing_test`)."""
  if request.node.get_closest_marker("plumbing") is None:
    yield
    return
  with _without_xla_optimizations():
    yield


@pytest.fixture(autouse=True)
def _plumbing_test(request):
  """A test function marked `plumbing` in a module that is not: XLA's optimizations off for
  that test alone (its module-scoped fixtures were built before, optimized)."""
  if not any(m.name == "plumbing" for m in request.node.own_markers):
    yield
    return
  with _without_xla_optimizations():
    yield


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data_dir for the whole session: the offline digits dataset is prepared once."""
  return str(tmp_path_factory.mktemp("tfds"))


#: The test files that take longest, longest first (one process, each file from its first test's
#: start to its last test's end, fixtures included; measured before plumbing modules took the
#: legacy emitters, which shortened most of them: test_train 100 s, test_narrow_binary 98 s,
#: test_export 78 s, ... test_hessian 35 s, test_runtime 34 s). xdist's `--dist loadfile`
#: (pyproject.toml) hands the files to its two workers in collection order (`pytest_configure`
#: turns its reordering off), each taking the next when it is done: a long file collected last
#: leaves one worker running it alone at the end. Running the long ones first leaves only short
#: files for the end.
LONG_FILES = ("test_train.py", "test_narrow_binary.py", "test_export.py", "test_models.py",
              "test_fastconv.py", "test_analysis.py", "test_quantize.py", "test_intinfer.py",
              "test_bnn_infer.py", "test_quantize_reference.py", "test_pq.py",
              "test_pretrained.py", "test_actquant.py", "test_structured.py", "test_hessian.py",
              "test_runtime.py")


def pytest_collection_modifyitems(session, config, items):
  """Long files first (`LONG_FILES`), the rest in their usual order; tests within a file keep
  their order (the sort is stable). Deterministic, so every xdist worker collects the same
  order."""
  rank = {name: i for i, name in enumerate(LONG_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
