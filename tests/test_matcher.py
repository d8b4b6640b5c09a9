"""HungarianMatcher against a brute-force search over all assignments, with the cost written out here."""
import itertools
import math

import pytest
import torch
from model_helpers import giou_cxcywh

from models.matcher import HungarianMatcher

WEIGHTS = dict(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)



def _pair_cost(logits, box, label, target_box, alpha=0.25, gamma=2.0):
    """Matching cost of one query against one target: focal class cost + L1 + -GIoU, weighted."""
    p = 1 / (1 + math.exp(-logits[label]))
    positive = alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
    negative = (1 - alpha) * p ** gamma * -math.log(1 - p + 1e-8)
    l1 = sum(abs(x - y) for x, y in zip(box, target_box))
    return (WEIGHTS["cost_class"] * (positive - negative) + WEIGHTS["cost_bbox"] * l1
            - WEIGHTS["cost_giou"] * giou_cxcywh(box, target_box))


def _brute_force(logits, boxes, labels, target_boxes):
    """Minimum total cost over all one-to-one assignments of min(Q, T) pairs, and the best pairs."""
    num_queries, num_targets = len(boxes), len(target_boxes)
    cost = [[_pair_cost(logits[q], boxes[q], labels[t], target_boxes[t]) for t in range(num_targets)]
            for q in range(num_queries)]
    best = (math.inf, None)
    if num_queries >= num_targets:  # every target gets a distinct query
        for queries in itertools.permutations(range(num_queries), num_targets):
            total = sum(cost[q][t] for t, q in enumerate(queries))
            best = min(best, (total, sorted(zip(queries, range(num_targets)))))
    else:  # every query gets a distinct target
        for tgts in itertools.permutations(range(num_targets), num_queries):
            total = sum(cost[q][t] for q, t in enumerate(tgts))
            best = min(best, (total, sorted(zip(range(num_queries), tgts))))
    return best[0], best[1], cost


def _random_case(gen, batch, num_queries, target_counts, num_classes=7):
    outputs = {"pred_logits": torch.randn(batch, num_queries, num_classes, generator=gen) * 2,
               "pred_boxes": torch.cat([0.2 + 0.6 * torch.rand(batch, num_queries, 2, generator=gen),
                                        0.05 + 0.3 * torch.rand(batch, num_queries, 2, generator=gen)], -1)}
    targets = [{"labels": torch.randint(0, num_classes, (n,), generator=gen),
                "boxes": torch.cat([0.2 + 0.6 * torch.rand(n, 2, generator=gen),
                                    0.05 + 0.3 * torch.rand(n, 2, generator=gen)], -1)} for n in target_counts]
    return outputs, targets


@pytest.mark.parametrize("num_queries,target_counts", [(5, [3, 2]), (4, [4, 1]), (2, [4, 3])])
@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force(seed, num_queries, target_counts):
    gen = torch.Generator().manual_seed(seed)
    outputs, targets = _random_case(gen, len(target_counts), num_queries, target_counts)
    indices = HungarianMatcher(**WEIGHTS)(outputs, targets)
    assert len(indices) == len(targets)
    for b, ((src, tgt), target) in enumerate(zip(indices, targets)):
        assert src.dtype == tgt.dtype == torch.int64
        assert len(src) == len(tgt) == min(num_queries, len(target["labels"]))
        assert len(set(src.tolist())) == len(src) and len(set(tgt.tolist())) == len(tgt)
        best_cost, best_pairs, cost = _brute_force(outputs["pred_logits"][b].tolist(),
                                                   outputs["pred_boxes"][b].tolist(),
                                                   target["labels"].tolist(), target["boxes"].tolist())
        matched_cost = sum(cost[q][t] for q, t in zip(src.tolist(), tgt.tolist()))
        assert matched_cost == pytest.approx(best_cost, abs=1e-4)
        assert sorted(zip(src.tolist(), tgt.tolist())) == best_pairs


def test_empty_targets():
    gen = torch.Generator().manual_seed(0)
    outputs, targets = _random_case(gen, 2, 5, [0, 2])
    indices = HungarianMatcher(**WEIGHTS)(outputs, targets)
    (src0, tgt0), (src1, tgt1) = indices
    assert len(src0) == len(tgt0) == 0 and src0.dtype == torch.int64
    assert len(src1) == len(tgt1) == 2
    # all images empty
    outputs, targets = _random_case(gen, 2, 5, [0, 0])
    assert all(len(s) == len(t) == 0 for s, t in HungarianMatcher(**WEIGHTS)(outputs, targets))


def test_cost_weights_change_the_assignment():
    """A query with the right class but a poor box wins on class cost alone, loses on box cost alone."""
    logits = torch.full((1, 2, 3), -5.0)
    logits[0, 0, 1] = 5.0  # query 0 is confident in class 1
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2]]])
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.7, 0.7, 0.2, 0.2]])}]
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    by_class = HungarianMatcher(cost_class=1, cost_bbox=0, cost_giou=0)(outputs, targets)
    by_box = HungarianMatcher(cost_class=0, cost_bbox=1, cost_giou=1)(outputs, targets)
    assert by_class[0][0].tolist() == [0]
    assert by_box[0][0].tolist() == [1]
    with pytest.raises(ValueError):
        HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=0)
