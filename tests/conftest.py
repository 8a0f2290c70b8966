import os

import keras
import pytest

from cxrkeras.images import CACHE_ENV
from cxrkeras.synth import write_synthetic_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_DATASET = os.path.join(ROOT, "..", "shared", "cxr-dataset")


@pytest.fixture(autouse=True, scope="session")
def _private_check_cache(tmp_path_factory):
    """Checked-file verdicts go to a folder of this session, not the user's ~/.cache."""
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("check-cache"))


@pytest.fixture(autouse=True)
def _seed_everything():
    keras.utils.set_random_seed(0)


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """A tiny dataset in the study's layout: 10 train, 3 val, 3 test images per class."""
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_dataset(root, {"train": 10, "val": 3, "test": 3}, seed=0)
    return str(root)


@pytest.fixture
def real_dataset():
    if not os.path.isdir(os.path.join(REAL_DATASET, "train")):
        pytest.skip("../shared/cxr-dataset is not present")
    return REAL_DATASET


@pytest.fixture(scope="session")
def exported_cascade(tmp_path_factory):
    """One tiny cascade for the session: {"cascade": folder with model.keras, "base": its export's base, "version"}."""
    from tiny_models import export_tiny_cascade

    return export_tiny_cascade(tmp_path_factory.mktemp("exported"))
