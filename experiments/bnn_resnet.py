r"""Binary ResNet: binary weights and `num_bits` activations (seed 001's BNN residual unit).

  python launch.py --config=experiments/bnn_resnet.py                 # CIFAR-10, runs/bnn_resnet
  python launch.py --config=experiments/bnn_resnet.py:data=digits --workdir=runs/bnn_digits
  python launch.py --config=experiments/bnn_resnet.py:data=digits,num_bits=2 --workdir=...
  python launch.py --config=experiments/bnn_resnet.py:data=digits,teacher= --workdir=...  # no KD

Distillation (on by default): the float teacher is the run of `experiments/baseline_resnet.py`
in `teacher` (CIFAR-10: ResNet-18 with a CIFAR stem in runs/baseline_resnet_model=resnet18_cifar;
digits: ResNet-20 in runs/baseline_resnet_data=digits, the workdirs `launch.py` gives those
configs by default). When that workdir holds no finished run, the teacher is trained there first
(`teacher_config`), so the one command above does everything; a rerun resumes either run. The
loss is ReActNet's distributional loss by default: KL divergence to the teacher's softmax at
T 1 with no hard-label term (`distill` sub-config, loss kd, temperature 1, alpha 1); Hinton's
KD is `temperature=4,alpha=0.9`, other losses `loss=dkd` etc. (on digits the distributional
loss gave W1A1 a smaller spread over seeds: docs/results.md).

Weights: every conv kernel except the float stem (`stem_conv`) and classifier (`head`) is
binarized in the forward pass by the `binary` ParamTransform (latent float weights, sign with a
straight-through gradient, clipped to [-1, 1] after each step). Activations: the model quantizes
the input of every binary conv to `num_bits` (1: sign). Adam, lr 1e-3 cosine, no weight decay
(decay would pull latent weights to 0 and make signs flip-flop).

CIFAR-10 (default): BNN ResNet-18 with a CIFAR stem, batch 128, 64k steps, crop and flip.
`data=digits`: BNN ResNet-20 on the 32x32x3 digits, 1500 steps of batch 64 (W1A1 with KD
752-761 s a point on one core of a 2-core Zen 3 AMD EPYC: docs/results/digits.md's wall
column; a shorter schedule moves W1A1 by a point or more between seeds). `data=digits_hard`:
3000 steps; W1A1 (num_bits=1) trains in two stages, float kernels for the first 1500
(`float_steps`).

Args: data, model, num_bits (activation bits, 1..8), method (ste_sign, approx_sign, swish_sign,
xnor, ternary: -1/0/+1 weights, TWN's threshold, two bit planes in the artifact), width,
steps (total_steps; 0: the data's default), float_steps (`binary.float_steps`: steps with
float kernels before they are binarized, ReActNet's two stages in one run), teacher
(the teacher's workdir; empty: no distillation; "default": see above), loss, temperature, alpha
(the `distill` sub-config; temperature 0 and alpha -1 mean 1 and 1 for loss kd with a
teacher, the library's defaults otherwise), seed, runlocal.
"""

import os

import ml_collections

from jcompress import config as config_lib
from jcompress import distill
from jcompress import transforms
from jcompress.errors import ConfigError

#: data -> the config that trains the default teacher; its workdir is the one launch.py gives
#: that config by default (`config.default_workdir`), relative to the current directory.
_BASELINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "baseline_resnet.py")
TEACHERS = {
    "cifar10": _BASELINE + ":model=resnet18_cifar",
    "digits": _BASELINE + ":data=digits",
    "digits_hard": _BASELINE + ":data=digits_hard",
}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="cifar10", model="", num_bits=1, method="ste_sign",
                             width=1.0, teacher="default", loss="kd", temperature=0.0,
                             alpha=-1.0, float_steps=-1, steps=0, seed=0, runlocal=False)
  c = config_lib.base_config()
  c.data = arg.data
  offline = arg.data in config_lib.OFFLINE_DATASETS
  c.model = arg.model or ("bnn_resnet20" if offline else "bnn_resnet18_cifar")
  c.width = arg.width
  c.model_kwargs.num_bits = arg.num_bits
  c.seed = arg.seed
  c.teacher, c.teacher_config = arg.teacher, ""
  if arg.teacher == "default":
    if arg.data not in TEACHERS:
      raise ConfigError(
          f"config arg 'teacher': no default teacher for data={arg.data!r}; give teacher=<workdir> "
          "or teacher= (none)")
    c.teacher_config = TEACHERS[arg.data] + (",runlocal" if arg.runlocal else "")
    c.teacher = config_lib.default_workdir(c.teacher_config)
  c.distill = distill.default_config()
  c.distill.loss = arg.loss
  if c.teacher and arg.loss == "kd":   # ReActNet's distributional loss: the softmax only, T 1
    c.distill.temperature, c.distill.alpha = 1.0, 1.0
  if arg.temperature:
    c.distill.temperature = arg.temperature
  if arg.alpha != -1.0:
    c.distill.alpha = arg.alpha

  c.binary = ml_collections.ConfigDict()
  c.binary.method = arg.method
  c.binary.include = (r".*",)
  c.binary.exclude = transforms.DEFAULT_EXCLUDE   # float first conv and classifier
  c.binary.float_steps = 0

  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 0.0
  if arg.data in config_lib.OFFLINE_DATASETS:
    c.image_size = config_lib.offline_image_size(arg.data)
    c.batch_size = 64
    # ~75 epochs of digits' 1,293 training images (600 steps gave W1A1 with KD 98.06% +- 0.56
    # over 3 seeds, 1500 steps 99.07% +- 0.16); ~30 of digits_hard's 6,465
    c.total_steps = 1500 if arg.data == "digits" else 3000
    c.eval_every = 250
    c.checkpoint_every = 250
    c.log_every = 25
    c.optimizer.learning_rate = 2e-3
    c.schedule.warmup_steps = 25
    if arg.data == "digits_hard" and arg.num_bits == 1:
      # two stages: sign activations on float kernels for half the run, then binary kernels.
      # In one stage W1A1's training accuracy sat at chance for ~1,400 of its 3,000 steps
      # (test 43.39% and 53.22% on seeds 0 and 2); two stages gave 80.33% and 68.89%
      c.binary.float_steps = 1500
  if arg.steps:
    c.total_steps = arg.steps
  if arg.float_steps >= 0:
    c.binary.float_steps = arg.float_steps
  if arg.runlocal:
    config_lib.make_runlocal(c)
  return c
