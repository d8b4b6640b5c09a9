"""Segment Anything prompted with boxes: building a predictor (SAM, the optional segment-anything package, or SAM 2,
the optional sam2 package) with its weights (a file, or a URL through the checkpoint cache), and the masks of one
image's boxes.

A predictor here is anything with segment_anything.SamPredictor's interface as box_masks uses it:
``set_image(uint8 [H, W, 3] RGB)``; ``transform.apply_boxes_torch(boxes, (H, W))``, xyxy boxes in the image's
pixels to the model's input frame; ``predict_torch(None, None, boxes=..., multimask_output=...)`` taking boxes in
that frame and returning (masks bool [B, C, H, W] in the image's pixels, predicted IoU [B, C], low-resolution
logits); ``device``. SAM 2's predictor is wrapped to offer it (Sam2BoxPredictor).
"""
import importlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from .amp import autocast
from .checkpoint import load_checkpoint
from .download import is_url

SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
SAM_CHECKPOINTS = {  # the released weights of each model
    "vit_h": SAM_URL + "sam_vit_h_4b8939.pth",
    "vit_l": SAM_URL + "sam_vit_l_0b3195.pth",
    "vit_b": SAM_URL + "sam_vit_b_01ec64.pth",
    "sam2.1_hiera_t": SAM2_URL + "sam2.1_hiera_tiny.pt",
    "sam2.1_hiera_s": SAM2_URL + "sam2.1_hiera_small.pt",
    "sam2.1_hiera_b+": SAM2_URL + "sam2.1_hiera_base_plus.pt",
    "sam2.1_hiera_l": SAM2_URL + "sam2.1_hiera_large.pt",
}
SAM_MODELS = tuple(SAM_CHECKPOINTS)
NO_CHECKPOINT = "none"  # --sam_checkpoint none: random weights (tests and timing only)
SAM2_INSTALL = ("pip install --no-deps --no-build-isolation sam2==1.1.0 hydra-core==1.3.2 omegaconf==2.3.0 "
                "antlr4-python3-runtime==4.9.3 iopath==0.1.10 portalocker==4.4.2")


def is_sam2(model):
    return model.startswith("sam2")


def segment_anything(model="vit_h"):
    """The package of `model`: segment_anything for SAM, sam2 for SAM 2; missing, one line naming it."""
    if is_sam2(model):
        try:
            return importlib.import_module("sam2.build_sam")
        except ImportError as error:
            raise ImportError(f"--sam_model {model} needs the sam2 package (and hydra-core, iopath): "
                              f"{SAM2_INSTALL} (docs/sam.md)") from error
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
        raise FileNotFoundError(f"--sam_checkpoint {checkpoint}: no such file (the released weights of {model}: "
                                f"{SAM_CHECKPOINTS[model]}; 'none' runs random weights)")


def _load_weights(module, model, checkpoint):
    """Load `checkpoint` (SAM's state dict, or SAM 2's {"model": state dict}) into `module`; weights of another
    model are an error saying so."""
    state = load_checkpoint(checkpoint)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    own, given = set(module.state_dict()), set(state) if isinstance(state, dict) else set()
    missing, unexpected = sorted(own - given), sorted(given - own)
    if missing or unexpected:
        raise ValueError(f"--sam_checkpoint {checkpoint} does not hold the weights of {model}: {len(missing)} tensors "
                         f"missing (e.g. {', '.join(missing[:3]) or '-'}), {len(unexpected)} unexpected (e.g. "
                         f"{', '.join(unexpected[:3]) or '-'}); is it another --sam_model's?")
    try:
        module.load_state_dict(state)
    except RuntimeError as error:  # the same names, other shapes
        raise ValueError(f"--sam_checkpoint {checkpoint} does not fit {model}: "
                         f"{str(error).splitlines()[-1].strip()}") from error


def build_sam_predictor(model, checkpoint, device):
    """The predictor of `model` (SAM: vit_h, vit_l, vit_b; SAM 2.1: sam2.1_hiera_t, _s, _b+, _l) on `device`, in
    eval mode, with the weights of `checkpoint` (a file or an http(s) URL, downloaded once into the checkpoint cache
    and loaded with weights_only=True; "none": random weights)."""
    package = segment_anything(model)
    check_sam_arguments(model, checkpoint)
    if is_sam2(model):
        sam = package.build_sam2(f"configs/sam2.1/{model}.yaml", ckpt_path=None, device="cpu")
    else:
        sam = package.sam_model_registry[model]()  # no checkpoint: built with random weights
    if checkpoint != NO_CHECKPOINT:
        _load_weights(sam, model, checkpoint)
    sam = sam.to(torch.device(device)).eval()
    if is_sam2(model):
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        return Sam2BoxPredictor(SAM2ImagePredictor(sam))
    return package.SamPredictor(sam)


class Sam2BoxPredictor:
    """SAM 2's SAM2ImagePredictor behind SamPredictor's interface (see the module's docstring): its own box
    transform (to its normalised 1024 x 1024 frame) and its batched prediction."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.transform = SimpleNamespace(apply_boxes_torch=self._boxes_to_input_frame)

    @property
    def device(self):
        return self.predictor.device

    def _boxes_to_input_frame(self, boxes, size):
        return self.predictor._transforms.transform_boxes(boxes, normalize=True, orig_hw=size).reshape(-1, 4)

    def set_image(self, image):
        self.predictor.set_image(image)

    def predict_torch(self, point_coords, point_labels, boxes=None, mask_input=None, multimask_output=True):
        return self.predictor._predict(point_coords, point_labels, boxes=boxes, mask_input=mask_input,
                                       multimask_output=multimask_output)


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
    with autocast(predictor.device, amp):
        predictor.set_image(image)
    prompts = predictor.transform.apply_boxes_torch(boxes.to(predictor.device), image.shape[:2])
    for start in range(0, len(prompts), batch_size):
        with autocast(predictor.device, amp):
            masks, iou, _ = predictor.predict_torch(None, None, boxes=prompts[start:start + batch_size],
                                                    multimask_output=multimask)
        # masks [B, C, H, W], iou [B, C]: C = 3 with multimask_output, else 1; each box's best of its C
        iou = iou.float()
        best = iou.argmax(dim=1)
        rows = torch.arange(len(best), device=best.device)
        yield masks[rows, best].cpu(), iou[rows, best].cpu()
