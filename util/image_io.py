"""Images into the model without torch: reading and decoding files, the evaluation resize rule, normalisation and
padding with numpy. datasets.transforms takes the resize rule and the normalisation constants from here, so that
the ONNX runtime path (util.onnx_runtime) prepares images exactly as evaluation does."""
import io
from pathlib import Path

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def read_bytes(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    return path.read_bytes()


def decode_image(data, path):
    """Encoded image bytes -> RGB PIL image; an undecodable file raises naming ``path``."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
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
