"""tools/run_tests.sh: the pytest command it runs (TEST_WORKERS parallel processes) and its refusal of a bad
TEST_WORKERS, checked on a copy of the script beside a stand-in .venv/bin/python that prints its arguments."""
import os
import subprocess

import pytest
from model_helpers import ROOT


@pytest.fixture
def tree(tmp_path):
    """A copy of tools/run_tests.sh, a no-op tools/install.sh and a .venv/bin/python that echoes its call."""
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "run_tests.sh").write_text((ROOT / "tools" / "run_tests.sh").read_text())
    (tmp_path / "tools" / "install.sh").write_text("exit 0\n")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/usr/bin/env bash\n[ "$1" = -c ] || echo "python $*"\n')  # -c: the import checks pass
    python.chmod(0o755)
    return tmp_path


def environment(workers=None):
    env = {k: v for k, v in os.environ.items() if k != "TEST_WORKERS"}
    if workers is not None:
        env["TEST_WORKERS"] = workers
    return env


def run(tree, workers=None, *args):
    return subprocess.run(["bash", str(tree / "tools" / "run_tests.sh"), *args], env=environment(workers),
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("workers", [None, ""], ids=["unset", "empty"])
def test_default_is_a_process_per_core_at_most_four(tree, workers):
    result = run(tree, workers, "-k", "parity")
    assert result.returncode == 0, result.stderr
    cores = int(subprocess.run(["nproc"], env=environment(), capture_output=True, text=True).stdout)
    command = f"python -m pytest -q -n {min(cores, 4)} --dist loadscope tests -k parity"
    assert result.stdout.splitlines()[-1] == command


@pytest.mark.parametrize("workers, command", [
    ("3", "python -m pytest -q -n 3 --dist loadscope tests"),
    ("0", "python -m pytest -q tests"),
])
def test_test_workers_sets_the_processes(tree, workers, command):
    result = run(tree, workers)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == command


@pytest.mark.parametrize("workers", ["two", "-1", "2.5", " 2"])
def test_a_bad_test_workers_is_refused_before_installing(tree, workers):
    (tree / "tools" / "install.sh").write_text("echo installing\n")
    result = run(tree, workers)
    assert result.returncode == 2 and "installing" not in result.stdout
    assert result.stderr.strip() == (f"TEST_WORKERS: expected a number of processes (0: none besides this one), "
                                     f"got '{workers}'")
