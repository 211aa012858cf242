r"""Where a ResNet-18 train step's time goes: every convolution's forward, input gradient and
kernel gradient timed alone, as jcompress's train step computes them, beside PyTorch's.

  python benchmarks/conv_rates.py                 # about 2 min on 2 CPUs
  python benchmarks/conv_rates.py --torch=false   # without the PyTorch columns

For each distinct convolution of resnet18_cifar (batch --batch_size, 32x32 input): the forward,
the input gradient and the kernel gradient as the model's convolution computes them with
--conv_impl ("auto": what the models pick here, `fastconv.default_conv_impl`), best of
--repeats, in GFLOP/s (2 x MACs / s); the seconds they add up to per step (times how many
such convs the network has), to compare with the whole step's time from benchmarks/suite.py.
With PyTorch installed, the same convolution in channels-last layout (its fastest on CPU):
forward alone, and forward + both gradients. Prints a markdown table; --out writes JSON too.
"""

from __future__ import annotations

import json
import os
import sys
import time

from jcompress import runtime  # noqa: E402

runtime.configure_cpu()   # XLA:CPU tuning before jax starts a backend, as launch.py does

from absl import app
from absl import flags
import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from jcompress import fastconv  # noqa: E402

_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per figure (best reported).")
_TORCH = flags.DEFINE_boolean("torch", True, "Time PyTorch's convolutions too when installed.")
_OUT = flags.DEFINE_string("out", None, "Also write the figures to this JSON file.")
_IMPL = flags.DEFINE_enum("conv_impl", "auto", ["auto", "xla", "staged", "fast"],
                          "The models' conv_impl whose gradients are timed.")

#: resnet18_cifar's convolutions: (input side, C_in, C_out, kernel, stride, how many).
RESNET18_CIFAR = (
    (32, 3, 64, 3, 1, 1), (32, 64, 64, 3, 1, 4),
    (32, 64, 128, 3, 2, 1), (16, 128, 128, 3, 1, 3), (32, 64, 128, 1, 2, 1),
    (16, 128, 256, 3, 2, 1), (8, 256, 256, 3, 1, 3), (16, 128, 256, 1, 2, 1),
    (8, 256, 512, 3, 2, 1), (4, 512, 512, 3, 1, 3), (8, 256, 512, 1, 2, 1),
)
DN = ("NHWC", "HWIO", "NHWC")


def best(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  return min(common.block_runner(fn, *args)(1) for _ in range(repeats))


def jax_times(n, h, cin, cout, k, s, impl, repeats):
  """(forward, input gradient, kernel gradient) seconds of the convolution as `impl` computes
  it (each gradient alone: a vjp with respect to one operand)."""
  p = (k - 1) // 2
  pad = ((p, p), (p, p))
  ho = (h + 2 * p - k) // s + 1
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (n, h, h, cin))
  w = jax.random.normal(kw, (k, k, cin, cout))
  g = jax.random.normal(kg, (n, ho, ho, cout))
  fn = fastconv.conv_function(impl)
  conv = lambda x, w: fn(x, w, (s, s), pad, dimension_numbers=DN)  # noqa: E731
  fwd = jax.jit(conv)
  dx = jax.jit(lambda x, w, g: jax.vjp(lambda x_: conv(x_, w), x)[1](g)[0])
  dw = jax.jit(lambda x, w, g: jax.vjp(lambda w_: conv(x, w_), w)[1](g)[0])
  return (best(fwd, x, w, repeats=repeats), best(dx, x, w, g, repeats=repeats),
          best(dw, x, w, g, repeats=repeats))


def torch_times(n, h, cin, cout, k, s, repeats):
  """(forward, forward + backward) seconds of torch.nn.Conv2d, channels-last, or None."""
  try:
    import torch  # noqa: PLC0415
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count() or 1)
  conv = torch.nn.Conv2d(cin, cout, k, stride=s, padding=(k - 1) // 2, bias=False).to(
      memory_format=torch.channels_last)
  x = torch.randn(n, cin, h, h).to(memory_format=torch.channels_last).requires_grad_()
  ho = (h + 2 * ((k - 1) // 2) - k) // s + 1
  g = torch.randn(n, cout, ho, ho).to(memory_format=torch.channels_last)

  def fwd():
    with torch.no_grad():
      conv(x)

  def fwd_bwd():
    conv(x).backward(g)

  def timed(fn):
    fn()
    ts = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      fn()
      ts.append(time.perf_counter() - t0)
    return min(ts)

  return timed(fwd), timed(fwd_bwd)


def main(argv):
  del argv
  n, repeats = _BATCH.value, _REPEATS.value
  impl = fastconv.default_conv_impl() if _IMPL.value == "auto" else _IMPL.value
  rows, total = [], {"forward": 0.0, "input_grad": 0.0, "kernel_grad": 0.0, "torch_all": 0.0}
  print(f"device: {common.device_name()}; batch {n}, resnet18_cifar convolutions, "
        f"conv_impl {impl!r}", flush=True)
  for h, cin, cout, k, s, count in RESNET18_CIFAR:
    ho = (h + 2 * ((k - 1) // 2) - k) // s + 1
    gflop = 2 * n * ho * ho * cin * cout * k * k / 1e9
    tf, tx, tw = jax_times(n, h, cin, cout, k, s, impl, repeats)
    tt = torch_times(n, h, cin, cout, k, s, repeats) if _TORCH.value else None
    row = {"conv": f"{h}x{h} {cin}->{cout} {k}x{k}/{s}", "count": count, "gflop": gflop,
           "forward": gflop / tf, "input_grad": gflop / tx, "kernel_grad": gflop / tw,
           "seconds_per_step": count * (tf + tx + tw)}
    total["forward"] += count * tf
    total["input_grad"] += count * tx
    total["kernel_grad"] += count * tw
    if tt is not None:
      row["torch_forward"], row["torch_all"] = gflop / tt[0], 3 * gflop / tt[1]
      total["torch_all"] += count * tt[1]
    rows.append(row)
    print(json.dumps({k_: round(v, 3) if isinstance(v, float) else v for k_, v in row.items()}),
          flush=True)

  has_torch = any("torch_all" in r for r in rows)
  head = "| conv | x | fwd | input grad | kernel grad | s per step |"
  sep = "|---|---|---|---|---|---|"
  if has_torch:
    head += " torch fwd | torch fwd+bwd |"
    sep += "---|---|"
  lines = [f"GFLOP/s (2 x MACs / s), conv_impl {impl!r}, best of {repeats}; s per step: forward "
           "+ both gradients x count", "", head, sep]
  for r in rows:
    line = (f"| {r['conv']} | {r['count']} | {r['forward']:.0f} | {r['input_grad']:.0f} | "
            f"{r['kernel_grad']:.0f} | {r['seconds_per_step']:.3f} |")
    if has_torch:
      line += f" {r.get('torch_forward', 0):.0f} | {r.get('torch_all', 0):.0f} |"
    lines.append(line)
  flops = sum(3 * r["gflop"] * r["count"] for r in rows)
  ours = total["forward"] + total["input_grad"] + total["kernel_grad"]
  lines += ["", f"jcompress convolutions: {ours:.2f} s per step ({flops / ours:.0f} GFLOP/s; "
            f"forward {total['forward']:.2f} s, input gradients {total['input_grad']:.2f} s, "
            f"kernel gradients {total['kernel_grad']:.2f} s)"]
  if has_torch:
    lines.append(f"PyTorch convolutions (channels-last): {total['torch_all']:.2f} s per step "
                 f"({flops / total['torch_all']:.0f} GFLOP/s)")
  print("\n".join(lines))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump({"device": common.device_info(), "batch_size": n, "conv_impl": impl,
                 "rows": rows,
                 "seconds": total, "gflop_per_step": flops}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
