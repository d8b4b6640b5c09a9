"""Run an exported detector (tools/export_onnx.py) with onnxruntime, numpy and PIL alone: no torch.

The graph takes a padded, normalised image batch "images" [B, 3, H, W] float32 and its padding mask "mask"
[B, H, W] bool (True on padding, as util.misc.NestedTensor), and returns the one-to-one queries' "pred_logits"
[B, Q, K] and "pred_boxes" [B, Q, 4] (cxcywh relative to each image's unpadded area, as the PyTorch model). A graph
exported with the post-processing also takes "orig_sizes" [B, 2] int64 (h, w) and returns the top-k "scores"
[B, k], "labels" [B, k] int64 and "boxes" [B, k, 4] (xyxy pixels of those sizes). The export writes the evaluation
resize, --topk and the category names into the file's metadata.
"""
import json

import numpy as np

from .image_io import eval_image_array, pad_batch

INPUTS = ("images", "mask")
POSTPROCESS_INPUT = "orig_sizes"
OUTPUTS = ("pred_logits", "pred_boxes")
POSTPROCESS_OUTPUTS = ("scores", "labels", "boxes")
# metadata_props of the exported file
VAL_SCALE_KEY = "hdetr.val_scale"
MAX_SIZE_KEY = "hdetr.max_size"
TOPK_KEY = "hdetr.topk"
NAMES_KEY = "hdetr.category_names"  # JSON {id: name}
# without metadata (a file from elsewhere): upstream's evaluation resize and top-k
DEFAULT_VAL_SCALE, DEFAULT_MAX_SIZE, DEFAULT_TOPK = 800, 1333, 100


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError("running an ONNX model needs the onnxruntime package: pip install onnxruntime") from err
    return onnxruntime


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def top_detections(logits, boxes, orig_sizes, topk):
    """models.deformable_detr.PostProcess in numpy: the top-k (query, class) pairs per image of logits [B, Q, K]
    and cxcywh boxes [B, Q, 4], boxes scaled to orig_sizes [B, 2] (h, w). Returns scores [B, k], labels [B, k] and
    xyxy boxes [B, k, 4]."""
    batch, num_queries, num_classes = logits.shape
    prob = sigmoid(logits.astype(np.float32)).reshape(batch, -1)  # [B, Q * K]
    k = min(topk, num_queries * num_classes)
    # best first; among equal scores the lower index first
    order = np.argsort(-prob, axis=1, kind="stable")[:, :k]  # [B, k]
    scores = np.take_along_axis(prob, order, 1)
    labels = order % num_classes
    cx, cy, w, h = np.moveaxis(boxes, -1, 0)
    xyxy = np.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)  # [B, Q, 4]
    xyxy = np.take_along_axis(xyxy, (order // num_classes)[..., None], 1)  # [B, k, 4]
    img_h, img_w = np.asarray(orig_sizes, dtype=np.float32).T
    scale = np.stack([img_w, img_h, img_w, img_h], 1)  # [B, 4]
    return scores, labels.astype(np.int64), xyxy * scale[:, None, :]


class OnnxDetector:
    """An exported detector in an onnxruntime session (CPU unless `providers` say otherwise).

    val_scale / max_size / topk: the evaluation resize and the number of detections kept (default: those written
    into the file at export; for a graph with the post-processing, topk is the graph's).
    """

    def __init__(self, path, val_scale=None, max_size=None, topk=None, providers=("CPUExecutionProvider",),
                 threads=None):
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        except Exception as err:  # onnxruntime raises its own exception types
            raise RuntimeError(f"cannot load ONNX model {path}: {type(err).__name__}: {err}") from err
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        self.with_postprocess = POSTPROCESS_INPUT in inputs
        expected = (list(INPUTS) + [POSTPROCESS_INPUT] * self.with_postprocess,
                    list(OUTPUTS) + list(POSTPROCESS_OUTPUTS) * self.with_postprocess)
        if (inputs, outputs) != expected:
            raise ValueError(f"{path} is not a detector exported by tools/export_onnx.py: inputs {inputs}, outputs "
                             f"{outputs} (expected {expected[0]} and {expected[1]})")
        meta = self.session.get_modelmeta().custom_metadata_map
        self.val_scale = val_scale or int(meta.get(VAL_SCALE_KEY, DEFAULT_VAL_SCALE))
        self.max_size = max_size or int(meta.get(MAX_SIZE_KEY, DEFAULT_MAX_SIZE))
        self.topk = topk or int(meta.get(TOPK_KEY, DEFAULT_TOPK))
        self.names = {int(k): v for k, v in json.loads(meta.get(NAMES_KEY, "{}")).items()}

    def run(self, images, mask, orig_sizes=None):
        """The graph's outputs by name for a padded batch (and, with the post-processing, the original sizes)."""
        feed = {"images": np.ascontiguousarray(images, dtype=np.float32), "mask": np.asarray(mask, dtype=bool)}
        if self.with_postprocess:
            if orig_sizes is None:
                raise ValueError("this model includes the post-processing: pass orig_sizes [B, 2] (h, w)")
            feed[POSTPROCESS_INPUT] = np.asarray(orig_sizes, dtype=np.int64)
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feed)))

    def detect(self, images):
        """Top-k detections of PIL images, batched as evaluation batches them (padded to the largest): per image
        (scores [k], labels [k], boxes [k, 4] xyxy in its original pixels), best first."""
        batch, mask = pad_batch([eval_image_array(image, self.val_scale, self.max_size) for image in images])
        orig_sizes = np.array([[image.height, image.width] for image in images], dtype=np.int64)
        out = self.run(batch, mask, orig_sizes)
        if self.with_postprocess:
            scores, labels, boxes = (out[name] for name in POSTPROCESS_OUTPUTS)
        else:
            scores, labels, boxes = top_detections(out["pred_logits"], out["pred_boxes"], orig_sizes, self.topk)
        return list(zip(scores, labels, boxes))
