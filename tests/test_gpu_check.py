"""tools/gpu_check.sh: the one command for a lent GPU machine. Here (no GPU) it stops at once, saying why; with
--smoke it runs its steps on the CPU with a tiny model (as CI does), within its budget."""
import os
import subprocess
import sys

import pytest
import torch
from model_helpers import ROOT, parse

SCRIPT = ROOT / "tools" / "gpu_check.sh"
STEPS = ["build the CPU op (JIT)", "op tests (registration, kernels, autocast, dispatch)",
         "kernel parity: CUDA vs CPU (--smoke: CPU vs PyTorch)"]


def run(args, tmp_path, timeout, **env):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=tmp_path, env={**os.environ, "PYTHON": sys.executable,
                                                                           **env},
                          capture_output=True, text=True, timeout=timeout)


def summary(report):
    """{step name: status} of the report's summary."""
    lines = report.read_text().split("== summary", 1)[1].splitlines()[1:]
    rows = [line for line in lines if line.rstrip().endswith(" s") and not line.startswith(" ")]
    return {row[:58].strip(): row[58:90].strip() for row in rows}


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the script would run every check")
def test_without_a_gpu_it_stops_with_a_clear_message(tmp_path):
    report = tmp_path / "reports" / "gpu.txt"
    result = run([str(report)], tmp_path, 120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no CUDA GPU is available here" in result.stdout
    text = report.read_text()
    assert text.startswith("gpu_check ") and "torch " in text and "no CUDA GPU" in text


def test_smoke_runs_every_step_on_the_cpu(tmp_path):
    """Alone its steps take about 180 s (--smoke's budget: 300 s); in the parallel suite they share the cores with
    other tests and may wait for another process's build of the op, so the test gives them 600 s. pycocotools is
    hidden, as on the lent GPU machines, which lack it and reach no package index: no step may need it."""
    report = tmp_path / "smoke" / "report.txt"
    hidden = tmp_path / "hidden" / "pycocotools"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('pycocotools is hidden by tests/test_gpu_check.py')\n")
    python_path = os.pathsep.join(filter(None, [str(hidden.parent), os.environ.get("PYTHONPATH")]))
    result = run(["--smoke", str(report)], tmp_path, 660, GPU_CHECK_BUDGET="600", PYTHONPATH=python_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    status = summary(report)
    assert all(status[name] == "ok" for name in STEPS), status
    has_amp = "amp" in vars(parse([]))
    for precision in ("fp32", "bf16", "fp16"):
        for step in (f"hybrid training step, {precision}", f"evaluation forward, {precision}"):
            expected = "ok" if has_amp or precision == "fp32" else "SKIPPED (no --amp in this tree)"
            assert status[step] == expected, (step, status)
    text = report.read_text()
    assert "training step, batch 2" in text and "Inference Speed" in text and " passed" in text


def test_the_budget_is_enforced(tmp_path):
    """With a budget spent at once, every step is reported as not run and the exit status says so."""
    report = tmp_path / "report.txt"
    result = run(["--smoke", str(report)], tmp_path, 120, GPU_CHECK_BUDGET="2")
    assert result.returncode == 1
    status = summary(report)
    assert status and all(s in ("NOT RUN (budget spent)", "SKIPPED (all present)") or s.startswith("SKIPPED (no")
                          for s in status.values()), status
    assert status["build the CPU op (JIT)"] == "NOT RUN (budget spent)"
