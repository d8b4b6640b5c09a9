"""datasets.coco_file: annotation files that COCO's tools would misread are refused at load naming the file and the
entries; missing area / iscrowd are filled in with one warning; valid files (the synthetic demo's) pass unchanged."""
import codecs
import copy
import json
import warnings

import pytest
import torch

from datasets.coco import load_coco_api, num_classes_from_annotations
from datasets.coco_eval import CocoEvaluator
from datasets.coco_file import AnnotationWarning, load_coco_annotations, segmentation_area
from datasets.synthetic import make_synthetic_coco


def minimal():
    """Two 100 x 80 images, two categories, three boxes: a valid COCO file."""
    return {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
                   {"id": 2, "file_name": "b.jpg", "width": 100, "height": 80}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 30], "area": 600, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 20, 30, 10], "area": 300, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 40, 40], "area": 1600, "iscrowd": 0},
        ],
    }


def write(tmp_path, data, name="instances_val2017.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def refused(tmp_path, data, pattern):
    path = write(tmp_path, data)
    with pytest.raises(ValueError, match=r"cannot read the COCO annotations .*instances_val2017\.json: .*" + pattern):
        load_coco_annotations(path)


def perfect_stats(coco):
    """COCO's 12 summary figures for the ground truth's own boxes as detections."""
    evaluator = CocoEvaluator(coco, ("bbox",))
    for image_id in coco.getImgIds():
        anns = coco.imgToAnns[image_id]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        evaluator.update({image_id: {"scores": torch.ones(len(anns)), "boxes": boxes,
                                     "labels": torch.tensor([a["category_id"] for a in anns])}})
    evaluator.accumulate()
    evaluator.summarize(table=False)
    return evaluator.stats()


def perfect_ap(coco):
    """COCO AP of the ground truth's own boxes as detections."""
    return perfect_stats(coco)[0]


def test_the_synthetic_demo_files_load_unchanged_and_without_warnings(tmp_path):
    make_synthetic_coco(tmp_path, 6, 4, image_size=64, seed=0)
    for split in ("train", "val"):
        path = tmp_path / "annotations" / f"instances_{split}2017.json"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert load_coco_annotations(path) == json.loads(path.read_text())


def test_duplicate_annotation_ids_are_refused_naming_them(tmp_path):
    data = minimal()
    data["annotations"][2]["id"] = 1
    refused(tmp_path, data, r"annotation ids used by more than one annotation .*: 1 \(2 times\)")


def test_duplicate_image_ids_are_refused_naming_them(tmp_path):
    data = minimal()
    data["images"][1].update(id=1)
    refused(tmp_path, data, r"image ids used by more than one image: 1 \(2 times\)")
    data = minimal()
    data["images"][1].update(file_name="a.jpg")
    refused(tmp_path, data, r'file names listed as more than one image .*: "a\.jpg" \(2 times: images 1, 2\)$')


def test_one_file_spelled_several_ways_is_refused_naming_the_images(tmp_path):
    """./a.jpg and sub/../a.jpg open a.jpg: its boxes would be split between three entries."""
    data = minimal()
    data["images"] += [{"id": 3, "file_name": "./a.jpg", "width": 100, "height": 80},
                       {"id": 4, "file_name": "sub/../a.jpg", "width": 100, "height": 80},
                       {"id": 5, "file_name": "sub//b.jpg", "width": 100, "height": 80},
                       {"id": 6, "file_name": "sub/b.jpg", "width": 100, "height": 80}]
    refused(tmp_path, data, r'file names listed as more than one image \(their boxes would be split between the '
                            r'entries\): "a\.jpg" \(3 times: images 1, 3 "\./a\.jpg", 4 "sub/\.\./a\.jpg"\), '
                            r'"sub/b\.jpg" \(2 times: images 5 "sub//b\.jpg", 6\)$')
    data["images"] = data["images"][:2] + [dict(data["images"][2], file_name="sub/a.jpg")]  # another file: fine
    load_coco_annotations(write(tmp_path, data))


def test_missing_area_and_iscrowd_are_filled_with_one_warning_and_evaluation_works(tmp_path):
    data = minimal()
    for ann in data["annotations"]:
        del ann["area"], ann["iscrowd"]
    data["annotations"][0]["segmentation"] = [[10, 10, 30, 10, 30, 40, 10, 40]]  # a 20 x 30 rectangle
    data["annotations"][1]["segmentation"] = [[50, 20, 80, 20, 50, 30]]  # a triangle: half the box
    path = write(tmp_path, data)
    with pytest.warns(AnnotationWarning) as caught:
        coco = load_coco_api(path)
    assert len(caught) == 1
    assert str(caught[0].message) == (f"{path}: filled in the missing 'area' of 3 annotations (2 from the "
                                      "segmentation, 1 from the box) and the missing 'iscrowd' of 3 annotations "
                                      "(0: not a crowd region)")
    assert [coco.anns[i]["area"] for i in (1, 2, 3)] == [600.0, 150.0, 1600.0]
    assert all(a["iscrowd"] == 0 for a in coco.anns.values())
    assert perfect_ap(coco) == pytest.approx(1.0)


def test_segmentation_area_of_every_coco_form():
    assert segmentation_area([[0, 0, 4, 0, 4, 3, 0, 3], [10, 10, 12, 10, 10, 12]]) == 12 + 2
    assert segmentation_area({"size": [4, 4], "counts": [2, 3, 5, 6]}) == 9  # uncompressed RLE: 3 + 6 object pixels
    mask_utils = pytest.importorskip("pycocotools.mask")
    import numpy as np

    mask = np.zeros((6, 5), dtype=np.uint8, order="F")
    mask[1:4, 2:5] = 1
    compressed = mask_utils.encode(mask)
    assert segmentation_area({"size": compressed["size"], "counts": compressed["counts"].decode()}) == 9
    assert segmentation_area([]) is None and segmentation_area([[1, 2, 3]]) is None and segmentation_area(None) is None


@pytest.mark.parametrize("bbox, problem", [
    ([1, 2, 3], "a bbox that is not 4 finite numbers"), (["1", 2, 3, 4], "a bbox that is not 4 finite numbers"),
    ([1, 2, 3, None], "a bbox that is not 4 finite numbers"), ("1 2 3 4", "a bbox that is not 4 finite numbers"),
    ([1, 2, -3, 4], "a bbox of negative width or height"),
])
def test_malformed_boxes_are_refused_naming_the_annotation(tmp_path, bbox, problem):
    data = minimal()
    data["annotations"][1]["bbox"] = bbox
    refused(tmp_path, data, rf"1 annotation with {problem}.*\(e\.g\. annotation 2: ")
    del data["annotations"][1]["bbox"]
    refused(tmp_path, data, r"1 annotation with a bbox that is not 4 finite numbers .*annotation 2: null")


def test_nan_in_a_box_is_refused(tmp_path):
    path = tmp_path / "instances_val2017.json"
    path.write_text(json.dumps(minimal()).replace("[10, 10, 20, 30]", "[10, NaN, 20, 30]"))
    with pytest.raises(ValueError, match=r"annotation 1: \[10, NaN, 20, 30\]"):
        load_coco_annotations(path)


@pytest.mark.parametrize("change, pattern", [
    (lambda d: d["annotations"][0].update(image_id=7), r"with an image_id that is not among the images' ids "
                                                       r"\(e\.g\. annotation 1: 7\)"),
    (lambda d: d["annotations"][0].update(image_id="1"), r"image_id that is not .*annotation 1: \"1\""),
    (lambda d: d["annotations"][0].update(category_id=3), r"category_id that is not among the categories' ids "
                                                          r"\(e\.g\. annotation 1: 3\)"),
    (lambda d: d["annotations"][0].update(id="a1"), r"1 annotation without an integer 'id'"),
    (lambda d: d["annotations"][0].update(area=-5), r"area that is not a number >= 0 \(e\.g\. annotation 1: -5\)"),
    (lambda d: d["annotations"][0].update(iscrowd=2), r"iscrowd that is not 0 or 1 \(e\.g\. annotation 1: 2\)"),
    (lambda d: d["annotations"].append(7), r"1 annotation that are not JSON objects"),
    (lambda d: d["images"][0].update(id=1.5), r"1 image entry without an integer 'id'"),
    (lambda d: d["images"][0].update(id=2 ** 63), r"1 image entry with an 'id' outside the 64-bit integer range "
                                                   r"\(e\.g\. image 9223372036854775808\)"),
    (lambda d: d["images"][0].pop("file_name"), r"1 image entry without a 'file_name' string \(e\.g\. image 1"),
    (lambda d: d["images"][0].update(width=0), r"width or height that is not a positive integer .*image 1: width 0"),
    (lambda d: d["images"][0].pop("height"), r"width or height that is not a positive integer"),
    (lambda d: d["categories"][0].update(id=-1), r"1 category entry without an integer 'id' >= 0"),
    (lambda d: d["categories"].append({"id": 2, "name": "again"}), r"category ids used by more than one category: "
                                                                   r"2 \(2 times\)"),
    (lambda d: d["categories"].append({"id": 10 ** 9, "name": "x"}), r"category ids reach 1000000000 for 3 "
                                                                      r"categories.*number the categories from 1"),
    (lambda d: d.pop("annotations"), r"it has no 'annotations' list \(a file of images only"),
    (lambda d: d.pop("categories"), r"it has no 'categories' list"),
    (lambda d: d.update(images={"1": {}}), r"'images' is a object, not a list"),
])
def test_other_entries_coco_would_misread_are_refused(tmp_path, change, pattern):
    data = minimal()
    change(data)
    refused(tmp_path, data, pattern)


def test_every_problem_is_named_in_one_error(tmp_path):
    data = minimal()
    data["annotations"][0]["bbox"] = [1, 2, 3]
    data["annotations"][1]["category_id"] = 9
    data["annotations"][2]["id"] = 2
    with pytest.raises(ValueError) as info:
        load_coco_annotations(write(tmp_path, data))
    message = str(info.value)
    assert "annotation 1: [1, 2, 3]" in message and "annotation 2: 9" in message and "2 (2 times)" in message
    assert "\n" not in message


def test_many_problems_name_the_first_few(tmp_path):
    data = minimal()
    data["annotations"] = [{"id": i, "image_id": 1, "category_id": 1, "bbox": [1, 2], "area": 1, "iscrowd": 0}
                           for i in range(10, 20)]
    refused(tmp_path, data, r"10 annotations with a bbox .*\(e\.g\. annotation 10: \[1, 2\]; annotation 11: "
                            r"\[1, 2\]; annotation 12: \[1, 2\]; \.\.\.\)")


def test_empty_images_or_categories(tmp_path):
    data = minimal()
    data["images"], data["annotations"] = [], []
    with pytest.raises(ValueError, match=r"instances_val2017\.json lists no images"):
        load_coco_annotations(write(tmp_path, data))
    data = minimal()
    data["categories"] = []
    with pytest.raises(ValueError, match=r"instances_val2017\.json lists no categories"):
        load_coco_annotations(write(tmp_path, data))


def test_boxes_without_area_in_their_image_are_reported(tmp_path):
    """Training drops them, evaluation counts them: one warning naming them (not an error: COCO keeps them)."""
    data = minimal()
    data["annotations"][0]["bbox"] = [10, 10, 0, 30]  # zero width
    data["annotations"][1]["bbox"] = [150, 20, 30, 10]  # right of the 100-pixel-wide image
    path = write(tmp_path, data)
    with pytest.warns(AnnotationWarning, match=r"instances_val2017\.json: 2 annotations have boxes with no area "
                                               r"inside their image.*which lowers AP \(e\.g\. annotation 1: \[10, 10, "
                                               r"0, 30\] in a 100 x 80 image; annotation 2: "):
        coco = load_coco_api(path)
    assert perfect_ap(coco) < 0.7  # what the warning says: not even its own copy matches the zero-width box


def test_area_zero_on_a_real_box_is_reported(tmp_path):
    """A converter's 'area' 0 files a 40 x 40 object as small in COCO's evaluation (its AP by size is wrong): one
    warning naming it; a crowd region or an empty box with area 0 is not reported."""
    data = minimal()
    data["annotations"][2]["area"] = 0
    data["annotations"].append({"id": 4, "image_id": 2, "category_id": 2, "bbox": [50, 50, 20, 20], "area": 0,
                                "iscrowd": 1})
    path = write(tmp_path, data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        coco = load_coco_api(path)
    assert [str(w.message) for w in caught] == [
        f"{path}: 1 annotations have 'area' 0 but a box of some size (e.g. annotation 3: bbox [0, 0, 40, 40]): COCO's "
        "evaluation files them as small objects, so AP_small / AP_medium / AP_large are wrong; remove their 'area' to "
        "have it computed from the segmentation or the box"]
    # what it warns of: the one medium-sized (32^2 to 96^2 pixels) object counts as small, no AP for medium ones
    assert perfect_stats(coco)[4] == -1
    assert perfect_stats(load_coco_api(write(tmp_path, minimal())))[4] == pytest.approx(1)


def test_boxes_reaching_past_the_image_are_reported_with_the_xyxy_hint(tmp_path):
    data = minimal()
    x0, y0, x1, y1 = 30, 20, 90, 70
    data["annotations"][2]["bbox"] = [x0, y0, x1, y1]  # an xyxy box read as xywh reaches to 120 x 90
    with pytest.warns(AnnotationWarning, match=r"1 annotations have boxes reaching past their image's border.*"
                                               r"\[x1, y1, x2, y2\] rather than COCO's \[x, y, width, height\] "
                                               r"\(e\.g\. annotation 3: \[30, 20, 90, 70\] in a 100 x 80 image\)"):
        load_coco_annotations(write(tmp_path, data))
    data["annotations"][2]["bbox"] = [-0.5, 0, 100.8, 80.4]  # within a pixel: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_coco_annotations(write(tmp_path, data))


def test_boxes_normalised_to_the_image_size_are_refused(tmp_path):
    """Boxes in fractions of the image (as YOLO's files) trained and scored as sub-pixel objects without a word."""
    data = minimal()
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        ann["bbox"] = [x / 100, y / 80, w / 100, h / 80]
    refused(tmp_path, data, r"all 3 boxes lie within \[0, 1\] \(x \+ width up to 0\.8, y \+ height up to 0\.5\) in "
                            r"images of up to 100 x 80 pixels: they look normalised to the image size")
    data["annotations"][2]["bbox"] = [0.5, 0.5, 1, 1]  # one box past [0, 1]: a tiny object among others, fine
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_coco_annotations(write(tmp_path, data))


def test_a_file_of_crowd_regions_is_reported(tmp_path):
    """Some mask converters mark every RLE mask iscrowd 1: training then sees no object and evaluation counts none."""
    data = minimal()
    for ann in data["annotations"][1:]:
        ann["iscrowd"] = 1
    path = write(tmp_path, data)
    with pytest.warns(AnnotationWarning, match=r"instances_val2017\.json: 2 of the 3 annotations are crowd regions "
                                               r"\(iscrowd 1\): training leaves them out"):
        coco = load_coco_api(path)
    assert perfect_stats(coco)[1] == pytest.approx(1) and len(coco.getAnnIds(iscrowd=False)) == 1  # what it says
    data["annotations"][1]["iscrowd"] = 0  # a third: not reported
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_coco_annotations(write(tmp_path, data))


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
def test_text_in_the_other_unicode_encodings_is_read(tmp_path, encoding):
    data = minimal()
    data["categories"][0]["name"] = "chat café"
    path = tmp_path / "instances_val2017.json"
    path.write_bytes(json.dumps(data, ensure_ascii=False).encode(encoding))
    assert load_coco_annotations(path)["categories"][0]["name"] == "chat café"
    assert num_classes_from_annotations(path) == 3


@pytest.mark.parametrize("content, pattern", [
    (json.dumps(minimal()).replace("dog", "d\u00f6g").encode("latin-1"), r"not UTF-8 text \(byte \d+ is b'\\xf6'\)"),
    (json.dumps(minimal()).encode()[:200], r"not valid JSON: .* at line 1 column \d+ \(the file ends there: was it "
                                           r"cut short\?\)"),
    (json.dumps(minimal()).encode()[:-1], r"not valid JSON: .*\(the file ends there"),
    (b"{'images': []}", r"not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2$"),
    (b"", r"the file is empty"), (b"  \n", r"the file is empty"),
    (codecs.BOM_UTF8 + b"[1, 2]", r"expected a JSON object .*got a list"),
])
def test_files_that_are_not_json_say_what_they_are(tmp_path, content, pattern):
    path = tmp_path / "instances_val2017.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"cannot read the COCO annotations .*instances_val2017\.json: " + pattern):
        load_coco_annotations(path)
    with pytest.raises(ValueError, match=pattern):
        num_classes_from_annotations(path)


def test_a_directory_given_as_the_annotation_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"COCO annotation file not found: .*ann \(it is a directory\)"):
        load_coco_annotations((tmp_path / "ann").mkdir() or tmp_path / "ann")


def test_checks_do_not_change_valid_entries(tmp_path):
    data = minimal()
    data["annotations"][0].update(segmentation=[[10, 10, 30, 10, 30, 40]], area=12.5, iscrowd=1)
    data["info"] = {"year": 2017}
    assert load_coco_annotations(write(tmp_path, data)) == copy.deepcopy(data)
