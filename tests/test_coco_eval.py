"""CocoEvaluator: perfect, empty and wrong-class detections; merging of duplicated images across processes; the
summary (pycocotools' numbers) at COCO's maxDets or at a raised --topk, and the warning for dense images."""
import json
import warnings

import pytest
import torch

import datasets.coco_eval as coco_eval_module
from datasets.coco import load_coco_api
from datasets.coco_eval import CocoEvaluator, warn_if_capped
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


# ------------------------------------------------------------------------------------------ the summary and maxDets


def dense_coco(tmp_path, objects=150, categories=1):
    """One 200 x 200 image holding `objects` small disjoint boxes, of `categories` categories in turn."""
    boxes = [[(i % 15) * 13.0, (i // 15) * 13.0, 10.0, 10.0] for i in range(objects)]
    data = {"images": [{"id": 1, "file_name": "dense.jpg", "width": 200, "height": 200}],
            "categories": [{"id": c + 1, "name": f"dot{c}"} for c in range(categories)],
            "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1 + i % categories, "bbox": box,
                             "area": 100.0, "iscrowd": 0} for i, box in enumerate(boxes)]}
    path = tmp_path / "dense.json"
    path.write_text(json.dumps(data))
    return load_coco_api(path)


def test_the_summary_is_pycocotools_own_at_cocos_maxdets(coco_gt, capsys):
    """The 12 numbers and the printed table are COCOeval.summarize's, bit for bit, with the default maxDets."""
    gen = torch.Generator().manual_seed(0)
    predictions = ground_truth_predictions(coco_gt, coco_gt.getImgIds())
    for prediction in predictions.values():
        prediction["boxes"] += torch.randn(prediction["boxes"].shape, generator=gen) * 3
        prediction["scores"] = torch.rand(len(prediction["scores"]), generator=gen)
    evaluator = CocoEvaluator(coco_gt, ["bbox"])
    evaluator.update(predictions)
    evaluator.accumulate()
    evaluator.summarize()
    ours = capsys.readouterr().out
    coco_eval = evaluator.coco_eval["bbox"]
    assert coco_eval.params.maxDets == [1, 10, 100]
    stats = evaluator.stats().copy()
    assert 0.1 < stats[0] < 0.9
    coco_eval.summarize()  # pycocotools' own
    theirs = capsys.readouterr().out
    assert stats.tolist() == coco_eval.stats.tolist()
    assert ours == "IoU metric: bbox\n" + theirs


def test_dense_images_are_reported_and_topk_raises_maxdets(tmp_path):
    """COCO's maxDets counts detections per image and category: 150 objects of one class are capped at 100."""
    coco = dense_coco(tmp_path, objects=150)
    with pytest.warns(UserWarning, match=r"1 of the 1 evaluated images have more ground-truth boxes than the 100 "
                                         r"detections kept per image \(--topk\), up to 150: .*--topk 150 lifts the "
                                         r"cap \(above 100 it also raises maxDets"):
        capped = CocoEvaluator(coco, ["bbox"])
    capped_stats = evaluate_all(capped, coco)
    assert capped_stats[0] < 0.7 and capped_stats[8] == pytest.approx(100 / 150)  # AR@100: 100 of 150 found
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        raised = CocoEvaluator(coco, ["bbox"], topk=150)
    assert raised.coco_eval["bbox"].params.maxDets == [1, 10, 100, 150]
    stats = evaluate_all(raised, coco)
    assert stats[0] == pytest.approx(1.0) and stats[8] == pytest.approx(1.0)
    assert stats[6] == pytest.approx(1 / 150) and stats[7] == pytest.approx(10 / 150)  # AR@1, AR@10 as COCO's
    assert raised.coco_eval["bbox"].eval["precision"][..., 0, 2].mean() == pytest.approx(capped_stats[0])  # at 100
    assert CocoEvaluator(coco_gt=dense_coco(tmp_path, 5), iou_types=["bbox"], topk=50).coco_eval[
        "bbox"].params.maxDets == [1, 10, 100]  # fewer than 100 kept: COCO's maxDets


def test_images_with_more_objects_than_topk_are_reported(tmp_path):
    """The model keeps --topk detections per image over all categories: 120 objects of two categories (60 each,
    under COCO's 100 per category) were capped at 100 found (AP 0.83 for perfect detections) without a word."""
    coco = dense_coco(tmp_path, objects=120, categories=2)
    with pytest.warns(UserWarning, match=r"1 of the 1 evaluated images have more ground-truth boxes than the 100 "
                                         r"detections kept per image \(--topk\), up to 120"):
        CocoEvaluator(coco, ["bbox"])
    with pytest.warns(UserWarning, match=r"than the 50 detections kept per image \(--topk\), up to 120: .*--topk 120"):
        CocoEvaluator(coco, ["bbox"], topk=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CocoEvaluator(coco, ["bbox"], topk=120)
    # fewer one-to-one queries than --topk: the queries cap what the model finds, and raising --topk does not help
    with pytest.warns(UserWarning, match=r"than the 110 boxes the model predicts per image \(--num_queries_one2one\), "
                                         r"up to 120: .*a model with more one-to-one queries lifts the cap$"):
        CocoEvaluator(coco, ["bbox"], topk=300, queries=110)
    with pytest.warns(UserWarning, match=r"than the 50 detections kept per image \(--topk\)"):
        CocoEvaluator(coco, ["bbox"], topk=50, queries=110)  # the tighter of the two
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CocoEvaluator(coco, ["bbox"], topk=300, queries=120)
    # finished results (tools): the cap per image and category, 60 each
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_capped(coco, 100)
    with pytest.warns(UserWarning, match="more ground-truth boxes of one category than the 50 detections per image "
                                         r"and category COCO's AP counts \(maxDets\), up to 60"):
        warn_if_capped(coco, 50)


def evaluate_all(evaluator, coco):
    evaluator.update(ground_truth_predictions(coco, coco.getImgIds()))
    evaluator.accumulate()
    evaluator.summarize(table=False)
    return evaluator.stats()


def test_the_table_names_the_raised_maxdets(tmp_path, capsys):
    coco = dense_coco(tmp_path, objects=120)
    evaluator = CocoEvaluator(coco, ["bbox"], topk=300)
    evaluator.update(ground_truth_predictions(coco, coco.getImgIds()))
    evaluator.accumulate()
    evaluator.summarize()
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=300 ] = 1.000"
    assert lines[9] == " Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=300 ] = 1.000"
    assert lines[13].startswith(" Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.")
    assert lines[13].endswith("(COCO's maxDets, as upstream's --topk 300 results)") and len(lines) == 14
