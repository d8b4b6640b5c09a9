"""util/torch_release.py: a torch older than the oldest release tested gets one line at the start of main.py."""
import pytest

from util.torch_release import OLDEST_TESTED, release, untested_torch_note


@pytest.mark.parametrize("version, expected", [("2.14.1", (2, 14)), ("2.11.0+cu130", (2, 11)),
                                               ("2.4.1+cu121", (2, 4)), ("2.12.0a0+git1234", (2, 12)),
                                               ("unknown", None)])
def test_release_reads_major_and_minor(version, expected):
    assert release(version) == expected


def test_only_an_older_torch_gets_the_note():
    assert OLDEST_TESTED == (2, 11)
    for version in ("2.14.1", "2.11.0+cu130", "3.0.0", "2.12.0a0+git1234", "local-build"):
        assert untested_torch_note(version) is None, version
    note = untested_torch_note("2.4.1+cu121")
    assert note.startswith("torch 2.4.1+cu121 is older than 2.11") and "docs/install.md" in note
    assert untested_torch_note("1.13.1") is not None


def test_main_prints_it_first(monkeypatch, capsys, tmp_path):
    """main() prints the note before it touches data (here: a data path that does not exist)."""
    import torch

    import main

    monkeypatch.setattr(torch, "__version__", "2.4.1+cu121")
    args = main.get_args_parser().parse_args(["--coco_path", str(tmp_path / "missing"), "--device", "cpu",
                                              "--output_dir", ""])
    with pytest.raises(FileNotFoundError, match="COCO path does not exist"):
        main.main(args)
    assert "torch 2.4.1+cu121 is older than 2.11" in capsys.readouterr().out
