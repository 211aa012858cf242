r"""Product quantization (PQ) or Q-CNN of a trained float ResNet, then codebook fine-tuning.

  python launch.py --config=experiments/baseline_resnet.py:data=digits --workdir=runs/digits
  python launch.py --config=experiments/pq_resnet.py:data=digits,init_from=runs/digits \
      --workdir=runs/pq_digits
  python launch.py --config=experiments/pq_resnet.py:data=digits,method=qcnn,init_from=runs/digits \
      --workdir=runs/qcnn_digits

Every convolution except the float stem (`stem_conv`) and classifier (`head`) is cut into
sub-vectors of `subvector` input channels, each replaced by one of `2^bits` codewords of its
subspace (`jcompress.pq`). The codebooks are learnt once before step 0 (`calibrate`) from the
`init_from` run's weights: by k-means on the weights (`method=pq`) or by Q-CNN's minimisation of
each layer's output error on `calibration_batches` training batches (`method=qcnn`). Then
`steps` steps of SGD fine-tune the codebooks (codes fixed: each codeword moves by the summed
gradient of its sub-vectors), the BatchNorm parameters and statistics, the stem and the head.
`steps=0` evaluates the post-training quantized model.

Defaults: d = 4, 16 codewords (4-bit codes): 1 bit per weight for the codes, about 2.3 bits with
the codebooks, so ResNet-20's quantized convolutions are 14x smaller than float32
(`pq_compression_ratio` in metrics.jsonl / results.json).

Digits, ResNet-20 (float baseline 99.17%, `baseline_resnet.py:data=digits`), d = 4, 4-bit codes,
convolutions 14.07x smaller (2.275 bits per weight), whole model 12.48x (results.json
`compression_ratio`: stem, head and BatchNorm stay float32):

  method  steps=0 (PTQ)  steps=300 (fine-tuned codebooks)
  pq      9.72%          99.72%
  qcnn    98.89%         99.44%

(k-means PQ alone collapses before fine-tuning: the BatchNorm statistics no longer fit; Q-CNN,
which matches each layer's output with error compensation, keeps 98.9% without any training.)

Args: data (cifar10 | digits), model, method (pq | qcnn), subvector, bits, init_from (a float
run's workdir; required for a meaningful run), steps (fine-tuning steps), lr, runlocal.
"""

from jcompress import config as config_lib
from jcompress import pq


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="cifar10", model="resnet20", method="pq", subvector=4,
                             bits=4, init_from="", steps=-1, lr=-1.0, runlocal=False)
  c = config_lib.base_config()
  c.data = arg.data
  c.model = arg.model
  c.init_from = arg.init_from
  c.calibration_batches = 4

  c.pq = pq.default_config()
  c.pq.method = arg.method
  c.pq.subvector = arg.subvector
  c.pq.bits = arg.bits
  c.pq.iters = 25
  c.pq.qcnn_iters = 3
  c.pq.calibration_samples = 4096

  # Fine-tuning: SGD with momentum, a small constant-then-cosine learning rate, no weight decay
  # (decay on the latent kernels would act on the codewords times their cluster sizes).
  c.optimizer.name = "sgd"
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 0.0
  c.optimizer.learning_rate = 1e-3
  c.schedule.name = "cosine"
  c.schedule.warmup_steps = 0
  c.total_steps = 4_000
  c.eval_every = 1_000
  c.checkpoint_every = 1_000
  if arg.data in config_lib.OFFLINE_DATASETS:
    c.image_size = config_lib.offline_image_size(arg.data)
    c.batch_size = 64
    c.total_steps = 300
    c.eval_every = 100
    c.checkpoint_every = 100
    c.log_every = 25
  if arg.steps >= 0:
    c.total_steps = arg.steps
  if arg.lr > 0:
    c.optimizer.learning_rate = arg.lr
  if arg.runlocal:
    config_lib.make_runlocal(c)
    if arg.steps >= 0:
      c.total_steps = arg.steps
  return c
