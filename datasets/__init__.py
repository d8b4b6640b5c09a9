"""Dataset construction for training and evaluation."""
from torch.utils.data import Subset

from .coco import CocoDetection, num_classes_from_annotations  # noqa: F401
from .coco import build as build_coco

SUPPORTED_DATASETS = ("coco",)


def get_coco_api_from_dataset(dataset):
    """The pycocotools COCO object behind ``dataset`` (looking through ``torch.utils.data.Subset``)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if isinstance(dataset, CocoDetection):
        return dataset.coco
    raise TypeError(f"no COCO annotations behind a {type(dataset).__name__}")


def build_dataset(image_set, args):
    """Dataset for ``image_set`` ("train" or "val") as chosen by ``args.dataset_file``."""
    if args.dataset_file == "coco":
        return build_coco(image_set, args)
    if args.dataset_file == "coco_panoptic":
        raise ValueError("dataset_file 'coco_panoptic' is not supported: this implementation does "
                         "detection only (no segmentation heads)")
    raise ValueError(f"unknown dataset_file {args.dataset_file!r}; supported: {', '.join(SUPPORTED_DATASETS)}")
