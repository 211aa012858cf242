"""Fixtures shared by the test modules."""

import pytest

from jcompress import runtime

# The tests run with the CPU tuning that launch.py applies (XLA:CPU convolutions on Eigen,
# malloc settings): the same compiled code paths as the runs they stand for. Importing
# jcompress applies nothing by itself (tests/test_runtime.py checks that in fresh processes).
runtime.configure_cpu()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data_dir for the whole session: the offline digits dataset is prepared once."""
  return str(tmp_path_factory.mktemp("tfds"))
