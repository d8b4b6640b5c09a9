"""Shared test set-up: the repository root on sys.path, the reference data location, one thread."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# one thread: on small shared CI machines several threads mostly wait on each other
torch.set_num_threads(1)


@pytest.fixture
def reference_dir():
    """../shared/reference, or skip the test when it is absent."""
    if not REFERENCE.is_dir():
        pytest.skip(f"reference data not found at {REFERENCE}")
    return REFERENCE
