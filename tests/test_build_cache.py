"""The JIT builds of the compiled ops are keyed by their sources, torch and flags (build_cache.py): two checkouts
with the same sources share one build, a change of any source, flag, architecture or torch version builds into
another directory, so checkouts never rebuild each other's op."""
import shutil

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
