"""What a user may feed main.py and the tools: every bad input stops early with an error that names it, and
nothing is silently wrong (images of every PIL mode, flag values, annotation files, diverging runs, a full disk,
files that are not checkpoints, checkpoints of another number of classes)."""
import errno
import io
import json
import os
import re
import runpy
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from model_helpers import ROOT
from PIL import Image

import main as project_main
import util.checkpoint
from datasets import build_dataset
from datasets.coco import decode_image
from datasets.synthetic import make_synthetic_coco
from models import build_model
from models.backbone import training_flag_problems
from util.arguments import argument_problems, unused_hybrid_flags
from util.checkpoint import load_checkpoint, load_finetune_state, load_model_state, save_checkpoint

TINY = [
    "--device", "cpu", "--backbone", "resnet18", "--no_pretrained_backbone", "--lr_backbone", "1e-4",
    "--num_feature_levels", "2", "--hidden_dim", "32", "--nheads", "2", "--enc_layers", "1", "--dec_layers", "2",
    "--dim_feedforward", "64", "--dropout", "0.0", "--with_box_refine", "--two_stage", "--num_queries_one2one", "6",
    "--num_queries_one2many", "12", "--k_one2many", "2", "--train_scales", "80", "96", "--val_scale", "96",
    "--max_size", "128", "--no_crop_augment", "--batch_size", "2", "--num_workers", "0", "--print_freq", "100",
]


def parse(*flags):
    return project_main.get_args_parser().parse_args([*TINY, *map(str, flags)])


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    make_synthetic_coco(root, num_train=4, num_val=2, image_size=96, seed=4)
    return root


@pytest.fixture
def coco_copy(coco, tmp_path):
    return shutil.copytree(coco, tmp_path / "coco")


def annotations(root, split):
    return root / "annotations" / f"instances_{split}2017.json"


def edit_annotations(root, split, change):
    path = annotations(root, split)
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# ------------------------------------------------------------------------------------------ images of every mode


def encoded(image, fmt="PNG"):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


RAMP = np.tile(np.arange(256, dtype=np.uint8), (3, 1))  # [3, 256] grey levels 0..255


@pytest.mark.parametrize("mode, fmt", [("1", "PNG"), ("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"),
                                       ("CMYK", "TIFF"), ("CMYK", "JPEG"), ("YCbCr", "JPEG"), ("RGB", "PNG")])
def test_eight_bit_modes_decode_to_their_rgb(mode, fmt):
    image = Image.fromarray(RAMP).convert(mode)
    rgb = np.asarray(decode_image(encoded(image, fmt), f"ramp.{fmt.lower()}"), dtype=np.int64)
    assert rgb.shape == (3, 256, 3) and rgb.dtype == np.int64
    expected = np.asarray(Image.fromarray(RAMP).convert(mode).convert("RGB"), dtype=np.int64)
    tolerance = 6 if fmt == "JPEG" else 0
    assert np.abs(rgb - expected).max() <= tolerance
    if mode != "1":  # a grey ramp stays a grey ramp: neither white nor black
        assert np.abs(rgb[..., 0] - RAMP).max() <= tolerance


def test_palette_with_transparency_decodes_without_warnings():
    image = Image.fromarray(RAMP).convert("P")
    image.info["transparency"] = 0
    with __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("error")
        rgb = np.asarray(decode_image(encoded(image), "palette.png"))
    assert np.abs(rgb[..., 1].astype(int) - RAMP).max() == 0


@pytest.mark.parametrize("values, mode, fmt", [
    (np.arange(0, 65536, 64, dtype=np.uint16).reshape(4, 256), "I;16", "PNG"),  # 16-bit PNG
    (np.arange(0, 65536, 64, dtype=np.int32).reshape(4, 256), "I", "TIFF"),  # 16-bit data in 32-bit ints
    (np.linspace(0, 65535, 1024, dtype=np.float32).reshape(4, 256), "F", "TIFF"),
])
def test_sixteen_bit_images_are_scaled_not_saturated(values, mode, fmt):
    image = Image.fromarray(values)
    assert image.mode == mode
    rgb = np.asarray(decode_image(encoded(image, fmt), f"deep.{fmt.lower()}"), dtype=np.int64)
    expected = np.rint(values.astype(np.float64) / 257)
    assert np.abs(rgb[..., 0] - expected).max() <= 0 and (rgb[..., 0] == rgb[..., 2]).all()
    assert rgb.min() == 0 and rgb.max() == 255 and 120 < rgb.mean() < 135  # not white (PIL's convert saturates)


@pytest.mark.parametrize("values, expected", [(np.linspace(0, 1, 16), np.rint(np.linspace(0, 255, 16))),
                                              (np.linspace(0, 255, 16), np.rint(np.linspace(0, 255, 16)))])
def test_float_images_in_unit_or_byte_range(values, expected):
    image = Image.fromarray(values.astype(np.float32).reshape(4, 4))
    rgb = np.asarray(decode_image(encoded(image, "TIFF"), "f.tif"), dtype=np.float64)
    assert np.abs(rgb[..., 0].flatten() - expected).max() <= 1


def test_an_image_outside_any_pixel_range_is_refused_naming_it():
    image = Image.fromarray(np.array([[-5.0, 1e6]], dtype=np.float32))
    with pytest.raises(RuntimeError, match=r"strange\.tif.*mode F.*-5\.\.1e\+06"):
        decode_image(encoded(image, "TIFF"), "strange.tif")


def test_a_sixteen_bit_training_image_is_read_correctly(coco_copy):
    """Through the dataset (as training reads it): the image keeps its content."""
    first = json.loads(annotations(coco_copy, "train").read_text())["images"][0]["file_name"]
    path = coco_copy / "train2017" / first
    grey = np.asarray(Image.open(path).convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey).save(path.with_suffix(".png"))
    edit_annotations(coco_copy, "train", lambda d: d["images"][0].update(file_name=path.with_suffix(".png").name))
    dataset = build_dataset("train", parse("--coco_path", coco_copy, "--num_classes", 7))
    image = dataset.load_image(dataset.ids[0])
    assert image.mode == "RGB"
    assert np.abs(np.asarray(image, dtype=np.int64)[..., 0] - grey // 257).max() <= 1


# ------------------------------------------------------------------------------------------ flag values


@pytest.mark.parametrize("flags, flag", [
    (["--lr_drop", "0"], "--lr_drop"), (["--lr_drop_epochs", "3", "0"], "--lr_drop_epochs"),
    (["--k_one2many", "-1"], "--k_one2many"), (["--topk", "0"], "--topk"), (["--epochs", "0"], "--epochs"),
    (["--num_queries_one2one", "0"], "--num_queries_one2one"), (["--batch_size", "0"], "--batch_size"),
    (["--hidden_dim", "48"], "--hidden_dim"), (["--nheads", "3", "--hidden_dim", "64"], "--nheads"),
    (["--dropout", "1.0"], "--dropout"), (["--lr", "-1"], "--lr"), (["--num_classes", "0"], "--num_classes"),
    (["--train_scales", "0", "64"], "--train_scales"), (["--max_size", "-3"], "--max_size"),
    (["--dec_layers", "0"], "--dec_layers"), (["--num_workers", "-1"], "--num_workers"),
    (["--save_every_iters", "0"], "--save_every_iters"), (["--keep_checkpoints", "-2"], "--keep_checkpoints"),
    (["--model_ema_decay", "1.5"], "--model_ema_decay"), (["--auto_resume"], "--auto_resume needs --output_dir"),
    (["--finetune", "a.pth", "--resume", "b.pth"], "--finetune and --resume"),
    (["--finetune", "a.pth", "--eval"], "--finetune starts a training run"),
])
def test_impossible_flag_values_are_refused_naming_the_flag(flags, flag, coco):
    args = parse("--coco_path", coco, *flags)
    assert any(flag in problem for problem in argument_problems(args))
    with pytest.raises(ValueError, match="bad flag values: .*" + flag):
        project_main.main(args)


@pytest.mark.parametrize("flags, message", [
    (["--drop_path_rate", "0.3"], "--drop_path_rate 0.3: stochastic depth is a Swin and ViT option, --backbone "
                                  "resnet18 has none"),
    (["--no_backbone_checkpoint"], "--no_backbone_checkpoint: only Swin blocks are checkpointed by default "
                                  "(--backbone resnet18)"),
    (["--no_pretrained_backbone", "--pretrained_backbone_path", "r50.pth"],
     "--pretrained_backbone_path r50.pth with --no_pretrained_backbone: the file would not be read"),
    (["--no_pretrained_backbone", "--lr_backbone", "0"],
     "--no_pretrained_backbone with --lr_backbone 0.0: a random backbone that never trains"),
])
def test_training_flags_the_backbone_would_not_read_are_refused(flags, message, coco):
    """Each was accepted and changed nothing (or left a random backbone frozen, its BatchNorm statistics moving);
    at --eval, whose flags rebuild a trained model, they are let through."""
    args = parse("--coco_path", coco, *flags)
    assert training_flag_problems(args) == [message]
    with pytest.raises(ValueError, match="bad flag values: " + re.escape(message)):
        project_main.main(args)
    assert training_flag_problems(parse("--coco_path", coco, "--eval", *flags)) == []
    assert training_flag_problems(parse("--coco_path", coco, "--backbone", "swin_tiny", "--drop_path_rate", "0.3",
                                        "--no_backbone_checkpoint")) == []


@pytest.mark.parametrize("flags, message", [
    (["--mixed_selection"], "--mixed_selection needs --two_stage (it keeps learned content queries beside the "
                            "encoder's proposals)"),
    (["--look_forward_twice"], "--look_forward_twice needs --with_box_refine (it acts on the boxes each decoder "
                               "layer refines)"),
])
def test_tricks_without_the_part_they_act_on_are_refused(flags, message, coco):
    """Each was accepted and changed nothing (the same model and losses); at --eval they are let through."""
    plain = [flag for flag in TINY if flag not in ("--two_stage", "--with_box_refine")]
    args = project_main.get_args_parser().parse_args([*plain, "--coco_path", str(coco), *flags])
    assert argument_problems(args) == [message]
    with pytest.raises(ValueError, match="bad flag values: " + re.escape(message)):
        project_main.main(args)
    args.eval = True
    assert argument_problems(args) == []


def test_hybrid_flags_without_one2many_queries_get_a_note(coco):
    """Not an error: a hybrid config with --num_queries_one2many 0 is the branch's ablation (tools/compare_hybrid)."""
    args = parse("--coco_path", coco, "--num_queries_one2many", 0, "--lambda_one2many", 2)
    assert argument_problems(args) == []
    assert unused_hybrid_flags(args) == ("--num_queries_one2many 0: the hybrid branch is off, --k_one2many 2 and "
                                         "--lambda_one2many 2.0 unused")
    assert unused_hybrid_flags(parse("--coco_path", coco)) is None  # 12 one-to-many queries
    assert unused_hybrid_flags(parse("--coco_path", coco, "--num_queries_one2many", 0, "--eval")) is None
    defaults = project_main.get_args_parser().parse_args(["--coco_path", str(coco)])
    assert unused_hybrid_flags(defaults) is None  # main.py's defaults: the branch off, k and lambda not given


def test_command_line_errors_exit_2_with_the_message():
    result = subprocess.run([sys.executable, "main.py", "--lr_drop", "0", "--topk", "0", "--device", "cpu"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--lr_drop must be > 0, got 0" in result.stderr and "--topk must be > 0, got 0" in result.stderr


def test_every_config_script_passes_the_checks():
    from util.config_script import read_config_script

    scripts = sorted((ROOT / "configs").rglob("*.sh"))
    assert len(scripts) >= 60
    for script in scripts:
        args = project_main.get_args_parser().parse_args(read_config_script(script)[1])
        assert argument_problems(args) == [] and training_flag_problems(args) == [], script


# ------------------------------------------------------------------------------------------ annotation files


def test_labels_outside_the_classifier_are_found_when_the_dataset_is_built(coco_copy):
    def relabel(data):
        data["categories"].append({"id": 12, "name": "extra", "supercategory": "shape"})
        data["annotations"][1]["category_id"] = 12

    edit_annotations(coco_copy, "train", relabel)
    with pytest.raises(ValueError, match=r"instances_train2017\.json.*category ids outside the classifier's 7 "
                                         r"outputs \(--num_classes 7\): \[12\].*--num_classes 13"):
        build_dataset("train", parse("--coco_path", coco_copy, "--num_classes", 7))
    # a category id that the categories do not list is refused whatever the classifier
    edit_annotations(coco_copy, "train", lambda d: d["annotations"][1].update(category_id=-1))
    with pytest.raises(ValueError, match=r"instances_train2017\.json: 1 annotation with a category_id that is not "
                                         r"among the categories' ids \(e\.g\. annotation 2: -1\)"):
        build_dataset("train", parse("--coco_path", coco_copy, "--num_classes", 7))


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_split_without_images_is_an_error_at_start(coco_copy, split):
    edit_annotations(coco_copy, split, lambda d: d.update(images=[], annotations=[]))
    with pytest.raises(ValueError, match=rf"instances_{split}2017\.json lists no images"):
        project_main.main(parse("--coco_path", coco_copy, "--epochs", 1))


def test_missing_image_files_are_named_at_start(coco_copy):
    names = [d["file_name"] for d in json.loads(annotations(coco_copy, "train").read_text())["images"]]
    (coco_copy / "train2017" / names[2]).unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 of the 4 images listed in .*instances_train2017\.json are not "
                                                rf"in .*train2017, e.g. {names[2]}"):
        build_dataset("train", parse("--coco_path", coco_copy))


@pytest.mark.parametrize("text", ["{not json", "[1, 2, 3]", '{"images": 5}'])
def test_a_malformed_annotation_file_names_itself(coco_copy, text):
    annotations(coco_copy, "val").write_text(text)
    with pytest.raises(ValueError, match=r"cannot read the COCO annotations .*instances_val2017\.json"):
        build_dataset("val", parse("--coco_path", coco_copy, "--num_classes", 7))


@pytest.mark.parametrize("topk, max_dets", [(100, [1, 10, 100]), (150, [1, 10, 100, 150])])
def test_evaluation_counts_topk_detections_when_it_is_above_100(coco, tmp_path, topk, max_dets):
    """main.py --eval --topk: the saved evaluation's maxDets (engine.evaluate passes the post-processor's topk)."""
    from util.plot_utils import load_evaluation

    out = tmp_path / f"eval{topk}"
    weights = tmp_path / "random.pth"
    save_checkpoint({"model": build_model(parse("--coco_path", coco, "--num_classes", 7))[0].state_dict()}, weights)
    stats = project_main.main(parse("--coco_path", coco, "--eval", "--topk", topk, "--output_dir", out,
                                    "--resume", weights))
    assert list(load_evaluation(out / "eval.pth")["params"].maxDets) == max_dets
    assert len(stats["coco_eval_bbox"]) == 12 and stats["coco_eval_bbox"][0] >= 0
    if topk == 100:  # a second evaluation into the same folder on a full disk keeps the first's eval.pth
        fdopen = os.fdopen
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(util.checkpoint.os, "fdopen", lambda fd, mode: FullDisk(fdopen(fd, mode), room=2000))
            with pytest.raises(OSError, match="no space left on device writing .*eval.pth; the previous eval.pth is "
                                              "kept"):
                project_main.main(parse("--coco_path", coco, "--eval", "--topk", topk, "--output_dir", out,
                                        "--resume", weights))
        assert list(load_evaluation(out / "eval.pth")["params"].maxDets) == max_dets


def test_evaluation_names_the_queries_when_they_cap_the_objects_found(coco_copy, tmp_path):
    """An image with more objects than the model's one-to-one queries (6 here): the warning named --topk (100),
    which cannot help; it names the queries."""
    def crowd_one_image(data):
        image = data["images"][0]
        for i in range(10):
            data["annotations"].append({"id": 10_000 + i, "image_id": image["id"], "category_id": 1,
                                        "bbox": [2 * i, 2 * i, 8, 8], "area": 64, "iscrowd": 0})

    edit_annotations(coco_copy, "val", crowd_one_image)
    weights = tmp_path / "random.pth"
    save_checkpoint({"model": build_model(parse("--coco_path", coco_copy, "--num_classes", 7))[0].state_dict()},
                    weights)
    with pytest.warns(UserWarning, match=r"1 of the 2 evaluated images have more ground-truth boxes than the 6 boxes "
                                         r"the model predicts per image \(--num_queries_one2one\)"):
        project_main.main(parse("--coco_path", coco_copy, "--eval", "--resume", weights))


def test_missing_area_and_iscrowd_do_not_stop_a_run_after_its_epoch(coco_copy, tmp_path):
    """Filled in at load (one warning per file): the run trains, evaluates and writes its log line."""
    def strip(data):
        for ann in data["annotations"]:
            del ann["area"], ann["iscrowd"]

    edit_annotations(coco_copy, "train", strip)
    edit_annotations(coco_copy, "val", strip)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match=r"filled in the missing 'area'") as caught:
        project_main.main(parse("--coco_path", coco_copy, "--output_dir", out, "--epochs", 1))
    assert sum("filled in the missing" in str(w.message) for w in caught) == 2  # train and val, once each
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert len(log) == 1 and len(log[0]["test_coco_eval_bbox"]) == 12


# ------------------------------------------------------------------------------------------ runs and checkpoints


def test_a_diverging_run_ends_with_the_documented_message_and_keeps_the_checkpoint(coco, tmp_path):
    out = tmp_path / "run"
    project_main.main(parse("--coco_path", coco, "--output_dir", out, "--epochs", 1))
    saved = (out / "checkpoint.pth").read_bytes()
    with pytest.raises(FloatingPointError) as info:
        project_main.main(parse("--coco_path", coco, "--output_dir", out, "--epochs", 3, "--resume",
                                out / "checkpoint.pth", "--lr", "1e12", "--lr_backbone", "1e12"))
    message = str(info.value)
    assert "epoch 1, iteration" in message and "try a lower --lr or --clip_max_norm" in message
    assert "not finite" in message or "non-finite terms" in message
    assert (out / "checkpoint.pth").read_bytes() == saved


class FullDisk(io.RawIOBase):
    """A file on a disk that fills up after `room` bytes."""

    def __init__(self, file, room):
        self.file, self.room = file, room

    def write(self, data):
        if self.room < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)

    def flush(self):
        self.file.flush()

    def fileno(self):
        return self.file.fileno()

    def close(self):
        self.file.close()


def test_a_full_disk_is_reported_and_the_previous_checkpoint_kept(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"epoch": 1, "w": torch.zeros(10)}, path)
    fdopen = os.fdopen
    monkeypatch.setattr(util.checkpoint.os, "fdopen", lambda fd, mode: FullDisk(fdopen(fd, mode), room=2000))
    with pytest.raises(OSError, match=rf"no space left on device writing {path}; the previous checkpoint.pth is kept"):
        save_checkpoint({"epoch": 2, "w": torch.zeros(100000)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


@pytest.mark.parametrize("content", [b"epoch 3\n", b'{"model": {}}', b"\xff\xd8\xff\xe0 a jpeg"])
def test_resume_of_a_file_that_is_not_a_checkpoint_says_so(coco, tmp_path, content):
    path = tmp_path / "notes.pth"
    path.write_bytes(content)
    with pytest.raises(RuntimeError, match=r"notes\.pth is not a PyTorch checkpoint"):
        project_main.main(parse("--coco_path", coco, "--eval", "--resume", path))


def test_resume_of_a_bare_state_dict_says_what_it_holds(coco, tmp_path):
    torch.save({"conv1.weight": torch.zeros(2)}, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match=r"resnet\.pth is not a checkpoint .*bare state dict of 1 tensors "
                                         r"\(e\.g\. conv1\.weight\).*--pretrained_backbone_path"):
        project_main.main(parse("--coco_path", coco, "--eval", "--resume", tmp_path / "resnet.pth"))


def test_a_mismatched_checkpoint_hint_names_real_flags(tmp_path):
    args = parse("--coco_path", "unused", "--num_classes", 7)
    model, _, _ = build_model(args)
    other = parse("--coco_path", "unused", "--num_classes", 7, "--num_queries_one2one", 5, "--mixed_selection")
    other.pretrained_backbone = True
    checkpoint = {"model": build_model(other)[0].state_dict(), "args": other}
    with pytest.raises(RuntimeError) as info:
        load_model_state(model, checkpoint, "other.pth", args)
    message = str(info.value)
    assert "--num_queries_one2one 5 (now --num_queries_one2one 6)" in message
    assert "without --no_pretrained_backbone (now --no_pretrained_backbone)" in message
    assert "--mixed_selection (now without --mixed_selection)" in message
    assert "pretrained_backbone False" not in message and "True" not in message


def test_a_checkpoint_whose_tensors_fit_but_flags_differ_is_refused(tmp_path):
    """Another split of the same number of queries, or --dilation: every tensor fits, the model differs."""
    args = parse("--coco_path", "unused", "--num_classes", 7)
    model, _, _ = build_model(args)
    other = parse("--coco_path", "unused", "--num_classes", 7, "--num_queries_one2one", 9, "--num_queries_one2many", 9)
    checkpoint = {"model": build_model(other)[0].state_dict(), "args": other}
    with pytest.raises(RuntimeError, match=r"other\.pth was trained with other flags: --num_queries_one2one 9 \(now "
                                           r"--num_queries_one2one 6\), --num_queries_one2many 9 \(now "
                                           r"--num_queries_one2many 12\); its tensors fit"):
        load_model_state(model, checkpoint, "other.pth", args)
    dilated = parse("--coco_path", "unused", "--num_classes", 7, "--dilation")
    with pytest.raises(RuntimeError, match=r"without --dilation \(now --dilation\)"):
        load_model_state(model, {"model": model.state_dict(), "args": args}, "plain.pth", dilated)
    scaled = parse("--coco_path", "unused", "--num_classes", 7, "--position_embedding_scale", 1.0)
    with pytest.raises(RuntimeError, match=r"--position_embedding_scale 6\.28318.* \(now --position_embedding_scale "
                                           r"1\.0\)"):
        load_model_state(model, {"model": model.state_dict(), "args": args}, "plain.pth", scaled)
    load_model_state(model, {"model": model.state_dict(), "args": args}, "same.pth", args)  # its own flags: loads
    # 16 heads of 2 points have the tensors of 8 heads of 4
    eight = parse("--coco_path", "unused", "--num_classes", 7, "--nheads", 8, "--enc_n_points", 4, "--dec_n_points", 4)
    sixteen = parse("--coco_path", "unused", "--num_classes", 7, "--nheads", 16, "--enc_n_points", 2,
                    "--dec_n_points", 2)
    with pytest.raises(RuntimeError, match=r"--nheads 8 \(now --nheads 16\), --enc_n_points 4 \(now "
                                           r"--enc_n_points 2\), --dec_n_points 4 \(now --dec_n_points 2\)"):
        load_model_state(build_model(sixteen)[0], {"model": build_model(eight)[0].state_dict(), "args": eight},
                         "eight.pth", sixteen)


def test_training_refuses_validation_categories_named_otherwise(coco_copy):
    def swap_names(data):
        first, second = data["categories"][:2]
        first["name"], second["name"] = second["name"], first["name"]

    edit_annotations(coco_copy, "val", swap_names)
    with pytest.raises(ValueError, match=r"instances_train2017\.json and .*instances_val2017\.json give 2 category "
                                         r"ids different names"):
        project_main.main(parse("--coco_path", coco_copy))


def test_a_checkpoint_is_evaluated_and_resumed_on_its_own_categories_only(coco_copy, tmp_path):
    """Checkpoints hold the categories they were trained on: --eval (which reads no training file) on a validation
    file that names them otherwise scored the model against other categories without a word; so did a resumed
    training on another training file."""
    def swap_names(data):
        first, second = data["categories"][:2]
        first["name"], second["name"] = second["name"], first["name"]

    train_file = json.loads(annotations(coco_copy, "train").read_text())
    out = tmp_path / "run"
    project_main.main(parse("--coco_path", coco_copy, "--output_dir", out, "--epochs", 1))
    checkpoint = load_checkpoint(out / "checkpoint.pth")
    assert checkpoint["categories"] == {c["id"]: c["name"] for c in train_file["categories"]}
    project_main.main(parse("--coco_path", coco_copy, "--eval", "--resume", out / "checkpoint.pth"))  # the same: fine
    for split, flags in (("val", ["--eval"]), ("train", ["--epochs", 2])):
        other = shutil.copytree(coco_copy, tmp_path / f"other_{split}")
        for renamed in {"val", split}:  # training: both files (they agree with each other, not with the checkpoint)
            edit_annotations(other, renamed, swap_names)
        with pytest.raises(ValueError, match=rf"checkpoint\.pth \(trained on\) and .*instances_{split}2017\.json "
                                             r"give 2 category ids different names"):
            project_main.main(parse("--coco_path", other, "--resume", out / "checkpoint.pth", *flags))
    del checkpoint["categories"]  # upstream's checkpoints and older ones: nothing to compare
    save_checkpoint(checkpoint, tmp_path / "upstream.pth")
    project_main.main(parse("--coco_path", tmp_path / "other_val", "--eval", "--resume", tmp_path / "upstream.pth"))


def test_evaluating_weights_with_nan_names_the_images(coco, tmp_path):
    """The losses' matcher would fail in scipy ("invalid numeric entries") without saying where."""
    model = build_model(parse("--coco_path", coco, "--num_classes", 7))[0]
    state = model.state_dict()
    state["input_proj.0.0.bias"] = torch.full_like(state["input_proj.0.0.bias"], float("nan"))
    save_checkpoint({"model": state}, tmp_path / "nan.pth")
    with pytest.raises(FloatingPointError, match=r"the model's outputs are not finite in evaluation, on the batch of "
                                                 r"images \[\d+, \d+\] \(pred_logits, pred_boxes"):
        project_main.main(parse("--coco_path", coco, "--eval", "--resume", tmp_path / "nan.pth"))


def test_a_batch_of_images_of_different_kinds_is_refused():
    """Padding copies each image into the first one's dtype and channels: a uint8 image would go in
    unnormalised, a grey one broadcast to three channels."""
    from util.misc import nested_tensor_from_tensor_list

    for other in (torch.zeros(3, 8, 8, dtype=torch.uint8), torch.zeros(1, 8, 8)):
        with pytest.raises(ValueError, match=r"the images differ in channels, dtype or device"):
            nested_tensor_from_tensor_list([torch.zeros(3, 8, 8), other])
    with pytest.raises(ValueError, match=r"the images differ"):
        build_model(parse("--coco_path", "unused", "--num_classes", 7))[0]([torch.zeros(3, 64, 64),
                                                                            torch.zeros(1, 64, 64)])


def test_as_many_targets_as_images():
    model, criterion, _ = build_model(parse("--coco_path", "unused", "--num_classes", 7))
    outputs = model([torch.rand(3, 64, 64), torch.rand(3, 64, 64)])
    target = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    with pytest.raises(ValueError, match=r"SetCriterion: 1 target dicts for a batch of 2 images"):
        criterion(outputs, [target])


def test_dilation_of_a_basic_block_resnet_names_the_flag():
    with pytest.raises(ValueError, match=r"--dilation needs a bottleneck ResNet \(resnet50/101\), not resnet18"):
        build_model(parse("--coco_path", "unused", "--num_classes", 7, "--dilation"))


def test_evaluating_without_weights_is_refused(coco, tmp_path):
    with pytest.raises(ValueError, match=r"--eval needs the weights to evaluate: --resume CHECKPOINT"):
        project_main.main(parse("--coco_path", coco, "--eval"))
    with pytest.raises(FileNotFoundError, match=r"--eval --auto_resume: no checkpoint in .*empty to evaluate"):
        project_main.main(parse("--coco_path", coco, "--eval", "--auto_resume", "--output_dir", tmp_path / "empty"))


# ------------------------------------------------------------------------------------------ another number of classes


@pytest.fixture(scope="module")
def coco91_checkpoint(tmp_path_factory):
    """A checkpoint of the tiny model with COCO's 91 classes, as a released model would be."""
    args = parse("--coco_path", "unused", "--num_classes", 91)
    torch.manual_seed(1)
    model, _, _ = build_model(args)
    path = tmp_path_factory.mktemp("released") / "coco91.pth"
    save_checkpoint({"model": model.state_dict(), "args": args, "epoch": 35}, path)
    return path, model.state_dict()


def test_evaluating_a_checkpoint_of_another_number_of_classes_says_what_to_pass(coco, coco91_checkpoint):
    path, _ = coco91_checkpoint
    with pytest.raises(RuntimeError, match=r"the checkpoint's classifier has 91 outputs, this model 7: pass "
                                           r"--num_classes 91 to evaluate it"):
        project_main.main(parse("--coco_path", coco, "--eval", "--resume", path))


def test_finetune_loads_all_but_the_classifier(coco91_checkpoint):
    path, state = coco91_checkpoint
    torch.manual_seed(2)
    model, _, _ = build_model(parse("--coco_path", "unused", "--num_classes", 7))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    skipped = load_finetune_state(model, load_checkpoint(path), path)
    assert skipped and all("class_embed" in k.split(".") for k in skipped)
    assert any(k.startswith("transformer.decoder.class_embed.") for k in skipped)  # two-stage shares the heads
    loaded = model.state_dict()
    for key, value in loaded.items():
        assert torch.equal(value, fresh[key] if key in skipped else state[key]), key
    other = parse("--coco_path", "unused", "--num_classes", 7, "--dim_feedforward", 32)
    with pytest.raises(RuntimeError, match="only the classification heads may differ.*linear1"):
        load_finetune_state(build_model(other)[0], load_checkpoint(path), path)


def test_finetune_a_coco_checkpoint_on_the_synthetic_data(coco, coco91_checkpoint, tmp_path, capsys):
    path, _ = coco91_checkpoint
    out = tmp_path / "finetuned"
    stats = project_main.main(parse("--coco_path", coco, "--output_dir", out, "--epochs", 1, "--finetune", path))
    assert len(stats["coco_eval_bbox"]) == 12
    assert f"fine-tuning from {path}; new classification heads" in capsys.readouterr().out
    checkpoint = load_checkpoint(out / "checkpoint.pth")
    assert checkpoint["epoch"] == 0 and checkpoint["model"]["class_embed.0.bias"].shape == (7,)


# ------------------------------------------------------------------------------------------ the tools


# the ONNX tools too: their --help needs no onnx package
@pytest.mark.parametrize("tool", ["infer", "benchmark", "export_onnx", "benchmark_onnx"])
def test_tool_help_prints_help(tool):
    result = subprocess.run([sys.executable, f"tools/{tool}.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: {tool}.py") and "main.py --help" in result.stdout


def test_infer_keeps_drawings_of_images_with_the_same_name_apart(coco, tmp_path):
    tool = runpy.run_path(str(ROOT / "tools" / "infer.py"))
    args = parse("--coco_path", coco, "--num_classes", 7)
    model, _, _ = build_model(args)
    save_checkpoint({"model": model.state_dict(), "args": args}, tmp_path / "model.pth")
    source = next((coco / "val2017").iterdir())
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(source, tmp_path / folder / "x.jpg")
    code = tool["main"](["--resume", str(tmp_path / "model.pth"), "--images", str(tmp_path / "a" / "x.jpg"),
                         str(tmp_path / "b"), "--out", str(tmp_path / "out")])
    assert code == 0
    drawings = sorted(p.name for p in (tmp_path / "out").glob("*.jpg"))
    assert drawings == ["a_x_jpg_detections.jpg", "b_x_jpg_detections.jpg"]
    results = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert [r["drawing"] for r in results] == drawings


def test_infer_reads_photos_as_displayed_by_their_exif_orientation(coco, tmp_path):
    """A 60 x 40 photo stored landscape with orientation 8 (turn 90 degrees counter-clockwise) is detected on, and
    drawn as, the 40 x 60 portrait image a viewer shows."""
    tool = runpy.run_path(str(ROOT / "tools" / "infer.py"))
    args = parse("--coco_path", coco, "--num_classes", 7, "--topk", 5)
    model, _, _ = build_model(args)
    save_checkpoint({"model": model.state_dict(), "args": args}, tmp_path / "model.pth")
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(np.tile(np.arange(60, dtype=np.uint8) * 4, (40, 1))).convert("RGB").save(
        tmp_path / "photo.jpg", exif=exif.tobytes())
    code = tool["main"](["--resume", str(tmp_path / "model.pth"), "--images", str(tmp_path / "photo.jpg"), "--out",
                         str(tmp_path / "out"), "--threshold", "0"])
    assert code == 0
    result = json.loads((tmp_path / "out" / "detections.json").read_text())[0]
    assert (result["width"], result["height"]) == (40, 60)
    assert result["detections"] and all(d["box"][2] <= 40.01 and d["box"][3] <= 60.01 for d in result["detections"])
    assert Image.open(tmp_path / "out" / result["drawing"]).size == (40, 60)


def test_output_dir_that_is_a_file_and_coco_path_that_is_a_file(coco, tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"--output_dir .*taken exists and is not a directory"):
        project_main.main(parse("--coco_path", coco, "--output_dir", tmp_path / "taken", "--epochs", 1))
    with pytest.raises(FileNotFoundError, match=r"COCO path is a file, not a directory: .*taken"):
        project_main.main(parse("--coco_path", tmp_path / "taken", "--epochs", 1))


@pytest.mark.parametrize("tool, argv, message", [
    ("infer", ["--resume", "x.pth", "--images", "a.jpg", "--out", "o", "--threshold", "1.5"], "--threshold"),
    ("benchmark", ["--image_size", "0", "64"], "--image_size must be positive"),
])
def test_tool_flag_values_are_checked(tool, argv, message):
    with pytest.raises(ValueError, match=message):
        runpy.run_path(str(ROOT / "tools" / f"{tool}.py"))["main"](argv)


def test_synthetic_data_tool_refuses_negative_counts_and_bad_knobs(tmp_path):
    def run(*argv):
        return subprocess.run([sys.executable, "tools/make_synthetic_coco.py", "--out", str(tmp_path / "s"), *argv],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)

    result = run("--num_train", "-1")
    assert result.returncode == 2 and "--num_train must be >= 0, got -1" in result.stderr
    result = run("--image_size", "8", "--num_train", "1", "--num_val", "1")
    assert result.returncode == 1
    assert result.stderr.strip() == "make_synthetic_coco: image_size must be at least 16, got 8"
