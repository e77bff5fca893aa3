"""Shared fixtures: tiny models (real classes, tiny configs), paths to the shared inputs."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
DATA = os.environ.get("FANTASYPORTRAIT_DATA", os.path.join(ROOT, "..", "shared", "data"))
REFERENCE = os.path.join(ROOT, "..", "shared", "reference")


def data_path(name: str) -> str:
    path = os.path.join(DATA, name)
    if not os.path.isfile(path):
        pytest.skip(f"shared input {name} not found in {DATA}")
    return path


@pytest.fixture(scope="session")
def tiny():
    """(transformer, adapter, vae, encoder) with seeded random weights."""
    from fantasyportrait_core.model.build import random_tiny_models

    return random_tiny_models(seed=0)


@pytest.fixture(scope="session")
def detector():
    from fantasyportrait_core.faces.mtcnn import MtcnnDetector

    det = MtcnnDetector()
    yield det
    det.close()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
