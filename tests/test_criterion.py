"""SetCriterion: focal loss, loss keys, class-agnostic encoder matching, normalisation by the number of boxes."""
import copy
import math

import pytest
import torch
from model_helpers import giou_cxcywh

from models.criterion import SetCriterion, sigmoid_focal_loss
from models.matcher import HungarianMatcher

NUM_CLASSES = 5
LOSSES = ["labels", "boxes", "cardinality"]
TERMS = {"loss_ce", "loss_bbox", "loss_giou", "cardinality_error"}


def make_criterion():
    return SetCriterion(NUM_CLASSES, HungarianMatcher(2, 5, 2), {"loss_ce": 2, "loss_bbox": 5, "loss_giou": 2},
                        LOSSES, focal_alpha=0.25)


def random_outputs(gen, batch, num_queries, num_classes=NUM_CLASSES):
    return {"pred_logits": torch.randn(batch, num_queries, num_classes, generator=gen),
            "pred_boxes": torch.cat([0.2 + 0.6 * torch.rand(batch, num_queries, 2, generator=gen),
                                     0.05 + 0.3 * torch.rand(batch, num_queries, 2, generator=gen)], -1)}


def random_targets(gen, counts):
    return [{"labels": torch.randint(0, NUM_CLASSES, (n,), generator=gen),
             "boxes": torch.cat([0.2 + 0.6 * torch.rand(n, 2, generator=gen),
                                 0.05 + 0.3 * torch.rand(n, 2, generator=gen)], -1)} for n in counts]


def focal_by_element(logit, target, alpha, gamma):
    p = 1 / (1 + math.exp(-logit))
    if target == 1:
        weight = alpha if alpha >= 0 else 1.0
        return -weight * (1 - p) ** gamma * math.log(p)
    weight = 1 - alpha if alpha >= 0 else 1.0
    return -weight * p ** gamma * math.log(1 - p)


@pytest.mark.parametrize("alpha", [0.25, -1])
def test_sigmoid_focal_loss_matches_formula(alpha):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, generator=gen) * 3
    onehot = (torch.rand(2, 4, 3, generator=gen) > 0.7).float()
    num_boxes = 3.0
    total = sum(focal_by_element(x, t, alpha, 2.0) for x, t in zip(logits.flatten().tolist(),
                                                                   onehot.flatten().tolist()))
    expected = total / logits.shape[1] / num_boxes  # mean over queries, sum over the rest, / num_boxes
    got = sigmoid_focal_loss(logits, onehot, num_boxes, alpha=alpha, gamma=2)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_loss_keys_for_aux_and_enc_outputs():
    gen = torch.Generator().manual_seed(1)
    outputs = random_outputs(gen, 2, 6)
    outputs["aux_outputs"] = [random_outputs(gen, 2, 6) for _ in range(2)]
    outputs["enc_outputs"] = random_outputs(gen, 2, 12)
    losses = make_criterion()(outputs, random_targets(gen, [2, 3]))
    expected = TERMS | {"class_error"}
    for suffix in ("_0", "_1", "_enc"):
        expected |= {t + suffix for t in TERMS}
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())


def test_enc_outputs_are_matched_class_agnostically():
    """The encoder proposals are matched and classified as if every target were class 0."""
    gen = torch.Generator().manual_seed(2)
    outputs = random_outputs(gen, 2, 6)
    outputs["enc_outputs"] = random_outputs(gen, 2, 12)
    targets = random_targets(gen, [2, 3])
    targets[0]["labels"] = torch.tensor([3, 4])
    original = copy.deepcopy(targets)
    criterion = make_criterion()
    seen = []

    def spy(module, args):
        outs, tgts = args
        seen.append((outs["pred_logits"].shape[1], [t["labels"].clone() for t in tgts]))

    hook = criterion.matcher.register_forward_pre_hook(spy)
    losses = criterion(outputs, targets)
    hook.remove()
    assert [n for n, _ in seen] == [6, 12]
    assert all((labels == 0).all() for labels in seen[1][1])
    assert torch.equal(seen[0][1][0], torch.tensor([3, 4]))
    for t, o in zip(targets, original):  # the caller's targets are left alone
        assert torch.equal(t["labels"], o["labels"])

    binary = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
    direct = criterion(outputs["enc_outputs"], binary)
    for term in ("loss_ce", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(losses[term + "_enc"], direct[term])


def test_losses_are_normalised_by_the_number_of_boxes():
    gen = torch.Generator().manual_seed(3)
    outputs = random_outputs(gen, 2, 6)
    targets = random_targets(gen, [2, 3])
    criterion = make_criterion()
    losses = criterion(outputs, targets)
    indices = criterion.matcher(outputs, targets)
    num_boxes = 5
    l1, giou_loss = 0.0, 0.0
    onehot = torch.zeros_like(outputs["pred_logits"])
    for b, (src, tgt) in enumerate(indices):
        for q, t in zip(src.tolist(), tgt.tolist()):
            pred, target = outputs["pred_boxes"][b, q], targets[b]["boxes"][t]
            l1 += (pred - target).abs().sum().item()
            giou_loss += 1 - giou_cxcywh(pred.tolist(), target.tolist())
            onehot[b, q, targets[b]["labels"][t]] = 1
    assert losses["loss_bbox"].item() == pytest.approx(l1 / num_boxes, rel=1e-5)
    assert losses["loss_giou"].item() == pytest.approx(giou_loss / num_boxes, rel=1e-5)
    focal = sum(focal_by_element(x, t, 0.25, 2.0) for x, t in zip(outputs["pred_logits"].flatten().tolist(),
                                                                  onehot.flatten().tolist()))
    assert losses["loss_ce"].item() == pytest.approx(focal / num_boxes, rel=1e-5)

    # the same images twice: twice the sums over twice the boxes, the same losses
    doubled = {k: torch.cat([v, v]) for k, v in outputs.items()}
    losses2 = criterion(doubled, targets + targets)
    for term in ("loss_ce", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(losses2[term], losses[term])



def _perfect_outputs(targets, extra=2):
    """Predictions that reproduce each target exactly (class logit 10, others -10) plus background queries."""
    batch = len(targets)
    num_queries = max(len(t["labels"]) for t in targets) + extra
    logits = torch.full((batch, num_queries, NUM_CLASSES), -10.0)
    boxes = torch.tensor([0.9, 0.9, 0.05, 0.05]).repeat(batch, num_queries, 1)
    for b, t in enumerate(targets):
        n = len(t["labels"])
        boxes[b, :n] = t["boxes"]
        logits[b, torch.arange(n), t["labels"]] = 10.0
    return {"pred_logits": logits, "pred_boxes": boxes}


def test_perfect_predictions_give_zero_box_losses_and_class_error():
    gen = torch.Generator().manual_seed(4)
    targets = random_targets(gen, [3, 1])
    losses = make_criterion()(_perfect_outputs(targets), targets)
    assert losses["loss_bbox"].item() == pytest.approx(0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0, abs=1e-6)
    assert losses["class_error"].item() == 0
    assert losses["loss_ce"].item() < 1e-6


def test_class_error_counts_wrong_top_classes():
    gen = torch.Generator().manual_seed(5)
    targets = random_targets(gen, [2, 2])
    outputs = _perfect_outputs(targets)
    # query 0 of image 0 prefers another class (its box still matches it best)
    wrong = (targets[0]["labels"][0] + 1) % NUM_CLASSES
    outputs["pred_logits"][0, 0, wrong] = 12.0
    losses = make_criterion()(outputs, targets)
    assert losses["class_error"].item() == pytest.approx(25.0)


def test_no_targets():
    gen = torch.Generator().manual_seed(6)
    outputs = random_outputs(gen, 2, 4)
    losses = make_criterion()(outputs, random_targets(gen, [0, 0]))
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    focal = sum(focal_by_element(x, 0, 0.25, 2.0) for x in outputs["pred_logits"].flatten().tolist())
    assert losses["loss_ce"].item() == pytest.approx(focal, rel=1e-5)  # num_boxes clamps to 1
