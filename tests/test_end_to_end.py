"""End to end on a tiny synthetic COCO-format set: train, checkpoint, resume, evaluate, and the bad inputs."""
import argparse
import json

import pytest
import torch
import torchvision

import main as project_main
from datasets.synthetic import make_synthetic_coco
from util.checkpoint import load_checkpoint, save_checkpoint

TINY_MODEL = [
    "--device", "cpu", "--backbone", "resnet18", "--no_pretrained_backbone", "--lr_backbone", "1e-4",
    "--num_feature_levels", "2", "--hidden_dim", "32", "--nheads", "2", "--enc_layers", "1", "--dec_layers", "2",
    "--dim_feedforward", "64", "--dropout", "0.0", "--with_box_refine", "--two_stage", "--mixed_selection",
    "--look_forward_twice", "--num_queries_one2one", "6", "--num_queries_one2many", "12", "--k_one2many", "2",
    "--train_scales", "80", "96", "--val_scale", "96", "--max_size", "128", "--no_crop_augment",
    "--batch_size", "2", "--num_workers", "0", "--print_freq", "100",
]


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_coco")
    make_synthetic_coco(root, num_train=4, num_val=3, image_size=96, seed=3)
    return root


def parse(*flags):
    return project_main.get_args_parser().parse_args([*TINY_MODEL, *map(str, flags)])


def train(coco, out, epochs, *extra):
    project_main.main(parse("--coco_path", coco, "--output_dir", out, "--epochs", epochs, *extra))
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_epochs(tiny_coco, tmp_path_factory):
    out = tmp_path_factory.mktemp("two_epochs")
    return out, train(tiny_coco, out, 2)


def test_training_writes_checkpoints_and_logs(two_epochs):
    out, log = two_epochs
    assert [entry["epoch"] for entry in log] == [0, 1]
    for name in ("checkpoint.pth", "checkpoint0000.pth", "checkpoint0001.pth", "eval/latest.pth"):
        assert (out / name).is_file(), name
    assert all(len(entry["test_coco_eval_bbox"]) == 12 for entry in log)
    checkpoint = load_checkpoint(out / "checkpoint.pth")
    assert checkpoint["epoch"] == 1 and isinstance(checkpoint["args"], argparse.Namespace)
    assert {"model", "optimizer", "lr_scheduler"} <= set(checkpoint)
    assert not list(out.glob(".*.tmp")), "temporary checkpoint files left behind"


def test_resumed_run_repeats_the_uninterrupted_losses(tiny_coco, two_epochs, tmp_path):
    _, uninterrupted = two_epochs
    first = train(tiny_coco, tmp_path, 1)
    resumed = train(tiny_coco, tmp_path, 2, "--resume", tmp_path / "checkpoint.pth")
    assert len(first) == 1 and [entry["epoch"] for entry in resumed] == [0, 1]
    for key in ("train_loss", "train_loss_ce", "train_loss_bbox_one2many", "train_loss_giou_enc"):
        assert resumed[1][key] == pytest.approx(uninterrupted[1][key], rel=1e-6, abs=1e-7), key
    assert resumed[1]["test_coco_eval_bbox"] == pytest.approx(uninterrupted[1]["test_coco_eval_bbox"], abs=1e-6)


def test_eval_of_a_checkpoint_gives_the_logged_ap(tiny_coco, two_epochs, tmp_path):
    out, log = two_epochs
    eval_dir = tmp_path / "run"  # a training run's folder, saving a checkpoint at this moment
    eval_dir.mkdir()
    saving = eval_dir / ".checkpoint.pth.a1b2c3.tmp"
    saving.write_bytes(b"half a checkpoint")
    stats = project_main.main(parse("--coco_path", tiny_coco, "--eval", "--resume", out / "checkpoint.pth",
                                    "--output_dir", eval_dir))
    assert stats["coco_eval_bbox"] == pytest.approx(log[-1]["test_coco_eval_bbox"], abs=1e-6)
    assert saving.exists()  # the evaluation deleted the training's save under way (its rename then failed)


def test_eval_restores_the_training_state(tiny_coco, two_epochs):
    from datasets import build_dataset, get_coco_api_from_dataset
    from engine import evaluate
    from models import build_model
    from util.misc import collate_fn

    args = parse("--coco_path", tiny_coco, "--num_classes", 7)
    model, criterion, post = build_model(args)
    model.train()
    dataset = build_dataset("val", args)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_fn)
    evaluate(model, criterion, post, loader, get_coco_api_from_dataset(dataset), "cpu")
    assert model.training and model.num_queries == 18 and model.transformer.two_stage_num_proposals == 18


def test_resume_from_a_missing_file_is_an_error(tiny_coco, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        project_main.main(parse("--coco_path", tiny_coco, "--resume", tmp_path / "nope.pth", "--epochs", 1))


def test_missing_coco_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        project_main.main(parse("--coco_path", tmp_path / "no_such_dir", "--epochs", 1))


def test_checkpoint_of_another_configuration_is_explained(tiny_coco, two_epochs):
    out, _ = two_epochs
    args = parse("--coco_path", tiny_coco, "--eval", "--resume", out / "checkpoint.pth",
                 "--num_queries_one2one", 5)
    with pytest.raises(RuntimeError, match=r"does not fit.*query_embed.*num_queries_one2one 6"):
        project_main.main(args)


def test_upstream_style_checkpoint_with_namespace_loads_safely(tmp_path):
    path = tmp_path / "released.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=2e-4, backbone="resnet50"),
                "epoch": 11}, path)
    checkpoint = load_checkpoint(path)
    assert checkpoint["args"].backbone == "resnet50" and torch.equal(checkpoint["model"]["w"], torch.ones(2))


class NotATensor:
    """Anything weights_only loading must refuse."""


def test_arbitrary_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": NotATensor()}, path)
    with pytest.raises(RuntimeError, match="evil.pth"):
        load_checkpoint(path)


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"epoch": 1}, path)

    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]


def test_eval_of_a_swin_checkpoint_needs_no_imagenet_file(tiny_coco, tmp_path):
    """--eval --resume of a Swin model reads only the checkpoint, not --pretrained_backbone_path."""
    from models import build_model

    flags = ["--coco_path", tiny_coco, "--backbone", "swin_tiny", "--num_classes", 7, "--batch_size", 3,
             "--pretrained_backbone_path", tmp_path / "not_downloaded.pth"]
    model, _, _ = build_model(parse(*flags))
    save_checkpoint({"model": model.state_dict()}, tmp_path / "swin.pth")
    stats = project_main.main(parse(*flags, "--eval", "--resume", tmp_path / "swin.pth"))
    assert len(stats["coco_eval_bbox"]) == 12


def test_wandb_logging_offline(tiny_coco, tmp_path, monkeypatch):
    """--use_wandb imports wandb only then and works with WANDB_MODE=offline (skipped without wandb)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(tiny_coco, tmp_path, 1, "--use_wandb")
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_main_with_its_default_flags_trains(tmp_path):
    """`python main.py` with its defaults (--num_queries_one2many 0, --k_one2many 5: the hybrid branch off) trains;
    only the data and output paths, the device, the image sizes and the model size are given."""
    make_synthetic_coco(tmp_path / "coco", num_train=2, num_val=1, image_size=64, seed=5)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    args = project_main.get_args_parser().parse_args(list(map(str, [
        "--coco_path", tmp_path / "coco", "--output_dir", tmp_path / "out", "--device", "cpu", "--epochs", 1,
        "--train_scales", 64, "--val_scale", 64, "--max_size", 96,
        "--backbone", "resnet18", "--pretrained_backbone_path", tmp_path / "resnet18.pth", "--enc_layers", 1,
        "--dec_layers", 1, "--hidden_dim", 32, "--dim_feedforward", 64])))
    assert (args.num_queries_one2many, args.k_one2many, args.num_queries_one2one) == (0, 5, 300)
    stats = project_main.main(args)
    assert len(stats["coco_eval_bbox"]) == 12
    (log,) = [json.loads(line) for line in (tmp_path / "out" / "log.txt").read_text().splitlines()]
    assert torch.isfinite(torch.tensor(log["train_loss"]))
    assert "train_loss_ce" in log and not any("one2many" in key for key in log)


@pytest.mark.parametrize("flag", ["--lr_backbone_names", "--lr_linear_proj_names"])
def test_parameter_group_names_that_match_nothing_are_refused(flag):
    """A typo in a name list left its parameters at --lr, silently (10x --lr_backbone for the backbone)."""
    from models import build_model

    args = parse("--coco_path", "unused", "--num_classes", 7, "--no_pretrained_backbone", flag, "backbone0")
    model, _, _ = build_model(args)
    with pytest.raises(ValueError, match=rf"^{flag} backbone0 matches no parameter of the model: every parameter "
                                         r"would train at --lr \(parameter names contain, e\.g\., backbone\.0, "):
        project_main.build_optimizer(args, model)
    frozen = parse("--coco_path", "unused", "--num_classes", 7, "--no_pretrained_backbone", "--lr_backbone", 0)
    optimizer, _ = project_main.build_optimizer(frozen, build_model(frozen)[0])  # a frozen backbone's names match
    assert [len(g["params"]) for g in optimizer.param_groups][1] == 0


def test_adamw_is_fused_also_after_resuming_an_unfused_optimizer():
    """The optimizer is upstream's AdamW in its fused kernel; an upstream checkpoint's optimizer state (not fused)
    resumes with its moments and keeps the fused kernel of this run."""
    from models import build_model

    args = parse("--coco_path", "unused", "--num_classes", 7)
    model, _, _ = build_model(args)
    optimizer, scheduler = project_main.build_optimizer(args, model)
    assert isinstance(optimizer, torch.optim.AdamW) and all(g["fused"] for g in optimizer.param_groups)
    upstream = torch.optim.AdamW([{k: v for k, v in g.items() if k in ("params", "lr")}
                                  for g in optimizer.param_groups], lr=args.lr, weight_decay=args.weight_decay)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    upstream.step()
    upstream_scheduler = torch.optim.lr_scheduler.StepLR(upstream, args.lr_drop)
    checkpoint = {"optimizer": upstream.state_dict(), "lr_scheduler": upstream_scheduler.state_dict(), "epoch": 3}
    assert not any(g.get("fused") for g in checkpoint["optimizer"]["param_groups"])
    next_epoch = project_main.resume_training_state(args, checkpoint, optimizer, scheduler, None)
    assert all(g["fused"] for g in optimizer.param_groups) and next_epoch == 4
    first = next(p for p in model.parameters() if p.requires_grad)
    assert torch.equal(optimizer.state[first]["exp_avg"], upstream.state[first]["exp_avg"])
    optimizer.step()  # runs with the loaded moments
