"""COCO-format detection dataset: an image folder plus an ``instances_*.json`` file, checked by datasets.coco_file
and indexed with pycocotools."""
import contextlib
import io
import os
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset

from util.image_io import decode_image, read_bytes
from util.misc import get_local_rank, get_local_size, is_main_process

from .coco_file import (
    AnnotationWarning,
    annotation_error,
    load_coco_annotations,
    objects_by,
    pycocotools,
    read_coco_json,
)
from .transforms import make_coco_transforms
from .tta import MultiScaleViews, tta_scales

# the classifier size build_model uses without --num_classes (COCO's largest category id + 1)
DEFAULT_NUM_CLASSES = 91
# split name -> (image folder, annotation file), relative to the dataset root
COCO_SPLITS = {
    "train": ("train2017", Path("annotations") / "instances_train2017.json"),
    "val": ("val2017", Path("annotations") / "instances_val2017.json"),
}


def load_coco_api(ann_file):
    """pycocotools COCO object of ``ann_file`` once the file has passed datasets.coco_file's checks (missing area
    and iscrowd filled in), without pycocotools' progress prints."""
    coco = pycocotools("coco").COCO()
    coco.dataset = load_coco_annotations(ann_file)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def num_classes_from_annotations(ann_file):
    """Classifier size for the categories of ``ann_file``: largest category id + 1 (91 for COCO)."""
    ann_file = Path(ann_file)
    for split, (_, relative) in COCO_SPLITS.items():  # a split's file under a --coco_path: its layout first
        if ann_file.parts[-2:] == relative.parts and not ann_file.is_file() and ann_file.parents[1].is_dir():
            check_layout(ann_file.parents[1], split)
    data = read_coco_json(ann_file)
    categories = data.get("categories", [])
    if not isinstance(categories, list) or not all(isinstance(c, dict) and isinstance(c.get("id"), int)
                                                   and not isinstance(c["id"], bool) for c in categories):
        raise annotation_error(ann_file, "'categories' is not a list of objects with integer ids")
    if not categories:
        raise ValueError(f"{ann_file} lists no categories")
    return max(c["id"] for c in categories) + 1


def category_names(coco_path):
    """{category id: name} from the validation (else training) annotation file under ``coco_path``; {} if none."""
    for _, ann_file in (COCO_SPLITS["val"], COCO_SPLITS["train"]):
        path = Path(coco_path) / ann_file
        if path.is_file():
            return {int(c["id"]): str(c.get("name", c["id"])) for c in read_coco_json(path).get("categories", [])}
    return {}


def coco_annotations_to_target(annotations, image_id, width, height):
    """COCO annotations of one image -> target dict with absolute xyxy boxes clamped to the image.

    Crowd regions and boxes left without area after clamping are dropped.
    """
    annotations = [a for a in annotations if a.get("iscrowd", 0) == 0]
    boxes = torch.as_tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)  # xywh
    boxes[:, 2:] += boxes[:, :2]  # -> xyxy
    boxes[:, 0::2].clamp_(min=0, max=width)
    boxes[:, 1::2].clamp_(min=0, max=height)
    labels = torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64)
    area = torch.tensor([a.get("area", 0.0) for a in annotations], dtype=torch.float32)
    iscrowd = torch.tensor([a.get("iscrowd", 0) for a in annotations], dtype=torch.int64)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    size = torch.tensor([height, width])
    return {
        "boxes": boxes[keep],
        "labels": labels[keep],
        "image_id": torch.tensor([image_id]),
        "area": area[keep],
        "iscrowd": iscrowd[keep],
        "orig_size": size,
        "size": size.clone(),
    }


def _not_a_file(path):
    """What is at ``path``, which is no image file: ' (a folder)', ' (a broken link)', ' (not a file)' or ''."""
    if path.is_dir():
        return " (a folder)"
    if path.is_symlink() and not path.exists():
        return " (a broken link)"
    return " (not a file)" if path.exists() else ""


class CocoDetection(Dataset):
    """Items are (image [3, H, W], target) after ``transforms``; see ``coco_annotations_to_target``.

    With ``cache_mode`` the encoded images this local rank will read (index % local_size == local_rank)
    are held in memory; other images are still read from disk on demand.
    """

    def __init__(self, img_folder, ann_file, transforms=None, cache_mode=False,
                 local_rank=0, local_size=1, num_classes=None):
        self.img_folder = Path(img_folder)
        if not self.img_folder.is_dir():
            raise FileNotFoundError(f"COCO image folder not found: {self.img_folder}")
        self.ann_file = Path(ann_file)
        self.coco = load_coco_api(ann_file)
        self.ids = sorted(self.coco.imgs.keys())
        self._check_image_files(ann_file)
        if num_classes is not None:
            self._check_labels(ann_file, num_classes)
        self.transforms = transforms
        self.cache_mode = cache_mode
        self.local_rank = local_rank
        self.local_size = local_size
        self.cache = {}
        if cache_mode:
            self._fill_cache()

    def _image_path(self, image_id):
        return self.img_folder / self.coco.imgs[image_id]["file_name"]

    def _check_image_files(self, ann_file):
        """Every listed image is a file (checked now, not when the loader reaches it an epoch later): not missing,
        not a folder, not a link to nothing."""
        # one listing, cheap even for 118k files: is_file() takes the listing's file type, stats links only
        present = {entry.name for entry in os.scandir(self.img_folder) if entry.is_file()}
        missing = [name for name in (self.coco.imgs[i]["file_name"] for i in self.ids)
                   if name not in present and not (self.img_folder / name).is_file()]
        if missing:
            relative_to_parent = [name for name in missing[:5] if (self.img_folder.parent / name).is_file()]
            hint = (f" (found under {self.img_folder.parent} instead: file_name is relative to the image folder "
                    f"{self.img_folder.name}/)") if relative_to_parent else ""
            examples = ", ".join(name + _not_a_file(self.img_folder / name) for name in missing[:5])
            raise FileNotFoundError(f"{len(missing)} of the {len(self.ids)} images listed in {ann_file} are not in "
                                    f"{self.img_folder}, e.g. {examples}{hint}")

    def _check_labels(self, ann_file, num_classes):
        """Every annotation's category id is an output of the classifier (0 .. num_classes - 1)."""
        bad = [a for a in self.coco.anns.values() if not 0 <= a["category_id"] < num_classes]
        if bad:
            ids = sorted({a["category_id"] for a in bad})
            raise ValueError(f"{ann_file}: {len(bad)} annotations have category ids outside the classifier's "
                             f"{num_classes} outputs (--num_classes {num_classes}): {ids[:10]} (e.g. annotation "
                             f"{bad[0]['id']}); pass --num_classes {max(ids) + 1} or fix the file")

    def _fill_cache(self):
        for index, image_id in enumerate(self.ids):
            if index % self.local_size == self.local_rank:
                self.cache[image_id] = read_bytes(self._image_path(image_id))

    def load_image(self, image_id):
        """The image as displayed (EXIF orientation applied, 8-bit RGB); a size other than the annotation file's
        width and height is an error naming the file: its boxes would not be where they were drawn."""
        path = self._image_path(image_id)
        data = self.cache.get(image_id)
        if data is None:
            data = read_bytes(path)
        image = decode_image(data, path)
        info = self.coco.imgs[image_id]
        listed = (info.get("width"), info.get("height"))
        if None not in listed and image.size != listed:
            swapped = " (swapped: were the boxes drawn on the stored pixels, ignoring the EXIF orientation?)" \
                if image.size == listed[::-1] else ""
            raise ValueError(f"image {path} is {image.width} x {image.height} pixels as displayed (EXIF orientation "
                             f"applied), but {self.ann_file} gives image {image_id} width {listed[0]}, height "
                             f"{listed[1]}{swapped}")
        return image

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        image_id = self.ids[index]
        image = self.load_image(image_id)
        annotations = self.coco.imgToAnns.get(image_id, [])
        target = coco_annotations_to_target(annotations, image_id, *image.size)
        if self.transforms is not None:
            try:
                image, target = self.transforms(image, target)
            except Exception as error:  # the loader's traceback says which image (Python 3.11+ shows notes)
                if hasattr(error, "add_note"):
                    error.add_note(f"while transforming image {image_id} "
                                   f"({self._image_path(image_id)}, {image.size[0]}x{image.size[1]})")
                raise
        return image, target


def transform_options(args):
    """Optional size settings read from ``args`` (upstream's defaults when absent or None)."""
    return {
        "scales": getattr(args, "train_scales", None),
        "max_size": getattr(args, "max_size", None),
        "val_size": getattr(args, "val_scale", None),
        "crop": not getattr(args, "no_crop_augment", False),
        "lsj": getattr(args, "lsj", None),
    }


def dataset_root(args):
    """--coco_path as a Path; not a directory is an error saying which way."""
    root = Path(args.coco_path)
    if not root.is_dir():
        raise FileNotFoundError(f"COCO path {'is a file, not a directory' if root.exists() else 'does not exist'}: "
                                f"{root}")
    return root


def _has_layout(folder, split):
    img_folder, ann_file = COCO_SPLITS[split]
    return (folder / img_folder).is_dir() and (folder / ann_file).is_file()


def check_layout(root, split):
    """The image folder and annotation file of ``split`` are under ``root``; else an error showing COCO's layout,
    what ``root`` holds and, when the layout is one level up or down, that folder."""
    if _has_layout(root, split):
        return
    img_folder, ann_file = COCO_SPLITS[split]
    missing = [str(root / p) + ("/" if p == img_folder else "") for p in (img_folder, ann_file)
               if not (root / p).exists()]
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    near = [root.parent] + sorted(p for p in root.iterdir() if p.is_dir())
    found = next((folder for folder in near if _has_layout(folder, split)), None)
    hint = f"; did you mean --coco_path {found}?" if found is not None else ""
    raise FileNotFoundError(f"--coco_path {root} does not have COCO's layout (train2017/, val2017/, "
                            f"annotations/instances_train2017.json, annotations/instances_val2017.json): "
                            f"{' and '.join(missing) or 'the ' + split + ' files'} not found; it holds "
                            f"{', '.join(entries[:10]) or 'nothing'}{', ...' if len(entries) > 10 else ''}{hint}")


def warn_if_more_objects_than_queries(coco, ann_file, queries):
    """A warning when training images hold more objects (crowd regions aside) than the model's `queries` one-to-one
    queries: Hungarian matching leaves the rest unmatched (trained as background) and the model never predicts more
    than `queries` boxes per image."""
    objects = objects_by(coco, "image_id")
    dense = sorted((count, image_id) for (image_id,), count in objects.items() if count > queries)
    if dense and is_main_process():
        most, image_id = dense[-1]
        warnings.warn(f"{ann_file}: {len(dense)} training images have more objects than the {queries} one-to-one "
                      f"queries (--num_queries_one2one), up to {most} (image {image_id}): matching leaves the rest "
                      f"unmatched and the model finds at most {queries} per image; raise --num_queries_one2one",
                      AnnotationWarning, stacklevel=2)


def build(image_set, args):
    """COCO split ``image_set`` under ``args.coco_path``; ``args.eval_in_training_set`` evaluates on train."""
    root = dataset_root(args)
    if image_set not in COCO_SPLITS:
        raise ValueError(f"unknown image_set {image_set!r}: expected one of {sorted(COCO_SPLITS)}")
    split = image_set
    if image_set == "val" and getattr(args, "eval_in_training_set", False):
        split = "train"
    img_folder, ann_file = COCO_SPLITS[split]
    check_layout(root, split)
    transforms = make_coco_transforms(image_set, **transform_options(args))
    if image_set == "val" and getattr(args, "tta", False):
        transforms = MultiScaleViews(transforms, tta_scales(args))  # every image also at the --tta_scales
    dataset = CocoDetection(root / img_folder, root / ann_file, transforms=transforms,
                            cache_mode=getattr(args, "cache_mode", False),
                            local_rank=get_local_rank(), local_size=get_local_size(),
                            num_classes=getattr(args, "num_classes", None) or DEFAULT_NUM_CLASSES)
    if image_set == "train" and getattr(args, "num_queries_one2one", None):
        warn_if_more_objects_than_queries(dataset.coco, root / ann_file, args.num_queries_one2one)
    return dataset
