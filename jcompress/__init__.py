"""jcompress: compression of computer-vision models as functions of Flax parameter trees."""

import os as _os

from jcompress import fastconv as _fastconv

# Before any computation: XLA:CPU's convolutions on Eigen (unless XLA_FLAGS says otherwise).
_fastconv.configure_xla_cpu()
# XLA:CPU's per-call temporaries reused from the heap (off with JCOMPRESS_CPU_MALLOC=0).
if _os.environ.get(_fastconv.MALLOC_OPT_OUT) != "0":
  _fastconv.configure_cpu_malloc()

from jcompress.errors import ConfigError  # noqa: E402
from jcompress.errors import DataError  # noqa: E402
from jcompress.errors import JCompressError  # noqa: E402
from jcompress.errors import WorkdirError  # noqa: E402

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "JCompressError", "WorkdirError", "__version__"]
