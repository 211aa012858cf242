r"""Low-rank factorization of a trained float ResNet, then fine-tuning (issue 6, item 4).

  python launch.py --config=experiments/baseline_resnet.py:data=digits --workdir=runs/digits
  python launch.py --config=experiments/lowrank_resnet.py:data=digits,init_from=runs/digits \
      --workdir=runs/lowrank_digits
  ...:data=digits,init_from=runs/digits,method=tucker,energy=0.9

The float model of `init_from` (a finished run's workdir) is factorized layer by layer
(`jcompress.lowrank`): every conv except the stem (and the classifier) becomes two smaller
layers (`svd`: k x k conv C_in -> r then 1x1 r -> C_out; `spatial`: k x 1 then 1 x k, Jaderberg
et al.) or three (`tucker`: 1x1, k x k core, 1x1), initialised from the truncated SVD / HOSVD of
the trained kernel, and the factorized model is fine-tuned. Ranks: `param_fraction` (default 0.5,
the issue's target: half the parameters of the factorized layers) or `energy` (the fraction of
spectral energy kept per layer; set param_fraction=0 with it). 1x1 convs are factorized by SVD.

Fine-tuning recipe: SGD momentum 0.9 (nesterov), lr 0.01 cosine, weight decay 5e-4; digits: 300
steps of batch 64. Args: data, model, method (svd | spatial | tucker), energy, param_fraction,
rank, init_from, steps (0: the recipe's), lr, runlocal.
"""

from jcompress import config as config_lib
from jcompress import lowrank


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="cifar10", model="resnet20", method="svd", energy=0.0,
                             param_fraction=-1.0, rank=0, init_from="", steps=0, lr=0.01,
                             runlocal=False)
  c = config_lib.base_config()
  c.data = arg.data
  c.model = arg.model
  c.init_from = arg.init_from

  c.lowrank = lowrank.default_config()
  c.lowrank.method = arg.method
  c.lowrank.rank = arg.rank
  c.lowrank.energy = arg.energy
  # param_fraction defaults to 0.5 unless the rank comes from `rank` or `energy`.
  fraction = arg.param_fraction
  if fraction < 0:
    fraction = 0.0 if (arg.rank or arg.energy) else 0.5
  c.lowrank.param_fraction = fraction

  c.optimizer.nesterov = True
  c.optimizer.learning_rate = arg.lr
  c.total_steps = 16_000          # CIFAR-10: ~40 epochs of fine-tuning
  if arg.data in config_lib.OFFLINE_DATASETS:
    c.image_size = config_lib.offline_image_size(arg.data)
    c.batch_size = 64
    c.total_steps = 300
    c.eval_every = 100
    c.checkpoint_every = 100
    c.log_every = 25
  if arg.steps:
    c.total_steps = arg.steps
  if arg.runlocal:
    config_lib.make_runlocal(c)
  return c

