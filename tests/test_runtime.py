"""Importing jcompress changes nothing in the process; `runtime.configure_cpu()` is the explicit
CPU tuning (XLA:CPU option, glibc malloc, inline dispatch), applied only where it should be.
Each check runs in a fresh interpreter."""

import os
import platform
import subprocess
import sys

import pytest

from jcompress import runtime


def _fresh_process(code, xla_flags=None, drop=(), **extra_env):
  """The last two lines `code` prints in a new interpreter, whose environment is this one's
  without XLA_FLAGS and `drop`, plus `xla_flags` and `extra_env`."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and k not in drop}
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  env.update(extra_env)
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300, check=True)
  return out.stdout.strip().splitlines()[-2:]


#: Imports every dependency first (they set variables of their own, e.g. TensorFlow's
#: TF2_BEHAVIOR), records the process's settings, imports every jcompress module, and prints
#: what changed and whether TensorFlow's devices were touched.
NO_SIDE_EFFECTS = """
import importlib, os, pkgutil
import absl.logging, flax, jax, ml_collections, numpy, optax, orbax.checkpoint, sklearn
import tensorflow as tf, tensorflow_datasets
calls = []
real = tf.config.set_visible_devices
tf.config.set_visible_devices = lambda *a, **k: calls.append(a) or real(*a, **k)
env, config = dict(os.environ), dict(jax.config.values)
import jcompress
for m in pkgutil.walk_packages(jcompress.__path__, "jcompress."):
  importlib.import_module(m.name)
changed = sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k))
changed += sorted(k for k in config if jax.config.values[k] != config[k])
print(changed, calls)
print(repr(os.environ.get("XLA_FLAGS")))
"""


def test_importing_every_module_changes_nothing():
  changes, xla_flags = _fresh_process(NO_SIDE_EFFECTS, drop=(runtime.MALLOC_OPT_OUT,))
  assert changes == "[] []", changes
  assert xla_flags == "None"
  # The user's own XLA_FLAGS come out as they went in.
  changes, xla_flags = _fresh_process(NO_SIDE_EFFECTS, "--xla_cpu_enable_fast_math=false")
  assert changes == "[] []" and xla_flags == repr("--xla_cpu_enable_fast_math=false")


REPORT = ("import os; {pre}from jcompress import fastconv, runtime; runtime.configure_cpu(); "
          "print(repr(os.environ.get('XLA_FLAGS', ''))); print(fastconv.default_conv_impl())")


def test_configure_cpu_puts_cpu_convolutions_on_eigen_and_auto_picks_staged():
  flags, impl = _fresh_process(REPORT.format(pre=""))
  assert runtime.XLA_CPU_FLAG in flags and impl == "staged"
  # Other flags of the user's are kept beside it.
  flags, impl = _fresh_process(REPORT.format(pre=""), "--xla_cpu_enable_fast_math=false")
  assert "--xla_cpu_enable_fast_math=false" in flags and runtime.XLA_CPU_FLAG in flags
  # Without the call, the convolutions stay on XLA's default (YNNPACK here).
  plain = "import os; from jcompress import fastconv; print(repr(os.environ.get('XLA_FLAGS', ''))); print(fastconv.default_conv_impl())"  # noqa: E501
  assert _fresh_process(plain) == [repr(""), "fast"]


@pytest.mark.slow
def test_user_setting_a_running_backend_or_an_unknown_option_is_left_alone():
  own = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
  flags, impl = _fresh_process(REPORT.format(pre=""), own)
  assert flags == repr(own) and impl == "fast"
  # jax already computed something: the flags were read, adding one would be a lie.
  early = "import jax; jax.numpy.zeros(1).block_until_ready(); "
  flags, impl = _fresh_process(REPORT.format(pre=early))
  assert flags == repr("") and impl == "fast"
  # A jaxlib that does not know the option: adding it would abort the process at start.
  assert runtime.jaxlib_knows_option(runtime.YNN_OPTION)
  assert not runtime.jaxlib_knows_option("xla_cpu_no_such_option_of_jcompress")
  unknown = ("from jcompress import runtime; runtime.jaxlib_knows_option = lambda *a: False; "
             "print(runtime.configure_cpu(malloc=False)); import os; "
             "print(repr(os.environ.get('XLA_FLAGS', '')))")
  assert _fresh_process(unknown) == [str({"xla_flags": False, "malloc": False}), repr("")]


FAULTS = """
import resource
import jax, jax.numpy as jnp
from jcompress import runtime
runtime.configure_cpu()
x, ones = jnp.ones((8192, 2048)), jnp.ones((1, 8192))
f = jax.jit(lambda x: ones @ (x * 2.0 + 1.0))   # a 64 MB temporary per call
def faults():
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
calls = [faults() for _ in range(24)]
print(runtime.malloc_configured, jax.config.values['jax_cpu_enable_async_dispatch'])
print(min(calls[4:]))
"""

#: Where `configure_cpu_malloc` must apply its settings (Linux with glibc).
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="glibc malloc settings")
@pytest.mark.slow
def test_configure_cpu_lets_xla_temporaries_reuse_the_heap_unless_opted_out():
  # A 64 MB temporary is 16384 pages: mapped afresh on every call, each one faults.
  # Fewest page faults of calls 5-24: with the heap reused some call has none (while the heap
  # grows to its peak some still fault); mapped afresh, every call faults on every page.
  run = lambda extra: _fresh_process(  # noqa: E731
      FAULTS, drop=(*runtime.MALLOC_ENV, runtime.MALLOC_OPT_OUT, "JAX_PLATFORMS"), **extra)
  applied, fewest = run({})
  # Applied, with the computations run in the calling thread (its heap).
  assert applied == "True False", applied
  assert int(fewest) < 2000, f"{fewest} page faults in every call despite the malloc settings"
  # Opted out, or the user's own malloc setting: malloc and dispatch are left alone, and the
  # temporary faults on every call.
  for extra in ({runtime.MALLOC_OPT_OUT: "0"}, {"MALLOC_ARENA_MAX": "8"}):
    applied, fewest = run(extra)
    assert applied == "False True" and int(fewest) > 8000, (extra, applied, fewest)


def test_configure_cpu_only_where_jax_computes_on_the_cpu():
  # JAX_PLATFORMS naming an accelerator first: nothing applied (no backend starts); naming the
  # CPU first: applied.
  code = ("import jax, os; from jcompress import runtime; runtime.configure_cpu(); "
          "print(runtime.malloc_configured, repr(os.environ.get('XLA_FLAGS', ''))); "
          "print(jax.config.values['jax_cpu_enable_async_dispatch'])")
  drop = (*runtime.MALLOC_ENV, runtime.MALLOC_OPT_OUT)
  assert _fresh_process(code, drop=drop, JAX_PLATFORMS="tpu,cpu") == ["False ''", "True"]
  if GLIBC:
    assert _fresh_process(code, drop=drop, JAX_PLATFORMS="cpu") == [
        f"True {runtime.XLA_CPU_FLAG!r}", "False"]


#: Imports the entry points' modules, then builds an experiment with a bad model name:
#: TensorFlow is loaded by neither (it starts with the first input pipeline).
NO_TENSORFLOW = """
import sys, tempfile
import jcompress, jcompress.train, jcompress.export, jcompress.analysis, jcompress.sweep
from jcompress import config as config_lib, experiment
from jcompress.errors import ConfigError
loaded = "tensorflow" in sys.modules
c = config_lib.base_config()
c.data, c.model = "digits", "resnet9000"
c.data_dir = tempfile.mkdtemp()   # were the data read first, it would be prepared here
try:
  experiment.make_experiment(c)
  error = "none"
except ConfigError as e:
  error = "resnet9000" in str(e)
print(loaded, error)
print("tensorflow" in sys.modules)
"""


def test_tensorflow_waits_for_the_first_pipeline():
  (first, after) = _fresh_process(NO_TENSORFLOW)
  assert first == "False True", first      # not loaded by imports; the model error names it
  assert after == "False"                  # nor by the config and model checks


CACHE = """
import os, sys
import jax, jax.numpy as jnp
from jcompress import runtime
path = runtime.compilation_cache(sys.argv[1])
jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()
print(path == os.path.abspath(sys.argv[1]))
print(len(os.listdir(path)))
"""


def test_compilation_cache_keeps_what_a_process_compiled(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")
         and k != "JAX_COMPILATION_CACHE_DIR"}
  path = tmp_path / "cache"
  out = subprocess.run([sys.executable, "-c", CACHE, str(path)], env=env, capture_output=True,
                       text=True, timeout=300, check=True).stdout.split()
  assert out[-2] == "True"
  assert int(out[-1]) >= 1, "no entry written"        # a tiny program, cached at min 0 s
