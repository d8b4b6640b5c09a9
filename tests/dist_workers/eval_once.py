"""torchrun worker: a distributed COCO evaluation scores every image exactly once.

Usage: torchrun --nproc_per_node 2 eval_once.py OUT_JSON COCO_ROOT

Each rank reads its share of the val split through ``DistributedSampler(shuffle=False)`` (which pads an
uneven split with repeated images) and gives ``CocoEvaluator`` the ground truth as detections. Their scores
fall with the dataset index, so the extra detections of an image scored twice would be false positives ranked
above other images' true positives and pull AP below 1.
Rank 0 writes what every rank saw (indices, merged image ids, detection count, COCO stats) to OUT_JSON.
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import util.misc as utils  # noqa: E402
from datasets.coco import COCO_SPLITS, CocoDetection  # noqa: E402
from datasets.coco_eval import CocoEvaluator  # noqa: E402
from datasets.samplers import DistributedSampler  # noqa: E402


def perfect_prediction(target, score):
    """The target's boxes (absolute xyxy in the original image, no transforms applied) and labels."""
    scores = torch.full((len(target["labels"]),), score)
    return {"boxes": target["boxes"], "labels": target["labels"], "scores": scores}


def main():
    out_path, coco_root = Path(sys.argv[1]), Path(sys.argv[2])
    args = argparse.Namespace(device="cpu")
    utils.init_distributed_mode(args)
    assert args.distributed and args.dist_backend == "gloo", "expected a gloo process group on the CPU"

    img_folder, ann_file = COCO_SPLITS["val"]
    dataset = CocoDetection(coco_root / img_folder, coco_root / ann_file)  # no transforms: original sizes
    sampler = DistributedSampler(dataset, shuffle=False)
    indices = list(sampler)
    evaluator = CocoEvaluator(dataset.coco, ("bbox",))
    for index in indices:
        _, target = dataset[index]
        score = 1.0 - 0.5 * index / len(dataset)
        evaluator.update({target["image_id"].item(): perfect_prediction(target, score)})
    local_ids = evaluator.img_ids
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    evaluator.summarize()

    report = {
        "rank": utils.get_rank(),
        "indices": [int(i) for i in indices],
        "local_image_ids": [int(i) for i in local_ids],
        "merged_image_ids": [int(i) for i in evaluator.img_ids],
        "evaluated_image_ids": [int(i) for i in evaluator.coco_eval["bbox"].params.imgIds],
        "num_detections": sum(len(d) for d in evaluator.detections.values()),
        "num_ground_truth": len(dataset.coco.getAnnIds()),
        "all_image_ids": sorted(int(i) for i in dataset.coco.getImgIds()),
        "stats": evaluator.stats().tolist(),
    }
    reports = utils.all_gather(report)
    if utils.is_main_process():
        out_path.write_text(json.dumps(reports, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
