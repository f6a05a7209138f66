import contextlib
import fcntl
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dist_helpers import make_image_folder  # noqa: E402

# The suite runs in two workers (pytest.ini). A test marked `alone` compares times (a slowed rank against the
# others, a delay or a link's rate against the overhead it adds, a modeled compute's wall time): it runs with the
# other worker idle. Every test holds LOCK shared for its setup, call and teardown (module fixtures included), an
# `alone` one holds it exclusive; each passes TURNSTILE first, so a waiting `alone` test is not starved.
LOCK, TURNSTILE = (Path(tempfile.gettempdir()) / f"kit-tests.{name}" for name in ("lock", "turnstile"))


@contextlib.contextmanager
def _cpu_share(alone):
    with open(TURNSTILE, "a") as turnstile, open(LOCK, "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        yield  # the lock goes when the file closes


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    with _cpu_share(item.get_closest_marker("alone") is not None):
        yield


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """The quick runs' data: an ImageFolder of 2 classes x 24 train / 2 val images of 16 px."""
    return make_image_folder(tmp_path_factory.mktemp("tiny_data"), classes=2, train_per_class=24, val_per_class=2,
                             size=16)
