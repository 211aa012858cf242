r"""Float train-step throughput and compile time of a model on the current device.

  python benchmarks/train_step.py                        # ResNet-18, CIFAR stem, 32x32, batch 64
  python benchmarks/train_step.py --model=resnet20 --batch_size=128 --json=out.json
  python benchmarks/train_step.py --binary_bits=1     # also bnn_resnet18_cifar W1A1, as a ratio
  python benchmarks/train_step.py --qat_bits=4        # also the W4A4 QAT step, as a ratio

All the figures of issue 8 in one run: benchmarks/suite.py. The runners and the timing loop
live in benchmarks/common.py.

Uses jcompress's own train step (make_train_step: forward, backward, SGD-momentum update with
weight decay, BatchNorm statistics) on a fixed synthetic batch, so the figure is the step alone,
not the input pipeline. Prints images/s (median over --repeats timed blocks of --steps steps)
and the compile time; --json also writes them.

--qat_bits=k times the quantization-aware step of the same model beside the float one: k-bit
uniform per-channel weight fake-quant (the `quant` transform, ranges from the current weights
every step) and k-bit activations (`--qat_act`: pact, dorefa or lsq) at every conv input but
the stem; it prints the QAT step time as a multiple of the float step's, timed in alternating
blocks (float, QAT, float, ...) so that both see the same load on a shared machine.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from jcompress import runtime  # noqa: E402

runtime.configure_cpu()   # XLA:CPU tuning before jax starts a backend, as launch.py does


from absl import app
from absl import flags
import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

_MODEL = flags.DEFINE_string("model", "resnet18_cifar", "Registered model name.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_SIZE = flags.DEFINE_integer("image_size", 32, "Image height and width.")
_CLASSES = flags.DEFINE_integer("num_classes", 10, "Classes.")
_STEPS = flags.DEFINE_integer("steps", 5, "Steps per timed block.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed blocks (the median is reported).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_JSON = flags.DEFINE_string("json", "", "Also write the figures to this JSON file.")
_BINARY = flags.DEFINE_integer(
    "binary_bits", 0, "Also time the binary step: bnn_<model> with binary weights (binary_weights "
    "transform) and activations of this many bits (1 = W1A1); 0: float only.")
_QAT = flags.DEFINE_integer(
    "qat_bits", 0, "Also time the QAT step of the same model: uniform per-channel weights and "
    "activations (--qat_act) of this many bits (4 = W4A4); 0: no QAT step.")
_QAT_ACT = flags.DEFINE_enum("qat_act", "pact", ["pact", "dorefa", "lsq"],
                             "Activation quantizer of the QAT step.")


def device_name() -> str:
  return common.device_name()


def make_runner(model_name, batch_size, image_size, num_classes, dtype="float32",
                binary_bits=0, qat_bits=0, qat_act="pact", model_kwargs=None):
  """(run_block(steps) -> seconds, info) for jcompress's train step of `model_name`, compiled.

  With `binary_bits`, the step trains binary weights (the `binary` sub-config's transform) and
  the model quantizes activations to that many bits. With `qat_bits`, the step fake-quantizes
  the weights (the `quant` sub-config's transform: uniform, per channel) and the model
  quantizes every conv input but the stem with `qat_act`, both to that many bits
  (`common.train_config` / `common.make_train_runner`).
  """
  config = common.train_config(model_name, dtype, binary_bits, qat_bits, qat_act, model_kwargs)
  run, info = common.make_train_runner(config, batch_size, image_size, num_classes)
  info.update({"binary_bits": binary_bits, "qat_bits": qat_bits,
               "qat_act": qat_act if qat_bits else "", "device": device_name(),
               "jax": jax.__version__})
  return run, info


def measure_train_step(model_name, batch_size, image_size, num_classes, steps, repeats,
                       dtype="float32", binary_bits=0, qat_bits=0, qat_act="pact"):
  """Compile seconds and images/s (median of `repeats` blocks of `steps` steps) of the train
  step of `model_name` (see `make_runner`)."""
  run, info = make_runner(model_name, batch_size, image_size, num_classes, dtype, binary_bits,
                          qat_bits, qat_act)
  return {**info, **common.rates([run(steps) for _ in range(repeats)], steps, batch_size)}


def measure_qat_vs_float(model_name, batch_size, image_size, num_classes, steps, repeats,
                         dtype="float32", qat_bits=4, qat_act="pact"):
  """The float and QAT steps timed in alternating blocks (float, QAT, float, QAT, ...), so that
  both see the same machine load; `step_time_vs_float` is the median over the pairs of
  t_QAT / t_float."""
  run_f, info_f = make_runner(model_name, batch_size, image_size, num_classes, dtype)
  run_q, info_q = make_runner(model_name, batch_size, image_size, num_classes, dtype,
                              qat_bits=qat_bits, qat_act=qat_act)
  t = common.alternate({"float": run_f, "qat": run_q}, steps, repeats)
  rt = common.ratio(t["qat"], t["float"])
  run_f_out = {**info_f, **common.rates(t["float"], steps, batch_size)}
  run_q_out = {**info_q, **common.rates(t["qat"], steps, batch_size),
               "step_time_vs_float": rt["median"], "step_time_vs_float_all": rt["all"]}
  run_q_out["images_per_second_vs_float"] = round(
      run_q_out["images_per_second"] / run_f_out["images_per_second"], 3)
  return run_f_out, run_q_out


def main(argv):
  del argv
  if _QAT.value:
    runs = list(measure_qat_vs_float(_MODEL.value, _BATCH.value, _SIZE.value, _CLASSES.value,
                                     _STEPS.value, _REPEATS.value, _DTYPE.value,
                                     qat_bits=_QAT.value, qat_act=_QAT_ACT.value))
  else:
    runs = [measure_train_step(_MODEL.value, _BATCH.value, _SIZE.value, _CLASSES.value,
                               _STEPS.value, _REPEATS.value, _DTYPE.value)]
  if _BINARY.value:
    runs.append(measure_train_step(f"bnn_{_MODEL.value}", _BATCH.value, _SIZE.value,
                                   _CLASSES.value, _STEPS.value, _REPEATS.value, _DTYPE.value,
                                   binary_bits=_BINARY.value))
    runs[-1]["images_per_second_vs_float"] = round(
        runs[-1]["images_per_second"] / runs[0]["images_per_second"], 3)
  print(f"device: {runs[0]['device']}  jax {runs[0]['jax']}")
  for r in runs:
    kind = "float"
    if r["binary_bits"]:
      kind = f"W1A{r['binary_bits']}"
    elif r["qat_bits"]:
      kind = f"QAT W{r['qat_bits']}A{r['qat_bits']} ({r['qat_act']})"
    print(f"{r['model']} ({r['params']:,} params, {kind}), {r['image_size']}x{r['image_size']}, "
          f"batch {r['batch_size']}, {r['dtype']}:")
    print(f"  compile time     {r['compile_seconds']:.2f} s")
    print(f"  train step       {r['images_per_second']:.1f} images/s  "
          f"(blocks: {r['images_per_second_all']})")
    if "images_per_second_vs_float" in r:
      print(f"  vs float step    {r['images_per_second_vs_float']:.3f}x images/s")
    if "step_time_vs_float" in r:
      print(f"  step time        {r['step_time_vs_float']:.3f}x the float step's (median of "
            f"alternating blocks: {r['step_time_vs_float_all']})")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(runs, f, indent=2)


if __name__ == "__main__":
  app.run(main)
