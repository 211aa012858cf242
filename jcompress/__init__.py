"""jcompress: compression of computer-vision models as functions of Flax parameter trees."""

from jcompress.errors import ConfigError, DataError, JCompressError, WorkdirError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "JCompressError", "WorkdirError", "__version__"]
