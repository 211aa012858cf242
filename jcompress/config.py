"""Experiment configs: the `arg` parser, the keys every experiment has, validation.

An experiment file defines `get_config(arg)`; `arg` is what follows the colon in
`--config=experiments/x.py:data=digits,runlocal`: comma-separated `key=value`
pairs and bare flags (`runlocal` means `runlocal=True`). `parse_arg` turns it
into a ConfigDict, typed by the defaults the experiment declares, and refuses
keys it does not declare.

`base_config()` holds the keys every experiment has (DESIGN.md, "Contracts");
`validate(config)` checks them before anything is compiled and raises a
`ConfigError` that names the key.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from typing import Any

import ml_collections
from ml_collections import config_dict

from jcompress.errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw")
EVAL_SPLITS = ("validation", "test")
#: The offline datasets: experiments give them their short CPU recipes (`:data=digits`).
OFFLINE_DATASETS = ("digits", "digits_hard")
# Keys added to `base_config()` after runs were made without them: the value that reproduces
# what those runs did (their config.json has no such key). Other absent keys take today's
# default.
LEGACY_VALUES = {"eval_split": "test", "mixup": 0.0}
SCHEDULES = ("constant", "cosine", "step")
DTYPES = ("float32", "bfloat16")


def _convert(key: str, text: str, default: Any) -> Any:
  """Parses `text` as the type of `default` (bool, int, float, str)."""
  if isinstance(default, bool):
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "y", "on", ""):
      return True
    if lowered in ("0", "false", "no", "n", "off"):
      return False
    raise ConfigError(f"config arg '{key}': expected a boolean, got '{text}'")
  try:
    if isinstance(default, int):
      return int(text)
    if isinstance(default, float):
      return float(text)
  except ValueError:
    raise ConfigError(
        f"config arg '{key}': expected {type(default).__name__}, got '{text}'") from None
  return text


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `"key=value,flag,..."` into a ConfigDict typed by `defaults`.

  Every key in `arg` must be declared in `defaults`; a bare `flag` sets a
  boolean to True. Values are converted to the type of their default.

  >>> parse_arg("data=digits,runlocal", data="cifar10", runlocal=False).data
  'digits'
  """
  result = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return result
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      known = ", ".join(sorted(defaults))
      raise ConfigError(f"unknown config arg '{key}' in '{arg}'; this experiment accepts: {known}")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ConfigError(f"config arg '{key}' needs a value ('{key}=...')")
      value = "true"
    result[key] = _convert(key, value.strip(), default)
  return result


def load_experiment_module(path: str, what: str):
  """The experiment file at `path` imported as a module; a missing file or one that fails to
  load is a ConfigError starting with `what` (the flag or config key that named the file)."""
  if not os.path.isfile(path):
    raise ConfigError(f"{what}: config file '{path}' does not exist")
  module_spec = importlib.util.spec_from_file_location(
      "jcompress_experiment_" + re.sub(r"\W", "_", path), path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001  (any failure of the file is a config error)
    raise ConfigError(f"{what}: config file '{path}' failed to load: "
                      f"{type(e).__name__}: {e}") from e
  return module


def load_config_file(spec: str, key: str = "config") -> ml_collections.ConfigDict:
  """The config of `"path/to/experiment.py:arg"` (what --config takes), for configs that name
  other runs' configs (`teacher_config`). Errors name `key` and the file."""
  path, _, arg = spec.partition(":")
  module = load_experiment_module(path, f"config key '{key}'")
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config key '{key}': '{path}' defines no get_config(arg)")
  return module.get_config(arg or None)


def default_workdir(spec: str) -> str:
  """`runs/<experiment>[_<arg>]` for `--config=experiments/<experiment>.py[:<arg>]`: the
  workdir of a run launched without --workdir (`runs/bnn_resnet`,
  `runs/baseline_resnet_data=digits`)."""
  path, _, arg = spec.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  slug = re.sub(r"[^A-Za-z0-9=.+-]+", "_", arg).strip("_")
  return os.path.join("runs", f"{name}_{slug}" if slug else name)


def base_config() -> ml_collections.ConfigDict:
  """The keys every experiment has, with a CIFAR-10 ResNet-20 float recipe."""
  c = ml_collections.ConfigDict()
  c.data = "cifar10"           # a TFDS name, or "digits" (offline)
  c.data_dir = ""              # TFDS data_dir; empty: TFDS's default
  c.image_size = 0             # 0: the dataset's own size; 32 turns digits into 32x32x3
  c.augment = True
  c.model = "resnet20"
  c.width = 1.0                # width multiplier where the architecture has one
  c.model_kwargs = ml_collections.ConfigDict()   # further model fields, e.g. num_bits
  c.dtype = "float32"          # compute dtype of the model (params stay float32)
  c.seed = 0
  c.init_from = ""             # start from these weights: another run's workdir (latest
                               # checkpoint), "keras:ResNet50", or a .safetensors file
  c.train_examples = 0         # > 0: train on the first N training examples only
  c.eval_split = "validation"  # "validation": train on the train split less its validation
                               # images, evaluate on those while training, read the test split
                               # once at the end; "test": train on all of train, evaluate on
                               # test (no held-out choice)
  c.calibration_batches = 4    # training batches handed to a transform's calibrate hook
  c.batch_size = 128           # global batch, split over all devices
  c.eval_batch_size = 256
  c.total_steps = 64_000
  c.log_every = 100
  c.eval_every = 2_000         # 0: evaluate at the end only
  c.checkpoint_every = 2_000
  c.keep_checkpoints = 3
  c.label_smoothing = 0.0
  c.mixup = 0.0                # > 0: mixup with ratio ~ Beta(mixup, mixup), each image mixed
                               # with its batch neighbour (labels mixed alike; teachers see
                               # the mixed images: "function matching")
  c.num_devices = 0            # 0: every device jax sees
  c.distributed = False        # call jax.distributed.initialize() (several hosts)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"     # sgd (with momentum), adam, adamw
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.weight_decay = 5e-4
  c.optimizer.decay_norm_and_bias = False   # False: weight decay on kernels only
  c.optimizer.grad_clip_norm = 0.0          # 0: no clipping

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = "cosine"   # constant, cosine, step
  c.schedule.warmup_steps = 0
  c.schedule.boundaries = (0.5, 0.75)   # step decay: fractions of total_steps
  c.schedule.decay_factor = 0.1
  c.schedule.end_value = 0.0
  return c


def offline_image_size(data: str) -> int:
  """`image_size` of an offline dataset's runs: digits' 32x32x3 variant, digits_hard as stored."""
  return 32 if data == "digits" else 0


def make_runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to a smoke run (20 steps, eval and checkpoint at 10): the `runlocal` arg."""
  c.total_steps = 20
  c.eval_every = 10
  c.checkpoint_every = 10
  c.log_every = 5
  c.schedule.warmup_steps = 0
  return c


def _check(cond: bool, key: str, message: str) -> None:
  if not cond:
    raise ConfigError(f"config key '{key}': {message}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the keys of `base_config()`; raises ConfigError naming the key."""
  for key in base_config().keys():
    if key not in config:
      raise ConfigError(f"config key '{key}' is missing (every experiment needs it)")
  _check(isinstance(config.data, str) and bool(config.data), "data", "must name a dataset")
  _check(config.image_size >= 0, "image_size", f"must be >= 0, got {config.image_size}")
  _check(config.width > 0, "width", f"must be > 0, got {config.width}")
  _check(config.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got '{config.dtype}'")
  _check(config.batch_size > 0, "batch_size", f"must be > 0, got {config.batch_size}")
  _check(config.eval_batch_size > 0, "eval_batch_size",
         f"must be > 0, got {config.eval_batch_size}")
  if config.init_from:
    _check(config.total_steps >= 0, "total_steps",
           f"must be >= 0 (0: evaluate the compressed init_from model, e.g. PTQ), "
           f"got {config.total_steps}")
  else:
    _check(config.total_steps > 0, "total_steps",
           f"must be > 0 (0 only with init_from), got {config.total_steps}")
  _check(config.eval_split in EVAL_SPLITS, "eval_split",
         f"must be one of {EVAL_SPLITS}, got {config.eval_split!r}")
  _check(config.train_examples >= 0, "train_examples",
         f"must be >= 0 (0: the whole train split), got {config.train_examples}")
  _check(config.calibration_batches >= 1, "calibration_batches",
         f"must be >= 1, got {config.calibration_batches}")
  for key in ("log_every", "checkpoint_every"):
    _check(config[key] > 0, key, f"must be > 0, got {config[key]}")
  _check(config.eval_every >= 0, "eval_every", f"must be >= 0, got {config.eval_every}")
  _check(config.keep_checkpoints >= 1, "keep_checkpoints",
         f"must be >= 1, got {config.keep_checkpoints}")
  _check(0.0 <= config.label_smoothing < 1.0, "label_smoothing",
         f"must be in [0, 1), got {config.label_smoothing}")
  _check(config.mixup >= 0 and math.isfinite(config.mixup), "mixup",
         f"must be a finite number >= 0 (0: off), got {config.mixup}")
  _check(config.num_devices >= 0, "num_devices", f"must be >= 0, got {config.num_devices}")

  opt = config.optimizer
  _check(opt.name in OPTIMIZERS, "optimizer.name",
         f"must be one of {OPTIMIZERS}, got '{opt.name}'")
  _check(opt.learning_rate > 0, "optimizer.learning_rate",
         f"must be > 0, got {opt.learning_rate}")
  _check(0.0 <= opt.momentum < 1.0, "optimizer.momentum", f"must be in [0, 1), got {opt.momentum}")
  _check(opt.weight_decay >= 0, "optimizer.weight_decay", f"must be >= 0, got {opt.weight_decay}")
  _check(opt.grad_clip_norm >= 0, "optimizer.grad_clip_norm",
         f"must be >= 0, got {opt.grad_clip_norm}")

  sched = config.schedule
  _check(sched.name in SCHEDULES, "schedule.name",
         f"must be one of {SCHEDULES}, got '{sched.name}'")
  _check(0 <= sched.warmup_steps < max(config.total_steps, 1), "schedule.warmup_steps",
         f"must be in [0, total_steps={config.total_steps}), got {sched.warmup_steps}")
  if sched.name == "step":
    bounds = tuple(sched.boundaries)
    _check(all(0 < b < 1 for b in bounds) and list(bounds) == sorted(bounds),
           "schedule.boundaries", f"must be increasing fractions in (0, 1), got {bounds}")
    _check(0 < sched.decay_factor <= 1, "schedule.decay_factor",
           f"must be in (0, 1], got {sched.decay_factor}")


def to_dict(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON-able data (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def from_dict(data: dict) -> ml_collections.ConfigDict:
  """Inverse of `to_dict` for configs read back from a workdir's config.json; keys of
  `LEGACY_VALUES` it lacks get the value that reproduces what that run did."""
  return ml_collections.ConfigDict({**LEGACY_VALUES, **data})


def flatten(data: Any, prefix: str = "") -> dict:
  """{"a": {"b": 1}} -> {"a.b": 1}; lists are kept as values."""
  if isinstance(data, config_dict.ConfigDict):
    data = to_dict(data)
  if not isinstance(data, dict):
    return {prefix: data}
  out = {}
  for key, value in data.items():
    name = f"{prefix}.{key}" if prefix else str(key)
    if isinstance(value, dict):
      out.update(flatten(value, name))
    else:
      out[name] = value
  return out
