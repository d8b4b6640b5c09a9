"""An --output_dir that cannot hold the run's files fails first thing, naming the path and the reason (issue 27)."""
import contextlib
import ctypes
import os
import stat
import subprocess
import sys

import pytest
from model_helpers import ROOT

import main as project_main
from util.output_dir import check_output_dir

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2  # what lets root write where the permission bits say no


def parse(*flags):
    return project_main.get_args_parser().parse_args(["--device", "cpu", *map(str, flags)])


def test_an_output_dir_under_a_file_fails_before_the_data_is_read(tmp_path):
    (tmp_path / "file").write_text("")
    args = parse("--coco_path", tmp_path / "no_such_data", "--output_dir", tmp_path / "file" / "run")
    with pytest.raises(NotADirectoryError) as raised:
        project_main.main(args)
    assert str(raised.value) == (f"--output_dir {tmp_path / 'file' / 'run'}: cannot create it (Not a directory: "
                                 f"{tmp_path / 'file' / 'run'})")


def test_a_missing_output_dir_is_created_and_leaves_no_probe(tmp_path):
    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list((tmp_path / "a" / "b").iterdir()) == []
    assert check_output_dir("") is None


def _without_root_overrides():
    """preexec_fn: drop the capabilities by which root ignores permission bits, for the program exec'd next."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            os._exit(97)


@contextlib.contextmanager
def read_only_folder(path):
    """An empty folder at `path` with mode 0o555 for the duration (writable again afterwards, for tmp_path's
    clean-up)."""
    path.mkdir()
    path.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        yield path
    finally:
        path.chmod(0o755)


def run_unprivileged(*cmd):
    """Run cmd in the repository root where the permission bits hold (as root: without its overrides)."""
    preexec = _without_root_overrides if os.geteuid() == 0 else None
    result = subprocess.run([str(c) for c in cmd], cwd=ROOT, preexec_fn=preexec, capture_output=True, text=True,
                            timeout=300)
    if result.returncode == 97:
        pytest.skip("cannot drop root's CAP_DAC_OVERRIDE here")
    return result


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="permission bits and prctl are Linux's")
def test_an_unwritable_output_dir_fails_at_start_naming_the_path_and_reason(tmp_path):
    with read_only_folder(tmp_path / "read_only") as read_only:
        # the data path does not exist: a run that got as far as reading data would fail with another error
        result = run_unprivileged(sys.executable, "main.py", "--device", "cpu", "--coco_path", tmp_path / "no_data",
                                  "--output_dir", read_only)
        assert result.returncode == 1
        last = result.stderr.strip().splitlines()[-1]
        assert last == (f"PermissionError: --output_dir {read_only}: cannot write in it (Permission denied; mode "
                        f"0o555, owner uid {os.geteuid()}; this process runs as uid {os.geteuid()})"), result.stderr
        assert "no_data" not in result.stdout + result.stderr
        # a folder to be made inside it
        result = run_unprivileged(sys.executable, "-c", "import sys; from util.output_dir import check_output_dir; "
                                  "check_output_dir(sys.argv[1])", read_only / "run")
        last = result.stderr.strip().splitlines()[-1]
        assert last == (f"PermissionError: --output_dir {read_only / 'run'}: cannot create it (Permission denied: "
                        f"{read_only / 'run'})"), result.stderr
        assert list(read_only.iterdir()) == []
