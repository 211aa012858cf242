"""jcompress: compression of computer-vision models as functions of Flax parameter trees."""

from jcompress.errors import ConfigError
from jcompress.errors import DataError
from jcompress.errors import JCompressError
from jcompress.errors import WorkdirError

__version__ = "0.1.0"

__all__ = ["ConfigError", "DataError", "JCompressError", "WorkdirError", "__version__"]
