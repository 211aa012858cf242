r"""int8 matrix products at the shapes of resnet18_cifar's integer layers: the native kernel
(`jcompress.native.int8_matmul`, AVX-512 VNNI) against XLA's int8 `dot_general` and the float32
matmul of the same shape.

  python benchmarks/int_rates.py                 # a few seconds on 2 CPUs
  python benchmarks/int_rates.py --batch_size=16

For each stage of resnet18_cifar (batch --batch_size, 32x32 input), the im2col product of its 3x3
convolutions: (batch x H x W) rows, depth 9 x C_in, C_out columns. Prints GOP/s (2 x MACs / s,
best of --repeats) of the native kernel (the weight packing it does in every call included), of
XLA's int8 x int8 -> int32 `dot_general` (YNNPACK with `runtime.configure_cpu`) and of the
float32 matmul, after checking that both integer products are equal.
"""

from __future__ import annotations

import time

from jcompress import runtime  # noqa: E402

runtime.configure_cpu()   # XLA:CPU tuning before jax starts a backend, as launch.py does

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
from jax import lax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jcompress import native  # noqa: E402

_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls per figure (best reported).")

#: resnet18_cifar's stages: (H = W, channels).
STAGES = ((32, 64), (16, 128), (8, 256), (4, 512))


def best_seconds(f, *args) -> float:
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(_REPEATS.value):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
  return min(times)


def main(argv):
  del argv
  if not native.available():
    raise SystemExit(f"jcompress.native does not run here: {native.unavailable_reason()}")
  dn = (((1,), (0,)), ((), ()))
  xla = jax.jit(lambda a, b: lax.dot_general(a, b, dn, preferred_element_type=jnp.int32))
  kernel = jax.jit(lambda u, b: native.int8_matmul(u, b, 128))
  f32 = jax.jit(lambda a, b: a @ b)
  rng = np.random.default_rng(0)
  print("| rows x depth x columns | native GOP/s | XLA int8 GOP/s | float32 GFLOP/s "
        "| native / XLA |\n|---|---:|---:|---:|---:|")
  for side, c in STAGES:
    m, k, n = _BATCH.value * side * side, 9 * c, c
    a = jnp.asarray(rng.integers(-128, 128, (m, k)), jnp.int8)
    u = lax.bitcast_convert_type(a ^ jnp.int8(-128), jnp.uint8)   # a + 128: (u - 128) b = a b
    b = jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8)
    if not np.array_equal(np.asarray(xla(a, b)), np.asarray(kernel(u, b))):
      raise SystemExit(f"{m} x {k} x {n}: the native product differs from XLA's")
    ops = 2 * m * k * n
    t_native, t_xla = best_seconds(kernel, u, b), best_seconds(xla, a, b)
    t_f32 = best_seconds(f32, a.astype(jnp.float32), b.astype(jnp.float32))
    print(f"| {m} x {k} x {n} | {ops / t_native / 1e9:.0f} | {ops / t_xla / 1e9:.0f} | "
          f"{ops / t_f32 / 1e9:.0f} | {t_xla / t_native:.2f}x |", flush=True)


if __name__ == "__main__":
  app.run(main)
