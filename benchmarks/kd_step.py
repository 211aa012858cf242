r"""The distillation train step's cost: teacher forward included, as a ratio of the student's step.

  python benchmarks/kd_step.py            # ResNet-18 (CIFAR stem) teacher, MobileNetV2 student, b64
  python benchmarks/kd_step.py --teacher=resnet20 --student=shufflenetv2_cifar --json=out.json

Both steps are jcompress's `train.make_train_step` on a fixed synthetic 32x32 batch: the plain
student step (hard labels) and the offline KD step (Hinton's KD; the frozen teacher runs forward
on the same batch). They are timed in alternating blocks (plain, KD, plain, ...) so both see the
same load, and the median of the per-pair ratios is printed. The benchmark also counts the
convolutions in each step's jaxpr: the KD step must add exactly the teacher's forward
convolutions (no teacher backward pass), or it stops with an error.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from jcompress import runtime  # noqa: E402

runtime.configure_cpu()   # XLA:CPU tuning before jax starts a backend, as launch.py does


from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from jcompress import config as config_lib
from jcompress import distill
from jcompress import experiment
from jcompress import jaxpr_utils
from jcompress import optim
from jcompress import train
from jcompress import transforms

_TEACHER = flags.DEFINE_string("teacher", "resnet18_cifar", "Teacher model.")
_STUDENT = flags.DEFINE_string("student", "mobilenetv2_cifar", "Student model.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_STEPS = flags.DEFINE_integer("steps", 3, "Steps per timed block.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed block pairs (the median is reported).")
_JSON = flags.DEFINE_string("json", "", "Also write the figures to this JSON file.")


def count_convs(jaxpr) -> int:
  return jaxpr_utils.count_primitive(jaxpr, "conv_general_dilated")


def main(argv):
  del argv
  config = config_lib.base_config()
  config.model = _STUDENT.value
  student = experiment.build_model(config, 10)
  tconfig = config_lib.base_config()
  tconfig.model = _TEACHER.value
  teacher = experiment.build_model(tconfig, 10)
  schedule = optim.make_schedule(config)
  tx = optim.make_optimizer(config, schedule)
  rng = jax.random.PRNGKey(0)
  x = jax.random.normal(rng, (_BATCH.value, 32, 32, 3), jnp.float32)
  y = jax.random.randint(rng, (_BATCH.value,), 0, 10)
  batch = {"image": x, "label": y}
  sv = student.init(rng, x[:1], train=False)
  tv = teacher.init(jax.random.PRNGKey(1), x[:1], train=False)
  tvars = [{"params": tv["params"], "batch_stats": tv["batch_stats"]}]
  transform = transforms.identity()
  kd = experiment.Teachers(workdirs=("synthetic",), experiments=[], models=[teacher],
                          loss_fn=distill.make_distill_loss(distill.default_config()),
                          init_aux=lambda r: {})

  def fresh_state():   # copies: the timed steps donate (and delete) their input state
    params, stats = jax.tree.map(jnp.copy, (sv["params"], sv["batch_stats"]))
    return train.TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                            opt_state=tx.init(params), compression={}, rng=jnp.copy(rng))

  plain_fn = train.make_train_step(student, tx, transform, schedule)
  kd_fn = train.make_train_step(student, tx, transform, schedule, 0.0, kd)
  n_plain = count_convs(jax.make_jaxpr(plain_fn)(fresh_state(), batch).jaxpr)
  n_kd = count_convs(jax.make_jaxpr(kd_fn)(fresh_state(), batch, tvars).jaxpr)
  n_teacher = count_convs(jax.make_jaxpr(
      lambda v: teacher.apply(v, x, train=False))(tvars[0]).jaxpr)
  if n_kd != n_plain + n_teacher:
    raise SystemExit(f"KD step has {n_kd} convolutions, expected {n_plain} (student forward "
                     f"and backward) + {n_teacher} (teacher forward only)")

  runners = {}
  for name, fn, args in (("plain", plain_fn, ()), ("kd", kd_fn, (tvars,))):
    jitted = jax.jit(fn, donate_argnums=(0,))
    t0 = time.perf_counter()
    compiled = jitted.lower(fresh_state(), batch, *args).compile()
    compile_s = time.perf_counter() - t0
    box = {"state": fresh_state()}

    def block(steps, compiled=compiled, box=box, args=args):
      t0 = time.perf_counter()
      for _ in range(steps):
        box["state"], m = compiled(box["state"], batch, *args)
      jax.block_until_ready((box["state"], m))
      return time.perf_counter() - t0

    block(1)
    runners[name] = (block, compile_s)

  times = common.alternate({k: v[0] for k, v in runners.items()}, _STEPS.value, _REPEATS.value)
  ratios = common.ratio(times["kd"], times["plain"])["all"]
  out = {
      "teacher": _TEACHER.value, "student": _STUDENT.value, "batch_size": _BATCH.value,
      "device": common.device_name(), "cpu_count": os.cpu_count(),
      "student_images_per_second": round(float(np.median(
          [_STEPS.value * _BATCH.value / t for t in times["plain"]])), 1),
      "kd_images_per_second": round(float(np.median(
          [_STEPS.value * _BATCH.value / t for t in times["kd"]])), 1),
      "kd_step_time_ratio": round(float(np.median(ratios)), 3),
      "compile_seconds": {k: round(v[1], 2) for k, v in runners.items()},
      "convolutions": {"student_step": n_plain, "kd_step": n_kd, "teacher_forward": n_teacher},
  }
  print(json.dumps(out, indent=2))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  app.run(main)
