from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import prep_small


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic CIFAR-10 (320 train / 64 test) and Flickr8k (128 / 16 / 48) shards, made once."""
    return prep_small(tmp_path_factory.mktemp("small"))
