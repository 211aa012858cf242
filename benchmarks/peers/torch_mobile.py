r"""Peer: a PyTorch (eager, CPU or CUDA) train step of MobileNetV2 or ShuffleNetV2, CIFAR stem.

  python benchmarks/peers/torch_mobile.py --model=mobilenetv2 [--width=1.0] [--memory_format=auto]
  python benchmarks/peers/torch_mobile.py --model=shufflenetv2 --width=0.5     # speaks protocol.py

The same networks as jcompress's `mobilenetv2_cifar` and `shufflenetv2_cifar`
(jcompress/models/mobilenetv2.py, shufflenetv2.py; torchvision's architectures with the CIFAR
stem: stride 1 in the stem, and in MobileNetV2's second stage; no max pool in ShuffleNetV2),
with the same parameter count (reported in `info`, checked by benchmarks/suite.py). At its best
settings: every core (`torch.set_num_threads`), and the faster of channels-last and contiguous
memory (timed over 3 steps each at start; `info` says which). SGD with
momentum 0.9 and weight decay, cross-entropy, one synthetic batch: what benchmarks/suite.py
times beside jcompress's step.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import protocol  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

MOBILENETV2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
SHUFFLENETV2_CHANNELS = {0.5: (48, 96, 192, 1024), 1.0: (116, 232, 464, 1024),
                         1.5: (176, 352, 704, 1024), 2.0: (244, 488, 976, 2048)}


def make_divisible(v, d=8):
  new = max(d, int(v + d / 2) // d * d)
  return new + d if new < 0.9 * v else new


def conv_bn(cin, cout, k, stride=1, groups=1, act=nn.ReLU6):
  layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout)]
  return nn.Sequential(*layers, act()) if act else nn.Sequential(*layers)


class InvertedResidual(nn.Module):

  def __init__(self, cin, cout, stride, t):
    super().__init__()
    hidden = int(round(cin * t))
    layers = [conv_bn(cin, hidden, 1)] if t != 1 else []
    layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden),
               conv_bn(hidden, cout, 1, act=None)]
    self.body = nn.Sequential(*layers)
    self.residual = stride == 1 and cin == cout

  def forward(self, x):
    return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):

  def __init__(self, width=1.0, num_classes=10):
    super().__init__()
    cin = make_divisible(32 * width)
    layers = [conv_bn(3, cin, 3, 1)]
    for s, (t, c, n, stride) in enumerate(MOBILENETV2_SETTING, start=1):
      stride = 1 if s == 2 else stride
      cout = make_divisible(c * width)
      for b in range(n):
        layers.append(InvertedResidual(cin, cout, stride if b == 0 else 1, t))
        cin = cout
    last = make_divisible(1280 * max(1.0, width))
    layers.append(conv_bn(cin, last, 1))
    self.features = nn.Sequential(*layers)
    self.head = nn.Linear(last, num_classes)

  def forward(self, x):
    return self.head(self.features(x).mean((2, 3)))


class ShuffleUnit(nn.Module):

  def __init__(self, cin, cout, stride):
    super().__init__()
    branch = cout // 2
    self.stride = stride
    if stride > 1:
      self.branch1 = nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin, act=None),
                                   conv_bn(cin, branch, 1, act=nn.ReLU))
    right_in = cin if stride > 1 else branch
    self.branch2 = nn.Sequential(conv_bn(right_in, branch, 1, act=nn.ReLU),
                                 conv_bn(branch, branch, 3, stride, groups=branch, act=None),
                                 conv_bn(branch, branch, 1, act=nn.ReLU))

  def forward(self, x):
    if self.stride == 1:
      left, right = x.chunk(2, dim=1)
      out = torch.cat((left, self.branch2(right)), dim=1)
    else:
      out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
    b, c, h, w = out.shape
    return out.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleNetV2(nn.Module):

  def __init__(self, width=1.0, num_classes=10):
    super().__init__()
    *stages, last = SHUFFLENETV2_CHANNELS[width]
    layers, cin = [conv_bn(3, 24, 3, 1, act=nn.ReLU)], 24
    for c, n in zip(stages, (4, 8, 4)):
      for b in range(n):
        layers.append(ShuffleUnit(cin, c, 2 if b == 0 else 1))
        cin = c
    layers.append(conv_bn(cin, last, 1, act=nn.ReLU))
    self.features = nn.Sequential(*layers)
    self.head = nn.Linear(last, num_classes)

  def forward(self, x):
    return self.head(self.features(x).mean((2, 3)))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", choices=("mobilenetv2", "shufflenetv2"), default="mobilenetv2")
  p.add_argument("--width", type=float, default=1.0)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--memory_format", choices=("auto", "channels_last", "contiguous"),
                 default="auto", help="auto: time both (3 steps each) and keep the faster.")
  args = p.parse_args()
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  torch.set_num_threads(os.cpu_count() or 1)   # every core, as jcompress's process uses

  net = {"mobilenetv2": MobileNetV2, "shufflenetv2": ShuffleNetV2}[args.model]

  def make_step(fmt):
    return protocol.torch_train_step(lambda: net(args.width), args.batch_size, args.image_size, fmt)

  fmt, step, params, tried = protocol.fastest_format(make_step, args.memory_format)
  protocol.serve(step, {"framework": f"torch {torch.__version__} eager", "device": dev,
                        "threads": torch.get_num_threads(), "model": args.model,
                        "width": args.width, "memory_format": fmt,
                        "memory_format_seconds_3_steps": tried,
                        "params": params})


if __name__ == "__main__":
  main()
