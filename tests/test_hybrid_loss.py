"""The hybrid loss (models.criterion.HybridCriterion, and upstream's entry engine.train_hybrid): the one-to-many
group trained against k-times repeated targets, scaled by lambda; the weighted sum; the branch switched off."""
import copy

import pytest
import torch
from model_helpers import SMALL, TWO_STAGE_HYBRID, build, images, targets

import engine
from models.criterion import HybridCriterion, SetCriterion, weighted_losses
from models.matcher import HungarianMatcher

TERMS = ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error")
WEIGHTED = ("loss_ce", "loss_bbox", "loss_giou")


def _group(gen, batch, num_queries, num_classes=7):
    return {"pred_logits": torch.randn(batch, num_queries, num_classes, generator=gen),
            "pred_boxes": torch.cat([0.2 + 0.6 * torch.rand(batch, num_queries, 2, generator=gen),
                                     0.05 + 0.3 * torch.rand(batch, num_queries, 2, generator=gen)], -1)}


def _hybrid_outputs(seed=0, q1=4, q2=12, aux_layers=2):
    """Outputs shaped like the model's: one-to-one and one-to-many groups, aux layers, encoder proposals."""
    gen = torch.Generator().manual_seed(seed)
    one2one, one2many = _group(gen, 2, q1), _group(gen, 2, q2)
    return {"pred_logits": one2one["pred_logits"], "pred_boxes": one2one["pred_boxes"],
            "pred_logits_one2many": one2many["pred_logits"], "pred_boxes_one2many": one2many["pred_boxes"],
            "aux_outputs": [_group(gen, 2, q1) for _ in range(aux_layers)],
            "aux_outputs_one2many": [_group(gen, 2, q2) for _ in range(aux_layers)],
            "enc_outputs": _group(gen, 2, 30)}


def _criterion():
    return SetCriterion(7, HungarianMatcher(2, 5, 2), {}, ["labels", "boxes", "cardinality"])


class SpyCriterion:
    """Records every call's outputs and targets, then delegates to the real criterion."""

    def __init__(self, criterion):
        self.criterion = criterion
        self.weight_dict = criterion.weight_dict
        self.calls = []

    def __call__(self, outputs, tgts, **kwargs):
        self.calls.append((outputs, copy.deepcopy(tgts)))
        return self.criterion(outputs, tgts, **kwargs)


def test_one2many_group_gets_repeated_targets():
    outputs = _hybrid_outputs()
    tgts = targets([2, 3], num_classes=7)
    original = copy.deepcopy(tgts)
    spy = SpyCriterion(_criterion())
    engine.train_hybrid(outputs, tgts, 3, spy, 1.0)
    assert len(spy.calls) == 2
    (first_out, first_tgts), (second_out, second_tgts) = spy.calls
    assert first_out is outputs
    for seen, t in zip(first_tgts, original):
        assert torch.equal(seen["labels"], t["labels"]) and torch.equal(seen["boxes"], t["boxes"])
    assert second_out["pred_logits"] is outputs["pred_logits_one2many"]
    assert second_out["pred_boxes"] is outputs["pred_boxes_one2many"]
    assert second_out["aux_outputs"] is outputs["aux_outputs_one2many"]
    assert "enc_outputs" not in second_out
    for seen, t in zip(second_tgts, original):
        assert torch.equal(seen["labels"], t["labels"].repeat(3))
        assert torch.equal(seen["boxes"], t["boxes"].repeat(3, 1))
    for t, o in zip(tgts, original):  # the caller's targets are not modified
        assert torch.equal(t["boxes"], o["boxes"]) and torch.equal(t["labels"], o["labels"])


def test_one2many_terms_scale_with_lambda():
    outputs = _hybrid_outputs(seed=1)
    tgts = targets([2, 1], num_classes=7)
    full = engine.train_hybrid(outputs, copy.deepcopy(tgts), 2, _criterion(), 1.0)
    half = engine.train_hybrid(outputs, copy.deepcopy(tgts), 2, _criterion(), 0.5)
    assert full.keys() == half.keys()
    one2many = [k for k in full if k.endswith("_one2many")]
    assert len(one2many) == len(TERMS) * 3 + 1  # final + 2 aux layers, and class_error
    for key in full:
        expected = full[key] * 0.5 if key.endswith("_one2many") else full[key]
        torch.testing.assert_close(half[key], expected, msg=key)
    # unscaled: the criterion on the one-to-many group against the repeated targets
    repeated = [{"labels": t["labels"].repeat(2), "boxes": t["boxes"].repeat(2, 1)} for t in tgts]
    direct = _criterion()({"pred_logits": outputs["pred_logits_one2many"],
                           "pred_boxes": outputs["pred_boxes_one2many"],
                           "aux_outputs": outputs["aux_outputs_one2many"]}, repeated)
    for key, value in direct.items():
        torch.testing.assert_close(full[key + "_one2many"], value, msg=key)


def test_loss_keys_of_a_hybrid_model():
    """<term>, <term>_0.._{D-2} and <term>_enc for the one-to-one group; <term>_one2many and
    <term>_<i>_one2many for the one-to-many group (no encoder terms there)."""
    model, criterion, _, args = build(SMALL + TWO_STAGE_HYBRID + ["--dec_layers", "3"])
    model.train()
    out = model(images([(64, 96), (64, 64)]))
    losses = engine.train_hybrid(out, targets([2, 1]), args.k_one2many, criterion, args.lambda_one2many)
    expected = {"class_error", "class_error_one2many"}
    for term in TERMS:
        expected |= {term, f"{term}_0", f"{term}_1", f"{term}_enc",
                     f"{term}_one2many", f"{term}_0_one2many", f"{term}_1_one2many"}
    assert set(losses) == expected


def test_weight_dict_carries_both_groups():
    _, criterion, _, _ = build(SMALL + TWO_STAGE_HYBRID + ["--dec_layers", "3", "--cls_loss_coef", "3",
                                                           "--bbox_loss_coef", "4", "--giou_loss_coef", "1.5"])
    coef = {"loss_ce": 3.0, "loss_bbox": 4.0, "loss_giou": 1.5}
    expected = {}
    for suffix in ("", "_0", "_1", "_enc"):
        for term in WEIGHTED:
            expected[term + suffix] = coef[term]
            expected[term + suffix + "_one2many"] = coef[term]
    assert criterion.weight_dict == expected


@pytest.mark.parametrize("k", [1, 4])
def test_number_of_matched_one2many_queries(k):
    """Each target is matched k times in the one-to-many group (enough queries), once in the one-to-one."""
    outputs = _hybrid_outputs(seed=2, q1=6, q2=16, aux_layers=0)
    tgts = targets([3, 2], num_classes=7)
    criterion = _criterion()
    sizes = []
    criterion.matcher.register_forward_hook(lambda m, args, result: sizes.append([len(i) for i, _ in result]))
    engine.train_hybrid(outputs, tgts, k, criterion, 1.0)
    assert sizes[0] == [3, 2]
    assert sizes[-1] == [3 * k, 2 * k]


def test_build_model_returns_the_hybrid_criterion():
    """build_model's criterion knows k_one2many and lambda_one2many: called once, it gives exactly what upstream's
    entry engine.train_hybrid gives (also when handed that same criterion)."""
    model, criterion, _, args = build(SMALL + TWO_STAGE_HYBRID + ["--k_one2many", "3", "--lambda_one2many", "0.5"])
    assert isinstance(criterion, HybridCriterion)
    assert (criterion.k_one2many, criterion.lambda_one2many) == (3, 0.5)
    model.train()
    out = model(images([(64, 96), (64, 64)]))
    tgts = targets([2, 1])
    ours = criterion(out, copy.deepcopy(tgts))
    upstream = engine.train_hybrid(out, copy.deepcopy(tgts), 3, criterion.criterion, 0.5)
    again = engine.train_hybrid(out, copy.deepcopy(tgts), 3, criterion, 0.5)
    assert ours.keys() == upstream.keys() == again.keys()
    assert any(k.endswith("_one2many") for k in ours)
    for key in ours:
        torch.testing.assert_close(ours[key], upstream[key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(ours[key], again[key], rtol=0, atol=0, msg=key)


def test_weighted_losses_is_the_weighted_sum():
    losses = {"loss_ce": torch.tensor(2.0), "loss_bbox": torch.tensor(3.0), "class_error": torch.tensor(50.0)}
    scaled, total = weighted_losses(losses, {"loss_ce": 0.5, "loss_bbox": 2.0, "loss_giou": 9.0})
    assert scaled.keys() == {"loss_ce", "loss_bbox"}  # unweighted terms (class_error) are logged only
    torch.testing.assert_close(scaled["loss_bbox"], torch.tensor(6.0))
    torch.testing.assert_close(total, torch.tensor(7.0))


def test_branch_is_off_without_one2many_queries():
    """--num_queries_one2many 0 with the default --k_one2many 5: no one-to-many outputs, no _one2many terms."""
    model, criterion, _, args = build(SMALL + TWO_STAGE_HYBRID + ["--num_queries_one2many", "0", "--k_one2many", "5"])
    assert args.k_one2many == 5
    model.train()
    out = model(images([(64, 96), (64, 64)]))
    assert not any("one2many" in key for key in out)
    losses = criterion(out, targets([2, 1]))
    assert losses and not any(key.endswith("_one2many") for key in losses)
    assert losses.keys() == engine.train_hybrid(out, targets([2, 1]), 5, criterion, 1.0).keys()


def test_one2many_queries_need_k_one2many():
    with pytest.raises(ValueError, match=r"--num_queries_one2many 20 needs --k_one2many > 0.*got 0"):
        build(SMALL + ["--k_one2many", "0"])


def test_negative_k_one2many_is_rejected():
    with pytest.raises(ValueError, match="k_one2many"):
        HybridCriterion(_criterion(), k_one2many=-1)
