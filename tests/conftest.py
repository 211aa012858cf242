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


def _xla_flags_without_plumbing() -> str:
  """XLA_FLAGS of this process less the legacy-emitter flag a plumbing module adds."""
  return " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                  if f not in _PLUMBING_XLA_FLAGS)


@contextlib.contextmanager
def _default_emitters():
  with pytest.MonkeyPatch.context() as mp:
    get = compiler.get_compile_options
    mp.setattr(compiler, "get_compile_options", getattr(get, "unpatched", get))
    mp.setenv("XLA_FLAGS", _xla_flags_without_plumbing())
    yield


@pytest.fixture(scope="session")
def default_emitters():
  """A context manager: inside it, a plumbing module compiles with XLA:CPU's default emitters
  (still unoptimized), for checks of bitwise results or of two programs that must agree."""
  return _default_emitters


@pytest.fixture
def optimized_env():
  """os.environ without what a plumbing module sets for its `launch.py` subprocesses
  (JAX_DISABLE_MOST_OPTIMIZATIONS, the legacy-emitter XLA flag): for a subprocess whose numbers
  must be those of programs compiled as users' runs compile them."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_DISABLE_MOST_OPTIMIZATIONS"}
  env["XLA_FLAGS"] = _xla_flags_without_plumbing()
  return env


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


#: The test files that take longest in the default run (`-m 'not slow'`), longest first (each
#: file's summed test times, fixtures included, from `python -m pytest -q --durations=0` on a
#: 2-core AMD EPYC). xdist's `--dist loadfile` (pyproject.toml) hands the files to its two
#: workers in collection order (`pytest_configure` turns its reordering off), each taking the
#: next when it is done: a long file collected last leaves one worker running it alone at the
#: end. Running the long ones first leaves only short files for the end.
LONG_FILES = ("test_export.py", "test_train.py", "test_analysis.py", "test_models.py",
              "test_runtime.py", "test_quantize.py", "test_pq.py", "test_fastconv.py",
              "test_bnn_infer.py", "test_mixed_precision.py", "test_narrow_binary.py",
              "test_intinfer.py", "test_structured.py", "test_hessian.py", "test_binarize.py",
              "test_quantize_reference.py")


def _other_cases_are_slow(items):
  """Marks `slow` every case of a parametrized test function but its first one not already
  marked slow: the default run (README's test command, `-m 'not slow'`) checks each test
  function once, `-m slow` the other cases (CI runs both). Deterministic (collection order),
  so every xdist worker selects the same tests."""
  seen = set()
  for item in items:
    if getattr(item, "callspec", None) is None or item.get_closest_marker("slow") is not None:
      continue
    key = (str(item.path), item.originalname)
    if key in seen:
      item.add_marker(pytest.mark.slow)
    else:
      seen.add(key)


@pytest.hookimpl(tryfirst=True)   # before pytest's own hook deselects by `-m`
def pytest_collection_modifyitems(session, config, items):
  """The first case of each parametrized test in the default run, the others slow
  (`_other_cases_are_slow`); long files first (`LONG_FILES`), the rest in their usual order;
  tests within a file keep their order (the sort is stable). Deterministic, so every xdist
  worker collects the same order."""
  _other_cases_are_slow(items)
  rank = {name: i for i, name in enumerate(LONG_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
