"""--compile (models/compile.py): torch.compile's default backend (inductor) on a small model, in float64, against
the eager model: a hybrid training step (outputs, every loss, every gradient) and an evaluation (outputs and
detections); one graph each, no graph break; the parser flag and the checkpoint keys.

Tolerances: even in a float64 model the position encodings, reference points and valid ratios are computed in
float32 (as upstream's), and inductor fuses those float32 chains (one rounding where eager rounds after each
operation), so compiled and eager agree to float32's precision (6e-8 relative per operation), amplified by the
layers: 1e-6 relative on outputs and losses. A gradient is compared relative to its parameter's largest gradient
(1e-5); the input projections' biases, which a GroupNorm follows, have an exact gradient of zero, so rounding noise
(1e-17) is all they get and an absolute 1e-12 covers them.
"""
import copy

import pytest
import torch
from model_helpers import SMALL, TWO_STAGE_HYBRID, build, hybrid_total, images, parse, perturb, targets

from models.compile import compile_model
from models.ops.functions import extension
from util.torch_release import release

FLAGS = SMALL + TWO_STAGE_HYBRID + ["--backbone", "resnet18", "--no_pretrained_backbone", "--dec_layers", "1"]


def float64(items):
    return [{k: v.double() if v.is_floating_point() else v for k, v in t.items()} for t in items]


def test_compile_flag_is_off_by_default():
    assert parse([]).compile is False and parse(["--compile"]).compile is True


@pytest.mark.xfail(release(torch.__version__) < (2, 14), strict=False,
                   reason="torch 2.11's inductor gives the float64 attention's backward a float32 gradient (a "
                          "float32 compiled step matches eager there); 2.14 passes")
def test_compiled_model_matches_eager_in_training_and_evaluation():
    torch._dynamo.reset()
    model, criterion, postprocessors, args = build(FLAGS)
    perturb(model, scale=0.1)
    model.double()
    eager = copy.deepcopy(model)
    keys = list(model.state_dict())
    assert compile_model(model, "cpu") is model and list(model.state_dict()) == keys  # checkpoints unchanged
    batch = [im.double() for im in images([(64, 96), (80, 64)])]
    tgts = float64(targets([3, 2]))

    results = {}
    for name, net in (("compiled", model), ("eager", eager)):
        net.train()
        outputs = net(batch)
        losses, total = hybrid_total(outputs, copy.deepcopy(tgts), criterion, args)
        total.backward()
        grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
        net.eval()
        with torch.no_grad():
            evaluated = net(batch)
            detections = postprocessors["bbox"](evaluated, torch.tensor([[128, 192], [160, 128]]))
        results[name] = outputs, losses, grads, evaluated, detections
    (outputs, losses, grads, evaluated, detections), reference = results["compiled"], results["eager"]
    ref_outputs, ref_losses, ref_grads, ref_evaluated, ref_detections = reference

    for key in ("pred_logits", "pred_boxes", "pred_logits_one2many", "pred_boxes_one2many"):
        torch.testing.assert_close(outputs[key], ref_outputs[key], rtol=1e-6, atol=1e-6, msg=key)
    assert losses.keys() == ref_losses.keys()
    for key in losses:
        torch.testing.assert_close(losses[key], ref_losses[key], rtol=1e-6, atol=1e-9, msg=key)
    assert grads.keys() == ref_grads.keys() and len(grads) > 100
    for key, grad in grads.items():
        scale = ref_grads[key].abs().max().item()
        assert (grad - ref_grads[key]).abs().max().item() <= 1e-5 * scale + 1e-12, key
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(evaluated[key], ref_evaluated[key], rtol=1e-6, atol=1e-6, msg=key)
    for ours, theirs in zip(detections, ref_detections):
        torch.testing.assert_close(ours["scores"], theirs["scores"], rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(ours["boxes"], theirs["boxes"], rtol=1e-6, atol=1e-5)  # pixels


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_one_graph_without_breaks(training):
    """The model's forward is one graph in training and in evaluation (dynamo's explain: no compilation)."""
    model, _, _, _ = build(FLAGS)
    model.train(training)
    extension.compiled_extension(torch.device("cpu"))  # loaded first, as compile_model() does
    with torch.set_grad_enabled(training):
        explained = torch._dynamo.explain(model)(images([(64, 96), (80, 64)]))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
