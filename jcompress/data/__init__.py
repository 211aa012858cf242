"""TFDS input pipelines (deterministic, resumable tf.data) and the offline `digits` and
`digits_hard` builders.

Importing this package registers those two TFDS builders (nothing else: TensorFlow's devices
are left alone until a pipeline is built).
"""

from jcompress.data.digits import Digits
from jcompress.data.digits_hard import DigitsHard
from jcompress.data.pipeline import DATASET_DEFAULTS
from jcompress.data.pipeline import DatasetDefaults
from jcompress.data.pipeline import DatasetInfo
from jcompress.data.pipeline import dataset_defaults
from jcompress.data.pipeline import dataset_info
from jcompress.data.pipeline import eval_iterator
from jcompress.data.pipeline import splits
from jcompress.data.pipeline import train_iterator

__all__ = [
    "DATASET_DEFAULTS",
    "DatasetDefaults",
    "DatasetInfo",
    "Digits",
    "DigitsHard",
    "dataset_defaults",
    "dataset_info",
    "eval_iterator",
    "splits",
    "train_iterator",
]
