"""What `launch.py` does once its flags are parsed: dispatch on --mode, report errors.

Kept free of jax and TensorFlow imports at module level, so that bad flags are
reported in a fraction of a second.
"""

from __future__ import annotations

import json
import sys

from absl import logging

from jcompress.errors import JCompressError


def _root_cause(e: BaseException) -> BaseException:
  """The innermost exception of a chain (config_flags wraps and re-raises)."""
  seen = set()
  while id(e) not in seen:
    seen.add(id(e))
    nxt = e.__cause__ or e.__context__
    if nxt is None:
      break
    e = nxt
  return e


def _config_arg(argv) -> str:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return "?"


def describe_flag_error(e: BaseException, argv) -> str:
  """One sentence for a failure while parsing flags (config file loading included)."""
  root = _root_cause(e)
  config = _config_arg(argv)
  if isinstance(root, JCompressError):
    return str(root)
  if isinstance(root, SyntaxError):
    return (f"config file '{root.filename}' line {root.lineno}: {root.msg} "
            f"({(root.text or '').strip()!r})")
  if isinstance(root, (AttributeError, KeyError)):
    key = str(root).strip("\"'")
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.") and key in a]
    if overrides:
      return (f"unknown config key '{key}' in {overrides[0]}: the config of "
              f"{config.split(':')[0]} has no such key")
  if isinstance(root, (ImportError, NameError, TypeError, AttributeError)) and config != "?":
    return f"config file '{config.split(':')[0]}' failed to load: {type(root).__name__}: {root}"
  return str(e).splitlines()[0] if str(e) else type(e).__name__


def _config_value(config_flag):
  """The parsed ConfigDict; a config file that could not be found becomes a JCompressError."""
  from ml_collections import config_flags  # noqa: PLC0415
  value = config_flag.value
  if value is None:
    return None
  try:
    value.keys()
  except OSError as e:
    from absl import flags  # noqa: PLC0415
    path = config_flags.get_config_filename(flags.FLAGS[config_flag.name])
    import os  # noqa: PLC0415
    if not os.path.exists(path):
      raise JCompressError(f"config file '{path}' does not exist") from None
    reason = str(_root_cause(e)).strip().splitlines()[-1]
    raise JCompressError(f"config file '{path}' could not be loaded: {reason}") from None
  return value


class _QuietLibraries:
  """Drops INFO records of orbax and jax internals (per-save chatter); warnings stay."""

  _NOISY = ("/orbax/", "/jax/_src/", "/etils/", "/tensorflow_datasets/")

  def filter(self, record) -> bool:
    return record.levelno >= 30 or not any(p in record.pathname for p in self._NOISY)


def run(config_flag, workdir: str, mode: str, *, sweep_index: int | None = None,
        summarize: bool = False, analyze_compare: str | None = None) -> int:
  """Runs `mode` on `workdir`; a JCompressError becomes one line on stderr and status 2."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  try:
    config = _config_value(config_flag)
    if mode in ("train", "sweep") and config is None:
      raise JCompressError(f"--config is required for --mode={mode} "
                           "(e.g. --config=experiments/baseline_resnet.py:data=digits)")
    if mode == "train":
      from jcompress import train  # noqa: PLC0415
      if not workdir:
        from jcompress import config as config_lib  # noqa: PLC0415
        workdir = config_lib.default_workdir(_config_arg(sys.argv))
        logging.info("no --workdir: writing into %s", workdir)
      results = train.train_and_evaluate(config, workdir)
    elif mode == "sweep":
      from jcompress import config as config_lib  # noqa: PLC0415
      from jcompress import sweep  # noqa: PLC0415
      spec = _config_arg(sys.argv)
      if not workdir:
        workdir = config_lib.default_workdir(spec) + "_sweep"
        logging.info("no --workdir: the sweep writes into %s", workdir)
      results = sweep.run_sweep(config, spec, workdir, index=sweep_index, summarize=summarize)
    elif not workdir:
      raise JCompressError(f"--workdir is required for --mode={mode}")
    elif mode == "eval":
      from jcompress import train  # noqa: PLC0415
      results = train.evaluate(config, workdir)
    elif mode == "analyze":
      from jcompress import analysis  # noqa: PLC0415
      results = analysis.analyze(workdir, compare=analyze_compare)
    elif mode == "export":
      from jcompress import export  # noqa: PLC0415
      results = export.export_run(workdir)
    else:
      raise JCompressError(f"unknown --mode={mode}")
  except JCompressError as e:
    print(f"jcompress: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(results, indent=2, sort_keys=True))
  return 0
