"""A small synthetic COCO-format detection set: coloured geometric shapes on textured backgrounds.

The layout matches COCO (``train2017/``, ``val2017/``, ``annotations/instances_{split}2017.json``) so the
regular COCO reader and evaluator run on it unchanged; each object's ``segmentation`` is its visible pixels,
exactly (datasets.mask_outline: polygons, or RLE for an object with a hole). Everything is drawn from the seed: the
same parameters give byte-identical files. Each image has its own random stream (seed, split, index), so
changing the number of images leaves the existing ones as they were.
"""
import colorsys
import io
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .mask_outline import coco_segmentation

SHAPE_NAMES = ("circle", "square", "triangle", "diamond", "ring", "cross")
TEXTURES = ("noise", "stripes", "gradient")
SPLITS = ("train", "val")
MANIFEST_NAME = "manifest.json"
GENERATOR_VERSION = 2  # 2: annotations carry segmentation (images and boxes as in 1)
GENERATOR_ID = "H-Deformable-DETR datasets/synthetic.py"  # in the manifest: the folder is this generator's
_IMAGE_FILE_PATTERN = re.compile(r"^\d{12}\.(jpg|png)$")


@dataclass(frozen=True)
class SyntheticConfig:
    """Difficulty knobs of the generator (lengths in pixels unless noted); the defaults make the demo's data."""

    image_size: int = 128            # geometric mean of image width and height
    aspect_jitter: float = 0.25      # width / height drawn log-uniformly in [1 / (1 + j), 1 + j]
    min_objects: int = 1
    max_objects: int = 8
    min_object_frac: float = 0.18    # object extent, as a fraction of the shorter image side,
    max_object_frac: float = 0.55    # drawn log-uniformly between these two
    min_visible: float = 0.8         # an object keeps at least this fraction of its pixels visible
    rotation_jitter: float = 10.0    # degrees of rotation for square / diamond / cross
    texture_amplitude: float = 18.0  # grey levels of background texture (low contrast)
    min_color_distance: float = 90.0  # RGB distance of an object colour from the background colour
    min_overlap_color_distance: float = 70.0  # ... and from the colours of objects it overlaps
    pixel_noise: float = 3.0         # std of per-pixel Gaussian noise over the whole image
    placement_attempts: int = 30     # tries per object before giving up on it
    image_format: str = "jpg"        # "jpg" or "png"
    jpeg_quality: int = 95

    def __post_init__(self):
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 0 < self.min_object_frac <= self.max_object_frac <= 1:
            raise ValueError("need 0 < min_object_frac <= max_object_frac <= 1")
        if self.image_format not in ("jpg", "png"):
            raise ValueError(f"image_format must be 'jpg' or 'png', got {self.image_format!r}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {self.image_size}")
        widest = math.sqrt(3) * 255  # the largest RGB distance (black to white)
        ranges = {  # knob: (lowest, highest), both allowed
            "aspect_jitter": (0, math.inf), "min_visible": (1e-9, 1), "rotation_jitter": (0, 180),
            "texture_amplitude": (0, 255), "min_color_distance": (0, widest), "min_overlap_color_distance": (0, widest),
            "pixel_noise": (0, 255), "placement_attempts": (1, math.inf), "jpeg_quality": (1, 100)}
        wrong = [f"{name} {getattr(self, name)} (allowed: {low:g} to {high:g})" for name, (low, high) in ranges.items()
                 if not low <= getattr(self, name) <= high]
        if wrong:  # accepted, they made datasets without objects, or with another difficulty than asked
            raise ValueError(f"synthetic generator settings out of range: {'; '.join(wrong)}")


# --------------------------------------------------------------------------- shapes


def _rotate(points, angle_deg, center):
    """Rotate [K, 2] (x, y) offsets by ``angle_deg`` and move them to ``center``."""
    angle = math.radians(angle_deg)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return points @ rotation.T + np.asarray(center)


def _shape_outline(name, radius, rng, rotation_jitter):
    """Outline of a shape centred at 0: ("ellipse", r_outer, r_inner) or ("polygon", [K, 2] offsets, angle)."""
    jitter = rng.uniform(-rotation_jitter, rotation_jitter)
    if name == "circle":
        return "ellipse", radius, 0.0
    if name == "ring":
        return "ellipse", radius, radius * rng.uniform(0.45, 0.65)
    if name == "square":
        r = radius * 0.85
        return "polygon", np.array([[-r, -r], [r, -r], [r, r], [-r, r]]), jitter
    if name == "diamond":
        half_w = radius * rng.uniform(0.7, 1.0)
        return "polygon", np.array([[0, -radius], [half_w, 0], [0, radius], [-half_w, 0]]), jitter
    if name == "triangle":
        angles = np.radians([90.0, 210.0, 330.0])
        return "polygon", radius * np.stack([np.cos(angles), -np.sin(angles)], axis=1), rng.uniform(0, 360)
    if name == "cross":
        arm = radius * rng.uniform(0.3, 0.4)  # half thickness of each bar
        r = radius
        points = np.array([[-arm, -r], [arm, -r], [arm, -arm], [r, -arm], [r, arm], [arm, arm],
                           [arm, r], [-arm, r], [-arm, arm], [-r, arm], [-r, -arm], [-arm, -arm]])
        return "polygon", points, jitter
    raise ValueError(f"unknown shape {name!r}")


def draw_shape_mask(name, center, radius, width, height, rng, rotation_jitter=0.0):
    """Boolean mask [H, W] of one shape of ``radius`` centred at ``center = (x, y)``."""
    kind, outline, extra = _shape_outline(name, radius, rng, rotation_jitter)
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy = center
    if kind == "ellipse":
        draw.ellipse([cx - outline, cy - outline, cx + outline, cy + outline], fill=1)
        if extra > 0:
            draw.ellipse([cx - extra, cy - extra, cx + extra, cy + extra], fill=0)
    else:
        points = _rotate(outline, extra, center)
        draw.polygon([tuple(p) for p in points.tolist()], fill=1)
    return np.asarray(canvas, dtype=bool)


# --------------------------------------------------------------------------- background and colours


def make_background(width, height, rng, cfg):
    """Textured background [H, W, 3] float and its base colour [3]: low-contrast noise, stripes or gradient."""
    level = rng.uniform(70, 185)
    base = np.clip(level + rng.uniform(-20, 20, size=3), 0, 255)
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    amplitude = cfg.texture_amplitude
    if texture == "noise":
        # smooth blobs: coarse noise upsampled
        cell = int(rng.integers(6, 17))
        coarse = rng.uniform(-1, 1, size=(max(2, height // cell), max(2, width // cell)))
        coarse_img = Image.fromarray(((coarse + 1) * 127.5).astype(np.uint8))
        pattern = np.asarray(coarse_img.resize((width, height), Image.Resampling.BILINEAR), np.float64)
        pattern = pattern / 127.5 - 1
    elif texture == "stripes":
        period = rng.uniform(8, 40)
        angle = rng.uniform(0, math.pi)
        pattern = np.sin(2 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period)
    else:
        angle = rng.uniform(0, 2 * math.pi)
        ramp = xs * math.cos(angle) + ys * math.sin(angle)
        pattern = 2 * (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-6) - 1
    tint = rng.uniform(0.6, 1.0, size=3)  # texture slightly coloured
    background = base + amplitude * pattern[..., None] * tint
    return background, base


def random_color(rng):
    """A saturated colour (RGB floats in [0, 255]) of random hue."""
    hue = rng.uniform(0, 1)
    saturation = rng.uniform(0.55, 1.0)
    value = rng.uniform(0.45, 1.0)
    return np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255


def pick_color(rng, avoid, min_distances, attempts=50):
    """A colour at least ``min_distances[i]`` (RGB distance) from each ``avoid[i]``; the best try otherwise."""
    best, best_margin = None, -np.inf
    for _ in range(attempts):
        color = random_color(rng)
        margin = min((np.linalg.norm(color - a) - d for a, d in zip(avoid, min_distances)), default=0.0)
        if margin >= 0:
            return color
        if margin > best_margin:
            best, best_margin = color, margin
    return best


# --------------------------------------------------------------------------- one image


def _image_rng(seed, split, index):
    return np.random.default_rng([seed, SPLITS.index(split), index])


def render_image(rng, cfg):
    """Draw one image.

    Returns (uint8 image [H, W, 3], objects, instance map [H, W]): objects are (category index, tight xywh
    box of the visible pixels, visible pixel count), listed back to front; the map holds at each pixel the
    index of the object seen there, -1 on background.
    """
    ratio = math.exp(rng.uniform(-1, 1) * math.log(1 + cfg.aspect_jitter))
    width = max(16, round(cfg.image_size * math.sqrt(ratio)))
    height = max(16, round(cfg.image_size / math.sqrt(ratio)))
    background, base_color = make_background(width, height, rng, cfg)

    owner = np.full((height, width), -1, dtype=np.int64)  # index of the object seen at each pixel
    full_areas, visible_areas, colors, categories = [], [], [], []
    num_wanted = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    short_side = min(width, height)
    for _ in range(num_wanted):
        for _ in range(cfg.placement_attempts):
            category = int(rng.integers(len(SHAPE_NAMES)))
            extent = short_side * math.exp(rng.uniform(math.log(cfg.min_object_frac),
                                                       math.log(cfg.max_object_frac)))
            radius = extent / 2
            center = (rng.uniform(radius, width - radius), rng.uniform(radius, height - radius))
            mask = draw_shape_mask(SHAPE_NAMES[category], center, radius, width, height, rng,
                                   cfg.rotation_jitter)
            area = int(mask.sum())
            if area < 16:
                continue
            # pixels each earlier object would lose under the new one
            covered = np.bincount(owner[mask] + 1, minlength=len(full_areas) + 1)[1:]
            remaining = np.asarray(visible_areas, dtype=np.int64) - covered
            if np.any(remaining < cfg.min_visible * np.asarray(full_areas)):
                continue
            overlapped = [colors[j] for j in np.flatnonzero(covered)]
            color = pick_color(rng, [base_color] + overlapped,
                               [cfg.min_color_distance] + [cfg.min_overlap_color_distance] * len(overlapped))
            owner[mask] = len(full_areas)
            visible_areas = list(remaining) + [area]
            full_areas.append(area)
            colors.append(color)
            categories.append(category)
            break

    image = background.copy()
    for index, color in enumerate(colors):
        image[owner == index] = color
    image += rng.normal(0, cfg.pixel_noise, size=image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    objects = []
    for index, category in enumerate(categories):
        ys, xs = np.nonzero(owner == index)
        x0, y0 = int(xs.min()), int(ys.min())
        box = [x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0]  # tight xywh
        objects.append((category, box, int(len(xs))))
    return image, objects, owner


def encode_image(array, cfg):
    buffer = io.BytesIO()
    if cfg.image_format == "jpg":
        Image.fromarray(array).save(buffer, format="JPEG", quality=cfg.jpeg_quality, subsampling=0)
    else:
        Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- dataset


def coco_categories():
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPE_NAMES)]


def write_split(out_dir, split, num_images, seed, cfg):
    """Write the images and the instances json of one split; returns the json dict."""
    image_dir = Path(out_dir) / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image_id = index + 1
        array, objects, owner = render_image(_image_rng(seed, split, index), cfg)
        file_name = f"{image_id:012d}.{cfg.image_format}"
        (image_dir / file_name).write_bytes(encode_image(array, cfg))
        images.append({"id": image_id, "file_name": file_name,
                       "height": int(array.shape[0]), "width": int(array.shape[1])})
        for index_in_image, (category, box, area) in enumerate(objects):
            # area: the visible pixels, which the segmentation covers exactly
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category + 1,
                                "bbox": box, "area": area, "iscrowd": 0,
                                "segmentation": coco_segmentation(owner == index_in_image)})
    written = {image["file_name"] for image in images}
    for stale in image_dir.iterdir():  # images of an earlier, larger generation
        if _IMAGE_FILE_PATTERN.match(stale.name) and stale.name not in written:
            stale.unlink()
    dataset = {
        "info": {"description": f"synthetic shapes, {split} split", "version": str(GENERATOR_VERSION)},
        "images": images,
        "annotations": annotations,
        "categories": coco_categories(),
    }
    ann_file = Path(out_dir) / "annotations" / f"instances_{split}2017.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    ann_file.write_text(json.dumps(dataset, separators=(",", ":")))
    return dataset


def generation_parameters(num_train, num_val, seed, cfg):
    """Everything the output depends on (what the manifest records)."""
    return {"generator_version": GENERATOR_VERSION, "num_train": num_train, "num_val": num_val,
            "seed": seed, **asdict(cfg)}


def _load_manifest(out_dir):
    """The content of ``out_dir``'s manifest.json, None when there is none or it is not JSON."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _own_manifest(data):
    """Whether a manifest's content is this generator's (written before GENERATOR_ID was: by its parameters)."""
    if not isinstance(data, dict):
        return False
    parameters = data.get("parameters")
    return data.get("generator") == GENERATOR_ID or isinstance(parameters, dict) and "generator_version" in parameters


def read_manifest(out_dir):
    """Parameters recorded by the last complete generation in ``out_dir``, or None."""
    data = _load_manifest(out_dir)
    return data.get("parameters") if _own_manifest(data) else None


def coco_files(out_dir):
    """What a generation in ``out_dir`` would overwrite or delete, described: the instances json files and the
    images named as COCO's (and this generator's) there."""
    out_dir = Path(out_dir)
    found = [f"annotations/instances_{split}2017.json" for split in SPLITS
             if (out_dir / "annotations" / f"instances_{split}2017.json").exists()]
    for split in SPLITS:
        image_dir = out_dir / f"{split}2017"
        count = sum(bool(_IMAGE_FILE_PATTERN.match(p.name)) for p in image_dir.iterdir()) if image_dir.is_dir() else 0
        if count:
            found.append(f"{count} image{'s' * (count > 1)} in {split}2017/")
    return found


def check_own_folder(out_dir):
    """Raise FileExistsError unless generating in ``out_dir`` replaces only files this generator wrote: its
    manifest must be there, else no file it would replace may be (a folder of COCO's files may be a real dataset)."""
    out_dir = Path(out_dir)
    advice = "nothing written; choose another output folder (--out), or delete {} yourself to generate there"
    if (out_dir / MANIFEST_NAME).exists():
        if not _own_manifest(_load_manifest(out_dir)):
            raise FileExistsError(f"{out_dir / MANIFEST_NAME} was not written by this generator: "
                                  f"{advice.format('it')}")
        return
    found = coco_files(out_dir)
    if found:
        listed = " and ".join([", ".join(found[:-1]), found[-1]] if len(found) > 1 else found)
        raise FileExistsError(f"{out_dir} holds {listed} but no {MANIFEST_NAME} of this generator (maybe a real "
                              f"dataset): {advice.format('them')}")


def make_synthetic_coco(out_dir, num_train, num_val, image_size=128, seed=0, **knobs):
    """Write the synthetic set under ``out_dir``; ``knobs`` are ``SyntheticConfig`` fields.

    Returns a summary: per split the number of images and objects, and the written paths. A folder holding
    COCO-named files but no manifest of this generator is refused (check_own_folder). The manifest claims the
    folder first, without parameters, and gets them last, so that they mark a complete generation.
    """
    cfg = SyntheticConfig(image_size=image_size, **knobs)
    out_dir = Path(out_dir)
    check_own_folder(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST_NAME
    manifest_path.write_text(json.dumps({"generator": GENERATOR_ID, "parameters": None}))
    summary = {"out_dir": str(out_dir), "splits": {}}
    for split, count in (("train", num_train), ("val", num_val)):
        dataset = write_split(out_dir, split, count, seed, cfg)
        summary["splits"][split] = {
            "images": len(dataset["images"]),
            "objects": len(dataset["annotations"]),
            "image_dir": str(out_dir / f"{split}2017"),
            "ann_file": str(out_dir / "annotations" / f"instances_{split}2017.json"),
        }
    parameters = generation_parameters(num_train, num_val, seed, cfg)
    manifest_path.write_text(json.dumps({"generator": GENERATOR_ID, "parameters": parameters, "summary": summary},
                                        indent=2))
    return summary
