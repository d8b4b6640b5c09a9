"""Box conversions, IoU and generalized IoU against hand-computed values."""
import math

import pytest
import torch

from util import box_ops


def test_cxcywh_to_xyxy_by_hand():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [1.0, 2.0, 4.0, 2.0]])
    expected = torch.tensor([[0.4, 0.3, 0.6, 0.7], [-1.0, 1.0, 3.0, 3.0]])
    torch.testing.assert_close(box_ops.box_cxcywh_to_xyxy(boxes), expected)
    torch.testing.assert_close(box_ops.box_xyxy_to_cxcywh(expected), boxes)


def test_conversions_round_trip():
    gen = torch.Generator().manual_seed(0)
    cxcywh = torch.cat([torch.rand(50, 2, generator=gen), 0.01 + torch.rand(50, 2, generator=gen)], 1)
    torch.testing.assert_close(box_ops.box_xyxy_to_cxcywh(box_ops.box_cxcywh_to_xyxy(cxcywh)), cxcywh)
    xyxy = box_ops.box_cxcywh_to_xyxy(cxcywh)
    torch.testing.assert_close(box_ops.box_cxcywh_to_xyxy(box_ops.box_xyxy_to_cxcywh(xyxy)), xyxy)
    # leading batch dimensions are kept
    assert box_ops.box_cxcywh_to_xyxy(cxcywh.view(5, 10, 4)).shape == (5, 10, 4)


def test_iou_and_giou_of_overlapping_boxes():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    iou, union = box_ops.box_iou(a, b)
    # intersection 1, union 4 + 4 - 1 = 7, enclosing box 3 x 3 = 9
    assert iou.item() == pytest.approx(1 / 7)
    assert union.item() == pytest.approx(7)
    assert box_ops.generalized_box_iou(a, b).item() == pytest.approx(1 / 7 - 2 / 9)


def test_giou_of_disjoint_boxes_is_negative():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[2.0, 0.0, 3.0, 1.0]])
    assert box_ops.box_iou(a, b)[0].item() == 0
    # enclosing box 3 x 1, union 2: GIoU = 0 - 1/3
    giou = box_ops.generalized_box_iou(a, b).item()
    assert giou == pytest.approx(-1 / 3) and giou < 0


def test_giou_of_identical_boxes_is_one():
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.9], [0.0, 0.0, 1.0, 1.0]])
    giou = box_ops.generalized_box_iou(boxes, boxes)
    torch.testing.assert_close(torch.diag(giou), torch.ones(2))


def test_pairwise_shapes_and_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [5.0, 5.0, 6.0, 7.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 1.0, 1.0]])
    giou = box_ops.generalized_box_iou(a, b)
    assert giou.shape == (3, 2)
    # [0,0,1,1] inside [0,0,2,2]: IoU 1/4, enclosing = union
    assert giou[0, 1].item() == pytest.approx(0.25)
    assert giou[1, 1].item() == pytest.approx(1.0)
    # [5,5,6,7] vs [0,0,1,1]: union 3, enclosing 6 x 7 = 42
    assert giou[2, 1].item() == pytest.approx(-(42 - 3) / 42)
    assert ((giou >= -1) & (giou <= 1)).all()


@pytest.mark.parametrize("bad", [[0.5, 0.0, 0.4, 1.0], [0.0, 0.6, 1.0, 0.5], [math.nan, 0.0, 1.0, 1.0]],
                         ids=["x1<x0", "y1<y0", "nan"])
def test_degenerate_boxes_are_rejected(bad):
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    bad = torch.tensor([bad])
    with pytest.raises(ValueError, match="degenerate"):
        box_ops.generalized_box_iou(bad, good)
    with pytest.raises(ValueError, match="degenerate"):
        box_ops.generalized_box_iou(good, bad)


def test_zero_size_box_is_accepted():
    """A point box (x1 == x0) is not degenerate in upstream's sense; inside a box its IoU and GIoU are 0."""
    point = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert box_ops.generalized_box_iou(point, box).item() == pytest.approx(0.0)
    # outside: enclosing box [0, 0, 2, 2] of area 4, union 1
    far = torch.tensor([[2.0, 2.0, 2.0, 2.0]])
    assert box_ops.generalized_box_iou(far, box).item() == pytest.approx(-3 / 4)
