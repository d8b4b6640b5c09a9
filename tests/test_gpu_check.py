"""tools/gpu_check.sh: the one command for a lent GPU machine; here (no GPU) it stops at once, saying why."""
import os
import subprocess
import sys

import pytest
import torch
from model_helpers import ROOT

SCRIPT = ROOT / "tools" / "gpu_check.sh"


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run every check")
def test_without_a_gpu_it_stops_with_a_clear_message(tmp_path):
    report = tmp_path / "reports" / "gpu.txt"
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(SCRIPT), str(report)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no CUDA GPU is available here" in result.stdout
    text = report.read_text()
    assert text.startswith("gpu_check ") and "torch " in text and "no CUDA GPU" in text
