"""Shared fixtures. `shared_dir` finds the licensed-data folder `../shared/flame2023_open`
(or $FACERECON_SHARED_DIR) and skips, naming what is missing, when it is absent."""

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def find_shared_flame_dir():
    env = os.environ.get("FACERECON_SHARED_DIR")
    candidates = [pathlib.Path(env)] if env else []
    candidates.append(REPO_ROOT.parent / "shared" / "flame2023_open")
    for candidate in candidates:
        if (candidate / "FLAME_masks.pkl").exists():
            return candidate
    return None


@pytest.fixture(scope="session")
def shared_dir():
    found = find_shared_flame_dir()
    if found is None:
        pytest.skip("../shared/flame2023_open (or $FACERECON_SHARED_DIR) with FLAME_masks.pkl is "
                    "not present; these tests need the auxiliary FLAME files")
    return found
