r"""Structured filter pruning of a float ResNet: halve the FLOPs, then fine-tune.

  # 1. a float baseline
  python launch.py --config=experiments/baseline_resnet.py:data=digits --workdir=/tmp/sp_base
  # 2. prune it to half the FLOPs (L1 filter norms) and fine-tune 300 steps
  python launch.py --config=experiments/filter_prune_resnet.py:data=digits,init_from=/tmp/sp_base \
      --workdir=/tmp/sp_prune

Args: `data`, `model` (resnet20), `criterion` (l1 | bn | taylor; see `jcompress.structured`),
`flops` (the fraction of the original MACs to keep, in (0, 1]), `method` (global | uniform),
`init_from` (the float baseline's workdir), `steps` (fine-tuning steps), `runlocal`.

A fresh run (`train.structured_prune`) restores `init_from`, ranks the filters, removes them
(`jcompress.structured.apply_to_config`: the kernels, BatchNorms and consumers' input channels
shrink; `model_kwargs.channels` records the pruned widths of every conv in the run's
config.json) and fine-tunes the smaller model; a rerun resumes it. results.json adds `flops`,
`flops_before`, `flops_ratio`, `params_before` and the float model's accuracy.
"""

from __future__ import annotations

from jcompress import config as config_lib
from jcompress import structured
from jcompress.errors import ConfigError


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="cifar10", model="resnet20", criterion="l1", flops=0.5,
                             method="global", init_from="", steps=0, runlocal=False)
  structured.check_criterion(arg.criterion, "criterion")
  structured.check_flops_target(arg.flops, "flops")
  if arg.method not in structured.METHODS:
    raise ConfigError(f"config arg 'method': unknown method {arg.method!r}; known: "
                      f"{', '.join(structured.METHODS)}")
  c = config_lib.base_config()
  c.data = arg.data
  c.model = arg.model
  c.init_from = arg.init_from
  c.optimizer.nesterov = True
  c.optimizer.learning_rate = 0.01     # fine-tuning: a tenth of the from-scratch rate
  c.schedule.warmup_steps = 0
  c.total_steps = arg.steps or 20_000
  if arg.data in config_lib.OFFLINE_DATASETS:
    c.image_size = config_lib.offline_image_size(arg.data)
    c.batch_size = 64
    c.total_steps = arg.steps or 300
    c.eval_every = 100
    c.checkpoint_every = 100
    c.log_every = 25
  c.structured = structured.default_config()
  c.structured.criterion = arg.criterion
  c.structured.flops_target = arg.flops
  c.structured.method = arg.method
  if arg.runlocal:
    config_lib.make_runlocal(c)
  return c
