r"""Runs a benchmark script where TensorFlow is not installed (a GPU machine's image, say).

  python benchmarks/without_tensorflow.py benchmarks/inference.py --peers= --matmul_n=8192
  python benchmarks/without_tensorflow.py benchmarks/suite.py --only=float,w1a1 --peers=

jcompress reads its datasets through TFDS, whose builders need TensorFlow; the speed benchmarks
time synthetic batches and read no data. Where `tensorflow_datasets` does not import, this puts
an import-time stand-in for it in `sys.modules` (the `digits` builders are defined but cannot
build), answers `data.dataset_info` from the offline datasets' known sizes and serves
`data.train_iterator` as random batches of the dataset's shape (what an artifact's
calibration reads), then runs the script. Nothing else changes; on a machine with TensorFlow
it only runs the script. The other dependencies must be importable (ml-collections, say, as a
wheel on `PYTHONPATH`).
"""

import importlib.util
import os
import runpy
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: (train, validation, test) images of the offline datasets.
SIZES = {"digits": (1293, 144, 360), "digits_hard": (6465, 720, 1800)}


def _stand_in_tfds() -> types.ModuleType:
  class Builder:
    pass

  tfds = types.ModuleType("tensorflow_datasets")
  tfds.core = types.SimpleNamespace(
      GeneratorBasedBuilder=Builder, DatasetBuilder=Builder, DatasetInfo=object, Version=str,
      utils=types.SimpleNamespace(classproperty=classmethod))
  return tfds


def _patch_data() -> None:
  import numpy as np  # noqa: PLC0415

  from jcompress import data as data_lib  # noqa: PLC0415
  from jcompress.data import pipeline  # noqa: PLC0415

  def dataset_info(name, *, image_size=None, data_dir=None, validation=True):
    del data_dir
    spec = pipeline._defaults(name)  # noqa: SLF001
    if name not in SIZES:
      raise SystemExit(f"{name}: without TensorFlow only {sorted(SIZES)} are known")
    train, evaluated, test = pipeline.splits(name, validation)
    n_train, n_val, n_test = SIZES[name]
    return pipeline.DatasetInfo(
        name=name, num_classes=spec.num_classes,
        image_shape=pipeline._output_shape(name, spec, image_size),  # noqa: SLF001
        train_size=n_train, eval_size=n_val if validation else n_test, test_size=n_test,
        train_split=train, eval_split=evaluated, test_split=test)

  def train_iterator(name, *, batch_size, seed=0, image_size=None, **kwargs):
    del kwargs
    shape = pipeline._output_shape(name, pipeline._defaults(name), image_size)  # noqa: SLF001
    rng = np.random.RandomState(seed)
    while True:
      yield {"image": rng.normal(size=(batch_size, *shape)).astype(np.float32),
             "label": rng.randint(0, 10, batch_size).astype(np.int32)}

  pipeline.dataset_info = data_lib.dataset_info = dataset_info
  pipeline.train_iterator = data_lib.train_iterator = train_iterator


def main() -> None:
  if len(sys.argv) < 2:
    raise SystemExit(__doc__)
  sys.path.insert(0, ROOT)
  # tensorflow_datasets itself may import without TensorFlow (its modules load lazily) and
  # fail only when a builder runs: ask for TensorFlow.
  usable = all(importlib.util.find_spec(m) is not None
               for m in ("tensorflow", "tensorflow_datasets"))
  if not usable:
    sys.modules["tensorflow_datasets"] = _stand_in_tfds()
    _patch_data()
  script = sys.argv[1]
  sys.argv = sys.argv[1:]
  sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
  runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
  main()
