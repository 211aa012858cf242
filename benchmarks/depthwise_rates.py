r"""MobileNetV2's depthwise convolutions timed alone: XLA's grouped convolution against
`fastconv.depthwise_conv` (shifted multiply-adds), forward, input gradient and kernel gradient.

  python benchmarks/depthwise_rates.py                   # about 2 min on 2 CPUs
  python benchmarks/depthwise_rates.py --batch_size=32 --out=/tmp/dw.json

For each distinct depthwise convolution of mobilenetv2_cifar (3x3, 32x32 input, batch
--batch_size): milliseconds (best of --repeats) of the forward, the input gradient and the kernel
gradient as XLA computes them (`lax.conv_general_dilated` with one group per channel) and as
`fastconv.depthwise_conv` does (what the models' CPU conv impls call), and the seconds both add up
to per train step (times how many such convolutions the network has). Prints a markdown table;
--out writes JSON too.
"""

from __future__ import annotations

import json
import os
import sys

from jcompress import runtime  # noqa: E402

runtime.configure_cpu()   # XLA:CPU tuning before jax starts a backend, as launch.py does

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
from jax import lax  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from jcompress import fastconv  # noqa: E402

_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per figure (best reported).")
_OUT = flags.DEFINE_string("out", None, "Also write the figures to this JSON file.")

#: mobilenetv2_cifar's depthwise convolutions (3x3): (input side, channels, stride, how many).
MOBILENETV2_CIFAR = (
    (32, 32, 1, 1), (32, 96, 1, 1), (32, 144, 1, 1), (32, 144, 2, 1), (16, 192, 1, 2),
    (16, 192, 2, 1), (8, 384, 1, 4), (8, 576, 1, 2), (8, 576, 2, 1), (4, 960, 1, 3),
)
DN = ("NHWC", "HWIO", "NHWC")


def times(fn, n, h, c, s, repeats):
  """(forward, input gradient, kernel gradient) seconds of depthwise conv `fn`."""
  kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.normal(kx, (n, h, h, c))
  w = jax.random.normal(kw, (3, 3, 1, c))
  g = jax.random.normal(kg, (n, (h - 1) // s + 1, (h - 1) // s + 1, c))
  conv = lambda x, w: fn(x, w, (s, s), ((1, 1), (1, 1)), dimension_numbers=DN,  # noqa: E731
                         feature_group_count=c)
  fwd = jax.jit(conv)
  dx = jax.jit(lambda x, w, g: jax.vjp(lambda x_: conv(x_, w), x)[1](g)[0])
  dw = jax.jit(lambda x, w, g: jax.vjp(lambda w_: conv(x, w_), w)[1](g)[0])
  out = []
  for f, args in ((fwd, (x, w)), (dx, (x, w, g)), (dw, (x, w, g))):
    jax.block_until_ready(f(*args))
    out.append(min(common.block_runner(f, *args)(1) for _ in range(repeats)))
  return out


def main(argv):
  del argv
  n, repeats = _BATCH.value, _REPEATS.value
  impls = {"xla": lax.conv_general_dilated, "ours": fastconv.conv_function("auto")}
  print(f"device: {common.device_name()}; batch {n}, mobilenetv2_cifar depthwise convolutions",
        flush=True)
  rows, total = [], {k: 0.0 for k in impls}
  for h, c, s, count in MOBILENETV2_CIFAR:
    row = {"conv": f"{h}x{h}x{c} /{s}", "count": count}
    for name, fn in impls.items():
      t = times(fn, n, h, c, s, repeats)
      row[name] = [round(1e3 * v, 2) for v in t]
      total[name] += count * sum(t)
    rows.append(row)
    print(json.dumps(row), flush=True)
  lines = [f"ms, best of {repeats}: forward / input gradient / kernel gradient", "",
           "| conv | x | XLA grouped conv | depthwise_conv | speed-up (all three) |",
           "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['conv']} | {r['count']} | {' / '.join(map(str, r['xla']))} | "
                 f"{' / '.join(map(str, r['ours']))} | {sum(r['xla']) / sum(r['ours']):.1f}x |")
  lines += ["", f"per train step: XLA {total['xla']:.2f} s, depthwise_conv {total['ours']:.3f} s "
            f"({total['xla'] / total['ours']:.0f}x)"]
  print("\n".join(lines))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump({"device": common.device_info(), "batch_size": n, "rows": rows,
                 "seconds_per_step": total}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
