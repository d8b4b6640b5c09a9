"""The model on (fake) CUDA tensors through the default dispatch, without a GPU: R50, Swin-T and ViT-B, in float32
and under bfloat16 / float16 autocast, a hybrid training step (losses, backward, the fused AdamW step) and an
evaluation (losses, post-processing, flip and multi-scale TTA); the same with the PyTorch path forced.

The tensors are FakeTensors (tests/fake_cuda.py): every operator runs its fake kernel (for deformable attention the
registered op's, hdetr::ms_deform_attn and its backward), a branch on tensor data fails, and each host read of
device data is recorded by caller. Three host computations need real numbers and are stood in for here, each a
documented host read (HOST_READS): the Hungarian assignment (scipy) gets a fixed assignment, GIoU's degenerate-box
check is skipped, TTA's soft box voting returns the passes' detections concatenated.

The transformers are small (1 encoder, 1 decoder layer, hidden 32); the backbones are the real R50, Swin-T (two
blocks in its first stage, one in the others: both window shifts, every patch merging) and ViT-B.
"""
import collections
import math

import numpy as np
import pytest
import torch
from fake_cuda import fake_cuda, meta_copy, recording_host_reads, run_backward, to_fake_cuda
from model_helpers import SMALL, TWO_STAGE_HYBRID, build, hybrid_total
from op_helpers import force_pytorch_path

import datasets.tta
import models.matcher
import util.box_ops
from datasets.tta import TestTimeAugmentation, TTAScale
from main import build_optimizer
from models.ops.functions import ms_deform_attn_compiled, ms_deform_attn_func
from models.swin_transformer import SWIN_VARIANTS
from util.misc import nested_tensor_from_tensor_list

# Every host read of device data in a training step and an evaluation ("file:function", method) and why; the
# tests below fail when the model, the losses or the post-processing read device data anywhere else.
HOST_READS = {
    ("models/matcher.py:forward", "cpu"):
        "the Hungarian assignment runs on the host (scipy), as upstream's: one transfer of all images' costs",
    ("models/criterion.py:_average_num_boxes", "item"):
        "the losses' normaliser (targets per process, all-reduced) is a Python float, as upstream's",
    ("util/box_ops.py:_check_boxes", "__bool__"):
        "GIoU refuses degenerate or non-finite boxes with a clear error (upstream asserts the same): one read per "
        "call, in the matcher and the losses",
    ("datasets/tta.py:__call__", "cpu"):
        "TTA's soft box voting is a greedy, sequential merge: it runs on the host after all passes of a batch",
    ("datasets/tta.py:__call__", "__index__"):
        "TTA's flipped identity pass crops each padded image to its size, read from the target (two reads an image; "
        "not exercised here: fake tensors have no values to slice with, so the test gives the sizes on the host)",
}
TRAIN_READS = {key for key in HOST_READS if key[0] != "datasets/tta.py:__call__"}
EVAL_READS = set(HOST_READS) - {("datasets/tta.py:__call__", "__index__")}

BACKBONES = {
    "r50": ["--backbone", "resnet50"],
    "swin_t": ["--backbone", "swin_tiny"],
    "vit_b": ["--backbone", "vit_base"],
}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
FLAGS = SMALL + TWO_STAGE_HYBRID + ["--no_pretrained_backbone", "--enc_layers", "1", "--dec_layers", "1"]
SIZES = [(64, 96), (80, 64)]  # (h, w) of the batch's two images
NUM_BOXES = [3, 2]


@pytest.fixture(scope="module")
def models_without_data():
    """(model, criterion, postprocessors, args) per backbone, built once, parameters on the meta device."""
    built = {}
    with pytest.MonkeyPatch.context() as patch:
        embed_dim, _, heads, window, image_size = SWIN_VARIANTS["swin_tiny"]
        patch.setitem(SWIN_VARIANTS, "swin_tiny", (embed_dim, (2, 1, 1, 1), heads, window, image_size))
        for name, flags in BACKBONES.items():
            model, criterion, postprocessors, args = build(FLAGS + flags)
            built[name] = meta_copy(model), meta_copy(criterion), postprocessors, args
    return built


@pytest.fixture
def stand_ins(monkeypatch):
    """The host computations that need real numbers, stood in for; each records the host read it stands for."""
    reads = collections.Counter()

    def fixed_assignment(cost):  # a valid assignment of min(Q, T) pairs, whatever the costs
        n = min(cost.shape)
        return np.arange(n), np.arange(n)[::-1].copy()

    def check_boxes(boxes, name):
        reads[("util/box_ops.py:_check_boxes", "__bool__")] += boxes.device.type == "cuda"

    def concatenated(detections, vote_iou, max_dets):
        assert all(v.device.type == "cpu" for d in detections for v in d.values())
        return {k: torch.cat([d[k] for d in detections]) for k in ("scores", "labels", "boxes")}

    monkeypatch.setattr(models.matcher, "linear_sum_assignment", fixed_assignment)
    monkeypatch.setattr(util.box_ops, "_check_boxes", check_boxes)
    monkeypatch.setattr(datasets.tta, "merge_detections", concatenated)
    return reads


def counting_compiled_op(monkeypatch):
    calls = []

    def counting(*args):
        calls.append(args[0].device.type)
        return ms_deform_attn_compiled(*args)

    monkeypatch.setattr(ms_deform_attn_func, "ms_deform_attn_compiled", counting)
    return calls


def batch():
    """Images and targets on the fake CUDA device, but "size" on the host (see HOST_READS)."""
    images = [torch.randn(3, h, w, device="cuda") for h, w in SIZES]
    targets = [{"labels": torch.randint(0, 91, (n,), device="cuda"),
                "boxes": torch.cat([torch.rand(n, 2, device="cuda") * 0.4 + 0.3,
                                    torch.rand(n, 2, device="cuda") * 0.2 + 0.1], 1),
                "size": size, "orig_size": torch.tensor(size, device="cuda") * 2}
               for n, size in zip(NUM_BOXES, SIZES)]
    return images, targets


def autocast(dtype):
    return torch.autocast("cuda", dtype=dtype or torch.float16, enabled=dtype is not None)


CASES = [pytest.param(backbone, precision, path, id=f"{backbone}-{precision}-{path}")
         for path in ("default", "pytorch_path") for backbone in BACKBONES for precision in PRECISIONS]


def prepare_case(monkeypatch, path, precision):
    """Force the PyTorch path when asked; return (the list that records compiled-op calls, autocast dtype)."""
    if path == "pytorch_path":
        force_pytorch_path(monkeypatch)
    return counting_compiled_op(monkeypatch), PRECISIONS[precision]


@pytest.mark.parametrize("backbone,precision,path", CASES)
def test_training_step_on_fake_cuda(models_without_data, stand_ins, monkeypatch, backbone, precision, path):
    meta_model, meta_criterion, _, args = models_without_data[backbone]
    op_calls, dtype = prepare_case(monkeypatch, path, precision)
    reads = stand_ins
    with fake_cuda(monkeypatch):
        model, criterion = to_fake_cuda(meta_model).train(), to_fake_cuda(meta_criterion)
        optimizer = build_optimizer(args, model)[0]
        images, targets = batch()
        with recording_host_reads(reads):
            with autocast(dtype):
                outputs = model(images)
                loss_dict, total = hybrid_total(outputs, targets, criterion, args)
            run_backward(total)
            optimizer.step()
        assert outputs["pred_logits"].device.type == "cuda"
        assert outputs["pred_logits"].dtype == (dtype or torch.float32)
        assert total.dtype == torch.float32 and total.shape == ()
        assert {"loss_ce_one2many", "loss_bbox_one2many", "loss_giou"} <= set(loss_dict)
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        missing = [n for n, p in trained if p.grad is None]
        assert not missing, missing[:5]
        assert all(p.grad.device.type == "cuda" and p.grad.dtype == p.dtype for _, p in trained)
    attention_layers = args.enc_layers + args.dec_layers
    assert op_calls == (["cuda"] * attention_layers if path == "default" else [])
    assert set(reads) == TRAIN_READS, set(reads) ^ TRAIN_READS


@pytest.mark.parametrize("backbone,precision,path", CASES)
def test_evaluation_with_tta_on_fake_cuda(models_without_data, stand_ins, monkeypatch, backbone, precision, path):
    meta_model, meta_criterion, postprocessors, args = models_without_data[backbone]
    op_calls, dtype = prepare_case(monkeypatch, path, precision)
    reads = stand_ins
    post = postprocessors["bbox"]
    tta = TestTimeAugmentation(post, flip=True, max_dets=50,
                               scales=[TTAScale(48, 80, 0, 64), TTAScale(96, 144, 16, math.inf)])
    with fake_cuda(monkeypatch):
        model, criterion = to_fake_cuda(meta_model).eval(), to_fake_cuda(meta_criterion).eval()
        images, targets = batch()
        samples = nested_tensor_from_tensor_list(images)
        views = [[(torch.zeros(3, s.scale, s.scale * 3 // 2, dtype=torch.uint8), s) for s in tta.scales]
                 for _ in images]
        with recording_host_reads(reads), torch.no_grad(), autocast(dtype):
            outputs = model(samples)
            losses = criterion(outputs, targets)
            results = post(outputs, torch.stack([t["orig_size"] for t in targets]))
            merged = tta(model, samples, targets, results, views)
        assert outputs["pred_boxes"].device.type == "cuda" and "pred_logits_one2many" not in outputs
        assert all(torch.is_tensor(v) and v.shape == () for v in losses.values() if torch.is_tensor(v))
        assert [r["boxes"].shape for r in results] == [(args.topk, 4)] * len(images)
        assert all(r["boxes"].device.type == "cuda" and r["boxes"].dtype == torch.float32 for r in results)
        assert len(merged) == len(images) and all(m["boxes"].device.type == "cpu" for m in merged)
    passes = 1 + 2 * (1 + len(tta.scales)) - 1  # identity, its flip, each scale and its flip
    attention_layers = args.enc_layers + args.dec_layers
    assert op_calls == (["cuda"] * attention_layers * passes if path == "default" else [])
    assert set(reads) == EVAL_READS, set(reads) ^ EVAL_READS
