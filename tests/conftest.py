import os

# unit tests never touch a model hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

import ztt_cli  # noqa: E402,F401  registers the model with transformers


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(False)
    yield


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private ztt cache so tests never see (or fill) the user's."""
    d = tmp_path / "ztt-cache"
    monkeypatch.setenv("ZTT_CACHE", str(d))
    return d


@pytest.fixture
def calib_file(tmp_path):
    """A plain-text calibration file (convert's --calib-data)."""
    from .fixtures import corpus

    path = tmp_path / "calib.txt"
    path.write_text(corpus(300, seed=1))
    return path
