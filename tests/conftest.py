"""Fixtures shared by the test modules."""

import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data_dir for the whole session: the offline digits dataset is prepared once."""
  return str(tmp_path_factory.mktemp("tfds"))
