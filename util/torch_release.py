"""Which torch releases the project is tested with, and the one-line note for an older one."""
import re

import torch

OLDEST_TESTED = (2, 11)  # the whole test suite passes with 2.11 and 2.14 (docs/install.md); 2.4 fails


def release(version):
    """(major, minor) of a torch version string ("2.11.0+cu130" -> (2, 11)); None when it cannot be read."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def untested_torch_note(version=None):
    """One line when this torch is older than the oldest release tested, else None."""
    version = torch.__version__ if version is None else version
    found = release(version)
    if found is None or found >= OLDEST_TESTED:
        return None
    return (f"torch {version} is older than {OLDEST_TESTED[0]}.{OLDEST_TESTED[1]}, the oldest release this project "
            "is tested with: expect errors (with 2.4: checkpoint loading, ONNX export); see docs/install.md")
