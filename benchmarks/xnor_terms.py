r"""`fastconv.xnor_conv` against the number of popcount terms summed in one XLA fusion.

  python benchmarks/xnor_terms.py                        # about 1 min on 2 CPUs
  python benchmarks/xnor_terms.py --terms=1000,24,18,12 --repeats=9

For each 3x3 convolution of ResNet-18's CIFAR stages at batch --batch_size (32x32x64,
16x16x128, 8x8x256, 4x4x512, stride 1, SAME), with +-1 weights ("binary") and -1/0/+1
weights ("ternary", a second bit plane), and each value of `fastconv.XNOR_TERMS_PER_FUSION`
in --terms (1000: the whole sum in one fusion): CPU milliseconds per call (process time, best
of --repeats, so a shared machine's load matters less). A 3x3 conv over C channels sums
9 ceil(C / 32) terms. Checks that every setting gives the same int32 sums.
"""

from __future__ import annotations

import time

from jcompress import runtime  # noqa: E402

runtime.configure_cpu()   # XLA:CPU tuning before jax starts a backend, as launch.py does

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jcompress import binary as binarize  # noqa: E402
from jcompress import fastconv  # noqa: E402

_TERMS = flags.DEFINE_list("terms", ["1000", "72", "36", "18", "12"],
                           "Values of fastconv.XNOR_TERMS_PER_FUSION to time.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls per setting (best reported).")

SHAPES = ((32, 64), (16, 128), (8, 256), (4, 512))


def cpu_ms(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.process_time()
    jax.block_until_ready(fn(*args))
    best = min(best, time.process_time() - t0)
  return best * 1e3


def main(argv):
  del argv
  terms = [int(t) for t in _TERMS.value]
  rng = np.random.RandomState(0)
  default = fastconv.XNOR_TERMS_PER_FUSION
  print(f"xnor_conv, 3x3 stride 1, batch {_BATCH.value}: CPU ms per call "
        f"(XNOR_TERMS_PER_FUSION = {default} in the code)\n")
  print("| conv | weights | terms | " + " | ".join(f"{t} a fusion" for t in terms) + " |")
  print("|---|---|---:|" + "---:|" * len(terms))
  for hw, c in SHAPES:
    x = jnp.asarray(np.where(rng.rand(_BATCH.value, hw, hw, c) > .5, 1, -1), jnp.int8)
    w = rng.choice([-1, 0, 1], size=(3, 3, c, c)).astype(np.int8)
    words = binarize.pack_signs(jnp.asarray(w), axis=2)
    nonzero = binarize.pack_signs(jnp.asarray(np.where(w != 0, 1, -1), jnp.int8), axis=2)
    for kind, args in (("binary", (x, words)), ("ternary", (x, words, nonzero))):
      row, ref = [], None
      for t in terms:
        fastconv.XNOR_TERMS_PER_FUSION = t   # read when the function is traced
        fn = jax.jit(lambda x, w, nz=None: fastconv.xnor_conv(x, w, (1, 1), ((1, 1), (1, 1)),
                                                               w_nonzero=nz))
        out = np.asarray(fn(*args))
        if ref is None:
          ref = out
        np.testing.assert_array_equal(out, ref)
        row.append(cpu_ms(fn, args, _REPEATS.value))
      fastconv.XNOR_TERMS_PER_FUSION = default
      print(f"| {hw}x{hw}x{c} | {kind} | {9 * -(-c // 32)} | "
            + " | ".join(f"{v:.1f}" for v in row) + " |")


if __name__ == "__main__":
  app.run(main)
