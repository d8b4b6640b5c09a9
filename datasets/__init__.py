"""Dataset construction for training and evaluation."""
import hashlib

from torch.utils.data import Subset

from .coco import CocoDetection, num_classes_from_annotations  # noqa: F401
from .coco import build as build_coco
from .coco_file import check_same_categories as check_coco_categories
from .samplers import SeededSamples

SUPPORTED_DATASETS = ("coco",)


def _coco_dataset(dataset):
    """The CocoDetection behind ``dataset`` (looking through ``torch.utils.data.Subset`` and the training loader's
    ``SeededSamples``), or None."""
    while isinstance(dataset, (Subset, SeededSamples)):
        dataset = dataset.dataset
    return dataset if isinstance(dataset, CocoDetection) else None


def get_coco_api_from_dataset(dataset):
    """The pycocotools COCO object behind ``dataset`` (looking through ``torch.utils.data.Subset``)."""
    coco_dataset = _coco_dataset(dataset)
    if coco_dataset is None:
        raise TypeError(f"no COCO annotations behind a {type(dataset).__name__}")
    return coco_dataset.coco


def check_same_categories(dataset_train, dataset_val):
    """A category id that the training and validation annotation files both list has the same name in both (else
    evaluation scores the model against other categories); an error names both files and the ids. Nothing to
    compare without a training set (evaluation only)."""
    train, val = _coco_dataset(dataset_train), _coco_dataset(dataset_val)
    if train is not None and val is not None:
        check_coco_categories(train.coco.cats, train.ann_file, val.coco.cats, val.ann_file)


def category_names(dataset):
    """{category id: name} of the COCO annotation file behind `dataset` (a training run saves it in its
    checkpoints); None without one."""
    coco_dataset = _coco_dataset(dataset)
    return None if coco_dataset is None else {i: c.get("name") for i, c in coco_dataset.coco.cats.items()}


def check_checkpoint_categories(saved, source, dataset):
    """The categories a checkpoint was trained on (`saved`, category_names of its training set; None in older and
    upstream's checkpoints: nothing to compare) agree with the annotation file behind `dataset`, by the rule of
    check_same_categories."""
    coco_dataset = _coco_dataset(dataset)
    if saved is not None and coco_dataset is not None:
        check_coco_categories({i: {"name": name} for i, name in saved.items()}, f"{source} (trained on)",
                              coco_dataset.coco.cats, coco_dataset.ann_file)


def dataset_fingerprint(dataset):
    """'N images (digest)', the digest of the COCO images behind `dataset` (ids, file names, annotation counts):
    equal on processes that read the same annotation file; "none" without a dataset."""
    if dataset is None:
        return "none"
    coco = getattr(_coco_dataset(dataset), "coco", None)
    if coco is None:
        return f"{len(dataset)} images"
    digest = hashlib.sha1()
    for image_id in sorted(coco.imgs):
        digest.update(f"{image_id}:{coco.imgs[image_id].get('file_name')}:{len(coco.imgToAnns[image_id])};".encode())
    return f"{len(dataset)} images (digest {digest.hexdigest()[:12]})"


def build_dataset(image_set, args):
    """Dataset for ``image_set`` ("train" or "val") as chosen by ``args.dataset_file``."""
    if args.dataset_file == "coco":
        return build_coco(image_set, args)
    if args.dataset_file == "coco_panoptic":
        raise ValueError("dataset_file 'coco_panoptic' is not supported: this implementation does "
                         "detection only (no segmentation heads)")
    raise ValueError(f"unknown dataset_file {args.dataset_file!r}; supported: {', '.join(SUPPORTED_DATASETS)}")
