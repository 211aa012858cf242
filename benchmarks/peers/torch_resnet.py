r"""Peer: a PyTorch (eager, CPU or CUDA) train step of ResNet-18 with the CIFAR stem.

  python benchmarks/peers/torch_resnet.py [--binary] [--batch_size=64]   # speaks protocol.py

The same networks as jcompress's `resnet18_cifar` (3x3 stride-1 stem, BasicBlocks 64-512 with
1x1 projection shortcuts, BN, ReLU) and, with --binary, `bnn_resnet18_cifar` W1A1 (the seed's
unit: BN -> sign (STE) -> 3x3 conv with sign(W) (STE), no ReLU, real-valued residual sum, 3x3
binary projection shortcut with its own BN; float stem and head; final BN + ReLU). SGD with
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
import torch.nn.functional as F  # noqa: E402


class SignSTE(torch.autograd.Function):

  @staticmethod
  def forward(ctx, x):
    ctx.save_for_backward(x)
    return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

  @staticmethod
  def backward(ctx, g):
    (x,) = ctx.saved_tensors
    return g * (x.abs() <= 1).to(g.dtype)


class BinaryConv(nn.Conv2d):

  def forward(self, x):
    return F.conv2d(SignSTE.apply(x), SignSTE.apply(self.weight), None, self.stride,
                    self.padding)


class Block(nn.Module):

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.b1 = nn.BatchNorm2d(cout)
    self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.b2 = nn.BatchNorm2d(cout)
    self.sc = None
    if stride != 1 or cin != cout:
      self.sc = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    y = F.relu(self.b1(self.c1(x)))
    y = self.b2(self.c2(y))
    return F.relu(y + (x if self.sc is None else self.sc(x)))


class BinaryBlock(nn.Module):

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.b1 = nn.BatchNorm2d(cin)
    self.c1 = BinaryConv(cin, cout, 3, stride, 1, bias=False)
    self.b2 = nn.BatchNorm2d(cout)
    self.c2 = BinaryConv(cout, cout, 3, 1, 1, bias=False)
    self.sc = None
    if stride != 1 or cin != cout:
      self.sbn = nn.BatchNorm2d(cin)
      self.sc = BinaryConv(cin, cout, 3, stride, 1, bias=False)

  def forward(self, x):
    y = self.c2(self.b2(self.c1(self.b1(x))))
    return y + (x if self.sc is None else self.sc(self.sbn(x)))


class ResNet18(nn.Module):

  def __init__(self, binary=False, num_classes=10):
    super().__init__()
    block = BinaryBlock if binary else Block
    self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                              nn.ReLU())
    layers, cin = [], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
      layers += [block(cin, cout, stride), block(cout, cout, 1)]
      cin = cout
    self.layers = nn.Sequential(*layers)
    self.final = nn.Sequential(nn.BatchNorm2d(512), nn.ReLU()) if binary else nn.Identity()
    self.head = nn.Linear(512, num_classes)

  def forward(self, x):
    x = self.final(self.layers(self.stem(x)))
    return self.head(x.mean((2, 3)))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--binary", action="store_true")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--memory_format", choices=("auto", "channels_last", "contiguous"),
                 default="auto", help="auto: time both (3 steps each) and keep the faster.")
  args = p.parse_args()
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  torch.set_num_threads(os.cpu_count() or 1)   # every core, as jcompress's process uses

  def make_step(fmt):
    return protocol.torch_train_step(lambda: ResNet18(args.binary), args.batch_size,
                                     args.image_size, fmt)

  fmt, step, params, tried = protocol.fastest_format(make_step, args.memory_format)
  protocol.serve(step, {"framework": f"torch {torch.__version__} eager", "device": dev,
                        "threads": torch.get_num_threads(), "binary": args.binary,
                        "memory_format": fmt,
                        "memory_format_seconds_3_steps": tried,
                        "params": params})


if __name__ == "__main__":
  main()
