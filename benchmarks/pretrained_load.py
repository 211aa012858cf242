r"""Time to load published ResNet-50 weights into a jcompress model (issue 9: under 10 s).

  python benchmarks/pretrained_load.py                 # torchvision naming, from .safetensors
  python benchmarks/pretrained_load.py --keras         # also Keras ResNet50 (weights=None)

Writes a torchvision-named ResNet-50 state_dict of random float32 values (25.6M parameters,
102 MB) to a temporary .safetensors file, then times `pretrained.load_pretrained` on it as
`init_from` does: read the file, map names and layouts, check every shape against the model
(the model's shapes are traced, nothing is compiled). `--keras` also times the Keras route
from a built `keras.applications.ResNet50(weights=None)`; building the Keras model itself is
reported apart, as the ImageNet download it would need is not part of the conversion.
"""

import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from jcompress import runtime  # noqa: E402

runtime.configure_cpu()   # XLA:CPU tuning before jax starts a backend, as launch.py does


from absl import app
from absl import flags
import jax
import numpy as np
from safetensors import numpy as safetensors_numpy

from jcompress import models
from jcompress import pretrained

_KERAS = flags.DEFINE_bool("keras", False, "Also time the Keras ResNet50 conversion.")


def main(argv):
  del argv
  model = models.get_model("resnet50", 1000, **pretrained.TORCHVISION_FIELDS)
  rng = np.random.default_rng(0)
  shapes = pretrained.target_shapes(model)
  variables = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)
  state = pretrained.to_torch_state_dict("resnet50", variables["params"],
                                         variables["batch_stats"])
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "resnet50.safetensors")
    safetensors_numpy.save_file(state, path)
    mb = os.path.getsize(path) / 1e6
    t0 = time.perf_counter()
    params, _, message = pretrained.load_pretrained(path, model, 1000, jax.random.PRNGKey(0))
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
  print(f"torchvision ResNet-50 from .safetensors ({mb:.0f} MB, {models.count_params(params):,} "
        f"parameters): {seconds:.2f} s (target < 10 s)\n  {message}")
  if _KERAS.value:
    t0 = time.perf_counter()
    keras_model = pretrained.build_keras_model("ResNet50", weights=None)
    build = time.perf_counter() - t0
    kmodel = models.get_model("resnet50", 1000, **pretrained.model_fields("keras:ResNet50"))
    t0 = time.perf_counter()
    params, _, _ = pretrained.load_pretrained("keras:ResNet50", kmodel, 1000,
                                              jax.random.PRNGKey(0), keras_weights=keras_model)
    jax.block_until_ready(params)
    print(f"Keras ResNet50: conversion {time.perf_counter() - t0:.2f} s (building the Keras "
          f"model: {build:.2f} s)")


if __name__ == "__main__":
  app.run(main)
