"""`digits_hard`: an offline, deterministic, harder variant of `digits` at 32x32x3.

`digits` is too easy to tell compression methods apart: a float ResNet-20 reaches 99-100% on its
360 test images, so most methods tie within one image. `digits_hard` is built from the same
1,797 scikit-learn digits, each seen several times under seeded random distortions, so that the
float model loses a few points and compression losses show.

How each image is made (`distort`, all randomness from `numpy.random.SeedSequence((SEED,
sklearn row, variant))`, so the dataset is the same on every machine):

1. The 8x8 original (16 levels) is upsampled to 20x20 by a cubic spline and placed in a 32x32
   canvas.
2. A random affine map about the centre: rotation within +-25 degrees, scale 0.75..1.15 per axis,
   shear within +-0.35, translation within +-4 pixels.
3. An elastic distortion (Simard et al., 2003): a random displacement field, Gaussian-smoothed
   (sigma 3 px) and scaled to about 2 px.
4. Colour and contrast: a random background and foreground RGB colour at least 0.25 apart in
   mean grey level (either may be the brighter), a random gamma 0.7..1.4 on the stroke.
5. Clutter and noise: a faint random stroke (a line segment of 0.15..0.45 of the foreground's
   contrast) and Gaussian pixel noise (sigma 0.04..0.12), clipped to [0, 1], stored as uint8.

Splits are built from `digits`' own splits, so no original is shared between them:

* `train`: 5 variants of each of the 1,293 `digits` train originals (6,465 images).
* `validation`: 5 variants of each of the 144 `digits` validation originals (720).
* `test`: 5 variants of each of the 360 `digits` test originals (1,800: one image is 0.056
  points).

What it is not: the classes, the originals and their writers are those of an 8x8 dataset of 43
writers; the distortions are synthetic. It separates methods that tie on `digits` and runs in
minutes on a CPU; it does not stand in for CIFAR-10 or ImageNet, whose natural images, textures
and class variety no transform of 8x8 digits has. Quote it beside them, never instead.

The builder registers itself under the TFDS name `digits_hard` when imported (`import
jcompress.data` does that). Preparing it takes a few seconds.
"""

from __future__ import annotations

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from jcompress.data import digits as digits_lib

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
VARIANTS = 5
SEED = 20261203
TRAIN_SIZE = VARIANTS * digits_lib.TRAIN_SIZE             # 6,465
VALIDATION_SIZE = VARIANTS * digits_lib.VALIDATION_SIZE   # 720
TEST_SIZE = VARIANTS * digits_lib.TEST_SIZE               # 1,800

_GLYPH = 20          # side of the upsampled digit inside the 32x32 canvas


def _glyph(original: np.ndarray) -> np.ndarray:
  """The 8x8 original (uint8 0..255) as a 32x32 float image in [0, 1], digit centred."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top

  small = original[..., 0].astype(np.float64) / 255.0
  big = np.clip(ndimage.zoom(small, _GLYPH / 8, order=3), 0.0, 1.0)
  canvas = np.zeros(IMAGE_SHAPE[:2])
  o = (IMAGE_SHAPE[0] - _GLYPH) // 2
  canvas[o:o + _GLYPH, o:o + _GLYPH] = big
  return canvas


def distort(original: np.ndarray, row: int, variant: int) -> np.ndarray:
  """The `variant`-th distorted 32x32x3 uint8 image of sklearn digit `row` (`original`: its
  8x8x1 uint8 image); a pure function of its arguments (see the module docstring)."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(np.random.SeedSequence((SEED, int(row), int(variant))))
  size = IMAGE_SHAPE[0]
  glyph = _glyph(original)

  # Affine: output pixel p reads input pixel A (p - c) + c + t.
  angle = np.deg2rad(rng.uniform(-25.0, 25.0))
  scale = rng.uniform(0.75, 1.15, size=2)
  shear = rng.uniform(-0.35, 0.35)
  rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  forward = rot @ np.array([[1.0, shear], [0.0, 1.0]]) @ np.diag(scale)
  inverse = np.linalg.inv(forward)
  centre = np.full(2, (size - 1) / 2.0)
  shift = rng.uniform(-4.0, 4.0, size=2)
  yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  grid = np.stack([yy, xx]).reshape(2, -1).astype(np.float64)
  src = inverse @ (grid - centre[:, None] - shift[:, None]) + centre[:, None]

  # Elastic: a smoothed random displacement field, about 2 px.
  field = rng.uniform(-1.0, 1.0, size=(2, size, size))
  field = np.stack([ndimage.gaussian_filter(f, 3.0, mode="constant") for f in field])
  field *= 2.0 / max(np.abs(field).max(), 1e-6)
  src = src + field.reshape(2, -1)
  stroke = ndimage.map_coordinates(glyph, src, order=1, mode="constant", cval=0.0)
  stroke = np.clip(stroke.reshape(size, size), 0.0, 1.0) ** rng.uniform(0.7, 1.4)

  # Colours: background and foreground at least 0.25 apart in mean grey level.
  while True:
    background, foreground = rng.uniform(0.0, 1.0, size=(2, 3))
    if abs(foreground.mean() - background.mean()) >= 0.25:
      break
  image = background + stroke[..., None] * (foreground - background)

  # A faint random line segment and pixel noise.
  (y0, x0), (y1, x1) = rng.uniform(0, size - 1, size=(2, 2))
  t = np.linspace(0.0, 1.0, 4 * size)
  ly = np.clip(np.round(y0 + t * (y1 - y0)).astype(int), 0, size - 1)
  lx = np.clip(np.round(x0 + t * (x1 - x0)).astype(int), 0, size - 1)
  line = np.zeros((size, size))
  line[ly, lx] = rng.uniform(0.15, 0.45)
  line = ndimage.gaussian_filter(line, 0.5) * 2.0
  image = image + np.clip(line, 0.0, 1.0)[..., None] * (foreground - background)
  image = image + rng.normal(0.0, rng.uniform(0.04, 0.12), size=image.shape)
  return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def generate(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(images uint8 [N, 32, 32, 3], labels int64 [N], sklearn rows int64 [N]) of `split`
  ("train", "validation" or "test"): `VARIANTS` images of each original of `digits`' split,
  in order of (row, variant)."""
  images, labels = digits_lib.load_sklearn_digits()
  rows = digits_lib.split_indices(labels)[split]
  out = [(distort(images[r], r, v), labels[r], r) for r in rows for v in range(VARIANTS)]
  return (np.stack([o[0] for o in out]), np.array([o[1] for o in out], np.int64),
          np.array([o[2] for o in out], np.int64))


class DigitsHard(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's digits, 5 seeded distorted colour variants of each at 32x32x3."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # pylint: disable=invalid-name
    return epath.Path(__file__)   # as for `digits`: this module is a plain file

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=(
            "scikit-learn's 1,797 handwritten 8x8 digits, each upsampled to 32x32x3 and seen "
            f"{VARIANTS} times under seeded random affine and elastic distortions, colours, "
            "contrast, a clutter stroke and noise; splits follow `digits`' (train 1,293, "
            "validation 144, test 360 originals), so no original is in two splits."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=IMAGE_SHAPE, dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=("image", "label"),
        citation=digits_lib._CITATION,  # pylint: disable=protected-access
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Nothing is downloaded.
    return {split: self._generate_examples(split) for split in ("train", "validation", "test")}

  def _generate_examples(self, split: str):
    images, labels, rows = generate(split)
    for i, (image, label, row) in enumerate(zip(images, labels, rows)):
      # The key is (sklearn row, variant): unique, and it fixes the on-disk order.
      yield f"{int(row):04d}_{i % VARIANTS}", {"image": image, "label": int(label)}
