"""One tiny model directory per family for the whole session (built on first use)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.models.tiny import family_configs, save_tiny


@pytest.fixture(scope="session")
def family_paths(tmp_path_factory, default_model_path):
    """family -> model directory, saved on first request."""
    configs = family_configs()
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = save_tiny(configs[name], tmp_path_factory.mktemp(name), default_model_path)
        return made[name]

    return get
