r"""Peer: PyTorch (eager, CPU) inference of ResNet-18 with the CIFAR stem, float or int8.

  python benchmarks/peers/torch_inference.py --mode=float|int8_static|int8_dynamic  # protocol.py

The network of benchmarks/peers/torch_resnet.py (jcompress's `resnet18_cifar`) in eval mode
under `torch.inference_mode`, one synthetic batch, every core (`torch.set_num_threads`):

* `float`: float32, channels_last or contiguous, whichever ran 3 calls faster;
* `int8_static`: PyTorch's post-training static quantization at its best on x86
  (`torch.ao.quantization.quantize_fx`, the "x86" qconfig mapping: per-channel int8 weights,
  int8 activations calibrated on 4 batches, fused conv-BN-ReLU, fbgemm/onednn int8 kernels);
* `int8_dynamic`: `torch.ao.quantization.quantize_dynamic`, which applies to the Linear layer
  only (the classifier): convolutions stay float; the issue's "where it applies".

Each "step" of the protocol is one forward call of the batch.
"""

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import protocol  # noqa: E402
import torch  # noqa: E402
from torch_resnet import ResNet18  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--mode", choices=("float", "int8_static", "int8_dynamic"), default="float")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--image_size", type=int, default=32)
  args = p.parse_args()
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
  base = ResNet18().eval()
  params = sum(q.numel() for q in base.parameters())

  def make_step(fmt):
    model, inp = copy.deepcopy(base), x
    if fmt == "channels_last":
      model = model.to(memory_format=torch.channels_last)
      inp = x.contiguous(memory_format=torch.channels_last)
    if args.mode == "int8_static":
      from torch.ao.quantization import get_default_qconfig_mapping  # noqa: PLC0415
      from torch.ao.quantization.quantize_fx import convert_fx  # noqa: PLC0415
      from torch.ao.quantization.quantize_fx import prepare_fx  # noqa: PLC0415
      torch.backends.quantized.engine = "x86"
      prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (inp,))
      with torch.inference_mode():
        for _ in range(4):   # calibration batches
          prepared(torch.randn_like(inp))
      model = convert_fx(prepared)
    elif args.mode == "int8_dynamic":
      model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, torch.qint8)

    def step():
      with torch.inference_mode():
        model(inp)

    return step, params

  fmt, step, _, tried = protocol.fastest_format(make_step)
  protocol.serve(step, {"framework": f"torch {torch.__version__} eager", "mode": args.mode,
                        "threads": torch.get_num_threads(), "memory_format": fmt,
                        "memory_format_seconds_3_calls": tried, "params": params})


if __name__ == "__main__":
  main()
