import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_helpers import make_image_folder  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The quick runs' data: an ImageFolder of 2 classes x 24 train / 2 val images of 16 px."""
    return make_image_folder(tmp_path_factory.mktemp("tiny_data"), classes=2, train_per_class=24, val_per_class=2,
                             size=16)
