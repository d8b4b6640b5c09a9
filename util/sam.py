"""Segment Anything (the optional segment-anything package) prompted with boxes: building a predictor with its
weights (a file, or a URL through the checkpoint cache), and the masks of one image's boxes.

A predictor here is anything with SamPredictor's interface as used below: ``set_image(uint8 [H, W, 3] RGB)``,
``predict_torch(None, None, boxes=..., multimask_output=...)`` taking xyxy boxes in the frame of the image resized
so that its longer side is ``transform.target_length``, returning (masks bool [B, C, H, W] in the original image's
pixels, predicted IoU [B, C], low-resolution logits), and ``device``.
"""
import importlib
from pathlib import Path

import numpy as np
import torch

from .amp import autocast
from .checkpoint import load_checkpoint
from .download import is_url

SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
SAM_CHECKPOINTS = {  # the released weights of each image-encoder size
    "vit_h": SAM_URL + "sam_vit_h_4b8939.pth",
    "vit_l": SAM_URL + "sam_vit_l_0b3195.pth",
    "vit_b": SAM_URL + "sam_vit_b_01ec64.pth",
}
SAM_MODELS = tuple(SAM_CHECKPOINTS)
NO_CHECKPOINT = "none"  # --sam_checkpoint none: SAM with random weights (tests and timing only)


def segment_anything():
    """The segment_anything package; missing, one line naming it."""
    try:
        return importlib.import_module("segment_anything")
    except ImportError as error:
        raise ImportError("masks from SAM need the segment-anything package: pip install segment-anything==1.0") \
            from error


def check_sam_arguments(model, checkpoint):
    """An unknown --sam_model (ValueError) or a --sam_checkpoint file that is not there (FileNotFoundError), found
    before anything is built or downloaded."""
    if model not in SAM_CHECKPOINTS:
        raise ValueError(f"--sam_model {model!r}: choose one of {', '.join(SAM_MODELS)}")
    if checkpoint != NO_CHECKPOINT and not is_url(checkpoint) and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"--sam_checkpoint {checkpoint}: no such file (SAM {model}'s released weights: "
                                f"{SAM_CHECKPOINTS[model]}; 'none' runs random weights)")


def build_sam_predictor(model, checkpoint, device):
    """segment_anything.SamPredictor of SAM `model` (vit_h, vit_l, vit_b) on `device`, in eval mode, with the
    weights of `checkpoint` (a file or an http(s) URL, downloaded once into the checkpoint cache and loaded with
    weights_only=True; "none": random weights)."""
    package = segment_anything()
    check_sam_arguments(model, checkpoint)
    sam = package.sam_model_registry[model]()  # no checkpoint: built with random weights
    if checkpoint != NO_CHECKPOINT:
        state = load_checkpoint(checkpoint)
        state = state.get("model", state) if isinstance(state, dict) else state
        missing, unexpected = _key_differences(sam, state)
        if missing or unexpected:
            raise ValueError(f"--sam_checkpoint {checkpoint} does not hold SAM {model}'s weights: "
                             f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3]) or '-'}), "
                             f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3]) or '-'}); "
                             "is it another --sam_model's?")
        try:
            sam.load_state_dict(state)
        except RuntimeError as error:  # same names, other shapes: another model size
            raise ValueError(f"--sam_checkpoint {checkpoint} does not fit SAM {model}: "
                             f"{str(error).splitlines()[-1].strip()}") from error
    return package.SamPredictor(sam.to(torch.device(device)).eval())


def _key_differences(module, state):
    own = set(module.state_dict())
    given = set(state) if isinstance(state, dict) else set()
    return sorted(own - given), sorted(given - own)


def resized_size(height, width, long_side):
    """(h, w) of an image resized so that its longer side is `long_side`, rounded as SAM's ResizeLongestSide
    rounds them."""
    scale = long_side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def boxes_to_sam_frame(boxes, height, width, long_side):
    """xyxy boxes [N, 4] in the pixels of a height x width image -> the same boxes in the frame of that image
    resized to `long_side` (what predict_torch takes)."""
    new_height, new_width = resized_size(height, width, long_side)
    scale = boxes.new_tensor([new_width / width, new_height / height] * 2)
    return boxes * scale


def box_masks(predictor, image, boxes, batch_size, multimask=False, amp="fp32"):
    """Prompt SAM with one image's xyxy boxes [N, 4] (pixels of `image`, uint8 [H, W, 3] RGB), `batch_size` at a
    time: yields (masks bool [B, H, W], predicted IoU float32 [B]) per batch, on the CPU, in the boxes' order. The
    image is embedded once, and not at all when there is no box. With `multimask`, each box gets the best of SAM's 3
    masks by predicted IoU; otherwise SAM's single mask. SAM runs under autocast in the `amp` precision (util.amp)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"box_masks: expected a uint8 [H, W, 3] image, got {image.dtype} {tuple(image.shape)}")
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    if len(boxes) == 0:
        return
    height, width = image.shape[:2]
    with autocast(predictor.device, amp):
        predictor.set_image(image)
    prompts = boxes_to_sam_frame(boxes, height, width, predictor.transform.target_length).to(predictor.device)
    for start in range(0, len(prompts), batch_size):
        with autocast(predictor.device, amp):
            masks, iou, _ = predictor.predict_torch(None, None, boxes=prompts[start:start + batch_size],
                                                    multimask_output=multimask)
        # masks [B, C, H, W], iou [B, C]: C = 3 with multimask_output, else 1; each box's best of its C
        iou = iou.float()
        best = iou.argmax(dim=1)
        rows = torch.arange(len(best), device=best.device)
        yield masks[rows, best].cpu(), iou[rows, best].cpu()
