"""The config arg parser and validation: bad input is refused with the key named."""

import pytest

from jcompress import config as config_lib
from jcompress.errors import ConfigError


def test_parse_arg_types_and_flags():
  arg = config_lib.parse_arg("data=digits,bits=4,lr=0.5,runlocal", data="cifar10", bits=8,
                             lr=0.1, runlocal=False, extra=True)
  assert arg.data == "digits" and arg.bits == 4 and arg.lr == 0.5
  assert arg.runlocal is True and arg.extra is True
  assert isinstance(arg.bits, int) and isinstance(arg.lr, float)


def test_parse_arg_defaults_when_empty():
  assert config_lib.parse_arg(None, data="cifar10").data == "cifar10"
  assert config_lib.parse_arg("", data="cifar10").data == "cifar10"


@pytest.mark.parametrize("arg, fragment", [
    ("colour=red", "unknown config arg 'colour'"),
    ("bits=four", "config arg 'bits': expected int"),
    ("bits", "config arg 'bits' needs a value"),
    ("runlocal=maybe", "config arg 'runlocal': expected a boolean"),
])
def test_parse_arg_refuses_bad_input(arg, fragment):
  with pytest.raises(ConfigError, match=fragment):
    config_lib.parse_arg(arg, data="cifar10", bits=8, runlocal=False)


def test_base_config_is_valid():
  config_lib.validate(config_lib.base_config())


@pytest.mark.parametrize("key, value", [
    ("batch_size", 0), ("total_steps", 0), ("width", 0.0), ("label_smoothing", 1.0),
    ("optimizer.name", "rmsprop"), ("optimizer.learning_rate", -1.0),
    ("optimizer.momentum", 1.0), ("schedule.name", "linear"), ("schedule.warmup_steps", 10**9),
    ("dtype", "float16"), ("log_every", 0), ("eval_every", -1), ("eval_split", "train"),
    ("mixup", -1.0), ("mixup", float("inf")),
])
def test_validate_names_the_bad_key(key, value):
  c = config_lib.base_config()
  node, _, leaf = key.rpartition(".")
  (c[node] if node else c)[leaf] = value
  with pytest.raises(ConfigError, match=f"config key '{key}'"):
    config_lib.validate(c)


def test_validate_step_schedule_boundaries():
  c = config_lib.base_config()
  c.schedule.name = "step"
  c.schedule.boundaries = (0.75, 0.5)
  with pytest.raises(ConfigError, match="schedule.boundaries"):
    config_lib.validate(c)


def test_missing_key_is_named():
  c = config_lib.base_config()
  del c["seed"]
  with pytest.raises(ConfigError, match="'seed' is missing"):
    config_lib.validate(c)


def test_flatten_roundtrip_through_json():
  c = config_lib.base_config()
  flat = config_lib.flatten(config_lib.to_dict(c))
  assert flat["optimizer.learning_rate"] == c.optimizer.learning_rate
  assert flat["schedule.boundaries"] == list(c.schedule.boundaries)
  assert config_lib.flatten(config_lib.from_dict(config_lib.to_dict(c))) == flat


def test_runlocal_arg_shrinks_every_experiment_to_a_valid_smoke_run():
  import importlib  # noqa: PLC0415
  for name in ("baseline_resnet", "bnn_resnet"):
    module = importlib.import_module(f"experiments.{name}")
    full = module.get_config("data=digits")
    small = module.get_config("data=digits,runlocal")
    config_lib.validate(small)
    assert small.total_steps == 20 < full.total_steps
    assert small.checkpoint_every == small.eval_every == 10


def test_workdirs_made_before_eval_split_load_with_the_protocol_they_ran(tmp_path):
  """A config.json without `eval_split` (runs that evaluated on the test split while training)
  loads as eval_split="test"; today's default ("validation") is another run and is refused
  with the key named, "test" resumes it."""
  import json

  from jcompress import checkpoint
  from jcompress.errors import WorkdirError

  old = config_lib.to_dict(config_lib.base_config())
  del old["eval_split"]
  (tmp_path / "config.json").write_text(json.dumps(old))
  assert checkpoint.load_workdir_config(str(tmp_path)).eval_split == "test"
  with pytest.raises(WorkdirError, match="eval_split: 'test' in the workdir, 'validation' now"):
    checkpoint.check_workdir_config(config_lib.base_config(), str(tmp_path))
  c = config_lib.base_config()
  c.eval_split = "test"
  assert checkpoint.check_workdir_config(c, str(tmp_path))


def test_workdirs_made_before_mixup_resume_as_runs_without_it(tmp_path):
  """A config.json without `mixup` loads as mixup 0 (what those runs did) and today's default
  config resumes the workdir."""
  import json

  from jcompress import checkpoint

  old = config_lib.to_dict(config_lib.base_config())
  del old["mixup"]
  (tmp_path / "config.json").write_text(json.dumps(old))
  assert checkpoint.load_workdir_config(str(tmp_path)).mixup == 0.0
  assert checkpoint.check_workdir_config(config_lib.base_config(), str(tmp_path))


def test_baseline_activation_arg_reaches_the_model():
  """`baseline_resnet.py:model=mobilenetv2_cifar,activation=relu` trains the ReLU MobileNetV2
  that cross-layer equalization needs; without the arg the model keeps its own activation."""
  import importlib  # noqa: PLC0415

  from jcompress import models  # noqa: PLC0415
  module = importlib.import_module("experiments.baseline_resnet")
  c = module.get_config("data=digits,model=mobilenetv2_cifar,activation=relu")
  config_lib.validate(c)
  model = models.get_model(c.model, 10, **c.model_kwargs)
  assert model.activation == "relu"
  assert "activation" not in module.get_config("data=digits").model_kwargs
