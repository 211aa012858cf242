"""Errors that jcompress raises for bad input.

Every error a user can provoke with a config, a flag, a file or a workdir is a
`JCompressError`: `launch.py` prints its message as one clean line (no
traceback) and exits with status 2. The message names the config key, file,
path or layer at fault.
"""


class JCompressError(Exception):
  """Base class for errors caused by bad input (config, files, workdirs)."""


class ConfigError(JCompressError, ValueError):
  """A config key is unknown, missing, or holds an impossible value."""


class DataError(JCompressError):
  """A dataset is unknown to TFDS or cannot be fetched / prepared here."""


class WorkdirError(JCompressError):
  """A workdir or checkpoint does not fit the run that was asked for."""
