"""Multi-scale and flip test-time augmentation (issue #13): flip-back, size ranges, soft voting, the scale plan,
the flag errors, and evaluation through engine.evaluate / main.py (the identity pass alone is plain evaluation)."""
import math
import re
import subprocess
import sys

import pytest
import torch
from model_helpers import ROOT, build, parse, perturb
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.ops import box_iou

import main as project_main
from datasets import build_dataset, get_coco_api_from_dataset
from datasets.synthetic import make_synthetic_coco
from datasets.transforms import hflip, make_coco_transforms
from datasets.tta import (
    UPSTREAM_TTA_RANGES,
    UPSTREAM_TTA_SCALES,
    MultiScaleViews,
    TestTimeAugmentation,
    TTAScale,
    collate_views,
    tta_scales,
    view_to_input,
)
from datasets.tta_merge import in_size_range, merge_detections, soft_box_vote
from engine import evaluate
from models.deformable_detr import PostProcess
from util.arguments import argument_problems, tta_problems
from util.box_ops import hflip_boxes
from util.misc import collate_fn, nested_tensor_from_tensor_list

INF = math.inf
TINY = ["--device", "cpu", "--backbone", "resnet18", "--no_pretrained_backbone", "--num_feature_levels", "2",
        "--hidden_dim", "32", "--nheads", "2", "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "64",
        "--dropout", "0.0", "--with_box_refine", "--two_stage", "--mixed_selection", "--look_forward_twice",
        "--num_queries_one2one", "8", "--num_queries_one2many", "8", "--k_one2many", "2", "--num_classes", "7",
        "--val_scale", "64", "--max_size", "96", "--batch_size", "2", "--num_workers", "0", "--print_freq", "100",
        "--topk", "20"]


# --------------------------------------------------------------------------- flip, size ranges, voting


def test_hflip_boxes_undoes_the_image_flip_exactly():
    image = Image.new("RGB", (64, 48))
    boxes = torch.tensor([[0.0, 0.0, 64.0, 48.0], [5.5, 10.0, 25.25, 30.0], [60.0, 1.0, 63.5, 2.0]])
    _, flipped = hflip(image, {"boxes": boxes})
    assert not torch.equal(flipped["boxes"], boxes)
    assert torch.equal(hflip_boxes(flipped["boxes"], 64), boxes)
    assert torch.equal(hflip_boxes(hflip_boxes(boxes, 64), 64), boxes)


class BrightBoxModel(torch.nn.Module):
    """Stub detector: one query, class 1, whose box (normalised cxcywh) encloses the pixels of channel 0 above 0
    in the unpadded image."""

    def forward(self, samples):
        boxes = []
        for image, mask in zip(samples.tensors, samples.mask):
            height, width = int((~mask[:, 0]).sum()), int((~mask[0]).sum())
            ys, xs = torch.nonzero(image[0, :height, :width] > 0, as_tuple=True)
            x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
            boxes.append(torch.stack([(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width,
                                      (y1 - y0) / height]).float())
        logits = torch.full((len(boxes), 1, 3), -5.0)
        logits[:, :, 1] = 5.0
        return {"pred_logits": logits, "pred_boxes": torch.stack(boxes)[:, None]}


def bright_rectangle_image(height=48, width=64, box=(5, 10, 25, 30)):
    """Normalised-looking image [3, H, W]: -1 except a rectangle (x0, y0, x1, y1) of +1 left of the centre."""
    image = -torch.ones(3, height, width)
    x0, y0, x1, y1 = box
    image[:, y0:y1, x0:x1] = 1
    return image


@pytest.mark.parametrize("vote_iou", [None, 0.66])
def test_flipped_pass_is_mapped_back_onto_the_identity_pass(vote_iou):
    image = bright_rectangle_image()
    size = torch.tensor([48, 64])
    samples = nested_tensor_from_tensor_list([image, bright_rectangle_image(56, 72)])  # padded, as in a batch
    model, post = BrightBoxModel(), PostProcess(topk=1)
    identity = post(model(samples), torch.stack([size, size]))
    torch.testing.assert_close(identity[0]["boxes"], torch.tensor([[5.0, 10.0, 25.0, 30.0]]))
    tta = TestTimeAugmentation(post, flip=True, vote_iou=vote_iou)
    merged = tta(model, samples, [{"size": size, "orig_size": size}], identity[:1], [[]])[0]
    if vote_iou is None:  # both passes, the flipped one mirrored back
        assert len(merged["boxes"]) == 2
        torch.testing.assert_close(merged["boxes"], identity[0]["boxes"].expand(2, 4), rtol=0, atol=1e-5)
    else:  # one group of two equal boxes: one box; the other, rescored by 1 - IoU = 0, is dropped
        assert len(merged["boxes"]) == 1
        torch.testing.assert_close(merged["boxes"], identity[0]["boxes"], rtol=0, atol=1e-5)
        torch.testing.assert_close(merged["scores"], identity[0]["scores"])


def test_in_size_range_measures_the_square_root_of_the_area():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 20.0, 5.0], [0.0, 0.0, 30.0, 30.0], [5, 5, 5, 9]])
    assert in_size_range(boxes, 0, INF).tolist() == [True, True, True, True]
    assert in_size_range(boxes, 10, 30).tolist() == [True, True, False, False]  # low included, high not
    assert in_size_range(boxes, 10.5, INF).tolist() == [False, False, True, False]


class ConstantModel(torch.nn.Module):
    """Stub detector whatever the input: a small box (0.1 wide, class 1, score ~0.9) and a large one (0.5 wide,
    class 2, score ~0.8), normalised cxcywh."""

    def forward(self, samples):
        batch = len(samples.tensors)
        logits = torch.full((batch, 2, 3), -9.0)
        logits[:, 0, 1], logits[:, 1, 2] = math.log(0.9 / 0.1), math.log(0.8 / 0.2)
        boxes = torch.tensor([[0.3, 0.3, 0.1, 0.1], [0.5, 0.5, 0.5, 0.5]]).expand(batch, 2, 4)
        return {"pred_logits": logits, "pred_boxes": boxes}


def test_each_scale_keeps_the_sizes_of_its_range_in_its_own_pixels():
    pil = Image.new("RGB", (100, 100))
    scales = [TTAScale(200, 1000, 15, 60), TTAScale(50, 1000, 20, INF)]
    (image, views), target = MultiScaleViews(make_coco_transforms("val", val_size=100, max_size=1000),
                                             scales)(pil, {})
    assert [tuple(v.shape) for v, _ in views] == [(3, 200, 200), (3, 50, 50)]
    assert all(v.dtype == torch.uint8 for v, _ in views)
    model, post = ConstantModel(), PostProcess(topk=2)
    samples = nested_tensor_from_tensor_list([image])
    size = torch.tensor([100, 100])
    identity = post(model(samples), size[None])
    merged = TestTimeAugmentation(post, vote_iou=None)(model, samples, [{"size": target["size"],
                                                                         "orig_size": size}], identity, [views])[0]
    # identity: both; at 200 px the small box is 20 px (kept) and the large 100 px (dropped); at 50 px the small
    # box is 5 px (dropped) and the large 25 px (kept). In original pixels (10 and 50) the choice would differ.
    assert sorted(merged["labels"].tolist()) == [1, 1, 2, 2]
    widths = merged["boxes"][:, 2] - merged["boxes"][:, 0]
    torch.testing.assert_close(widths, torch.where(merged["labels"] == 1, 10.0, 50.0))


def test_soft_box_vote_against_a_hand_computed_case():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0],     # A 0.9: the best
                          [0.0, 0.0, 10.0, 12.0],     # B 0.6: IoU with A 100/120
                          [20.0, 20.0, 30.0, 30.0],   # C 0.5: alone
                          [1.0, 0.0, 11.0, 10.0],     # D 0.3: IoU with A 90/110
                          [0.0, 0.0, 10.0, 10.5],     # E 0.2: IoU with A 100/105
                          [0.0, 0.0, 10.0, 16.0]], dtype=torch.float64)  # F 0.4: IoU with A 100/160 < 0.66
    scores = torch.tensor([0.9, 0.6, 0.5, 0.3, 0.2, 0.4], dtype=torch.float64)
    out_boxes, out_scores = soft_box_vote(boxes, scores, 0.66)
    # group {A, B, D, E}: score-weighted mean box with A's score; B, D and E rescored by 1 - IoU with A, E's
    # 0.2 * 5 / 105 = 0.0095 falls below 0.05. F starts its own group (with no one left: itself)
    weights = [0.9, 0.6, 0.3, 0.2]
    members = [[0, 0, 10, 10], [0, 0, 10, 12], [1, 0, 11, 10], [0, 0, 10, 10.5]]
    voted = [sum(w * b[i] for w, b in zip(weights, members)) / sum(weights) for i in range(4)]
    expected = [(voted, 0.9), ([20, 20, 30, 30], 0.5), ([0, 0, 10, 16], 0.4), ([0, 0, 10, 12], 0.6 * 20 / 120),
                ([1, 0, 11, 10], 0.3 * 20 / 110)]
    torch.testing.assert_close(out_scores, torch.tensor([s for _, s in expected], dtype=torch.float64))
    torch.testing.assert_close(out_boxes, torch.tensor([b for b, _ in expected], dtype=torch.float64))


def reference_soft_vote(boxes, scores, threshold):
    """The voting of soft_box_vote written as a plain loop over Python lists (IoU from the same box_iou)."""
    iou = box_iou(torch.tensor(boxes, dtype=torch.float64), torch.tensor(boxes, dtype=torch.float64)).tolist()
    pool = sorted(range(len(boxes)), key=lambda i: -scores[i])
    out = []
    while pool:
        best = pool[0]
        group = [i for i in pool if i == best or iou[best][i] >= threshold]
        pool = [i for i in pool if i not in group]
        if len(group) == 1:
            out.append((boxes[best], scores[best]))
            continue
        total = sum(scores[i] for i in group)
        out.append(([sum(scores[i] * boxes[i][k] for i in group) / total for k in range(4)], scores[best]))
        out += [(boxes[i], scores[i] * (1 - iou[best][i])) for i in group[1:]
                if scores[i] * (1 - iou[best][i]) >= 0.05]
    return sorted(out, key=lambda bs: -bs[1])


@pytest.mark.parametrize("seed", range(5))
def test_soft_box_vote_equals_a_plain_loop_on_random_clusters(seed):
    gen = torch.Generator().manual_seed(seed)
    centres = (torch.rand(6, 2, generator=gen) * 100).repeat_interleave(8, 0)  # 6 objects, 8 detections each
    xy0 = centres + torch.randn(48, 2, generator=gen) * 3
    boxes = torch.cat([xy0, xy0 + 20 + torch.randn(48, 2, generator=gen) * 3], 1).double()
    scores = torch.rand(48, generator=gen).double()
    out_boxes, out_scores = soft_box_vote(boxes, scores, 0.66)
    expected = reference_soft_vote(boxes.tolist(), scores.tolist(), 0.66)
    assert len(expected) < 48 and len(out_scores) == len(expected)
    torch.testing.assert_close(out_scores, torch.tensor([s for _, s in expected], dtype=torch.float64))
    torch.testing.assert_close(out_boxes, torch.tensor([b for b, _ in expected], dtype=torch.float64))


def test_merge_votes_within_a_class_only_and_keeps_the_best_max_dets():
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    passes = [{"scores": torch.tensor([0.9]), "labels": torch.tensor([1]), "boxes": box},
              {"scores": torch.tensor([0.7]), "labels": torch.tensor([2]), "boxes": box},
              {"scores": torch.tensor([0.8]), "labels": torch.tensor([1]), "boxes": box + 1}]
    merged = merge_detections(passes, 0.5, max_dets=10)
    # class 1: voted (IoU 81/119) and the second box rescored; class 2 untouched
    assert merged["labels"].tolist() == [1, 2, 1]
    assert merged["scores"].tolist() == pytest.approx([0.9, 0.7, 0.8 * 38 / 119])
    torch.testing.assert_close(merged["boxes"], torch.cat([(0.9 * box + 0.8 * (box + 1)) / 1.7, box, box + 1]))
    unvoted = merge_detections(passes, None, max_dets=2)
    assert unvoted["scores"].tolist() == pytest.approx([0.9, 0.8]) and unvoted["labels"].tolist() == [1, 1]
    empty = {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    assert len(merge_detections([empty, empty], 0.66, 10)["scores"]) == 0


# --------------------------------------------------------------------------- the scale plan and the flags


def tta_flags(*flags):
    return parse(["--eval", "--tta", *map(str, flags)])


def test_default_plan_is_upstreams():
    scales = tta_scales(tta_flags())
    assert [s.scale for s in scales] == list(UPSTREAM_TTA_SCALES) == [400, 500, 600, 640, 700, 900, 1000, 1100,
                                                                     1200, 1300, 1400, 1800]
    assert [s.max_size for s in scales] == [1333] * 5 + [3000] * 7
    assert [(s.object_min, s.object_max) for s in scales] == [UPSTREAM_TTA_RANGES[s.scale] for s in scales]
    assert UPSTREAM_TTA_RANGES[400] == (96, INF) and UPSTREAM_TTA_RANGES[1800] == (0, 96)


def test_plan_for_another_evaluation_size():
    scales = tta_scales(tta_flags("--val_scale", 128, "--max_size", 256, "--tta_scales", 96, 128, 176, 192,
                                  "--tta_max_size", 400))
    f = 128 / 800  # upstream's ranges of 600, 900, 1100 and 1200, scaled to the evaluation size
    assert scales == [TTAScale(96, 256, 64 * f, INF), TTAScale(128, 400, 0, INF), TTAScale(176, 400, 0, 256 * f),
                      TTAScale(192, 400, 0, 256 * f)]
    explicit = tta_scales(tta_flags("--tta_scales", 300, 1500, "--tta_ranges", "50,inf", "0,100.5"))
    assert explicit == [TTAScale(300, 1333, 50, INF), TTAScale(1500, 3000, 0, 100.5)]


def test_a_view_at_the_evaluation_size_is_the_evaluation_input_exactly():
    pil = Image.effect_mandelbrot((77, 53), (-2, -1.2, 1, 1.2), 40).convert("RGB")
    plain = make_coco_transforms("val", val_size=64, max_size=96)
    (image, views), _ = MultiScaleViews(plain, [TTAScale(64, 96, 0, INF)])(pil, {})
    assert torch.equal(view_to_input(views[0][0]), plain(pil, {})[0]) and torch.equal(image, plain(pil, {})[0])


@pytest.mark.parametrize("flags, message", [
    (["--tta_scales", "400", "0"], r"--tta_scales needs one or more shorter sides > 0 \(pixels\), got \[400, 0\]"),
    (["--tta_scales", "-600"], "--tta_scales needs one or more shorter sides > 0"),
    (["--tta_scales", "400", "800", "--tta_ranges", "0,inf"], "--tta_ranges gives 1 ranges for 2 scales"),
    (["--tta_ranges", "0,inf"], "--tta_ranges gives 1 ranges for 12 scales"),
    (["--tta_scales", "400", "--tta_ranges", "96,32"], "--tta_ranges needs 0 <= LO < HI in every LO,HI, got 96,32"),
    (["--tta_scales", "400", "--tta_ranges=-1,32"], "--tta_ranges needs 0 <= LO < HI"),
    (["--tta_vote_iou", "0"], r"--tta_vote_iou must be in \(0, 1\], got 0.0"),
    (["--tta_vote_iou", "1.5"], "--tta_vote_iou must be in"),
    (["--tta_vote_iou", "nan"], "--tta_vote_iou must be in"),
    (["--tta_max_dets", "0"], "--tta_max_dets must be > 0"),
    (["--tta_max_size", "0"], "--tta_max_size must be > 0"),
])
def test_bad_tta_flags_are_refused_naming_the_flag(flags, message):
    args = tta_flags(*flags)
    assert any(re.search(message, problem) for problem in argument_problems(args)), argument_problems(args)
    assert tta_problems(args) == argument_problems(args), "main.py and tools/infer.py check the same"
    with pytest.raises(ValueError, match="bad flag values: .*" + message):
        project_main.main(args)


@pytest.mark.parametrize("flags, message", [
    (["--tta"], "--tta .* needs --eval"),
    (["--eval", "--tta_flip"], "--tta_flip only act with --tta"),
    (["--eval", "--tta_scales", "400", "--tta_ranges", "0,inf"], "--tta_scales, --tta_ranges only act with --tta"),
    # defaults that are numbers: given without --tta, they were ignored
    (["--eval", "--tta_max_dets", "5", "--tta_vote_iou", "0.9", "--tta_max_size", "500"],
     "--tta_max_size, --tta_vote_iou, --tta_max_dets only act with --tta"),
])
def test_tta_options_without_their_mode_are_refused(flags, message):
    args = parse(["--coco_path", "/nonexistent", *flags])
    assert any(re.search(message, problem) for problem in argument_problems(args))
    with pytest.raises(ValueError, match=message):
        project_main.main(args)


def test_good_tta_flags_pass_the_checks():
    assert argument_problems(tta_flags()) == []
    assert argument_problems(tta_flags("--tta_scales", 96, 192, "--tta_ranges", "10,inf", "0,40.5", "--tta_flip",
                                       "--tta_vote_iou", 1, "--tta_max_dets", 1)) == []
    assert argument_problems(parse(["--eval"])) == argument_problems(parse([])) == []


@pytest.mark.parametrize("flags, message", [
    (["--tta_scales"], "argument --tta_scales: expected at least one argument"),
    (["--tta_scales", "400", "--tta_ranges", "96"], "argument --tta_ranges: '96' is not LO,HI"),
    (["--tta_scales", "400", "--tta_ranges", "a,b"], "argument --tta_ranges: 'a,b' is not LO,HI"),
])
def test_malformed_tta_flags_are_parser_errors(flags, message, capsys):
    with pytest.raises(SystemExit):
        tta_flags(*flags)
    assert message in capsys.readouterr().err


def test_an_empty_scale_list_set_by_a_script_is_refused():
    args = tta_flags()
    args.tta_scales = []
    assert argument_problems(args) == ["--tta_scales needs one or more shorter sides > 0 (pixels), got []"]


def test_command_line_tta_errors_exit_2_with_the_message():
    result = subprocess.run([sys.executable, "main.py", "--eval", "--tta", "--tta_scales", "0", "--device", "cpu"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--tta_scales needs one or more shorter sides > 0 (pixels), got [0]" in result.stderr


def test_the_plan_is_printed(capsys):
    print(TestTimeAugmentation.from_args(tta_flags("--tta_flip"), PostProcess(100)))
    out = capsys.readouterr().out
    assert "26 passes per image (13 scales, each also flipped), top 100 of each, soft box voting at IoU 0.66" in out
    assert "1800 max 3000  keeps 0 <= sqrt(w*h) < 96" in out and "400 max 1333  keeps 96 <= sqrt(w*h) < inf" in out


# --------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("tta_coco")
    make_synthetic_coco(root, 3, 3, image_size=64, seed=5)
    return root


@pytest.fixture(scope="module")
def tiny(coco):
    model, criterion, post, args = build([*TINY, "--coco_path", str(coco)], seed=3)
    return perturb(model, seed=1, scale=0.2), criterion, post, args


def run_evaluate(tiny, dataset, collate, tta=None):
    model, criterion, post, args = tiny
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate)  # 3 images: a padded batch and a single one
    stats, evaluator = evaluate(model, criterion, post, loader, get_coco_api_from_dataset(dataset), "cpu",
                                print_freq=100, tta=tta)
    return stats, evaluator.detections


def test_identity_pass_alone_without_voting_is_plain_evaluation_exactly(tiny):
    _, _, post, args = tiny
    dataset = build_dataset("val", args)
    plain_stats, plain = run_evaluate(tiny, dataset, collate_fn)
    dataset.transforms = MultiScaleViews(dataset.transforms, [])
    tta = TestTimeAugmentation(post["bbox"], flip=False, vote_iou=None, max_dets=1000)
    tta_stats, merged = run_evaluate(tiny, dataset, collate_views, tta)
    assert sum(map(len, plain.values())) == 3 * 20, "--topk 20 per image"
    assert merged == plain  # every image's COCO results, in order
    assert tta_stats == plain_stats  # AP and the losses


def test_every_scale_and_flip_runs_once_per_batch(tiny):
    model, _, post, args = tiny
    args = parse([*TINY, "--coco_path", args.coco_path, "--eval", "--tta", "--tta_scales", "48", "80",
                  "--tta_flip"])
    dataset = build_dataset("val", args)
    shapes = []
    handle = model.register_forward_pre_hook(lambda _, inputs: shapes.append(tuple(inputs[0].tensors.shape)))
    try:
        stats, merged = run_evaluate((model, *tiny[1:]), dataset, collate_views,
                                     TestTimeAugmentation.from_args(args, post["bbox"]))
    finally:
        handle.remove()
    # per batch (of 2 images, then 1): the evaluation pass, its flip, and each scale plain and flipped, the
    # batch's images together
    assert [s[0] for s in shapes] == [2] * 6 + [1] * 6
    assert sum(min(s[2:]) == 48 for s in shapes) == 2 * 2 and sum(min(s[2:]) == 80 for s in shapes) == 2 * 2
    assert sorted(merged) == sorted(dataset.ids) and all(len(r) > 20 for r in merged.values())


@pytest.mark.parametrize("extra", [[], ["--eval_in_training_set"]])
def test_main_eval_with_tta(tiny, coco, tmp_path, extra, capsys):
    model = tiny[0]
    torch.save({"model": model.state_dict()}, tmp_path / "model.pth")
    flags = [*TINY, "--coco_path", str(coco), "--eval", "--resume", str(tmp_path / "model.pth"), *extra]
    plain = project_main.main(parse(flags))
    stats = project_main.main(parse([*flags, "--tta", "--tta_scales", "48", "80", "--tta_flip",
                                     "--output_dir", str(tmp_path)]))
    out = capsys.readouterr().out
    assert "test-time augmentation: 6 passes per image (3 scales, each also flipped)" in out
    assert len(stats["coco_eval_bbox"]) == 12 and (tmp_path / "eval.pth").is_file()
    assert stats["loss"] == pytest.approx(plain["loss"])  # the losses are the evaluation pass's
