"""Shared pytest fixtures. Add yours below; keep this file small and put larger helpers in their own module."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # lets fixtures live in helper modules such as tests/pg.py

from pg import postgres_url  # noqa: E402,F401  (session fixture: throwaway PostgreSQL server)


import pytest  # noqa: E402
import torch  # noqa: E402
from pathlib import Path  # noqa: E402

#: ../shared beside the checkout (CI clones the repo with shared/ next to it).
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
IMAGENET_SAMPLE = SHARED / "data" / "imagenet-sample"


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: tiny models gain nothing from two, and on a shared CPU they lose a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def proxy_cache(tmp_path_factory):
    """A session-wide proxy cache so each tiny backbone is pre-trained once (and never in ~/.cache)."""
    path = tmp_path_factory.mktemp("proxy-cache")
    old = os.environ.get("TPSEXPLORE_CACHE")
    os.environ["TPSEXPLORE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("TPSEXPLORE_CACHE", None)
    else:
        os.environ["TPSEXPLORE_CACHE"] = old
