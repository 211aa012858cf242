r"""Weight pruning of a CIFAR ResNet: unstructured or N:M masks, one-shot, gradual or iterative.

  python launch.py --config=experiments/baseline_resnet.py:data=digits --workdir=runs/base
  python launch.py --config=experiments/prune_resnet.py:data=digits,init_from=runs/base \
      --workdir=runs/prune90
  python launch.py --config=experiments/prune_resnet.py:data=digits,n_m=2:4,init_from=runs/base \
      --workdir=runs/prune24
  python launch.py --config=experiments/prune_resnet.py:data=digits,method=snip,schedule=oneshot \
      --workdir=runs/snip90                                    # SNIP at initialisation

Every conv kernel but the float stem (`stem_conv`) and the classifier (`head`) is pruned by the
`prune` ParamTransform (jcompress/prune.py): masks in the train state, pruned latent weights held
at exactly 0 after every optimizer step, masks that only tighten.

Args:
  data, model, width: as in baseline_resnet.py.
  method: magnitude | random | snip (SNIP: |w * dL/dw| from `calibration_batches` batches at
    the start, before any training).
  schedule: oneshot (prune at the start, then fine-tune) | gradual (Zhu & Gupta's cubic
    schedule over the first 60% of the steps, events every `frequency` steps) | iterative (the
    seed's loop: `rounds` rounds of prune-then-fine-tune, `frequency` steps apart).
  sparsity: the target fraction of zeros in the pruned kernels (ignored with n_m).
  scope: layerwise | uniform | global | erk.
  n_m: "2:4" (N:M along the input channels, sparsity 1 - N/M); empty: unstructured.
  rewind: -1 (off) or a step whose weights the survivors are reset to at each pruning event
    (lottery tickets; 0: the initial weights).
  init_from: a float run's workdir to start from (pruning then fine-tunes it: lr 0.01,
    400 steps on digits); empty: train from scratch while pruning (lr 0.05, 600 steps).
  frequency, rounds: schedule settings (0: the defaults below).
  runlocal: a tiny smoke run.
"""

from jcompress import config as config_lib
from jcompress import prune


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="cifar10", model="resnet20", width=1.0, method="magnitude",
                             schedule="gradual", sparsity=0.9, scope="layerwise", n_m="",
                             rewind=-1, init_from="", frequency=0, rounds=0, runlocal=False)
  c = config_lib.base_config()
  c.data = arg.data
  c.model = arg.model
  c.width = arg.width
  c.init_from = arg.init_from
  c.optimizer.nesterov = True
  finetune = bool(arg.init_from)

  if arg.data in config_lib.OFFLINE_DATASETS:
    c.image_size = config_lib.offline_image_size(arg.data)
    c.batch_size = 64
    c.total_steps = 400 if finetune else 600
    c.eval_every = 100
    c.checkpoint_every = 100
    c.log_every = 25
    c.optimizer.learning_rate = 0.01 if finetune else 0.05
    c.schedule.warmup_steps = 0 if finetune else 25
  elif finetune:   # CIFAR-10: fine-tune a trained float model for 30k steps
    c.total_steps = 30_000
    c.optimizer.learning_rate = 0.01
  if arg.runlocal:
    config_lib.make_runlocal(c)
  total = c.total_steps

  p = prune.default_config()
  p.criterion = {"snip": "saliency"}.get(arg.method, arg.method)
  p.scope = arg.scope
  p.n_m = arg.n_m
  n_m = prune.parse_n_m(arg.n_m, "n_m")
  p.sparsity = 1 - n_m[0] / n_m[1] if n_m else arg.sparsity
  p.schedule = arg.schedule
  p.rewind_step = arg.rewind
  if arg.schedule == "oneshot":
    p.begin_step = 0
  elif arg.schedule == "gradual":
    # From a trained model: start at once; from scratch: let the weights settle first.
    p.begin_step = 0 if finetune else int(0.1 * total)
    p.end_step = int(0.6 * total)
    p.frequency = arg.frequency or max(1, total // 40)
  else:
    p.rounds = arg.rounds or 4
    p.begin_step = 0 if finetune else int(0.1 * total)
    p.frequency = arg.frequency or max(1, int(0.6 * total - p.begin_step) // max(p.rounds - 1, 1))
  c.prune = p
  return c
