"""The JIT builds of the compiled ops are keyed by their sources, torch and flags (build_cache.py): two checkouts
with the same sources share one build, a change of any source, flag, architecture or torch version builds into
another directory, so checkouts never rebuild each other's op."""
import shutil
import subprocess
import sys
import time
import warnings

import pytest
import torch

from models.ops.functions import build_cache, extension


def checkout(tmp_path, name):
    """A copy of the op's sources, as another checkout of the project would have them."""
    target = tmp_path / name / "src"
    shutil.copytree(extension.SOURCE_DIR, target)
    return target


def test_the_key_is_the_sources_flags_architectures_and_torch(tmp_path, monkeypatch):
    a, b = checkout(tmp_path, "a"), checkout(tmp_path, "b")
    key = build_cache.build_key(a, ["-O3"])
    assert build_cache.build_key(b, ["-O3"]) == key  # the place of a checkout does not matter
    header = b / "ms_deform_attn_sampling.h"
    header.write_text(header.read_text() + "\n// a changed header\n")
    assert build_cache.build_key(b, ["-O3"]) != key
    (a / "cpu" / "notes.txt").write_text("not a build file")  # ignored
    assert build_cache.build_key(a, ["-O3"]) == key
    assert build_cache.build_key(a, ["-O2"]) != key
    assert build_cache.build_key(a, ["-O3"], "8.0") != build_cache.build_key(a, ["-O3"], "9.0")
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    assert build_cache.build_key(a, ["-O3"]) != key


def test_builds_live_in_directories_of_their_key(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    a, b = checkout(tmp_path, "a"), checkout(tmp_path, "b")
    flags = ["-O3"]
    name_a, dir_a, staged_a = extension._keyed_build("Op", a, flags, None)
    name_b, dir_b, staged_b = extension._keyed_build("Op", b, flags, None)
    assert (name_a, dir_a, staged_a) == (name_b, dir_b, staged_b)  # one build for both checkouts
    assert dir_a == tmp_path / "extensions" / name_a and name_a.startswith("Op_")
    assert build_cache.source_files(staged_a) == build_cache.source_files(a)
    source = b / "cpu" / "ms_deform_attn_cpu.cpp"
    source.write_text(source.read_text() + "\n// changed\n")
    name_c, dir_c, staged_c = extension._keyed_build("Op", b, flags, None)
    assert dir_c != dir_a and (staged_c / "cpu" / "ms_deform_attn_cpu.cpp").read_text().endswith("// changed\n")
    assert not (staged_a / "cpu" / "ms_deform_attn_cpu.cpp").read_text().endswith("// changed\n")


def test_another_checkout_reuses_the_build_without_rebuilding(tmp_path):
    """The CPU op built from this checkout, then loaded from another checkout's copy of the sources: the same
    directory and library, not rebuilt (the build's commands name the staged copy, not the checkout)."""
    if extension.get_cpu_extension() is None:
        pytest.skip("the CPU op could not be built here")
    name, directory, _ = extension.cpu_build()
    library = directory / f"{name}.so"
    built = library.stat().st_mtime_ns
    other = extension.load_cpu_extension(source_dir=checkout(tmp_path, "other"))
    assert other.__name__ == name and library.stat().st_mtime_ns == built
    assert callable(other.ms_deform_attn_forward)


@pytest.mark.parametrize("waits_on_lock_file", [True, False])
def test_a_lock_file_left_by_a_killed_build_is_removed(tmp_path, monkeypatch, waits_on_lock_file):
    """torch 2.4-2.11 waits for ever while the build directory's `lock` file exists, and a build killed midway
    leaves it: under the build lock (no live build) it is removed, with a warning. A torch that flocks that file
    instead leaves it there harmlessly: it is kept."""
    monkeypatch.setattr(build_cache, "torch_waits_on_lock_file", lambda: waits_on_lock_file)
    stale = tmp_path / "build" / build_cache.TORCH_LOCK
    stale.parent.mkdir()
    stale.touch()
    if waits_on_lock_file:
        with pytest.warns(RuntimeWarning, match=r"Op: removed .*lock, left by a build that was interrupted"):
            with build_cache.exclusive_build(stale.parent, "Op") as directory:
                assert directory == stale.parent and not stale.exists()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with build_cache.exclusive_build(stale.parent, "Op"):
                assert stale.exists()


HOLDER = """
import sys, time, filelock
from pathlib import Path
directory = Path(sys.argv[1])
with filelock.FileLock(directory / "build.lock"):
    (directory / "lock").touch()  # a live build of torch 2.11: its lock file exists while it builds
    print("building", flush=True)
    time.sleep(1.5)
    (directory / "lock").unlink()
"""


def test_a_live_build_is_waited_for_not_broken_into(tmp_path, monkeypatch):
    """Another process building in the directory holds the build lock: exclusive_build waits for it to finish,
    and then finds no lock file to remove (no warning)."""
    monkeypatch.setattr(build_cache, "torch_waits_on_lock_file", lambda: True)
    directory = tmp_path / "build"
    directory.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "building"
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with build_cache.exclusive_build(directory, "Op"):
                waited = time.perf_counter() - start
                assert holder.wait(timeout=30) == 0  # it had finished before the lock was ours
        assert waited > 0.5 and not (directory / build_cache.TORCH_LOCK).exists()
    finally:
        holder.kill()
