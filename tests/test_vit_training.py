"""A small ViT H-Deformable-DETR trains on the synthetic set: the loss goes down, and main.py runs end to end with
an MAE file, layer-wise decay, large-scale jitter and checkpointing."""
import json
import random

import pytest
import torch
from model_helpers import SMALL, TINY_VIT, TWO_STAGE_HYBRID, register_tiny_vit
from test_mae_checkpoint import mae_encoder

import engine
import main as project_main
from datasets.coco import COCO_SPLITS, CocoDetection
from datasets.synthetic import make_synthetic_coco
from datasets.transforms import make_coco_transforms
from models import build_model
from util.misc import collate_fn

TINY = SMALL + TWO_STAGE_HYBRID + ["--backbone", TINY_VIT, "--num_workers", "0", "--print_freq", "1000"]


@pytest.fixture(autouse=True)
def tiny_vit(monkeypatch):
    register_tiny_vit(monkeypatch)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_coco(root, num_train=4, num_val=2, image_size=96, seed=3)
    return root


def test_training_decreases_the_loss(synthetic):
    """Twelve epochs over the same four images (no augmentation) with layer-wise decay and drop path."""
    args = project_main.get_args_parser().parse_args(
        TINY + ["--coco_path", str(synthetic), "--lr", "1e-3", "--lr_backbone", "1e-4", "--lr_layer_decay", "0.8",
                "--drop_path_rate", "0.1"])
    args.num_classes = project_main.num_classes_of(args)
    torch.manual_seed(0)
    model, criterion, _ = build_model(args)
    folder, ann_file = COCO_SPLITS["train"]
    dataset = CocoDetection(synthetic / folder, synthetic / ann_file,
                            transforms=make_coco_transforms("val", val_size=96, max_size=128))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_fn)
    optimizer, _ = project_main.build_optimizer(args, model)
    losses = []
    for epoch in range(12):
        random.seed(epoch)
        torch.manual_seed(epoch)
        stats = engine.train_one_epoch(model, criterion, loader, optimizer, "cpu", epoch, args.clip_max_norm,
                                       print_freq=1000)
        losses.append(stats["loss"])
    assert losses[-1] < 0.85 * losses[0], losses
    assert sum(losses[-3:]) < sum(losses[:3]), losses


def test_main_trains_from_an_mae_file_with_lsj_and_evaluates(synthetic, tmp_path, capsys):
    weights = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": mae_encoder(grid=6)}, weights)
    out = tmp_path / "run"
    flags = TINY + ["--coco_path", str(synthetic), "--device", "cpu", "--batch_size", "2", "--val_scale", "96",
                    "--max_size", "128", "--lsj", "128", "--lr_layer_decay", "0.8", "--use_checkpoint",
                    "--pretrained_backbone_path", str(weights)]
    parser = project_main.get_args_parser()
    project_main.main(parser.parse_args(flags + ["--output_dir", str(out), "--epochs", "1"]))
    assert f"tensors of {weights} into {TINY_VIT}" in capsys.readouterr().out
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert len(log) == 1 and log[0]["train_loss"] > 0
    stats = project_main.main(parser.parse_args(flags + ["--eval", "--resume", str(out / "checkpoint.pth")]))
    assert stats["coco_eval_bbox"] == pytest.approx(log[0]["test_coco_eval_bbox"], abs=1e-6)
