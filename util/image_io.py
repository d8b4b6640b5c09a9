"""Images into the model without torch: reading and decoding files (EXIF orientation applied, any PIL mode to 8-bit
RGB), the evaluation resize rule, normalisation and padding with numpy. datasets.coco and datasets.transforms take
these from here, so that the ONNX runtime path (util.onnx_runtime) prepares images exactly as evaluation does."""
import io
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def read_bytes(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    return path.read_bytes()


# modes of more than 8 bits per pixel, which PIL's convert("RGB") saturates (a 16-bit image turns white)
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def _wide_to_rgb(image, path):
    """A 16/32-bit integer or float grey image as 8-bit RGB, scaled by the range its values are stored in:
    [0, 1] (float), [0, 255] or [0, 65535] (16-bit data, / 257). Other ranges cannot be read without guessing."""
    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not np.isfinite(values).all() or low < 0 or high > 65535:
        raise RuntimeError(f"cannot convert image {path} (mode {image.mode}, values {low:g}..{high:g}) to 8-bit RGB: "
                           "save it as 8- or 16-bit")
    if image.mode == "F" and high <= 1:
        scale = 255.0
    elif high <= 255 and image.mode in ("I", "F"):
        scale = 1.0
    else:
        scale = 1 / 257
    grey = np.rint(values * scale).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def to_rgb(image, path):
    """A PIL image of any mode as 8-bit RGB: palette, grey, CMYK and the other 8-bit modes through PIL (alpha
    dropped), 16/32-bit grey images scaled to 8 bits (see _wide_to_rgb)."""
    if image.mode == "RGB":
        return image
    if image.mode in WIDE_MODES:
        return _wide_to_rgb(image, path)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL's advice for palette transparency; the alpha is dropped below
    return image.convert("RGB")


# EXIF orientation -> the transpose that shows the stored pixels as a viewer does (1 and unknown values: none)
ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}
# what PIL's EXIF parser raises on a corrupt block (a bad TIFF header: SyntaxError; a short entry: struct.error)
EXIF_ERRORS = (SyntaxError, struct.error, OSError, ValueError)


def exif_orientation(image):
    """The EXIF (else XMP) orientation of a loaded PIL image, 1 when it has none; a corrupt EXIF block raises one
    of EXIF_ERRORS."""
    exif = image.getexif()
    raw = image.info.get("exif")
    if raw and not exif:  # PIL's JPEG reader parses the block at open (for the dpi) and keeps a failure quiet
        Image.Exif().load(raw)
    return exif.get(ExifTags.Base.Orientation, 1)


def exif_oriented(image, path):
    """``image`` (loaded) turned and mirrored as its EXIF orientation says. An EXIF block PIL cannot parse leaves
    the pixels as stored, with a warning naming ``path``: the pixels themselves decoded."""
    try:
        orientation = exif_orientation(image)
    except EXIF_ERRORS as error:
        warnings.warn(f"image {path}: cannot read its EXIF block ({type(error).__name__}: {error}); using it as "
                      "stored, without applying an EXIF orientation", stacklevel=3)
        return image
    method = ORIENTATIONS.get(orientation) if isinstance(orientation, int) else None
    return image if method is None else image.transpose(method)


def decode_image(data, path):
    """Encoded image bytes -> 8-bit RGB PIL image as displayed: turned and mirrored as its EXIF orientation says (as
    photo viewers and annotation tools show it; see exif_oriented); an undecodable file raises naming ``path``.
    Training, evaluation and tools/infer.py all read images here."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return to_rgb(exif_oriented(image, path), path)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise RuntimeError(f"cannot decode image {path}: {error}") from error


def get_size_with_aspect_ratio(image_size, size, max_size=None):
    """Output (h, w) whose shorter side is ``size`` (reduced so the longer side stays <= ``max_size``).

    ``image_size`` is PIL's (w, h). Rounding follows DETR: the reduced shorter side is rounded, the longer
    side truncated.
    """
    w, h = image_size
    if max_size is not None:
        short, long = float(min(w, h)), float(max(w, h))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
            if size < 1:  # thinner than 1 : 2 * max_size: one pixel across, max_size along (0 pixels: an error)
                return (1, max_size) if w >= h else (max_size, 1)
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def eval_image_array(image, size, max_size):
    """What the evaluation transform makes of a PIL image, as numpy: resized (shorter side ``size``, longer side
    at most ``max_size``, PIL bilinear as torchvision does for PIL images), scaled to [0, 1] and normalised with the
    ImageNet mean and std. Returns float32 [3, h, w]."""
    new_h, new_w = get_size_with_aspect_ratio(image.size, size, max_size)
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), resample=Image.BILINEAR)
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)  # [H, W, 3] -> [3, H, W]
    # the operations of torchvision's to_dtype(scale=True) and normalize, in float32
    scaled = pixels.astype(np.float32) * np.float32(1.0 / 255)
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
    return (scaled - mean) / std


def pad_batch(arrays):
    """Pad [3, H, W] arrays to the largest H and W (bottom/right, zeros), as util.misc.nested_tensor_from_tensor_list
    does: (batch float32 [B, 3, H, W], mask bool [B, H, W], True on padding)."""
    if not arrays:
        raise ValueError("pad_batch: got no images")
    if any(a.ndim != 3 for a in arrays):
        raise ValueError(f"pad_batch: expected [C, H, W] arrays, got shapes {[a.shape for a in arrays]}")
    height = max(a.shape[1] for a in arrays)
    width = max(a.shape[2] for a in arrays)
    batch = np.zeros((len(arrays), arrays[0].shape[0], height, width), dtype=np.float32)
    mask = np.ones((len(arrays), height, width), dtype=bool)
    for i, array in enumerate(arrays):
        batch[i, :, : array.shape[1], : array.shape[2]] = array
        mask[i, : array.shape[1], : array.shape[2]] = False
    return batch, mask
