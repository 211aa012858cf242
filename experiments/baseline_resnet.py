r"""Float baseline: a CIFAR ResNet trained from scratch with the standard recipe.

  python launch.py --config=experiments/baseline_resnet.py --workdir=runs/base        # CIFAR-10
  python launch.py --config=experiments/baseline_resnet.py:data=digits --workdir=runs/digits

CIFAR-10 (default): ResNet-20, SGD momentum 0.9 with nesterov, lr 0.1 cosine, weight decay 5e-4 on
kernels, batch 128, 64k steps (~164 epochs), pad-4 random crop and flip (He et al. 2016).
`model=resnet18_cifar` gives ResNet-18 with a CIFAR stem; `model=mobilenetv2_cifar,activation=relu`
a MobileNetV2 with ReLU in place of ReLU6 (the float model that cross-layer equalization needs,
experiments/quant_resnet.py's `equalize`).

`data=digits`: the offline digits (1,293 train / 144 validation / 360 test, resized to 32x32x3)
with the same model and recipe, shortened to 500 steps (batch 64, lr 0.05): a few minutes on a
2-core CPU. `data=digits_hard`: its distorted 32x32x3 variant (6,465 / 720 / 1,800), 1,500 steps
with 150 of warmup.
`runlocal`: a tiny smoke run.
"""

from jcompress import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="cifar10", model="resnet20", activation="", runlocal=False)
  c = config_lib.base_config()
  c.data = arg.data
  c.model = arg.model
  c.optimizer.nesterov = True
  if arg.activation:   # MobileNetV2's relu6 | relu (`model_kwargs.activation`)
    c.model_kwargs.activation = arg.activation
  if arg.data in config_lib.OFFLINE_DATASETS:
    c.image_size = config_lib.offline_image_size(arg.data)
    c.batch_size = 64
    # ~25 epochs of digits' 1,293 training images; ~15 of digits_hard's 6,465
    c.total_steps = 500 if arg.data == "digits" else 1500
    c.eval_every = 100
    c.checkpoint_every = 100
    c.log_every = 25
    c.optimizer.learning_rate = 0.05
    # digits_hard: with digits' 25 warmup steps the network sat at chance for 500 (seed 0) to
    # 1,000 (seed 2: 43% at the end) of its 1,500 steps; with 150 each seed leaves it by step
    # 300 (93.7% for seed 2)
    c.schedule.warmup_steps = 25 if arg.data == "digits" else 150
  if arg.runlocal:
    config_lib.make_runlocal(c)
  return c
