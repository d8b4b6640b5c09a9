"""COCO annotation files read and checked in one pass, before any training: an entry that COCO's tools would
misread is refused naming the file and the entries (first few of each kind); the fields evaluation needs and that
some converters leave out (``area``, ``iscrowd``) are filled in with one warning. docs/data.md lists the rules."""
import importlib
import json
import math
import os
import warnings
from collections import Counter
from pathlib import Path

from util.misc import is_main_process

EXAMPLES = 3  # entries named per kind of problem
# classifier outputs above which category ids are taken for a numbering mistake (ImageNet-21k has 21841 classes)
MAX_CATEGORY_ID = 100_000
# a box may reach this many pixels past its image's border before it is reported (COCO's own boxes are within)
BORDER_SLACK = 1.0
# every box within [0, NORMALISED_LIMIT]^2 in images larger than twice that: boxes normalised to the image size
NORMALISED_LIMIT = 1.01
# at least this share of the annotations crowd regions: a warning (COCO's own files: about 1%)
CROWD_SHARE = 0.5


class AnnotationWarning(UserWarning):
    """Something in an annotation file that was filled in or that lowers what evaluation can measure."""


def pycocotools(module):
    """pycocotools.<module>, imported only where COCO files are read or evaluated; missing, an error naming it."""
    try:
        return importlib.import_module(f"pycocotools.{module}")
    except ImportError as error:
        raise ImportError("reading and evaluating COCO annotation files needs pycocotools: "
                          "pip install pycocotools") from error


def annotation_error(path, detail):
    return ValueError(f"cannot read the COCO annotations {path}: {detail}")


def _json_type(value):
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def read_coco_json(path):
    """The JSON object of an annotation file (UTF-8, UTF-16 or UTF-32, with or without a byte-order mark); a file
    that is missing, not text, not JSON, cut short or not an object is an error saying which."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {path}"
                                + (" (it is a directory)" if path.is_dir() else ""))
    raw = path.read_bytes()
    if not raw.strip():
        raise annotation_error(path, "the file is empty")
    try:
        data = json.loads(raw)  # detects the UTF encoding as RFC 8259 says
    except UnicodeDecodeError as error:
        raise annotation_error(path, f"not UTF-8 text (byte {error.start} is {raw[error.start:error.start + 1]!r}); "
                                     "JSON files are UTF-8: save it as UTF-8") from None
    except json.JSONDecodeError as error:
        cut = error.msg.startswith("Unterminated") or not error.doc[error.pos:].strip()
        raise annotation_error(path, f"not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
                                     + (" (the file ends there: was it cut short?)" if cut else "")) from None
    if not isinstance(data, dict):
        raise annotation_error(path, f"expected a JSON object with 'images', 'annotations' and 'categories', got a "
                                     f"{_json_type(data)}")
    return data


class _Problems:
    """Problems found in a file, by kind: how many entries have each, and the first few of them."""

    def __init__(self):
        self.kinds = {}

    def add(self, kind, example):
        count, examples = self.kinds.get(kind, (0, []))
        if len(examples) < EXAMPLES:
            examples.append(example)
        self.kinds[kind] = (count + 1, examples)

    def describe(self, noun):
        return [f"{count} {noun(count)} {kind} (e.g. {'; '.join(examples)}{'; ...' if count > len(examples) else ''})"
                for kind, (count, examples) in self.kinds.items()]


def _is_int(value):  # JSON values: int, float, bool, str, list, dict or None (bool is not an id)
    return type(value) is int


def _is_number(value):
    return type(value) in (int, float) and math.isfinite(value)


def _short(value, limit=60):
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plural(singular, plural):
    return lambda count: singular if count == 1 else plural


def _top_level(data, path):
    """The images, annotations and categories lists; a missing or mistyped one is an error."""
    lists = {}
    for key in ("images", "annotations", "categories"):
        if key not in data:
            hint = " (a file of images only, such as image_info_test-dev2017.json, can be neither trained nor " \
                   "evaluated on)" if key == "annotations" else ""
            raise annotation_error(path, f"it has no {key!r} list{hint}")
        if not isinstance(data[key], list):
            raise annotation_error(path, f"{key!r} is a {_json_type(data[key])}, not a list")
        lists[key] = data[key]
    if not lists["images"]:
        raise ValueError(f"{path} lists no images")
    if not lists["categories"]:
        raise ValueError(f"{path} lists no categories")
    return lists["images"], lists["annotations"], lists["categories"]


def _duplicates(values, what):
    """'<what>: 5 (2 times), 9 (3 times)' for the first few values that occur more than once; None if none does."""
    repeated = [(value, count) for value, count in Counter(values).items() if count > 1]
    if not repeated:
        return None
    text = ", ".join(f"{_short(value)} ({count} times)" for value, count in repeated[:EXAMPLES])
    return f"{what}: {text}" + (f", ... ({len(repeated)} in all)" if len(repeated) > EXAMPLES else "")


def _duplicate_file_names(images):
    """'<what>: "a.jpg" (3 times: images 1, 2 "./a.jpg", 3 "sub/../a.jpg")' for the first few files that several
    images name, spelled alike or not (compared as normalised paths); None if there are none."""
    by_file = {}
    for image in images:
        if _is_int(image.get("id")) and isinstance(image.get("file_name"), str):
            by_file.setdefault(os.path.normpath(image["file_name"]), []).append(image)
    repeated = [(name, group) for name, group in by_file.items() if len(group) > 1]
    if not repeated:
        return None

    def listed(name, group):
        ids = [str(i["id"]) + ("" if i["file_name"] == name else f" {_short(i['file_name'])}") for i in group]
        shown = ", ".join(ids[:EXAMPLES]) + (", ..." if len(ids) > EXAMPLES else "")
        return f"{_short(name)} ({len(group)} times: images {shown})"

    text = ", ".join(listed(name, group) for name, group in repeated[:EXAMPLES])
    return ("file names listed as more than one image (their boxes would be split between the entries): " + text
            + (f", ... ({len(repeated)} in all)" if len(repeated) > EXAMPLES else ""))


def _check_images(images, problems):
    """{image id: (width, height) or None} of the well-formed image entries."""
    sizes = {}
    for index, image in enumerate(images):
        if not isinstance(image, dict):
            problems.add("that are not JSON objects", f"images[{index}] is {_short(image)}")
            continue
        where = f"image {_short(image.get('id'))}"
        if not _is_int(image.get("id")):
            problems.add("without an integer 'id'", f"images[{index}] {_short(image)}")
            continue
        if not -2 ** 63 <= image["id"] < 2 ** 63:  # image ids travel in int64 tensors
            problems.add("with an 'id' outside the 64-bit integer range", f"{where}")
            continue
        name = image.get("file_name")
        if not isinstance(name, str) or not name:
            problems.add("without a 'file_name' string", f"{where}: {_short(name)}")
        width, height = image.get("width"), image.get("height")
        if width is None and height is None:
            sizes[image["id"]] = None
        elif _is_int(width) and _is_int(height) and width > 0 and height > 0:
            sizes[image["id"]] = (width, height)
        else:
            problems.add("with a width or height that is not a positive integer",
                         f"{where}: width {_short(width)}, height {_short(height)}")
    return sizes


def _check_categories(categories, problems):
    ids = []
    for index, category in enumerate(categories):
        if not isinstance(category, dict) or not _is_int(category.get("id")) or category["id"] < 0:
            problems.add("without an integer 'id' >= 0 (the classifier output it trains)",
                         f"categories[{index}] is {_short(category)}")
        else:
            ids.append(category["id"])
    return ids


def _bbox_problem(bbox):
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(map(_is_number, bbox)):
        return "a bbox that is not 4 finite numbers [x, y, width, height]"
    if bbox[2] < 0 or bbox[3] < 0:
        return "a bbox of negative width or height ([x, y, width, height]; [x1, y1, x2, y2] boxes must be converted)"
    return None


def _check_annotations(annotations, image_sizes, category_ids, problems):
    """Each annotation's id, image, category, bbox, area and iscrowd."""
    known_categories = set(category_ids)
    for index, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            problems.add("that are not JSON objects", f"annotations[{index}] is {_short(ann)}")
            continue
        if not _is_int(ann.get("id")):
            problems.add("without an integer 'id'", f"annotations[{index}] {_short(ann)}")
            continue
        where = f"annotation {ann['id']}"
        image_id, category_id = ann.get("image_id"), ann.get("category_id")
        if not _is_int(image_id) or image_id not in image_sizes:
            problems.add("with an image_id that is not among the images' ids", f"{where}: {_short(image_id)}")
        if not _is_int(category_id) or category_id not in known_categories:
            problems.add("with a category_id that is not among the categories' ids", f"{where}: {_short(category_id)}")
        bbox_problem = _bbox_problem(ann.get("bbox"))
        if bbox_problem is not None:
            problems.add(f"with {bbox_problem}", f"{where}: {_short(ann.get('bbox'))}")
        if "area" in ann and not (_is_number(ann["area"]) and ann["area"] >= 0):
            problems.add("with an area that is not a number >= 0", f"{where}: {_short(ann['area'])}")
        if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):  # also matches false / true
            problems.add("with an iscrowd that is not 0 or 1", f"{where}: {_short(ann['iscrowd'])}")


def _polygon_area(polygon):
    """Shoelace area of one COCO polygon [x0, y0, x1, y1, ...]."""
    xs, ys = polygon[0::2], polygon[1::2]
    return abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))) / 2


def segmentation_area(segmentation):
    """Area of a COCO segmentation (polygons: the sum of their shoelace areas; RLE: its pixels), None when there is
    none or it is not one of COCO's forms."""
    if isinstance(segmentation, list) and segmentation and all(
            isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(_is_number(v) for v in p)
            for p in segmentation):
        return float(sum(_polygon_area(p) for p in segmentation))
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list) \
            and all(_is_int(v) for v in segmentation["counts"]):
        return float(sum(segmentation["counts"][1::2]))  # runs alternate background / object, background first
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), str) \
            and isinstance(segmentation.get("size"), list):
        rle = {"size": segmentation["size"], "counts": segmentation["counts"].encode()}
        try:
            return float(pycocotools("mask").area(rle))
        except (TypeError, ValueError):
            return None
    return None


def _fill_missing_fields(annotations, path):
    """area (from the segmentation when there is one, else the box) and iscrowd (0) where an annotation lacks
    them; one warning names the file and the counts."""
    from_segmentation = from_box = crowd = 0
    for ann in annotations:
        if "area" not in ann:
            area = segmentation_area(ann.get("segmentation"))
            if area is None:
                area = float(ann["bbox"][2] * ann["bbox"][3])
                from_box += 1
            else:
                from_segmentation += 1
            ann["area"] = area
        if "iscrowd" not in ann:
            ann["iscrowd"] = 0
            crowd += 1
    filled = []
    if from_segmentation or from_box:
        parts = [f"{n} from the {source}" for n, source in ((from_segmentation, "segmentation"), (from_box, "box"))
                 if n]
        filled.append(f"'area' of {from_segmentation + from_box} annotations ({', '.join(parts)})")
    if crowd:
        filled.append(f"'iscrowd' of {crowd} annotations (0: not a crowd region)")
    if filled and is_main_process():
        warnings.warn(f"{path}: filled in the missing {' and the missing '.join(filled)}", AnnotationWarning,
                      stacklevel=2)


def _report_boxes_outside(annotations, image_sizes, path):
    """One warning for boxes with no area inside their image (training drops them; evaluation counts them as objects
    no detection can match) and one for boxes reaching past the image (training clamps them)."""
    empty, beyond = _Problems(), _Problems()

    def example(ann, size):
        return f"annotation {ann['id']}: {_short(ann['bbox'])}" + (f" in a {size[0]} x {size[1]} image" if size else "")

    for ann in annotations:
        x, y, w, h = ann["bbox"]
        size = image_sizes[ann["image_id"]]
        width, height = size if size is not None else (math.inf, math.inf)
        if min(x + w, width) <= max(x, 0) or min(y + h, height) <= max(y, 0):
            if not ann["iscrowd"]:
                empty.add("", example(ann, size))
        elif x < -BORDER_SLACK or y < -BORDER_SLACK or x + w > width + BORDER_SLACK or y + h > height + BORDER_SLACK:
            beyond.add("", example(ann, size))
    if not is_main_process():
        return
    for problems, text in (
            (empty, "have boxes with no area inside their image (zero width or height, or outside it): training "
                    "drops them, evaluation counts them as objects no detection can match, which lowers AP"),
            (beyond, "have boxes reaching past their image's border: training clamps them; if most boxes do, "
                     "they may be [x1, y1, x2, y2] rather than COCO's [x, y, width, height]")):
        if problems.kinds:
            count, examples = problems.kinds[""]
            warnings.warn(f"{path}: {count} annotations {text} (e.g. {'; '.join(examples)})", AnnotationWarning,
                          stacklevel=2)


def _normalised_boxes(annotations, image_sizes):
    """An error text when every box lies within [0, 1] x [0, 1] of images larger than that: boxes given as fractions
    of the image (as YOLO's files), not COCO's pixels; they train and score as sub-pixel objects (AP about 0)."""
    boxes = [a["bbox"] for a in annotations if isinstance(a, dict) and _bbox_problem(a.get("bbox")) is None]
    sizes = [size for size in image_sizes.values() if size is not None]
    if not boxes or not sizes:
        return None
    right, bottom = max(x + w for x, _, w, _ in boxes), max(y + h for _, y, _, h in boxes)
    width, height = max(w for w, _ in sizes), max(h for _, h in sizes)
    if right > NORMALISED_LIMIT or bottom > NORMALISED_LIMIT or max(width, height) <= 2 * NORMALISED_LIMIT:
        return None
    return (f"all {len(boxes)} boxes lie within [0, 1] (x + width up to {right:.3g}, y + height up to {bottom:.3g}) "
            f"in images of up to {width} x {height} pixels: they look normalised to the image size, while COCO's "
            "boxes are [x, y, width, height] in pixels (multiply x and width by the image's width, y and height by "
            "its height)")


def objects_by(coco, *fields):
    """Counter of a loaded file's objects (its annotations that are not crowd regions), keyed by the tuple of their
    `fields` (("image_id",): per image; ("image_id", "category_id"): per image and category)."""
    return Counter(tuple(ann[field] for field in fields) for ann in coco.anns.values() if not ann.get("iscrowd", 0))


def _report_crowds(annotations, path):
    """One warning when most annotations are crowd regions (iscrowd 1, as some mask converters write for every
    RLE mask): training leaves them out and COCO's evaluation scores no detection against them."""
    crowds = sum(1 for ann in annotations if ann["iscrowd"])
    if crowds and crowds >= CROWD_SHARE * len(annotations) and is_main_process():
        warnings.warn(f"{path}: {crowds} of the {len(annotations)} annotations are crowd regions (iscrowd 1): "
                      "training leaves them out and evaluation does not count them as objects (only detections over "
                      "them go unpunished); an annotation of one object has iscrowd 0", AnnotationWarning,
                      stacklevel=2)


def _report_zero_areas(annotations, path):
    """One warning for objects whose 'area' is 0 while their box is not empty: COCO's evaluation takes the area, not
    the box, to file an object as small, medium or large, so these all count as small."""
    zero = [ann for ann in annotations
            if ann["area"] == 0 and not ann["iscrowd"] and ann["bbox"][2] > 0 and ann["bbox"][3] > 0]
    if zero and is_main_process():
        examples = "; ".join(f"annotation {ann['id']}: bbox {_short(ann['bbox'])}" for ann in zero[:EXAMPLES])
        warnings.warn(f"{path}: {len(zero)} annotations have 'area' 0 but a box of some size (e.g. {examples}): COCO's "
                      "evaluation files them as small objects, so AP_small / AP_medium / AP_large are wrong; remove "
                      "their 'area' to have it computed from the segmentation or the box", AnnotationWarning,
                      stacklevel=2)


def check_coco_annotations(data, path):
    """Check the object of an annotation file against what COCO's tools expect, fill in missing area and iscrowd
    (in place) and return it. Every problem found is named in one error (the first few entries of each kind)."""
    images, annotations, categories = _top_level(data, path)
    image_problems, category_problems, annotation_problems = _Problems(), _Problems(), _Problems()
    image_sizes = _check_images(images, image_problems)
    category_ids = _check_categories(categories, category_problems)
    _check_annotations(annotations, image_sizes, category_ids, annotation_problems)
    images = [i for i in images if isinstance(i, dict)]
    annotations_ids = [a["id"] for a in annotations if isinstance(a, dict) and _is_int(a.get("id"))]
    problems = [
        *image_problems.describe(_plural("image entry", "image entries")),
        *category_problems.describe(_plural("category entry", "category entries")),
        *annotation_problems.describe(_plural("annotation", "annotations")),
        _duplicates((i["id"] for i in images if _is_int(i.get("id"))), "image ids used by more than one image"),
        _duplicate_file_names(images),
        _duplicates(category_ids, "category ids used by more than one category"),
        _duplicates(annotations_ids, "annotation ids used by more than one annotation (COCO's evaluation tells "
                                     "boxes apart by id)"),
        _normalised_boxes(annotations, image_sizes),
    ]
    if category_ids and max(category_ids) >= MAX_CATEGORY_ID:
        problems.append(f"category ids reach {max(category_ids)} for {len(category_ids)} categories: the classifier "
                        f"would have {max(category_ids) + 1} outputs (one per id); number the categories from 1")
    problems = [p for p in problems if p is not None]
    if problems:
        raise annotation_error(path, "; ".join(problems))
    _fill_missing_fields(annotations, path)
    _report_boxes_outside(annotations, image_sizes, path)
    _report_zero_areas(annotations, path)
    _report_crowds(annotations, path)
    return data


def _ids_of_unique_names(categories):
    """{name: id} of the names that one category of `categories` ({id: category}) has."""
    names = Counter(c.get("name") for c in categories.values())
    return {c.get("name"): i for i, c in categories.items() if names[c.get("name")] == 1}


def check_same_categories(categories, path, other_categories, other_path):
    """An id in both files' categories ({id: category}, as pycocotools' ``COCO.cats``) has the same name in both,
    and a name that each file gives one category has the same id in both; else an error naming both files and the
    first few ids or names. An id in one file only is fine (a validation subset may lack categories)."""
    conflicts = [f"id {i}: {_short(categories[i].get('name'))} in {Path(path).name}, "
                 f"{_short(other_categories[i].get('name'))} in {Path(other_path).name}"
                 for i in sorted(set(categories) & set(other_categories))
                 if categories[i].get("name") != other_categories[i].get("name")]
    what = "category ids different names"
    if not conflicts:  # renumbered: the same names under other ids
        ids, other_ids = _ids_of_unique_names(categories), _ids_of_unique_names(other_categories)
        conflicts = [f"{_short(name)}: id {ids[name]} in {Path(path).name}, {other_ids[name]} in "
                     f"{Path(other_path).name}" for name in sorted(set(ids) & set(other_ids), key=ids.get)
                     if ids[name] != other_ids[name]]
        what = "category names different ids"
    if not conflicts:
        return
    raise ValueError(f"{path} and {other_path} give {len(conflicts)} {what} ({'; '.join(conflicts[:EXAMPLES])}"
                     f"{'; ...' if len(conflicts) > EXAMPLES else ''}): a model trained on one is evaluated against "
                     "the other's categories; give each id the same category in both files")


def load_coco_annotations(path):
    """The checked object of an annotation file (see check_coco_annotations)."""
    return check_coco_annotations(read_coco_json(path), Path(path))
