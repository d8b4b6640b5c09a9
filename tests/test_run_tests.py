"""tools/run_tests.sh: the pytest command it runs (TEST_WORKERS parallel processes), its refusal of a bad
TEST_WORKERS and of a temporary folder without room, checked on a copy of the script beside a stand-in
.venv/bin/python that prints its arguments."""
import os
import re
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


def environment(workers=None, min_free_mib="0", temp_root=None):
    env = {k: v for k, v in os.environ.items() if k not in ("TEST_WORKERS", "TMPDIR")}
    env["TEST_MIN_FREE_MIB"] = min_free_mib  # the free space check: tested on its own below
    if workers is not None:
        env["TEST_WORKERS"] = workers
    if temp_root is not None:
        env["TMPDIR"] = str(temp_root)
    return env


def run(tree, workers=None, *args, **env):
    return subprocess.run(["bash", str(tree / "tools" / "run_tests.sh"), *args], env=environment(workers, **env),
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


def test_a_temporary_folder_without_room_is_refused_before_installing(tree):
    """The training tests write about 2 GiB of checkpoints there at once: a full disk failed a CI run midway."""
    (tree / "tools" / "install.sh").write_text("echo installing\n")
    result = run(tree, min_free_mib=str(10**12), temp_root=tree)  # a million TiB
    assert result.returncode == 1 and "installing" not in result.stdout
    assert re.fullmatch(rf"only \d+ MiB free in {re.escape(str(tree))}, the tests' temporary folder: they need "
                        rf"{10**12} \(set TMPDIR to another folder, or TEST_MIN_FREE_MIB\)\n", result.stderr)
    result = run(tree, min_free_mib="1", temp_root=tree)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "installing"


@pytest.mark.parametrize("min_free", ["4G", "-1", " 1"])
def test_a_bad_test_min_free_mib_is_refused(tree, min_free):
    result = run(tree, min_free_mib=min_free)
    assert result.returncode == 2
    assert result.stderr.strip() == f"TEST_MIN_FREE_MIB: expected a number of MiB (0: no check), got '{min_free}'"
