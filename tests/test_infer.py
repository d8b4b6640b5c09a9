"""tools/infer.py: the model rebuilt from a checkpoint, detections in original pixels, drawings, bad inputs."""
import argparse
import json
import os
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch
from model_helpers import ROOT, SMALL, TWO_STAGE_HYBRID, build, parse
from PIL import Image
from test_output_dir import read_only_folder, run_unprivileged

from datasets import build_dataset
from datasets.synthetic import make_synthetic_coco
from main import get_args_parser
from models import build_model
from util.checkpoint import save_checkpoint
from util.config_script import main_arguments

TOOL = runpy.run_path(str(ROOT / "tools" / "infer.py"))
FLAGS = SMALL + TWO_STAGE_HYBRID + ["--backbone", "resnet18", "--no_pretrained_backbone", "--num_feature_levels", "2",
                                    "--val_scale", "72", "--max_size", "128", "--topk", "20"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    make_synthetic_coco(root / "coco", 0, 3, image_size=96, seed=2)
    return root


def trained(data, tmp_path, extra=(), keep_args=True):
    """A checkpoint (random weights, as main.py saves them) of the small model, and its arguments."""
    flags = FLAGS + ["--coco_path", str(data / "coco"), "--num_classes", "7", *extra]
    model, _, _, args = build(flags, seed=1)
    state = {"model": model.state_dict()}
    if keep_args:
        state["args"] = args
    save_checkpoint(state, tmp_path / "checkpoint.pth")
    return tmp_path / "checkpoint.pth", model, args


def test_detections_equal_evaluation_on_the_same_image(data, tmp_path, capsys):
    checkpoint, model, args = trained(data, tmp_path)
    out = tmp_path / "out"
    code = TOOL["main"](["--resume", str(checkpoint), "--images", str(data / "coco" / "val2017"), "--out", str(out),
                         "--threshold", "0"])
    assert code == 0
    results = json.loads((out / "detections.json").read_text())
    assert len(results) == 3 and all(len(r["detections"]) == 20 for r in results)  # --topk 20 from the checkpoint

    # what evaluation computes for the first validation image, in its original pixels
    dataset = build_dataset("val", args)
    image, target = dataset[0]
    model.eval()  # the one-to-one queries, as evaluation runs them
    with torch.no_grad():
        expected = build_model(args)[2]["bbox"](model([image]), target["orig_size"][None])[0]
    first = next(r for r in results if r["file"].endswith(dataset.coco.imgs[dataset.ids[0]]["file_name"]))
    assert (first["height"], first["width"]) == tuple(target["orig_size"].tolist())
    torch.testing.assert_close(torch.tensor([d["box"] for d in first["detections"]]), expected["boxes"],
                               atol=0.051, rtol=0)  # rounded to 0.1 px
    torch.testing.assert_close(torch.tensor([d["score"] for d in first["detections"]]), expected["scores"],
                               atol=5e-5, rtol=0)
    assert [d["label"] for d in first["detections"]] == expected["labels"].tolist()
    names = {c["id"]: c["name"] for c in dataset.coco.dataset["categories"]}
    assert all(d.get("name") == names.get(d["label"]) for d in first["detections"])
    assert len(list(out.glob("*_detections.jpg"))) == 3
    assert "3 images)" in capsys.readouterr().out


def test_tta_detections_equal_the_evaluation_path(data, tmp_path):
    """--tta runs the multi-scale (and flip) test of main.py --eval --tta: the same merged detections."""
    from datasets.tta import TestTimeAugmentation, collate_views

    checkpoint, model, _ = trained(data, tmp_path)
    out = tmp_path / "out"
    tta_flags = ["--tta", "--tta_scales", "48", "96", "--tta_flip"]
    code = TOOL["main"](["--resume", str(checkpoint), "--images", str(data / "coco" / "val2017"), "--out", str(out),
                         "--threshold", "0", "--no_draw", *tta_flags])
    assert code == 0
    results = json.loads((out / "detections.json").read_text())

    args = parse(FLAGS + ["--coco_path", str(data / "coco"), "--num_classes", "7", "--eval", *tta_flags])
    dataset = build_dataset("val", args)
    samples, targets, views = collate_views([dataset[0]])
    model.eval()
    post = build_model(args)[2]["bbox"]
    with torch.no_grad():
        identity = post(model(samples), targets[0]["orig_size"][None])
        expected = TestTimeAugmentation.from_args(args, post)(model, samples, targets, identity, views)[0]
    assert len(expected["scores"]) > 20, "the merged passes give more than one pass's --topk 20"
    first = next(r for r in results if r["file"].endswith(dataset.coco.imgs[dataset.ids[0]]["file_name"]))
    torch.testing.assert_close(torch.tensor([d["box"] for d in first["detections"]]), expected["boxes"],
                               atol=0.051, rtol=0)
    torch.testing.assert_close(torch.tensor([d["score"] for d in first["detections"]]), expected["scores"],
                               atol=5e-5, rtol=0)
    assert [d["label"] for d in first["detections"]] == expected["labels"].tolist()


def test_threshold_no_draw_and_an_unreadable_image(data, tmp_path, capsys):
    checkpoint, _, _ = trained(data, tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(next((data / "coco" / "val2017").iterdir()), images / "good.jpg")
    (images / "broken.jpg").write_bytes(b"not an image")
    (images / "notes.txt").write_text("ignored: not an image suffix")
    out = tmp_path / "out"
    code = TOOL["main"](["--resume", str(checkpoint), "--images", str(images), "--out", str(out), "--threshold",
                         "0.5", "--no_draw"])
    assert code == 1
    (result,) = json.loads((out / "detections.json").read_text())
    assert result["file"].endswith("good.jpg") and all(d["score"] >= 0.5 for d in result["detections"])
    assert not list(out.glob("*.jpg"))
    assert "skipped" in capsys.readouterr().err


def test_drawing_names_stay_distinct_and_gifs_are_read(data, tmp_path):
    """A "_2" made for a repeated name may be another image's own name: every image still gets its own drawing.
    A GIF in a folder is read (its first frame)."""
    checkpoint, _, _ = trained(data, tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    with Image.open(next((data / "coco" / "val2017").iterdir())) as image:
        source = image.convert("RGB")
    for name in ("x.jpg", "x.png", "x_jpg.png", "x_jpg_2.png", "y.gif"):
        source.save(images / name)
    out = tmp_path / "out"
    assert TOOL["main"](["--resume", str(checkpoint), "--images", str(images), "--out", str(out)]) == 0
    results = json.loads((out / "detections.json").read_text())
    drawings = [r["drawing"] for r in results]
    assert [Path(r["file"]).name for r in results] == ["x.jpg", "x.png", "x_jpg.png", "x_jpg_2.png", "y.gif"]
    assert drawings == ["x_jpg_detections.jpg", "x_png_detections.jpg", "x_jpg_3_detections.jpg",
                        "x_jpg_2_detections.jpg", "y_detections.jpg"]
    assert sorted(p.name for p in out.glob("*_detections.jpg")) == sorted(drawings)
    assert TOOL["drawing_names"]([tmp_path / "X.jpg", tmp_path / "x.png"]) == ["X_detections.jpg",
                                                                               "x_2_detections.jpg"]


def test_upstream_style_checkpoint_and_flag_overrides(data, tmp_path):
    """A checkpoint whose args lack this project's newer flags (as upstream's) still rebuilds its model; a flag
    given on the command line overrides the saved one."""
    checkpoint, _, args = trained(data, tmp_path, extra=["--topk", "5"])
    saved = torch.load(checkpoint, weights_only=False)
    old = {k: v for k, v in vars(saved["args"]).items() if k not in ("num_classes", "val_scale", "max_size")}
    saved["args"] = argparse.Namespace(**old)
    torch.save(saved, tmp_path / "upstream_style.pth")
    model_args = main_arguments(get_args_parser(), ["--topk", "3", "--device", "cpu"],
                                        saved=saved["args"])
    assert model_args.topk == 3 and model_args.hidden_dim == 32 and model_args.val_scale is None
    with pytest.raises(RuntimeError, match="class_embed"):  # 91 COCO classes by default, the file has 7
        TOOL["main"](["--resume", str(tmp_path / "upstream_style.pth"), "--images", str(data / "coco" / "val2017"),
                      "--out", str(tmp_path / "out")])
    code = TOOL["main"](["--resume", str(tmp_path / "upstream_style.pth"), "--images", str(data / "coco" / "val2017"),
                         "--out", str(tmp_path / "out"), "--num_classes", "7", "--threshold", "0"])
    results = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert code == 0 and all(len(r["detections"]) == 5 for r in results)


def test_checkpoint_without_arguments_needs_a_config(data, tmp_path):
    checkpoint, _, _ = trained(data, tmp_path, keep_args=False)
    argv = ["--resume", str(checkpoint), "--images", str(data / "coco" / "val2017"), "--out", str(tmp_path / "o")]
    with pytest.raises(RuntimeError, match="missing|unexpected|shape"):  # the default (full-size) model
        TOOL["main"](argv + ["--device", "cpu"])
    config = tmp_path / "small.sh"
    config.write_text("EXP_DIR=exps/small\npython -u main.py \\\n" + " ".join(FLAGS + ["--num_classes", "7"])
                      + " \\\n    ${PY_ARGS}\n")
    assert TOOL["main"](argv + ["--config", str(config)]) == 0


@pytest.mark.parametrize("argv, error, message", [
    (["--images", "x.jpg", "--out", "o"], ValueError, "--resume"),
    (["--images", "nowhere/", "--out", "o", "--resume", "CKPT"], FileNotFoundError, "no image or directory"),
    (["--images", "EMPTY", "--out", "o", "--resume", "CKPT"], FileNotFoundError, "no image files"),
    (["--images", "EMPTY", "--out", "o", "--resume", "CKPT", "--tta", "--tta_scales", "0", "64"], ValueError,
     r"--tta_scales needs one or more shorter sides > 0 \(pixels\), got \[0, 64\]"),
    (["--images", "EMPTY", "--out", "o", "--resume", "CKPT", "--tta_flip"], ValueError, "--tta_flip only act"),
    # main.py's checks of values: --topk 0 wrote no detections, --val_scale 0 ran at the default size
    (["--images", "EMPTY", "--out", "o", "--resume", "CKPT", "--topk", "0"], ValueError,
     "bad flag values: --topk must be > 0, got 0"),
    (["--images", "EMPTY", "--out", "o", "--resume", "CKPT", "--val_scale", "0"], ValueError,
     "bad flag values: --val_scale must be > 0, got 0"),
    # the config's flags replaced the saved ones: another evaluation size, no category names
    (["--images", "EMPTY", "--out", "o", "--resume", "CKPT", "--config",
      "configs/demo/r18_synthetic_hybrid_two_stage.sh"], ValueError,
     "--config .*: .*checkpoint.pth holds the arguments it was trained with"),
])
def test_bad_inputs(data, tmp_path, argv, error, message):
    checkpoint, _, _ = trained(data, tmp_path)
    (tmp_path / "empty").mkdir()
    argv = [str(checkpoint) if a == "CKPT" else str(tmp_path / "empty") if a == "EMPTY" else a for a in argv]
    with pytest.raises(error, match=message):
        TOOL["main"](argv)


def test_an_unusable_out_is_reported_before_the_model_loads(tmp_path, monkeypatch):
    """--out a file, or under one: one line naming the path, before the checkpoint is read (here it is missing)."""
    (tmp_path / "file").write_text("")
    for out, message in ((tmp_path / "file", f"--out {tmp_path / 'file'} exists and is not a directory"),
                         (tmp_path / "file" / "o", f"--out {tmp_path / 'file' / 'o'}: {tmp_path / 'file'} is not "
                                                   "a directory")):
        monkeypatch.setattr(sys, "argv", ["tools/infer.py", "--images", str(tmp_path), "--out", str(out),
                                          "--resume", str(tmp_path / "missing.pth")])
        with pytest.raises(SystemExit) as info:
            runpy.run_path(str(ROOT / "tools" / "infer.py"), run_name="__main__")
        assert info.value.code == f"infer: {message}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="permission bits and prctl are Linux's")
def test_a_read_only_out_is_reported_before_the_model_loads(tmp_path):
    with read_only_folder(tmp_path / "read_only") as read_only:
        result = run_unprivileged(sys.executable, "tools/infer.py", "--images", tmp_path, "--out",
                                  read_only / "detections", "--resume", tmp_path / "missing.pth")
        assert result.stderr == (f"infer: --out {read_only / 'detections'}: cannot write in {read_only} (mode "
                                 f"0o555, owner uid {os.geteuid()}; this process runs as uid {os.geteuid()})\n")
        assert result.returncode == 1 and list(read_only.iterdir()) == []


def test_command_line_error_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["tools/infer.py", "--images", "x", "--out", str(tmp_path), "--resume",
                                      str(tmp_path / "missing.pth")])
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(ROOT / "tools" / "infer.py"), run_name="__main__")
    assert str(info.value.code).startswith("infer: ") and "missing.pth" in str(info.value.code)
    assert parse([]).topk == 100  # the tool changes no default of main.py
