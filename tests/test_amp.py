"""Mixed precision (--amp bf16 / fp16, util.amp) on the CPU: the settings, the one warning on a CPU without native
support, training, evaluation and TTA close to fp32, the fp16 gradient scaler (skipped steps, resume), and the
parts that stay float32 under autocast.

Every model here is tiny (hidden 32, ResNet-18 at 64 pixels, batches of 2-4) and the reduced-precision training
steps keep the backbone frozen (no backbone backward; fp16's convolution weight gradient has no fast CPU kernel):
on a CPU without bf16/fp16 hardware, where reduced-precision kernels run 30-80x slower, the reduced-precision
passes below stay within a minute.

Tolerances. bf16 keeps 8 significant bits (a rounding errs by up to 2^-8, 0.4%), fp16 11 (2^-11, 0.05%). Along
the model's path the roundings of some 10-20 layers add up, mostly at random, to about 1-2% of a value's scale for
bf16: logits (|logit| up to about 6 here) within 0.15, boxes (in [0, 1]) within 0.02; fp16 8x tighter (0.02,
0.003). The losses (sums over many terms, whose roundings partly cancel) within 2% (bf16) and 0.5% (fp16).
Observed: bf16 0.03 / 0.003, fp16 0.004 / 0.0003, losses 0.1% / 0.02%.
"""
import copy
import math

import pytest
import torch
import torchvision
from model_helpers import ROOT, parse
from torch.utils.data import DataLoader

import datasets.tta as tta_module
import engine
import main as project_main
import models.deformable_detr as deformable_detr
import models.deformable_transformer as deformable_transformer
import util.box_ops as box_ops
from datasets import build_dataset, get_coco_api_from_dataset
from datasets.synthetic import make_synthetic_coco
from datasets.tta import TestTimeAugmentation, collate_views
from models import build_model
from models.backbone import Backbone, FrozenBatchNorm2d
from models.criterion import weighted_losses
from models.ops.modules import MSDeformAttn
from models.optimizer import build_optimizer
from util import amp
from util.checkpoint import load_checkpoint, save_checkpoint
from util.misc import collate_fn
from util.training_state import precision_change

REDUCED = ("bf16", "fp16")
TOLERANCE = {"bf16": {"logits": 0.15, "boxes": 0.02, "loss": 0.02},
             "fp16": {"logits": 0.02, "boxes": 0.003, "loss": 0.005}}
TINY = ["--device", "cpu", "--backbone", "resnet18", "--no_pretrained_backbone", "--num_feature_levels", "2",
        "--hidden_dim", "32", "--nheads", "2", "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "64",
        "--dropout", "0.0", "--with_box_refine", "--two_stage", "--mixed_selection", "--look_forward_twice",
        "--num_queries_one2one", "10", "--num_queries_one2many", "10", "--k_one2many", "2", "--num_classes", "7",
        "--train_scales", "64", "--val_scale", "64", "--max_size", "96", "--no_crop_augment", "--batch_size", "8",
        "--num_workers", "0", "--print_freq", "1000", "--lr", "5e-3", "--lr_backbone", "5e-3"]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """8 plain training images (1-2 large shapes each, no texture or noise) and 1 validation image."""
    root = tmp_path_factory.mktemp("amp_coco")
    make_synthetic_coco(root, num_train=8, num_val=1, image_size=64, seed=3, max_objects=2, min_object_frac=0.3,
                        texture_amplitude=0.0, pixel_noise=0.0)
    return root


@pytest.fixture(scope="module")
def two_images(tmp_path_factory):
    """2 training images and 1 validation image, for main.py runs (1 iteration an epoch with --batch_size 2)."""
    root = tmp_path_factory.mktemp("amp_two")
    make_synthetic_coco(root, num_train=2, num_val=1, image_size=64, seed=3, max_objects=2, min_object_frac=0.3)
    return root


def tiny_flags(coco, *extra):
    return [*TINY, "--coco_path", str(coco), *map(str, extra)]


@pytest.fixture(scope="module")
def trained(coco):
    """(model, criterion, postprocessors, args, dataset, batch): the tiny model after 60 float32 steps on the 8
    training images (one batch), which it then detects with AP about 0.4; dataset: those images with the
    evaluation transforms. Trained so far, its detections are confident: a weakly trained model (AP 0.1) scores
    true and false detections alike, and on so few objects one pair trading ranks under any rounding moves AP by
    0.01."""
    args = parse(tiny_flags(coco, "--eval_in_training_set"))
    torch.manual_seed(0)
    model, criterion, post = build_model(args)
    dataset = build_dataset("val", args)
    batch = collate_fn([dataset[i] for i in range(len(dataset))])
    optimizer, _ = build_optimizer(args, model)
    engine.train_one_epoch(model, criterion, [batch] * 60, optimizer, "cpu", 0, args.clip_max_norm, print_freq=1000)
    return model.eval(), criterion, post, args, dataset, batch


def with_frozen_backbone(model):
    """A copy of `model` whose backbone does not train (the reduced-precision training steps: see the top)."""
    model = copy.deepcopy(model)
    model.backbone.requires_grad_(False)
    return model


def assert_close_detections(want, got, sizes, tolerance):
    """Every confident detection of `want` (score >= 0.2; PostProcess results, boxes in pixels of `sizes`) is in
    `got` with the same label, its box and score within the tolerance; returns how many were compared."""
    confident = 0
    for w, g, size in zip(want, got, sizes):
        assert g["scores"].dtype is torch.float32 and g["boxes"].dtype is torch.float32
        scale = size.flip(0).repeat(2)  # boxes in pixels -> fractions of the image
        for score, label, box in zip(w["scores"], w["labels"], w["boxes"]):
            if score < 0.2:
                continue
            same = g["labels"] == label
            distance = ((g["boxes"][same] - box).abs() / scale).amax(1)
            nearest = distance.argmin()
            assert distance[nearest] <= tolerance["boxes"]
            assert abs(g["scores"][same][nearest] - score) <= tolerance["logits"] / 4  # d score / d logit <= 1/4
            confident += 1
    assert confident >= 2, "too few confident detections for the comparison to test anything"
    return confident


def evaluate(trained, precision, dataset=None, tta=None):
    model, criterion, post, _, own, _ = trained
    dataset = dataset or own
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate_views if tta is not None else collate_fn)
    stats, _ = engine.evaluate(model, criterion, post, loader, get_coco_api_from_dataset(dataset), "cpu",
                               print_freq=1000, table=False, tta=tta, amp=precision)
    return stats


# --------------------------------------------------------------------------- the settings


def test_modes_dtypes_scalers_and_contexts():
    assert [amp.amp_dtype(m) for m in ("fp32", "bf16", "fp16")] == [torch.float32, torch.bfloat16, torch.float16]
    assert [amp.needs_grad_scaler(m) for m in ("fp32", "bf16", "fp16")] == [False, False, True]
    assert [amp.grad_scaler("cpu", m).is_enabled() for m in ("fp32", "bf16", "fp16")] == [False, False, True]
    with amp.autocast("cpu", "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with amp.autocast(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        amp.amp_dtype("fp8")
    assert amp.amp_mode(parse(["--use_fp16"])) == "fp16" and amp.amp_mode(parse(["--amp", "bf16"])) == "bf16"
    assert amp.amp_mode(parse([])) == "fp32"
    # a given --amp wins over a config's --use_fp16 (bash <vit config> --amp fp32 ran fp16 before)
    assert [amp.amp_mode(parse(["--use_fp16", "--amp", mode])) for mode in ("fp32", "bf16", "fp16")] == [
        "fp32", "bf16", "fp16"]
    half, double, labels = torch.ones(2, dtype=torch.bfloat16), torch.ones(2, dtype=torch.float64), torch.ones(2).long()
    assert amp.to_float32(half).dtype is torch.float32
    assert amp.to_float32(double) is double and amp.to_float32(labels) is labels  # nothing else is cast


def test_the_default_path_is_the_plain_forward():
    """fp32 (every default) calls the model as before: no autocast, the model's own output objects."""
    out = {"pred_logits": torch.ones(1)}
    seen = []

    def model(samples):
        seen.append(torch.is_autocast_enabled("cpu"))
        return out

    assert amp.forward(model, None, "cpu", "fp32") is out and seen == [False]
    assert amp.amp_mode(project_main.get_args_parser().parse_args([])) == "fp32"


def no_native_support(monkeypatch, capability="AVX2"):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)


def test_the_warning_names_the_capability_on_a_cpu_without_native_support(monkeypatch):
    assert amp.native_on_cpu("fp32")
    no_native_support(monkeypatch)
    for precision in REDUCED:
        message = amp.slow_precision_warning("cpu", precision)
        assert f"--amp {precision}" in message and "capability AVX2" in message and "many times slower" in message
        assert amp.slow_precision_warning("cuda", precision) is None  # a GPU's support is not the CPU's
    assert amp.slow_precision_warning("cpu", "fp32") is None
    assert amp.cpu_precision_summary() == "CPU capability AVX2: bf16 emulated (slow), fp16 emulated (slow)"
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert amp.slow_precision_warning("cpu", "bf16") is None and amp.slow_precision_warning("cpu", "fp16")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: True)
    assert amp.slow_precision_warning("cpu", "fp16") is None  # evaluation in fp16 is fast here
    assert "about 100x slower than bf16); --amp bf16 trains fast" in amp.slow_precision_warning("cpu", "fp16", True)
    assert amp.slow_precision_warning("cpu", "bf16", training=True) is None


def test_main_warns_once_at_the_start(two_images, monkeypatch, capsys, tmp_path):
    no_native_support(monkeypatch, "DEFAULT")
    weights = tmp_path / "random.pth"
    model = build_model(project_main.derived_settings(parse(tiny_flags(two_images, "--eval"))))[0]
    save_checkpoint({"model": model.state_dict()}, weights)
    project_main.main(parse(tiny_flags(two_images, "--eval", "--amp", "bf16", "--resume", weights)))
    out = capsys.readouterr().out
    assert out.count("warning: --amp bf16 on this CPU (capability DEFAULT") == 1
    assert out.index("warning: --amp bf16") < out.index("number of params")  # before any work
    project_main.main(parse(tiny_flags(two_images, "--eval", "--resume", weights)))
    assert "warning" not in capsys.readouterr().out  # fp32: nothing to say


# --------------------------------------------------------------------------- training, evaluation, TTA


@pytest.mark.parametrize("precision", REDUCED)
def test_detections_and_losses_are_close_to_fp32(trained, precision):
    """The confident detections (score >= 0.2) come back with the same label, box and score; the training losses
    (both query groups, matched afresh) are the same within the rounding. Query by query the outputs may differ
    more: two-stage picks its queries by the encoder's scores, and a proposal at the cut can trade places."""
    model, criterion, post, _, dataset, _ = trained
    model = copy.deepcopy(model)  # training-mode passes update the BatchNorm statistics
    samples, targets = collate_fn([dataset[0], dataset[1]])
    tolerance = TOLERANCE[precision]
    sizes = torch.stack([t["orig_size"] for t in targets])
    with torch.no_grad():
        want, got = (post["bbox"](amp.forward(model, samples, "cpu", p), sizes) for p in ("fp32", precision))
        assert_close_detections(want, got, sizes, tolerance)

        model.train()
        want = amp.forward(model, samples, "cpu", "fp32")
        got = amp.forward(model, samples, "cpu", precision)
        assert {t.dtype for _, t in engine._output_tensors(got)} == {torch.float32}
        want_total = weighted_losses(criterion(want, targets), criterion.weight_dict)[1]
        got_total = weighted_losses(criterion(got, targets), criterion.weight_dict)[1]
    assert math.isfinite(got_total) and got_total.dtype is torch.float32  # the losses run in float32
    assert abs(got_total - want_total) <= tolerance["loss"] * want_total


def test_a_float32_checkpoint_evaluated_in_bf16_and_fp16_keeps_its_ap(trained):
    """The fixture's model trained on to 100 steps (AP about 0.6, confident detections) keeps its AP and AP50 in
    bf16 and fp16 within 0.005 (the demo checkpoint's figure, docs/mixed-precision.md) or one step of this tiny
    set's AP, whichever is larger. COCO's AP is the mean over the categories present of their AP averaged over 10
    IoU thresholds; with one or two objects per category, one box crossing one threshold moves AP by about
    1 / (10 categories) (0.017 here). A rounding may cause one such crossing (after 60 steps one of the float32
    models that the training's roundings lead to lost 0.024 AP in bf16; after 80 to 150 steps, on one and two
    threads, bf16 and fp16 gave fp32's AP exactly or within one step)."""
    model, criterion, post, args, dataset, batch = trained
    model = copy.deepcopy(model).train()
    optimizer, _ = build_optimizer(args, model)
    engine.train_one_epoch(model, criterion, [batch] * 40, optimizer, "cpu", 0, args.clip_max_norm, print_freq=1000)
    confident = (model.eval(), criterion, post, args, dataset, batch)
    categories = len({int(label) for target in batch[1] for label in target["labels"]})
    allowed = max(0.005, 1 / (10 * categories))
    reference = evaluate(confident, "fp32")["coco_eval_bbox"]
    assert reference[0] > 0.3, f"AP {reference[0]}: the model is not trained enough for the comparison"
    for precision in REDUCED:
        stats = evaluate(confident, precision)
        assert abs(stats["coco_eval_bbox"][0] - reference[0]) <= allowed, precision
        assert abs(stats["coco_eval_bbox"][1] - reference[1]) <= allowed, precision
        assert math.isfinite(stats["loss"])


@pytest.mark.parametrize("precision", REDUCED)
def test_tta_in_reduced_precision_merges_float32_detections_close_to_fp32(trained, monkeypatch, precision):
    model, _, post, args, _, _ = trained
    tta_args = parse(tiny_flags(args.coco_path, "--eval_in_training_set", "--eval", "--tta", "--tta_scales", "80",
                                "--tta_flip"))
    dataset = build_dataset("val", tta_args)
    samples, targets, views = collate_views([dataset[0], dataset[1]])
    sizes = torch.stack([t["orig_size"] for t in targets])
    tta = TestTimeAugmentation.from_args(tta_args, post["bbox"])
    merged_dtypes = []
    merge = tta_module.merge_detections

    def recording(detections, vote_iou, max_dets):
        merged_dtypes.extend(d[k].dtype for d in detections for k in ("scores", "boxes"))
        return merge(detections, vote_iou, max_dets)

    monkeypatch.setattr(tta_module, "merge_detections", recording)
    results = {}
    with torch.no_grad():
        for p in ("fp32", precision):
            identity = post["bbox"](amp.forward(model, samples, "cpu", p), sizes)
            results[p] = tta(model, samples, targets, identity, views, p)  # 4 passes: identity, 80 px, flipped
    assert merged_dtypes and set(merged_dtypes) == {torch.float32}
    assert_close_detections(results["fp32"], results[precision], sizes, TOLERANCE[precision])


# --------------------------------------------------------------------------- the fp16 gradient scaler


def test_an_inf_gradient_skips_the_step_and_lowers_the_scale(trained):
    model, criterion, _, args, dataset, _ = trained
    model = with_frozen_backbone(model)
    batch = collate_fn([dataset[0], dataset[1]])
    optimizer, _ = build_optimizer(args, model)
    # this model's fp16 gradients overflow above a scale of about 2^12: the default 2^16 would first halve anyway
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    scale = scaler.get_scale()
    before = {k: v.clone() for k, v in model.named_parameters()}  # (BatchNorm statistics move in any forward)
    handle = model.class_embed[0].weight.register_hook(lambda grad: torch.full_like(grad, math.inf))
    stats = engine.train_one_epoch(model, criterion, [batch], optimizer, "cpu", 0, args.clip_max_norm,
                                   print_freq=1000, amp="fp16", scaler=scaler)
    handle.remove()
    assert math.isfinite(stats["loss"])  # the forward was fine: only the gradient overflowed
    assert scaler.get_scale() == scale * scaler.get_backoff_factor()
    assert all(torch.equal(v, before[k]) for k, v in model.named_parameters())  # the step was skipped
    # logged: the share of skipped steps and the scale; no grad norm (an inf one made the epoch's average inf)
    assert stats["skipped_step"] == 1.0 and stats["loss_scale"] == scale and "grad_norm" not in stats

    # an epoch of two steps, the first skipped: its averages are the good step's
    overflows = [True]
    handle = model.class_embed[0].weight.register_hook(
        lambda grad: torch.full_like(grad, math.inf) if overflows and overflows.pop() else grad)
    stats = engine.train_one_epoch(model, criterion, [batch, batch], optimizer, "cpu", 0, args.clip_max_norm,
                                   print_freq=1000, amp="fp16", scaler=scaler)
    handle.remove()
    scale *= scaler.get_backoff_factor()
    assert scaler.get_scale() == scale * scaler.get_backoff_factor()  # lowered again, then kept by the good step
    assert stats["skipped_step"] == 0.5 and stats["loss_scale"] == 0.75 * scale
    assert math.isfinite(stats["grad_norm"]) and stats["grad_norm"] > 0
    assert sum(not torch.equal(v, before[k]) for k, v in model.named_parameters()) > 0  # the good step did step


def test_resume_restores_the_scaler_state(two_images, tmp_path):
    """An fp16 run resumed after its first epoch ends with the scaler state of the uninterrupted run (the scale and
    the count of good steps since it last changed, which a fresh scaler would restart). The backbone is frozen (its
    fp16 backward is slow on CPUs without fp16 hardware), so it starts from a weights file (a random ResNet-18)."""
    backbone_file = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), backbone_file)
    frozen = [flag for flag in tiny_flags(two_images) if flag != "--no_pretrained_backbone"]

    def scaler_after(out, *extra):
        project_main.main(parse(map(str, [*frozen, "--pretrained_backbone_path", backbone_file, "--lr_backbone",
                                          "0", "--amp", "fp16", "--batch_size", "2", "--output_dir", out, *extra])))
        return load_checkpoint(out / "checkpoint.pth")["scaler"]

    uninterrupted = scaler_after(tmp_path / "whole", "--epochs", "2")
    first = scaler_after(tmp_path / "resumed", "--epochs", "1")
    assert first != amp.grad_scaler("cpu", "fp16").state_dict()  # one step (1 iteration an epoch) changed it
    assert scaler_after(tmp_path / "resumed", "--epochs", "2", "--auto_resume") == uninterrupted


def test_resuming_in_another_precision_is_noted():
    """The command line's --amp decides; a run relaunched without its --amp changed precision without a word, and
    dropped its fp16 scaler state."""
    fp16 = {"args": parse(["--use_fp16"]), "scaler": {"scale": 1024.0}}
    assert precision_change(fp16, "fp16", "a.pth") is None
    assert precision_change(fp16, "fp32", "a.pth") == ("note: a.pth was trained in fp16; this run continues in fp32 "
                                                        "(--amp); its fp16 gradient-scaler state is not used")
    mid_epoch = {"args": parse(["--amp", "bf16"]), "in_epoch": {"epoch": 1}}
    assert precision_change(mid_epoch, "fp16", "b.pth") == (
        "note: b.pth was trained in bf16; this run continues in fp16 (--amp); a new gradient scaler starts; the rest "
        "of its epoch does not repeat its steps exactly")
    assert precision_change({"args": parse([])}, "fp32") is None
    assert precision_change({"model": {}}, "bf16") is None  # no saved arguments: nothing to compare


# --------------------------------------------------------------------------- the ResNet's bf16 fast path


def test_frozen_batch_norm_keeps_the_input_dtype_and_torchvisions_float32_values():
    ours, theirs = FrozenBatchNorm2d(8), torchvision.ops.FrozenBatchNorm2d(8)
    gen = torch.Generator().manual_seed(0)
    for name in ("weight", "bias", "running_mean", "running_var"):
        value = torch.randn(8, generator=gen) if name != "running_var" else torch.rand(8, generator=gen) + 0.5
        getattr(ours, name).copy_(value)
        getattr(theirs, name).copy_(value)
    x = torch.randn(2, 8, 5, 6, generator=gen)
    assert torch.equal(ours(x), theirs(x))  # float32: the same operations, bit for bit
    assert theirs(x.bfloat16()).dtype is torch.float32  # the promotion the subclass avoids
    reduced = ours(x.bfloat16())
    assert reduced.dtype is torch.bfloat16
    # bf16: scale and bias rounded, then the product and the sum: 3 roundings of 2^-8 of the terms' size each
    scale = ours.weight * (ours.running_var + ours.eps).rsqrt()
    bias = ours.bias - ours.running_mean * scale
    terms = (x.bfloat16().float() * scale[:, None, None]).abs() + bias[:, None, None].abs()
    assert ((reduced.float() - theirs(x.bfloat16())).abs() <= 3 * 2 ** -8 * terms).all()
    assert ours.state_dict().keys() == theirs.state_dict().keys()


def test_the_resnet_runs_channels_last_in_its_input_dtype_under_autocast():
    body = Backbone("resnet18", True, 2, False).body.eval()  # frozen BatchNorm, as with ImageNet weights
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = body(x)
        with amp.autocast("cpu", "bf16"):
            reduced = body(x)
    for name, feature in plain.items():
        assert feature.is_contiguous()  # fp32: the layout (and the computation) as before
        assert reduced[name].dtype is torch.bfloat16 and reduced[name].is_contiguous(memory_format=torch.channels_last)
        error = (reduced[name].float() - feature).norm() / feature.norm()
        assert error < 0.02, name  # 2^-8 per rounding through 8 blocks: about 1% (observed 0.3%)


# --------------------------------------------------------------------------- what stays float32


@pytest.mark.parametrize("precision", REDUCED)
def test_a_training_step_trains_with_the_sensitive_parts_in_float32(trained, monkeypatch, precision):
    model, criterion, _, args, dataset, _ = trained
    model = with_frozen_backbone(model)
    samples, targets = collate_fn([dataset[0], dataset[1]])
    seen = {}

    def record(name, *tensors):
        seen.setdefault(name, set()).update(t.dtype for t in tensors)

    def recording(function, name, inputs=True):
        def wrapped(*args):
            result = function(*args)
            record(name, *[a for a in args if inputs and torch.is_tensor(a) and a.is_floating_point()], result)
            return result
        return wrapped

    for module in (deformable_transformer, deformable_detr):
        monkeypatch.setattr(module, "refine_boxes", recording(module.refine_boxes, "refine_boxes"))
    monkeypatch.setattr(box_ops, "inverse_sigmoid", recording(box_ops.inverse_sigmoid, "inverse_sigmoid"))
    transformer = model.transformer
    monkeypatch.setattr(transformer, "get_proposal_pos_embed",
                        recording(transformer.get_proposal_pos_embed, "proposal sine embedding"))
    proposals = transformer.gen_encoder_output_proposals
    monkeypatch.setattr(transformer, "gen_encoder_output_proposals",
                        lambda *a: (lambda out: record("encoder proposals", out[1]) or out)(proposals(*a)))
    select = transformer.select_proposals
    monkeypatch.setattr(transformer, "select_proposals", lambda s, k: record("proposal scores", s) or select(s, k))
    matcher_cost = criterion.matcher.cost_matrix

    def cost_matrix(*args):
        record("matcher inputs", *args[:2], *args[3:])
        record("autocast in the matcher", torch.tensor(float(torch.is_autocast_enabled("cpu"))))
        return recording(matcher_cost, "matcher cost")(*args)

    monkeypatch.setattr(criterion.matcher, "cost_matrix", cost_matrix)
    hooks = [m.register_forward_pre_hook(lambda _, inputs: record("reference points", inputs[1]))
             for m in model.modules() if isinstance(m, MSDeformAttn)]
    # the box heads (their deltas fix the boxes: in bf16 a box moves by ~0.4% of its size)
    hooks += [head.register_forward_hook(lambda _, inputs, output: record("box heads", inputs[0], output))
              for head in model.bbox_embed]
    raw = []
    model_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda s: (lambda out: raw.append(out) or out)(model_forward(s)))
    optimizer, _ = build_optimizer(args, model)
    before = {k: v.clone() for k, v in model.named_parameters()}
    # a first fp16 step at the default scale (2^16) overflows here and is skipped (the next test): start lower
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, enabled=precision == "fp16")
    stats = engine.train_one_epoch(model, criterion, [(samples, targets)], optimizer, "cpu", 0, args.clip_max_norm,
                                   print_freq=1000, amp=precision, scaler=scaler)
    for hook in hooks:
        hook.remove()
    assert math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"]) and stats["grad_norm"] > 0
    changed = [k for k, v in model.named_parameters() if not torch.equal(v, before[k])]
    assert len(changed) == sum(p.requires_grad for p in model.parameters())  # every trained parameter moved
    assert {v.dtype for v in model.state_dict().values() if v.is_floating_point()} == {torch.float32}
    assert seen.pop("autocast in the matcher") == {torch.float32}  # the flag's value 0.0: off
    assert {name: dtypes for name, dtypes in seen.items() if dtypes != {torch.float32}} == {}
    assert set(seen) == {"refine_boxes", "box heads", "inverse_sigmoid", "proposal sine embedding", "encoder proposals",
                         "proposal scores", "matcher inputs", "matcher cost", "reference points"}
    (outputs,) = raw  # as the model returns them under autocast, before the loop's cast
    assert outputs["pred_logits"].dtype is amp.amp_dtype(precision)  # the heads did run in the reduced dtype
    assert outputs["pred_boxes"].dtype is torch.float32 and outputs["enc_outputs"]["pred_boxes"].dtype is torch.float32
    assert all(o["pred_boxes"].dtype is torch.float32 for o in outputs["aux_outputs"])


def test_post_processing_takes_reduced_outputs_in_float32(trained):
    _, _, post, _, _, (samples, _) = trained
    outputs = {"pred_logits": torch.randn(2, 10, 7), "pred_boxes": torch.rand(2, 10, 4)}
    sizes = torch.tensor([[96, 100], [80, 96]])
    reduced = {k: v.bfloat16() for k, v in outputs.items()}
    want = post["bbox"]({k: v.float() for k, v in reduced.items()}, sizes)
    got = post["bbox"](reduced, sizes)
    for w, g in zip(want, got):
        assert g["scores"].dtype is torch.float32 and g["boxes"].dtype is torch.float32
        assert all(torch.equal(w[k], g[k]) for k in w)


def test_the_export_path_is_float32(coco, tmp_path):
    """A checkpoint trained in bf16 (or upstream's --use_fp16) rebuilds in fp32 for inference and export; the
    export refuses a reduced precision instead of ignoring it."""
    pytest.importorskip("onnx")
    from models.trained_model import trained_model

    model, _, _ = build_model(parse(tiny_flags(coco)))
    for saved in (["--amp", "bf16"], ["--use_fp16"]):
        path = tmp_path / "model.pth"
        save_checkpoint({"model": model.state_dict(), "args": parse(tiny_flags(coco, *saved))}, path)
        _, _, model_args = trained_model(["--resume", str(path)], device="cpu")
        assert (model_args.amp, model_args.use_fp16) == ("fp32", False)
        assert trained_model(["--resume", str(path), "--amp", "bf16"])[2].amp == "bf16"
    export = __import__("runpy").run_path(str(ROOT / "tools" / "export_onnx.py"))["main"]
    with pytest.raises(ValueError, match="--amp bf16: the export writes the float32 graph"):
        export(["--resume", str(path), "--out", str(tmp_path / "m.onnx"), "--no_check", "--amp", "bf16"])
