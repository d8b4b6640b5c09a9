"""CocoEvaluator: perfect, empty and wrong-class detections; merging of duplicated images across processes."""
import pytest
import torch

import datasets.coco_eval as coco_eval_module
from datasets.coco import load_coco_api
from datasets.coco_eval import CocoEvaluator
from datasets.synthetic import make_synthetic_coco


@pytest.fixture(scope="module")
def coco_gt(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    make_synthetic_coco(root, 0, 6, image_size=64, seed=5)
    return load_coco_api(root / "annotations" / "instances_val2017.json")


def ground_truth_predictions(coco_gt, image_ids, label_shift=0):
    """Ground-truth boxes as detections with score 1 (labels shifted to a wrong class if asked)."""
    predictions = {}
    num_classes = len(coco_gt.getCatIds())
    for image_id in image_ids:
        anns = coco_gt.imgToAnns[image_id]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        labels = torch.tensor([(a["category_id"] - 1 + label_shift) % num_classes + 1 for a in anns])
        predictions[image_id] = {"scores": torch.ones(len(anns)), "labels": labels, "boxes": boxes}
    return predictions


def empty_predictions(image_ids):
    return {i: {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
                "boxes": torch.zeros(0, 4)} for i in image_ids}


def evaluate(evaluator):
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    evaluator.summarize()
    return evaluator.coco_eval["bbox"].stats


def test_perfect_detections_score_one(coco_gt, capsys):
    evaluator = CocoEvaluator(coco_gt, ["bbox"])
    image_ids = coco_gt.getImgIds()
    evaluator.update(ground_truth_predictions(coco_gt, image_ids[:3]))
    evaluator.update(ground_truth_predictions(coco_gt, image_ids[3:]))
    stats = evaluate(evaluator)
    assert stats[0] == pytest.approx(1.0) and stats[1] == pytest.approx(1.0)
    printed = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in printed
    assert "DONE" not in printed and "Running per image" not in printed


def test_no_predictions_score_zero(coco_gt):
    evaluator = CocoEvaluator(coco_gt, ["bbox"])
    evaluator.update(empty_predictions(coco_gt.getImgIds()))
    stats = evaluate(evaluator)
    assert stats[0] == 0 and stats[1] == 0


def test_no_update_at_all_does_not_crash(coco_gt):
    stats = evaluate(CocoEvaluator(coco_gt, ["bbox"]))
    assert len(stats) == 12 and stats[0] <= 0


def test_wrong_class_scores_zero(coco_gt):
    evaluator = CocoEvaluator(coco_gt, ["bbox"])
    evaluator.update(ground_truth_predictions(coco_gt, coco_gt.getImgIds(), label_shift=1))
    stats = evaluate(evaluator)
    assert stats[0] == 0 and stats[1] == 0


def test_half_the_images_detected(coco_gt):
    evaluator = CocoEvaluator(coco_gt, ["bbox"])
    image_ids = coco_gt.getImgIds()
    evaluator.update(ground_truth_predictions(coco_gt, image_ids[:3]))
    evaluator.update(empty_predictions(image_ids[3:]))
    stats = evaluate(evaluator)
    assert 0 < stats[0] < 1


def test_duplicated_images_across_processes_count_once(coco_gt, monkeypatch):
    image_ids = coco_gt.getImgIds()
    # a padded distributed sampler gave images 0-3 to one process and 3-5 plus 0 again to the other
    process_a = CocoEvaluator(coco_gt, ["bbox"])
    process_a.update(ground_truth_predictions(coco_gt, image_ids[:4]))
    process_b = CocoEvaluator(coco_gt, ["bbox"])
    process_b.update(ground_truth_predictions(coco_gt, image_ids[3:] + image_ids[:1]))
    gathered = [process_a.detections, process_b.detections]
    monkeypatch.setattr(coco_eval_module, "all_gather", lambda data: gathered)

    stats = evaluate(process_a)
    assert process_a.img_ids == sorted(image_ids)
    num_detections = sum(len(coco_gt.imgToAnns[i]) for i in image_ids)
    assert len(process_a.coco_eval["bbox"].cocoDt.anns) == num_detections
    assert stats[0] == pytest.approx(1.0)


def test_unsupported_iou_type(coco_gt):
    with pytest.raises(ValueError, match="segm"):
        CocoEvaluator(coco_gt, ["bbox", "segm"])
