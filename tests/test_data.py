"""Tests of jcompress.data: the offline digits builder and the deterministic TFDS pipelines.

Nothing here touches the network: digits is prepared from scikit-learn into a temporary
data_dir, other datasets come from `tfds.testing.mock_data`, the download-host probe is replaced
by a stub (and tested on a loopback socket), and failed downloads are simulated by monkeypatching.
"""

import collections
import socket

import numpy as np
import pytest
from sklearn import datasets as sk_datasets
import tensorflow as tf
import tensorflow_datasets as tfds

from jcompress import data
from jcompress.data import pipeline
from jcompress.errors import ConfigError
from jcompress.errors import DataError

pytestmark = pytest.mark.plumbing

_REAL_PROBE = pipeline._probe_download_host
TRAIN_SIZE, VAL_SIZE, TEST_SIZE = 1293, 144, 360
EPOCH_BATCH = 431  # 3 * 431 == 1293: one digits epoch is exactly 3 steps, nothing dropped.


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
  """The download-host probe never runs for real in tests: every host 'answers'."""
  monkeypatch.setattr(pipeline, "_probe_download_host", lambda host, *a, **k: None)


@pytest.fixture(scope="module")
def ddir(tmp_path_factory):
  """A TFDS data_dir with digits prepared in it (once per module)."""
  d = str(tmp_path_factory.mktemp("tfds"))
  data.dataset_info("digits", data_dir=d)
  return d


def _sklearn_digits():
  raw = sk_datasets.load_digits()
  return np.round(raw.images * 255 / 16).astype(np.uint8)[..., None], raw.target


def _split_arrays(ddir, split):
  ds = tfds.builder("digits", data_dir=ddir).as_dataset(split=split, batch_size=-1)
  ex = tfds.as_numpy(ds)
  return ex["image"], ex["label"]


def _raw(images, name):
  """Undo normalisation: back to x / 255 in [0, 1]."""
  spec = data.DATASET_DEFAULTS[name]
  c = images.shape[-1]
  mean = np.array(spec.mean * (c // len(spec.mean)), np.float32)
  std = np.array(spec.std * (c // len(spec.std)), np.float32)
  return images * std + mean


def _to_uint8(images, name):
  return np.round(_raw(images, name) * 255).astype(np.uint8)


def _take(it, n):
  return [next(it) for _ in range(n)]


# ------------------------------------------------------------------------------------------
# The digits builder.


def test_digits_splits_partition_sklearn_digits(ddir):
  info = data.dataset_info("digits", data_dir=ddir)
  assert (info.train_size, info.eval_size, info.test_size) == (TRAIN_SIZE, VAL_SIZE, TEST_SIZE)
  assert (info.train_split, info.eval_split, info.test_split) == ("train", "validation", "test")
  assert info.image_shape == (8, 8, 1) and info.num_classes == 10

  sk_images, sk_labels = _sklearn_digits()
  sk = {img.tobytes(): int(lab) for img, lab in zip(sk_images, sk_labels)}
  assert len(sk) == 1797  # sklearn's digits are pairwise distinct images.

  seen = {}
  for split, size in (("train", TRAIN_SIZE), ("validation", VAL_SIZE), ("test", TEST_SIZE)):
    images, labels = _split_arrays(ddir, split)
    assert images.shape == (size, 8, 8, 1) and images.dtype == np.uint8
    keys = [img.tobytes() for img in images]
    assert len(set(keys)) == size
    for key, label in zip(keys, labels):
      assert key in sk, "an image that is not one of sklearn's"
      assert int(label) == sk[key], "label differs from sklearn's for the same image"
      assert key not in seen, f"image in both splits ({seen.get(key)} and {split})"
      seen[key] = split
    counts = np.bincount(labels, minlength=10)
    if split == "test":  # Stratified: every class 35..37 times in the 360 test images.
      assert counts.min() >= 35 and counts.max() <= 37
    if split == "validation":  # 10% of the train images, every class 14..15 times.
      assert counts.min() >= 14 and counts.max() <= 15
  assert set(seen) == set(sk)  # The union is exactly sklearn's 1,797 images.
  # The test split is version 1.0.0's: sklearn's rows of train_test_split(test_size=360, ...).
  from sklearn import model_selection
  _, test_rows = model_selection.train_test_split(np.arange(1797), test_size=360,
                                                  stratify=sk_labels, random_state=0)
  assert sorted(k for k, s in seen.items() if s == "test") == sorted(
      sk_images[i].tobytes() for i in test_rows)


def test_without_validation_runs_train_on_train_plus_validation(ddir):
  info = data.dataset_info("digits", data_dir=ddir, validation=False)
  assert (info.train_size, info.eval_size, info.test_size) == (
      TRAIN_SIZE + VAL_SIZE, TEST_SIZE, TEST_SIZE)
  assert (info.train_split, info.eval_split) == ("train+validation", "test")
  assert data.splits("cifar10") == ("train[:45000]", "train[45000:]", "test")
  assert data.splits("imagenet2012", validation=False)[1] == "validation"
  train_images = np.concatenate([_split_arrays(ddir, s)[0] for s in ("train", "validation")])
  keys = lambda imgs: sorted(i.tobytes() for i in imgs)   # noqa: E731
  it = data.train_iterator("digits", batch_size=479, seed=0, augment=False, data_dir=ddir,
                           validation=False)
  epoch = np.concatenate([b["image"] for b in _take(it, 3)])   # 3 * 479 = 1,437
  assert keys(_to_uint8(epoch, "digits")) == keys(train_images)
  # train_examples beyond the train split's 1,293 takes the first validation images next.
  it = data.train_iterator("digits", batch_size=1300, seed=0, augment=False, data_dir=ddir,
                           validation=False, train_examples=1300)
  assert keys(_to_uint8(next(it)["image"], "digits")) == keys(train_images[:1300])


# ------------------------------------------------------------------------------------------
# Determinism and resumption.


def test_resume_matches_across_epoch_boundary(ddir):
  kw = dict(batch_size=EPOCH_BATCH, seed=3, data_dir=ddir)
  ref = _take(data.train_iterator("digits", **kw), 8)  # 2 2/3 epochs.
  for k in (2, 4):  # 2: resumes in epoch 0 and crosses into epoch 1; 4: starts inside epoch 1.
    resumed = _take(data.train_iterator("digits", start_step=k, **kw), 8 - k)
    for step, batch in enumerate(resumed, start=k):
      assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
      np.testing.assert_array_equal(batch["image"], ref[step]["image"], err_msg=f"step {step}")
      np.testing.assert_array_equal(batch["label"], ref[step]["label"], err_msg=f"step {step}")


def test_resume_with_uneven_epochs_and_32x32_variant(ddir):
  # 1293 // 100 = 12 steps per epoch (93 examples dropped per epoch); the 32x32x3 variant.
  kw = dict(batch_size=100, seed=11, data_dir=ddir, image_size=32)
  ref = _take(data.train_iterator("digits", **kw), 17)
  resumed = _take(data.train_iterator("digits", start_step=13, **kw), 4)
  for step, batch in enumerate(resumed, start=13):
    assert batch["image"].shape == (100, 32, 32, 3)
    np.testing.assert_array_equal(batch["image"], ref[step]["image"])
    np.testing.assert_array_equal(batch["label"], ref[step]["label"])


def test_train_examples_restricts_every_epoch_to_the_first_examples(ddir):
  train_images, _ = _split_arrays(ddir, "train")
  first = sorted(img.tobytes() for img in train_images[:200])
  it = data.train_iterator("digits", batch_size=50, seed=0, augment=False, data_dir=ddir,
                           train_examples=200)
  for _ in range(2):   # two epochs of 4 batches, each the same 200 images reshuffled
    imgs = np.concatenate([b["image"] for b in _take(it, 4)])
    assert sorted(img.tobytes() for img in _to_uint8(imgs, "digits")) == first
  with pytest.raises(ConfigError, match="train_examples"):
    next(data.train_iterator("digits", batch_size=50, seed=0, data_dir=ddir,
                             train_examples=5000))


def test_epochs_are_permutations_and_seeds_change_order(ddir):
  train_images, _ = _split_arrays(ddir, "train")
  train_keys = sorted(img.tobytes() for img in train_images)

  def epoch_keys(seed, epoch):
    it = data.train_iterator("digits", batch_size=EPOCH_BATCH, seed=seed, augment=False,
                             data_dir=ddir, start_step=3 * epoch)
    imgs = np.concatenate([b["image"] for b in _take(it, 3)])
    return [img.tobytes() for img in _to_uint8(imgs, "digits")]

  e0, e1, other = epoch_keys(0, 0), epoch_keys(0, 1), epoch_keys(1, 0)
  for keys in (e0, e1, other):  # Each epoch shows every training image exactly once.
    assert sorted(keys) == train_keys
  assert e0 != e1, "epochs must be reshuffled"
  assert e0 != other, "different seeds must give different orders"
  assert sum(a == b for a, b in zip(e0, other)) < 50  # ~1 coincidence expected by chance.


def _shift(image, dy, dx, fill):
  """out[y, x] = image[y + dy, x + dx], `fill` outside."""
  h, w, _ = image.shape
  p = max(abs(dy), abs(dx))
  padded = np.broadcast_to(fill, (h + 2 * p, w + 2 * p, image.shape[-1])).copy()
  padded[p:p + h, p:p + w] = image
  return padded[p + dy:p + dy + h, p + dx:p + dx + w]


def _augmentations_found(aug, orig, pad, fill):
  """All (flipped, dy, dx) with aug == flip?(shift(orig, dy, dx))."""
  found = []
  for dy in range(-pad, pad + 1):
    for dx in range(-pad, pad + 1):
      shifted = _shift(orig, dy, dx, fill)
      for flipped in (False, True):
        cand = shifted[:, ::-1] if flipped else shifted
        if np.allclose(aug, cand, atol=1e-5):
          found.append((flipped, dy, dx))
  return found


def _pad_fill(name, channels):
  spec = data.DATASET_DEFAULTS[name]
  mean = np.array(spec.mean * (channels // len(spec.mean)), np.float32)
  std = np.array(spec.std * (channels // len(spec.std)), np.float32)
  return (0 - mean) / std  # Zero padding of x / 255, normalised.


def test_digits_augmentation_is_shift_without_flip(ddir):
  spec = data.DATASET_DEFAULTS["digits"]
  assert spec.flip is False and spec.augment == "pad_crop" and spec.crop_pad == 1
  assert data.DATASET_DEFAULTS["mnist"].flip is False

  kw = dict(batch_size=EPOCH_BATCH, seed=5, data_dir=ddir)
  # Steps 0 (epoch 0) and 3 (epoch 1); the order does not depend on `augment`.
  aug = _take(data.train_iterator("digits", **kw), 4)
  plain = _take(data.train_iterator("digits", augment=False, **kw), 4)
  fill = _pad_fill("digits", 1)
  shifts = collections.Counter()
  for step in (0, 3):
    np.testing.assert_array_equal(aug[step]["label"], plain[step]["label"])
    for a, o in zip(aug[step]["image"][:200], plain[step]["image"][:200]):
      found = _augmentations_found(a, o, 1, fill)
      assert any(not flipped for flipped, _, _ in found), "not a 1-pixel shift of the original"
      shifts[next((dy, dx) for flipped, dy, dx in found if not flipped)] += 1
  assert len(shifts) >= 8, f"crops are not random: {shifts}"  # 9 possible offsets.

  # The same example gets a different crop in another epoch.
  def by_example(step):
    keys = [img.tobytes() for img in _to_uint8(plain[step]["image"], "digits")]
    return dict(zip(keys, aug[step]["image"]))

  epoch0, epoch1 = by_example(0), by_example(3)
  common = set(epoch0) & set(epoch1)
  assert len(common) > 100
  differ = sum(not np.array_equal(epoch0[k], epoch1[k]) for k in common)
  assert differ > len(common) // 2


def test_eval_iterator_yields_every_example_once(ddir):
  images, labels = _split_arrays(ddir, "test")
  for batch_size in (64, 360, 500):  # Last batch partial, exact, one padded batch.
    batches = list(data.eval_iterator("digits", batch_size=batch_size, data_dir=ddir))
    assert len(batches) == -(-TEST_SIZE // batch_size)
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.dtype == np.float32 and set(np.unique(mask)) <= {0.0, 1.0}
    assert mask.sum() == TEST_SIZE
    assert np.all(mask[:TEST_SIZE] == 1)  # Padding only at the end.
    got_labels = np.concatenate([b["label"] for b in batches])[mask == 1]
    assert collections.Counter(got_labels.tolist()) == collections.Counter(labels.tolist())
    got = _to_uint8(np.concatenate([b["image"] for b in batches])[mask == 1], "digits")
    assert sorted(i.tobytes() for i in got) == sorted(i.tobytes() for i in images)


def test_multi_process_slices_partition_the_data(ddir):
  count = 3
  per_process = [
      list(data.eval_iterator("digits", batch_size=50, data_dir=ddir, process_index=i,
                              process_count=count)) for i in range(count)]
  assert len({len(b) for b in per_process}) == 1  # Same number of eval steps everywhere.
  keys = []
  for batches in per_process:
    mask = np.concatenate([b["mask"] for b in batches])
    imgs = _to_uint8(np.concatenate([b["image"] for b in batches])[mask == 1], "digits")
    keys += [i.tobytes() for i in imgs]
  images, _ = _split_arrays(ddir, "test")
  assert sorted(keys) == sorted(i.tobytes() for i in images)

  first = [
      _to_uint8(next(data.train_iterator("digits", batch_size=300, seed=0, augment=False,
                                         data_dir=ddir, process_index=i, process_count=2))
                ["image"], "digits") for i in range(2)]
  assert not {i.tobytes() for i in first[0]} & {i.tobytes() for i in first[1]}


def test_digits_normalisation(ddir):
  batch = next(data.eval_iterator("digits", batch_size=TRAIN_SIZE, split="train",
                                  data_dir=ddir))
  assert abs(batch["image"].mean()) < 0.01 and abs(batch["image"].std() - 1) < 0.01
  # The stored pixels come back exactly: image = (x / 255 - mean) / std.
  images, _ = _split_arrays(ddir, "train")
  assert sorted(i.tobytes() for i in _to_uint8(batch["image"], "digits")) == sorted(
      i.tobytes() for i in images)

  big = next(data.eval_iterator("digits", batch_size=TEST_SIZE, image_size=32, data_dir=ddir))
  assert big["image"].shape == (TEST_SIZE, 32, 32, 3)
  np.testing.assert_array_equal(big["image"][..., 0], big["image"][..., 1])
  np.testing.assert_array_equal(big["image"][..., 0], big["image"][..., 2])
  assert abs(big["image"].mean()) < 0.1 and 0.7 < big["image"].std() < 1.1
  assert data.dataset_info("digits", image_size=32, data_dir=ddir).image_shape == (32, 32, 3)


def test_tensorflow_sees_no_accelerators():
  assert tf.config.get_visible_devices("GPU") == []


# ------------------------------------------------------------------------------------------
# Other datasets through tfds.testing.mock_data.


def test_cifar10_pipeline_shapes_normalisation_and_flip():
  spec = data.DATASET_DEFAULTS["cifar10"]
  assert spec.flip and spec.augment == "pad_crop" and spec.crop_pad == 4
  with tfds.testing.mock_data(num_examples=40):
    raw = tfds.as_numpy(tfds.builder("cifar10").as_dataset(split="test").batch(40)
                        .get_single_element())
    info = data.dataset_info("cifar10")
    assert info.image_shape == (32, 32, 3) and info.num_classes == 10
    assert (info.eval_split, info.test_split) == ("train[45000:]", "test")

    ev = list(data.eval_iterator("cifar10", batch_size=32))
    assert [b["image"].shape for b in ev] == [(32, 32, 32, 3)] * 2
    mask = np.concatenate([b["mask"] for b in ev])
    assert mask.sum() == 40
    images = np.concatenate([b["image"] for b in ev])[:40]
    expected = (raw["image"] / np.float32(255) - np.array(spec.mean, np.float32)) / np.array(
        spec.std, np.float32)
    np.testing.assert_allclose(images, expected, atol=1e-5)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in ev])[:40], raw["label"])

    kw = dict(batch_size=20, seed=0)
    aug = _take(data.train_iterator("cifar10", **kw), 4)
    plain = _take(data.train_iterator("cifar10", augment=False, **kw), 4)
  fill = _pad_fill("cifar10", 3)
  flips = collections.Counter()
  for a_batch, o_batch in zip(aug, plain):
    assert a_batch["image"].shape == (20, 32, 32, 3) and a_batch["image"].dtype == np.float32
    assert a_batch["label"].dtype == np.int32
    for a, o in zip(a_batch["image"], o_batch["image"]):
      found = _augmentations_found(a, o, 4, fill)
      assert found, "not a (flipped) 4-pixel shift of the original"
      flips[found[0][0]] += 1
  assert flips[True] > 10 and flips[False] > 10, flips


def test_imagenet_style_pipeline_is_resumable():
  with tfds.testing.mock_data(num_examples=24):
    kw = dict(batch_size=4, seed=2, image_size=48)
    assert data.DATASET_DEFAULTS["imagenette"].test_split == "validation"
    ref = _take(data.train_iterator("imagenette", **kw), 9)  # 5 steps per epoch (22 of 24).
    resumed = _take(data.train_iterator("imagenette", start_step=5, **kw), 4)
    ev = next(data.eval_iterator("imagenette", batch_size=4, image_size=48))
  for step, batch in enumerate(resumed, start=5):
    assert batch["image"].shape == (4, 48, 48, 3)
    np.testing.assert_array_equal(batch["image"], ref[step]["image"])
    np.testing.assert_array_equal(batch["label"], ref[step]["label"])
  assert ev["image"].shape == (4, 48, 48, 3) and np.isfinite(ev["image"]).all()
  raw = _raw(ev["image"], "imagenette")
  assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


# ------------------------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize("name", ["no_such_dataset", "fashion_mnist", "imagenette/no_such_config"])
def test_unknown_dataset_is_a_config_error(name, ddir):
  with pytest.raises(ConfigError, match="`data`") as e:
    data.dataset_info(name, data_dir=ddir)
  assert name in str(e.value) and "data=digits" in str(e.value)


@pytest.mark.parametrize("kwargs, key", [
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=5000), "batch_size"),
    (dict(image_size=16), "image_size"),
    (dict(seed=1.5), "seed"),
    (dict(start_step=-1), "start_step"),
    (dict(process_index=2, process_count=2), "process_index"),
])
def test_bad_arguments_are_config_errors(kwargs, key, ddir):
  args = dict(batch_size=8, seed=0, data_dir=ddir)
  args.update(kwargs)
  with pytest.raises(ConfigError, match=key):
    data.train_iterator("digits", **args)


def test_cifar_image_size_must_be_32():
  with pytest.raises(ConfigError, match="image_size"):
    data.train_iterator("cifar10", batch_size=8, seed=0, image_size=64)


def test_failed_download_is_one_clean_data_error(monkeypatch, tmp_path):
  cause = ConnectionError("HTTPSConnectionPool(host='www.cs.toronto.edu'): Max retries\n"
                          "exceeded with url: /~kriz/cifar-10-binary.tar.gz")

  def fail(self, *args, **kwargs):
    raise cause

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
  with pytest.raises(DataError) as e:
    data.train_iterator("cifar10", batch_size=8, seed=0, data_dir=str(tmp_path))
  msg = str(e.value)
  assert msg.startswith("Could not fetch TFDS dataset 'cifar10' (")
  assert "\n" not in msg and len(msg) < 500
  assert "data=digits" in msg and "data_dir" in msg and "network" in msg
  assert e.value.__cause__ is cause


def test_manual_download_dataset_says_so(monkeypatch, tmp_path):
  def fail(self, *args, **kwargs):
    raise AssertionError("Manual directory /x/downloads/manual does not exist or is empty.\n" * 5)

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", fail)
  with pytest.raises(DataError) as e:
    data.eval_iterator("imagenet2012", batch_size=8, data_dir=str(tmp_path))
  msg = str(e.value)
  assert "\n" not in msg and "manual download" in msg and "data=digits" in msg
  assert str(tmp_path) in msg and "network" not in msg


def test_unreachable_host_fails_before_any_download(monkeypatch, tmp_path):
  calls = []
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                      lambda self, *a, **k: calls.append(self.name))
  monkeypatch.setattr(pipeline, "_probe_download_host",
                      lambda host, *a, **k: f"cannot reach {host}: Name or service not known")
  with pytest.raises(DataError, match=r"cannot reach storage\.googleapis\.com.*data=digits"):
    data.dataset_info("mnist", data_dir=str(tmp_path))
  assert calls == []


def test_download_host_probe_on_loopback():
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    assert _REAL_PROBE("127.0.0.1", timeout=2, port=port) is None
  # Nothing listens on the port any more: refused at once.
  assert "cannot reach 127.0.0.1" in _REAL_PROBE("127.0.0.1", timeout=2, port=port)


# ------------------------------------------------------------------------------------------
# digits_hard.


def test_digits_hard_images_are_seeded_distortions_of_their_split_originals():
  from jcompress.data import digits as digits_lib
  from jcompress.data import digits_hard

  originals, labels = digits_lib.load_sklearn_digits()
  a = digits_hard.distort(originals[7], 7, 0)
  assert a.shape == (32, 32, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, digits_hard.distort(originals[7], 7, 0))  # deterministic
  assert not np.array_equal(a, digits_hard.distort(originals[7], 7, 1))     # variants differ
  images, split_labels, rows = digits_hard.generate("validation")
  want_rows = np.repeat(digits_lib.split_indices(labels)["validation"], digits_hard.VARIANTS)
  np.testing.assert_array_equal(rows, want_rows)     # only validation originals, 5 each
  np.testing.assert_array_equal(split_labels, labels[want_rows])
  assert images.shape == (digits_hard.VALIDATION_SIZE, 32, 32, 3)
  np.testing.assert_array_equal(images[5], digits_hard.distort(originals[rows[5]], rows[5], 0))
  # Colours vary: the per-image mean colours are spread, not one grey.
  assert images.reshape(len(images), -1, 3).mean(1).std(0).min() > 20


@pytest.mark.slow   # prepares the whole dataset: about 40 s
def test_digits_hard_prepares_with_its_sizes_and_normalisation(tmp_path):
  d = str(tmp_path)
  info = data.dataset_info("digits_hard", data_dir=d)
  assert (info.train_size, info.eval_size, info.test_size) == (6465, 720, 1800)
  assert info.image_shape == (32, 32, 3)
  batch = next(data.eval_iterator("digits_hard", batch_size=6465, split="train", data_dir=d))
  assert np.abs(batch["image"].mean((0, 1, 2))).max() < 0.01
  assert np.abs(batch["image"].std((0, 1, 2)) - 1).max() < 0.01
