"""Helpers shared by the model tests: small configurations, random inputs, the reference-data location."""
import json
from pathlib import Path

import torch

import engine
import main
from models import build_model
from models.criterion import weighted_losses
from models.vit import VIT_SIZES, ViTSize

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"

# a small model: 1 encoder + 2 decoder layers, hidden 32 (GroupNorm needs a multiple of 32), 8 channels a head
SMALL = ["--device", "cpu", "--enc_layers", "1", "--dec_layers", "2", "--hidden_dim", "32", "--nheads", "4",
         "--dim_feedforward", "64", "--dropout", "0.0", "--num_queries_one2one", "10",
         "--num_queries_one2many", "20", "--k_one2many", "2", "--enc_n_points", "2", "--dec_n_points", "2"]
TWO_STAGE_HYBRID = ["--with_box_refine", "--two_stage", "--mixed_selection", "--look_forward_twice"]

# a tiny ViT for tests only (not a user-facing --backbone): patch 16 as the real ones, 4 blocks (1 and 3 global),
# windows of 3 tokens, a 4 x 4 pre-training grid, global relative position tables for a 6 x 6 grid
TINY_VIT = "vit_tiny_test"
TINY_VIT_SIZE = ViTSize(embed_dim=32, depth=4, num_heads=2, global_blocks=(1, 3), window_size=3,
                        pretrain_img_size=64, img_size=96, pyramid_channels=32)


def register_tiny_vit(monkeypatch=None):
    """Make --backbone vit_tiny_test known (for the test's duration when given pytest's monkeypatch)."""
    if monkeypatch is not None:
        monkeypatch.setitem(VIT_SIZES, TINY_VIT, TINY_VIT_SIZE)
    else:
        VIT_SIZES[TINY_VIT] = TINY_VIT_SIZE


def parse(flags):
    """main.py's arguments for the given flags (added to the defaults)."""
    return main.get_args_parser().parse_args(list(flags))


def build(flags, seed=0):
    """(model, criterion, postprocessors, args) built with a fixed seed."""
    args = parse(flags)
    torch.manual_seed(seed)
    model, criterion, post = build_model(args)
    return model, criterion, post, args


def images(sizes, seed=0):
    """Random normalised-looking images [3, H, W], one per (H, W)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=gen) for h, w in sizes]


def targets(num_boxes, num_classes=91, seed=0):
    """One target dict per entry of num_boxes: labels and normalised cxcywh boxes well inside the image."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in num_boxes:
        centres = 0.3 + 0.4 * torch.rand(n, 2, generator=gen)
        sizes = 0.1 + 0.3 * torch.rand(n, 2, generator=gen)
        out.append({"labels": torch.randint(0, num_classes, (n,), generator=gen),
                    "boxes": torch.cat([centres, sizes], 1)})
    return out


def hybrid_total(outputs, tgts, criterion, args):
    """(loss dict, weighted total) through upstream's entry engine.train_hybrid, then the one weighted sum."""
    loss_dict = engine.train_hybrid(outputs, tgts, args.k_one2many, criterion, args.lambda_one2many)
    return loss_dict, weighted_losses(loss_dict, criterion.weight_dict)[1]


def reference_configs():
    """The configurations of checkpoint_keys.json by name ({} when the reference data is absent)."""
    path = REFERENCE / "checkpoint_keys.json"
    if not path.is_file():
        return {}
    return json.loads(path.read_text())["configs"]


def reference_fixture_names():
    """Names of the reference fixtures (*.pt), or [None] so that a test is collected and then skipped."""
    names = sorted(p.stem for p in REFERENCE.glob("*.pt")) if REFERENCE.is_dir() else []
    return names or [None]


def encoder_tokens(model, sizes):
    """Number of encoder tokens per image of a batch of the given image sizes (padded to the largest)."""
    h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
    total = 0
    for stride in model.backbone.strides:
        h_l, w_l = h, w
        while stride > 1:  # every stride-2 stage rounds up
            h_l, w_l, stride = -(-h_l // 2), -(-w_l // 2), stride // 2
        total += h_l * w_l
    for _ in range(model.num_feature_levels - len(model.backbone.strides)):
        h_l, w_l = -(-h_l // 2), -(-w_l // 2)
        total += h_l * w_l
    return total


def perturb(model, seed=0, scale=0.05):
    """Add noise to every parameter outside the backbone, so that zero-initialised heads (box deltas, attention
    weights) take part and a test cannot pass because some path is constant at initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.startswith("backbone."):
                param.add_(torch.randn(param.shape, generator=gen) * scale)
    return model


def giou_cxcywh(a, b):
    """Reference GIoU of two cxcywh boxes given as lists of floats, computed by hand."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull
