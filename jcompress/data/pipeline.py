"""Deterministic, resumable tf.data input pipelines over TFDS.

Supported datasets (`DATASET_DEFAULTS` holds every per-dataset default in one table):

| name         | train / validation / test (TFDS)     | cls  | yields (default)  | train augment |
| ------------ | ------------------------------------ | ---- | ----------------- | ------------- |
| digits       | train / validation / test            | 10   | 8x8x1 (32x32x3)   | pad-1 crop    |
| digits_hard  | train / validation / test            | 10   | 32x32x3           | pad-4 crop    |
| mnist        | train[:54000] / train[54000:] / test | 10   | 28x28x1 (32x32x3) | pad-2 crop    |
| cifar10      | train[:45000] / train[45000:] / test | 10   | 32x32x3           | pad-4 + flip  |
| cifar100     | train[:45000] / train[45000:] / test | 100  | 32x32x3           | pad-4 + flip  |
| imagenette   | train[:90%] / train[90%:] / val.     | 10   | 224x224x3         | RR-crop, flip |
| imagenet2012 | train[:-10000] / train[-10000:] / val. | 1000 | 224x224x3     | RR-crop, flip |

("val.": TFDS's `validation` split, the test split of ImageNet-style sets. Each set is
normalised with its own mean/std, in `DATASET_DEFAULTS`.)

Validation. Every dataset holds a validation split out of its train split (digits: a fixed
stratified 10% of its train images, a split of the builder; the others: the last 10% or
10,000 images of TFDS's train split, which TFDS stores shuffled). Runs train on the train column,
evaluate on the validation column while training and for any choice made from accuracy, and
read the test column (for ImageNet-style sets TFDS's `validation`, the figure papers report)
once at the end. `validation=False` (config `eval_split="test"`) trains on train + validation
and evaluates on the test split, the protocol of runs made before the split existed.

Digits are not mirror-invariant, so `digits`, `digits_hard` and `mnist` never flip. For the grey
ones `image_size=32` is the "32x32 variant": bilinear resize to 32x32 and the grey channel
repeated to 3 channels, so CIFAR-shaped models run on them (pad-4 crop then). ImageNet-style
sets train on an Inception random-resized crop ("RR-crop": area 8%..100%, aspect 3/4..4/3)
resized to `image_size` (default 224, any size >= 16) and evaluate on "resize 256, center-crop
224" (the center crop covering 224/256 of the shorter side, resized to `image_size`). Images
come out as float32 `(x / 255 - mean) / std`; the mean/std values are in `DATASET_DEFAULTS`.

Determinism. The batch that `train_iterator` yields at step `s` is a pure function of
(dataset, seed, s, batch_size, image_size, augment, process_index, process_count):

* Each process reads its slice of the train split (`tfds.split_for_jax_process`, equal sizes),
  in the order TFDS stores it (`shuffle_files=False`, deterministic tf.data).
* `steps_per_epoch = slice_size // batch_size`; epoch `e` is the slice in an order shuffled with
  a seed derived from (seed, e), truncated to `steps_per_epoch * batch_size` elements, so step
  `s` is batch `s % steps_per_epoch` of epoch `s // steps_per_epoch`.
  Small sets (`in_memory`) are held decoded in memory and permuted with
  `tf.random.experimental.stateless_shuffle`; large ones stream through a bounded shuffle buffer
  (`shuffle_buffer`) seeded per epoch (this one also depends on TensorFlow's global seed, so do
  not call `tf.random.set_seed` in a training process).
* Augmentation draws from stateless ops (`tf.image.stateless_random_crop`, ...) seeded from
  (seed, e, position within the epoch), so it is independent of threading and prefetching.
* `start_step=k` starts at epoch `k // steps_per_epoch` and skips the first elements of that
  epoch before any decoding or augmentation, so a resumed run sees the batches it would have
  seen.

TensorFlow is kept off accelerators (JAX owns them): the first dataset this module opens hides
GPUs and TPUs from TensorFlow; importing it changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Mapping
import dataclasses
import importlib
import math
import socket
import threading
import types
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from jcompress.data import digits as _digits  # noqa: F401  (registers the `digits` builder)
from jcompress.data import digits_hard as _digits_hard  # noqa: F401  (and `digits_hard`)
from jcompress.errors import ConfigError
from jcompress.errors import DataError


class _LazyModule:
  """`tf.X` imports TensorFlow at its first use: importing this module (and with it `jcompress`
  and `launch.py`'s flag and config checks) does not pay TensorFlow's import, seconds long."""

  def __init__(self, name: str):
    self._name = name

  def __getattr__(self, attr: str) -> Any:
    return getattr(importlib.import_module(self._name), attr)


tf = _LazyModule("tensorflow")

_tf_devices_hidden = False
# Prepared builders by (name, data_dir) and split sizes by (builder's directory, split): a
# prepared dataset does not change on disk, and each eval would otherwise re-read its metadata.
_builders: dict[tuple[str, str | None], tfds.core.DatasetBuilder] = {}
_split_sizes: dict[tuple[str, str], int] = {}


def _no_autograph(fn):
  """`fn` mapped by tf.data as written: it branches on Python values only (the dataset's
  settings, static shapes), so AutoGraph's source conversion would only cost time."""
  return tf.autograph.experimental.do_not_convert(fn)


def _hide_accelerators_from_tensorflow() -> None:
  """Keeps TensorFlow's hands off GPUs/TPUs (JAX owns them); harmless if TF already initialised
  its devices. Called when a pipeline is first built, not at import."""
  global _tf_devices_hidden
  if _tf_devices_hidden:
    return
  _tf_devices_hidden = True
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):  # Devices already initialised, or no such device type.
      pass

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# The 32x32 variant of grey datasets and the CIFAR sets pad by 4 before the random 32x32 crop.
_PAD_32 = 4
# Eval of ImageNet-style sets: resize the shorter side to 256, center-crop 224.
_EVAL_CROP_FRACTION = 224 / 256
# Seconds a download-host reachability check may take before the host counts as unreachable.
_PROBE_TIMEOUT_S = 5.0


@dataclasses.dataclass(frozen=True)
class DatasetDefaults:
  """Per-dataset defaults of the pipelines.

  Attributes:
    train_split: TFDS split trained on (the train split less the validation images).
    val_split: TFDS split held out of the train split for validation.
    test_split: TFDS split read once at the end (`eval_iterator`'s default).
    num_classes: number of labels.
    image_size: side of the images the pipeline yields by default (native size for the
      fixed-size sets; the crop size for ImageNet-style sets).
    channels: channels of the stored images.
    mean: per-channel mean of x / 255 subtracted in normalisation.
    std: per-channel std of x / 255 divided by in normalisation.
    flip: whether a random horizontal flip is a valid augmentation.
    augment: train augmentation kind: "pad_crop" (zero-pad then random crop back to size) or
      "random_resized_crop" (Inception crop, resized to `image_size`).
    crop_pad: padding of "pad_crop" at the native size (the 32x32 variant pads by 4).
    fixed_size: the stored images all have shape (image_size, image_size, channels).
    in_memory: the train split is small enough to hold decoded in memory and permute by index;
      otherwise it streams through a shuffle buffer of `shuffle_buffer` elements.
    shuffle_buffer: shuffle buffer of streamed train splits.
    download_host: host the TFDS builder downloads from (checked before a download attempt so
      that no-network machines fail fast); None: nothing to download or manual download.
    manual_download: TFDS needs the files placed by hand in `<data_dir>/downloads/manual`.
  """

  train_split: str
  val_split: str
  test_split: str
  num_classes: int
  image_size: int
  channels: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  flip: bool
  augment: str
  crop_pad: int = 0
  fixed_size: bool = True
  in_memory: bool = True
  shuffle_buffer: int = 0
  download_host: str | None = None
  manual_download: bool = False


DATASET_DEFAULTS: Mapping[str, DatasetDefaults] = types.MappingProxyType({
    # Stats of x / 255 over the 1,437 train images (pixels, all positions).
    "digits": DatasetDefaults(
        train_split="train", val_split="validation", test_split="test", num_classes=10,
        image_size=8, channels=1,
        mean=(0.3054,), std=(0.3760,), flip=False, augment="pad_crop", crop_pad=1),
    # Stats of x / 255 over the 6,465 train images (jcompress/data/digits_hard.py).
    "digits_hard": DatasetDefaults(
        train_split="train", val_split="validation", test_split="test", num_classes=10,
        image_size=32, channels=3, mean=(0.5036, 0.4999, 0.5011), std=(0.2958, 0.2957, 0.2919),
        flip=False,
        augment="pad_crop", crop_pad=4),
    "mnist": DatasetDefaults(
        train_split="train[:54000]", val_split="train[54000:]", test_split="test",
        num_classes=10, image_size=28, channels=1,
        mean=(0.1307,), std=(0.3081,), flip=False, augment="pad_crop", crop_pad=2,
        download_host="storage.googleapis.com"),
    "cifar10": DatasetDefaults(
        train_split="train[:45000]", val_split="train[45000:]", test_split="test",
        num_classes=10, image_size=32, channels=3,
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), flip=True,
        augment="pad_crop", crop_pad=4, download_host="www.cs.toronto.edu"),
    "cifar100": DatasetDefaults(
        train_split="train[:45000]", val_split="train[45000:]", test_split="test",
        num_classes=100, image_size=32, channels=3,
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), flip=True,
        augment="pad_crop", crop_pad=4, download_host="www.cs.toronto.edu"),
    "imagenette": DatasetDefaults(
        train_split="train[:90%]", val_split="train[90%:]", test_split="validation",
        num_classes=10, image_size=224, channels=3,
        mean=_IMAGENET_MEAN, std=_IMAGENET_STD, flip=True, augment="random_resized_crop",
        fixed_size=False, in_memory=False, shuffle_buffer=10_000,
        download_host="s3.amazonaws.com"),
    "imagenet2012": DatasetDefaults(
        train_split="train[:-10000]", val_split="train[-10000:]", test_split="validation",
        num_classes=1000, image_size=224, channels=3, mean=_IMAGENET_MEAN, std=_IMAGENET_STD,
        flip=True,
        augment="random_resized_crop", fixed_size=False, in_memory=False,
        shuffle_buffer=20_000, manual_download=True),
})


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a pipeline yields.

  Attributes:
    name: the dataset name as given (may carry a TFDS config, e.g. "imagenette/320px-v2").
    num_classes: number of labels.
    image_shape: (H, W, C) of the images the pipelines yield for this `image_size`.
    train_size: examples trained on (all processes together).
    eval_size: examples of the split evaluated while training (validation, or test with
      `validation=False`).
    test_size: examples of the test split.
    train_split: TFDS split trained on.
    eval_split: TFDS split evaluated while training.
    test_split: TFDS split read once at the end.
  """

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  train_size: int
  eval_size: int
  test_size: int
  train_split: str
  eval_split: str
  test_split: str


# --------------------------------------------------------------------------------------------
# Validation, builders, preparation.


def _supported() -> str:
  return ", ".join(DATASET_DEFAULTS)


def _defaults(name: Any) -> DatasetDefaults:
  """The table row for `name` ("cifar10", "imagenette/320px-v2", "mnist:3.0.1", ...)."""
  if not isinstance(name, str) or not name.strip():
    raise ConfigError(
        f"Config key `data` must be a dataset name (one of {_supported()}), got {name!r}; "
        "use `data=digits` for offline runs.")
  base = name.split("/")[0].split(":")[0].strip().lower()
  if base in DATASET_DEFAULTS:
    return DATASET_DEFAULTS[base]
  if base in tfds.list_builders(with_community_datasets=False):
    raise ConfigError(
        f"Config key `data`: TFDS dataset {name!r} has no input-pipeline defaults in jcompress "
        f"(supported: {_supported()}); use `data=digits` for offline runs.")
  raise ConfigError(
      f"Config key `data`: unknown dataset {name!r}, TFDS has no dataset of that name "
      f"(supported: {_supported()}); use `data=digits` for offline runs.")


def dataset_defaults(name: str) -> DatasetDefaults:
  """The pipeline defaults of dataset `name` (its normalisation statistics, classes, sizes);
  ConfigError for a dataset jcompress has no pipeline for. Reads nothing from disk."""
  return _defaults(name)


def _check_int(key: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ConfigError(f"Config key `{key}` must be an integer >= {minimum}, got {value!r}.")
  return int(value)


def _output_shape(name: str, spec: DatasetDefaults, image_size: Any) -> tuple[int, int, int]:
  """(H, W, C) the pipeline yields; validates `image_size` for the dataset."""
  if image_size is None:
    return (spec.image_size, spec.image_size, spec.channels)
  if not spec.fixed_size:
    size = _check_int("image_size", image_size, 16)
    return (size, size, spec.channels)
  allowed = {spec.image_size}
  if spec.channels == 1:
    allowed.add(32)  # The 32x32x3 variant of grey datasets.
  if isinstance(image_size, bool) or image_size not in allowed:
    options = " or ".join(["None"] + [str(s) for s in sorted(allowed)])
    raise ConfigError(
        f"Config key `image_size` must be {options} for dataset {name!r}, got {image_size!r}.")
  if image_size == spec.image_size:
    return (spec.image_size, spec.image_size, spec.channels)
  return (int(image_size), int(image_size), 3)


def _probe_download_host(host: str, timeout: float = _PROBE_TIMEOUT_S,
                         port: int = 443) -> str | None:
  """None if `host:port` accepts a TCP connection within `timeout` s, else a short reason.

  Runs in a daemon thread so that a hanging DNS lookup cannot hold the caller longer than
  `timeout`.
  """
  result: list[str | None] = []

  def connect():
    try:
      with socket.create_connection((host, port), timeout=timeout):
        result.append(None)
    except OSError as e:
      result.append(f"cannot reach {host}: {e.strerror or e}")

  thread = threading.Thread(target=connect, daemon=True, name=f"probe-{host}")
  thread.start()
  thread.join(timeout)
  if not result:
    return f"cannot reach {host}: no answer within {timeout:g} s"
  return result[0]


def _short(error: BaseException, limit: int = 160) -> str:
  """One line of an exception's text, at most `limit` characters."""
  text = " ".join(str(error).split()) or type(error).__name__
  text = f"{type(error).__name__}: {text}" if not isinstance(error, OSError) else text
  return text if len(text) <= limit else text[:limit - 3].rstrip() + "..."


def _fetch_error(name: str, builder: tfds.core.DatasetBuilder, spec: DatasetDefaults,
                 reason: str) -> DataError:
  """The one-sentence error for a dataset that is not prepared and cannot be prepared here."""
  base = name.split("/")[0].split(":")[0]
  root = builder.data_dir_root
  if spec.download_host is None and not spec.manual_download:  # Nothing to fetch (digits).
    return DataError(
        f"Could not prepare TFDS dataset {name!r} in {root} ({reason}); point --config.data_dir "
        "at a writable directory.")
  network = "; this machine may have no network access" if spec.download_host else ""
  return DataError(
      f"Could not fetch TFDS dataset {name!r} ({reason}){network}. Run with `:data=digits` to "
      "train offline on the bundled digits dataset, or prepare "
      f"{base} in --config.data_dir (now {root}).")


def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The TFDS builder of `name`, prepared in `data_dir` (downloading it if needed and possible).

  Raises:
    ConfigError: `name` is not a dataset (or config) TFDS knows.
    DataError: the dataset is not prepared in `data_dir` and cannot be fetched here.
  """
  spec = _defaults(name)
  cached = _builders.get((name, data_dir))
  if cached is not None:
    return cached
  _hide_accelerators_from_tensorflow()
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
    raise ConfigError(
        f"Config key `data`: TFDS cannot build dataset {name!r} ({_short(e, 120)}); use "
        "`data=digits` for offline runs.") from e
  if builder.is_prepared():
    _builders[(name, data_dir)] = builder
    return builder
  if spec.download_host is not None:
    reason = _probe_download_host(spec.download_host)
    if reason is not None:
      raise _fetch_error(name, builder, spec, reason)
  try:
    builder.download_and_prepare()
  except Exception as e:  # pylint: disable=broad-except  (anything deep inside tfds)
    if spec.manual_download:
      reason = f"it needs a manual download into {builder.data_dir_root}/downloads/manual"
    else:
      reason = _short(e)
    raise _fetch_error(name, builder, spec, reason) from e
  _builders[(name, data_dir)] = builder
  return builder


def _split_size(builder: tfds.core.DatasetBuilder, split: Any) -> int:
  """Examples in `split` (a name or a `tfds` sub-split), as the reader will yield them."""
  key = (str(builder.data_dir), repr(split))
  if key in _split_sizes:
    return _split_sizes[key]
  n = int(builder.as_dataset(split=split, shuffle_files=False).cardinality())
  if n < 0:  # Unknown cardinality: count.
    n = int(builder.as_dataset(split=split, shuffle_files=False).reduce(0, lambda c, _: c + 1))
  _split_sizes[key] = n
  return n


def splits(name: str, validation: bool = True) -> tuple[str, str, str]:
  """(train, eval, test) TFDS splits of dataset `name`: with `validation`, the train split less
  the validation images, the validation split, the test split; without, train + validation,
  the test split, the test split. Reads nothing from disk."""
  spec = _defaults(name)
  if validation:
    return spec.train_split, spec.val_split, spec.test_split
  return f"{spec.train_split}+{spec.val_split}", spec.test_split, spec.test_split


def _head(builder: tfds.core.DatasetBuilder, split: str, n: int) -> str:
  """The TFDS split of the first `n` examples of `split` ("train", "train[:45000]",
  "train+validation"; each part starts at its TFDS split's first example), `n` <= its size."""
  out = []
  for part in split.split("+"):
    base, _, _ = part.partition("[")
    size = _split_size(builder, part)
    if n <= size:
      out.append(f"{base}[:{n}]")
      break
    out.append(part)
    n -= size
  return "+".join(out)


def dataset_info(name: str, *, image_size: int | None = None,
                 data_dir: str | None = None, validation: bool = True) -> DatasetInfo:
  """Sizes, classes and output shape of dataset `name` (prepares it if needed).

  Args:
    name: TFDS name, one of `DATASET_DEFAULTS` (optionally with a TFDS config / version).
    image_size: as for `train_iterator`.
    data_dir: TFDS data_dir; None: TFDS's default (`TFDS_DATA_DIR` or ~/tensorflow_datasets).
    validation: as for `train_iterator`: the eval split is the validation split (else test).

  Returns:
    A `DatasetInfo`; sizes are those of the whole splits.

  Raises:
    ConfigError: unknown dataset or invalid image_size.
    DataError: the dataset is not prepared and cannot be fetched.
  """
  spec = _defaults(name)
  shape = _output_shape(name, spec, image_size)
  builder = _builder(name, data_dir)
  train, evaluated, test = splits(name, validation)
  return DatasetInfo(
      name=name,
      num_classes=spec.num_classes,
      image_shape=shape,
      train_size=_split_size(builder, train),
      eval_size=_split_size(builder, evaluated),
      test_size=_split_size(builder, test),
      train_split=train,
      eval_split=evaluated,
      test_split=test,
  )


# --------------------------------------------------------------------------------------------
# Preprocessing (all per-example, all randomness stateless).


def _normalize(image: tf.Tensor, spec: DatasetDefaults) -> tf.Tensor:
  """(x - mean) / std of an image already scaled to [0, 1] (grey stats repeat over 3 channels)."""
  channels = image.shape[-1]
  mean = tf.constant(spec.mean * (channels // len(spec.mean)), tf.float32)
  std = tf.constant(spec.std * (channels // len(spec.std)), tf.float32)
  return (image - mean) / std


def _fixed_to_float(image: tf.Tensor, shape: tuple[int, int, int]) -> tf.Tensor:
  """uint8 image of a fixed-size set -> float32 in [0, 1] of `shape` (32x32x3 variant)."""
  image = tf.image.convert_image_dtype(image, tf.float32)  # x / 255
  if image.shape[0] != shape[0]:
    image = tf.image.resize(image, shape[:2], method="bilinear")
  if image.shape[-1] != shape[-1]:
    image = tf.image.grayscale_to_rgb(image)
  return image


def _pad_and_crop(image: tf.Tensor, pad: int, seed: tf.Tensor) -> tf.Tensor:
  """Zero-pads `pad` pixels on each side, then crops back to the original size at random."""
  h, w, c = image.shape
  padded = tf.image.resize_with_crop_or_pad(image, h + 2 * pad, w + 2 * pad)
  return tf.image.stateless_random_crop(padded, size=[h, w, c], seed=seed)


def _decode_window(encoded: tf.Tensor, window: tf.Tensor, jpeg: bool) -> tf.Tensor:
  """Decodes the [y, x, h, w] `window` of an encoded image (uint8, 3 channels)."""
  if jpeg:
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  return tf.slice(image, tf.stack([window[0], window[1], 0]), tf.stack([window[2], window[3], 3]))


def _encoded_shape(encoded: tf.Tensor, jpeg: bool) -> tf.Tensor:
  if jpeg:
    return tf.image.extract_jpeg_shape(encoded)
  return tf.shape(tf.io.decode_image(encoded, channels=3, expand_animations=False))


def _random_resized_crop(encoded: tf.Tensor, size: int, seed: tf.Tensor, jpeg: bool) -> tf.Tensor:
  """Inception crop (area 8%..100%, aspect 3/4..4/3) resized to size x size, float in [0, 1]."""
  shape = _encoded_shape(encoded, jpeg)
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape,
      bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4]),
      seed=seed,
      min_object_covered=0.1,
      aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.08, 1.0),
      max_attempts=10,
      use_image_if_no_bounding_boxes=True,
  )
  window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
  image = _decode_window(encoded, window, jpeg)
  image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
  return tf.clip_by_value(image / 255.0, 0.0, 1.0)


def _center_crop(encoded: tf.Tensor, size: int, jpeg: bool) -> tf.Tensor:
  """"Resize 256, center-crop 224": the central 224/256 of the shorter side, resized to size."""
  shape = _encoded_shape(encoded, jpeg)
  h, w = shape[0], shape[1]
  side = tf.cast(
      _EVAL_CROP_FRACTION * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
  side = tf.maximum(side, 1)
  window = tf.stack([(h - side + 1) // 2, (w - side + 1) // 2, side, side])
  image = _decode_window(encoded, window, jpeg)
  image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
  return tf.clip_by_value(image / 255.0, 0.0, 1.0)


def _train_preprocess(spec: DatasetDefaults, shape: tuple[int, int, int], augment: bool,
                      jpeg: bool):
  """Returns f(image, seed[2]) -> normalised float32 image of `shape`."""

  def preprocess(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    if spec.fixed_size:
      image = _fixed_to_float(image, shape)
      if augment:
        pad = spec.crop_pad if shape[0] == spec.image_size else _PAD_32
        image = _pad_and_crop(image, pad, crop_seed)
    elif augment:
      image = _random_resized_crop(image, shape[0], crop_seed, jpeg)
    else:
      image = _center_crop(image, shape[0], jpeg)
    if augment and spec.flip:
      image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    image = tf.ensure_shape(image, shape)
    return _normalize(image, spec)

  return preprocess


def _eval_preprocess(spec: DatasetDefaults, shape: tuple[int, int, int], jpeg: bool):
  def preprocess(image: tf.Tensor) -> tf.Tensor:
    if spec.fixed_size:
      image = _fixed_to_float(image, shape)
    else:
      image = _center_crop(image, shape[0], jpeg)
    return _normalize(tf.ensure_shape(image, shape), spec)

  return preprocess


# --------------------------------------------------------------------------------------------
# Iterators.


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return options


def _read(builder: tfds.core.DatasetBuilder, split: Any, spec: DatasetDefaults) -> tf.data.Dataset:
  """(image, label) pairs of `split` in stored order; images stay encoded for variable sizes."""
  decoders = None if spec.fixed_size else {"image": tfds.decode.SkipDecoding()}
  ds = builder.as_dataset(
      split=split, shuffle_files=False, decoders=decoders,
      read_config=tfds.ReadConfig(options=_options()))
  return ds.map(_no_autograph(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32))))


def _is_jpeg(builder: tfds.core.DatasetBuilder) -> bool:
  return getattr(builder.info.features["image"], "encoding_format", None) == "jpeg"


def _check_process(process_index: Any, process_count: Any) -> tuple[int, int]:
  process_count = _check_int("process_count", process_count, 1)
  process_index = _check_int("process_index", process_index, 0)
  if process_index >= process_count:
    raise ConfigError(
        f"`process_index` must be < `process_count` ({process_count}), got {process_index}.")
  return process_index, process_count


def _base_key(seed: int, process_index: int) -> tf.Tensor:
  seed = int(seed)
  key = tf.constant([seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF], tf.int64)
  return tf.random.experimental.stateless_fold_in(key, process_index)


def train_iterator(name: str, *, batch_size: int, seed: int, start_step: int = 0,
                   image_size: int | None = None, augment: bool = True,
                   data_dir: str | None = None, process_index: int = 0,
                   process_count: int = 1, train_examples: int = 0,
                   validation: bool = True) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator over training batches; batch `s` depends only on (seed, s, settings).

  Args:
    name: TFDS name, one of `DATASET_DEFAULTS` (optionally with a TFDS config / version).
    batch_size: examples per batch on this process (the global batch is the concatenation of
      the processes' batches).
    seed: integer seed of the data order and the augmentation.
    start_step: first step to yield: `train_iterator(..., start_step=k)` yields exactly the
      batches `train_iterator(..., start_step=0)` yields from its k-th on.
    image_size: output side; None: the dataset's default (see `DATASET_DEFAULTS`); 32 for
      `digits` / `mnist`: the 32x32x3 variant.
    augment: apply the dataset's train augmentation (else: the eval preprocessing).
    data_dir: TFDS data_dir (None: TFDS's default).
    process_index: this process's index (`jax.process_index()`).
    process_count: number of processes (`jax.process_count()`).
    train_examples: > 0: train on the first `train_examples` examples of the train split only
      (a small labelled subset, as in Hinton et al.'s distillation experiments); 0: all.
    validation: train on the train split less the validation images (the default); False:
      on train + validation (see the module docstring).

  Yields:
    {"image": float32 [batch_size, H, W, C] normalised, "label": int32 [batch_size]}. Epochs
    repeat forever; each epoch drops its last `slice_size % batch_size` examples.

  Raises:
    ConfigError: unknown dataset, or an invalid batch_size / seed / start_step / image_size.
    DataError: the dataset is not prepared and cannot be fetched.
  """
  spec = _defaults(name)
  shape = _output_shape(name, spec, image_size)
  batch_size = _check_int("batch_size", batch_size, 1)
  start_step = _check_int("start_step", start_step, 0)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise ConfigError(f"Config key `seed` must be an integer, got {seed!r}.")
  process_index, process_count = _check_process(process_index, process_count)
  builder = _builder(name, data_dir)
  train_split = splits(name, validation)[0]
  train_examples = _check_int("train_examples", train_examples, 0)
  if train_examples:
    available = _split_size(builder, train_split)
    if train_examples > available:
      raise ConfigError(f"Config key `train_examples` ({train_examples}) exceeds the "
                        f"{available} examples of {name!r}'s train split ({train_split}).")
    train_split = _head(builder, train_split, train_examples)

  split = tfds.split_for_jax_process(
      train_split, process_index=process_index, process_count=process_count,
      drop_remainder=True)
  records = _read(builder, split, spec)
  n = _split_size(builder, split)
  if spec.in_memory:  # Decode the slice once; epochs then permute indices into it.
    images, labels = records.batch(max(n, 1)).get_single_element()
    n = int(images.shape[0])
  steps_per_epoch = n // batch_size
  if steps_per_epoch == 0:
    raise ConfigError(
        f"Config key `batch_size` ({batch_size}) exceeds the {n} training examples of "
        f"{name!r} on this process.")
  per_epoch = steps_per_epoch * batch_size
  start_epoch, skip = divmod(start_step, steps_per_epoch)

  key = _base_key(seed, process_index)
  shuffle_key = tf.random.experimental.stateless_fold_in(key, 1)
  augment_key = tf.random.experimental.stateless_fold_in(key, 2)

  if spec.in_memory:
    def epoch_elements(epoch):
      order = tf.random.experimental.stateless_shuffle(
          tf.range(n, dtype=tf.int64),
          seed=tf.random.experimental.stateless_fold_in(shuffle_key, epoch))
      return tf.data.Dataset.from_tensor_slices(order[:per_epoch]).enumerate()
  else:
    buffer = max(1, min(spec.shuffle_buffer, n))

    def epoch_elements(epoch):
      epoch_seed = tf.random.stateless_uniform(
          [], seed=tf.random.experimental.stateless_fold_in(shuffle_key, epoch),
          minval=None, maxval=None, dtype=tf.int64)
      return records.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False).take(
          per_epoch).enumerate()

  # (epoch, position in epoch, element); skipping happens here, before any decode / augment.
  ds = tf.data.Dataset.counter(start_epoch).flat_map(_no_autograph(
      lambda epoch: epoch_elements(epoch).map(_no_autograph(lambda pos, x: (epoch, pos, x)))))
  ds = ds.skip(skip * batch_size)

  preprocess = _train_preprocess(spec, shape, augment, _is_jpeg(builder))

  def load(epoch, pos, element):
    if spec.in_memory:
      image, label = tf.gather(images, element), tf.gather(labels, element)
    else:
      image, label = element
    seed_ = tf.random.experimental.stateless_fold_in(
        tf.random.experimental.stateless_fold_in(augment_key, epoch), pos)
    return {"image": preprocess(image, seed_), "label": label}

  ds = ds.map(_no_autograph(load), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True)
  ds = ds.with_options(_options()).prefetch(tf.data.AUTOTUNE)
  return ds.as_numpy_iterator()


def eval_iterator(name: str, *, batch_size: int, split: str | None = None,
                  image_size: int | None = None, data_dir: str | None = None,
                  process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """One pass over an eval split, every example exactly once, in stored order.

  Each process reads its slice (`tfds.split_for_jax_process`); all processes yield the same
  number of batches, ceil(ceil(split_size / process_count) / batch_size), the last ones padded.

  Args:
    name: TFDS name, one of `DATASET_DEFAULTS`.
    batch_size: examples per batch on this process.
    split: TFDS split (any TFDS split string); None: the dataset's test split (`splits(name)`
      gives the validation split).
    image_size: as for `train_iterator`.
    data_dir: TFDS data_dir (None: TFDS's default).
    process_index: this process's index.
    process_count: number of processes.

  Yields:
    {"image": float32 [batch_size, H, W, C], "label": int32 [batch_size], "mask": float32
    [batch_size]}: mask is 1 for real examples and 0 for padding (zero images, label 0).

  Raises:
    ConfigError: unknown dataset or split, invalid batch_size / image_size.
    DataError: the dataset is not prepared and cannot be fetched.
  """
  spec = _defaults(name)
  shape = _output_shape(name, spec, image_size)
  batch_size = _check_int("batch_size", batch_size, 1)
  process_index, process_count = _check_process(process_index, process_count)
  builder = _builder(name, data_dir)
  split = spec.test_split if split is None else split
  try:
    total = _split_size(builder, split)
  except (ValueError, KeyError, tf.errors.InvalidArgumentError) as e:
    raise ConfigError(
        f"Eval `split` {split!r} is not a split of dataset {name!r} ({_short(e, 120)}).") from e
  sub_split = tfds.split_for_jax_process(
      split, process_index=process_index, process_count=process_count)
  n = _split_size(builder, sub_split)
  # Even splits differ by at most one example, so ceil(total / process_count) bounds every slice.
  num_batches = max(math.ceil(math.ceil(total / process_count) / batch_size),
                    math.ceil(n / batch_size))
  padding = num_batches * batch_size - n

  preprocess = _eval_preprocess(spec, shape, _is_jpeg(builder))
  ds = _read(builder, sub_split, spec).map(
      _no_autograph(lambda image, label: {"image": preprocess(image), "label": label,
                                          "mask": tf.constant(1.0, tf.float32)}),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  pad = tf.data.Dataset.from_tensors({
      "image": tf.zeros(shape, tf.float32),
      "label": tf.constant(0, tf.int32),
      "mask": tf.constant(0.0, tf.float32),
  }).repeat(padding)
  ds = ds.concatenate(pad).batch(batch_size, drop_remainder=True)
  ds = ds.with_options(_options()).prefetch(tf.data.AUTOTUNE)
  return ds.as_numpy_iterator()
