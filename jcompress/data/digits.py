"""The offline `digits` dataset: scikit-learn's bundled handwritten digits as a TFDS builder.

scikit-learn ships the test set of the UCI "Optical Recognition of Handwritten Digits" data
(1,797 real 8x8 images, 16 intensity levels) inside the package, so this builder prepares a real,
labelled image-classification dataset without touching the network. Tests and quick runs
(`--config=...:data=digits`) use it.

Features:

* `image`: uint8 (8, 8, 1), sklearn's values v in 0..16 rescaled to `np.round(v * 255 / 16)`
  (0..255; v=8 is the one tie and rounds half-to-even to 128).
* `label`: ClassLabel with 10 classes (the digit).

Splits (fixed, stratified by label with `sklearn.model_selection.train_test_split`): 360 test
images first (`test_size=360, stratify=y, random_state=0`), then a fixed 10% of the remaining
1,437 held out as validation (`test_size=144, stratify=y, random_state=0`):

* `train`: 1,293 images, trained on.
* `validation`: 144 images (per class 14..15), evaluated during training and for every choice
  made from accuracy.
* `test`: 360 images (per class 35..37), read once at the end of a run. The same 360 images as
  version 1.0.0's test split; `train+validation` is version 1.0.0's train split.

The builder registers itself under the TFDS name `digits` when this module is imported
(`import jcompress.data` does that), so `tfds.builder("digits")` and `tfds.load("digits")` work.
Preparing it into a data_dir takes about a second.
"""

from __future__ import annotations

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)
TEST_SIZE = 360
VALIDATION_SIZE = 144          # 10% of the 1,437 images outside the test split
TRAIN_SIZE = 1797 - TEST_SIZE - VALIDATION_SIZE  # 1,293
SPLIT_RANDOM_STATE = 0

_CITATION = """\
@misc{alpaydin1998optical,
  author = {Alpaydin, E. and Kaynak, C.},
  title = {Optical Recognition of Handwritten Digits},
  year = {1998},
  howpublished = {UCI Machine Learning Repository},
  doi = {10.24432/C50P49},
}
"""


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
  """Returns sklearn's digits as (images uint8 [1797, 8, 8, 1] in 0..255, labels int64 [1797])."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  raw = datasets.load_digits()
  images = np.round(raw.images * 255.0 / 16.0).astype(np.uint8)[..., None]
  return images, raw.target.astype(np.int64)


def split_indices(labels: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Indices into sklearn's digits arrays of the fixed `train`, `validation` and `test` splits
  (each sorted; disjoint; together all 1,797).

  Args:
    labels: sklearn's digits labels (loaded if None).
  """
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top

  if labels is None:
    _, labels = load_sklearn_digits()
  rest, test = model_selection.train_test_split(
      np.arange(len(labels)),
      test_size=TEST_SIZE,
      stratify=labels,
      random_state=SPLIT_RANDOM_STATE,
  )
  rest = np.sort(rest)
  train, validation = model_selection.train_test_split(
      rest,
      test_size=VALIDATION_SIZE,
      stratify=labels[rest],
      random_state=SPLIT_RANDOM_STATE,
  )
  return {"train": np.sort(train), "validation": np.sort(validation), "test": np.sort(test)}


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), prepared offline."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release: stratified 1,437 / 360 train / test split.",
      "2.0.0": "A stratified validation split (144) held out of the 1,437 train images; the "
               "test split is unchanged.",
  }

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # pylint: disable=invalid-name
    # TFDS derives this from the package's resources through `importlib_resources`, which
    # etils >= 1.13 no longer installs; this module is a plain file, so say so directly.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=(
            "scikit-learn's bundled handwritten digits (UCI Optical Recognition of Handwritten "
            "Digits, test part): 1,797 real 8x8 grey images with 16 intensity levels, rescaled "
            "to 0..255. Fixed stratified splits: test 360 (train_test_split(test_size=360, "
            "stratify=label, random_state=0)), validation 144 of the rest (the same with "
            "test_size=144), train 1,293."
        ),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=IMAGE_SHAPE, dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing is downloaded: the data ships with scikit-learn.
    images, labels = load_sklearn_digits()
    return {
        split: self._generate_examples(images, labels, idx)
        for split, idx in split_indices(labels).items()
    }

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray):
    for i in indices:
      # The key is sklearn's row index: unique, and it fixes the on-disk order.
      yield int(i), {"image": images[i], "label": int(labels[i])}
