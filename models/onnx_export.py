"""Export of the evaluation model to ONNX, and the check of an exported file against PyTorch with onnxruntime.

The graph is the model in eval mode (one-to-one queries) with deformable attention on the PyTorch path
(grid_sample); inputs, outputs and metadata are those util.onnx_runtime reads. Batch size, height and width are
dynamic. The export captures the model with torch.export (non-strict) and translates it with torch.onnx's dynamo
exporter (it needs the onnxscript package); onnxscript's graph rewriter is not run: in onnxscript 0.7 its
min/max-to-Clip rule leaves the graph with a dangling input (onnx.checker rejects it). Constant folding and
the removal of unused nodes (the auxiliary heads) are run; onnxruntime optimises the graph further when it loads it.
"""
import json
import warnings
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch import nn

from util.misc import NestedTensor, nested_tensor_from_tensor_list
from util.onnx_runtime import (
    INPUTS,
    MAX_SIZE_KEY,
    NAMES_KEY,
    OUTPUTS,
    POSTPROCESS_INPUT,
    POSTPROCESS_OUTPUTS,
    TOPK_KEY,
    VAL_SCALE_KEY,
    OnnxDetector,
    import_onnxruntime,
)

# tolerance of check_export: max abs difference of logits and boxes between onnxruntime and PyTorch
CHECK_TOLERANCE = 1e-4
# the image size traced with; the graph runs on any size. Tracing keeps a size that is 1 at the traced scale as 1
# (a broadcast), so every window count and feature map must be 2 or more there: sides of at least MIN_EXAMPLE_SIDE
# (Swin's last stage needs more than one window of 12 tokens at stride 32: 385 pixels)
EXAMPLE_SIZE = (800, 1066)
MIN_EXAMPLE_SIDE = 400
# the lowest opset torch.onnx writes: its operators are implemented at 18 (torch 2.14's TORCHLIB_OPSET); asked for
# less, it exports at 18 and tries to convert the file down, which fails on this model and leaves it at 18
MIN_OPSET = 18


def import_onnx_packages():
    """(onnx, onnxscript), or an ImportError naming what to install."""
    try:
        import onnx
        import onnxscript
    except ImportError as err:
        raise ImportError(f"exporting to ONNX needs the onnx and onnxscript packages ({err.name} is missing): "
                          "pip install onnx onnxscript onnxruntime") from err
    return onnx, onnxscript


def supported_opsets():
    """The opsets an export can be written in: MIN_OPSET to the newest the installed onnx package defines (asked
    for a newer one, torch.onnx writes MIN_OPSET)."""
    onnx, _ = import_onnx_packages()
    return range(MIN_OPSET, onnx.defs.onnx_opset_version() + 1)


def opsets_written():
    """'the export writes opsets 18 to 28 ...' (as the installed onnx allows), for the messages refusing another."""
    opsets = supported_opsets()
    return (f"the export writes opsets {opsets.start} (torch.onnx's lowest) to {opsets.stop - 1} (the newest the "
            "installed onnx package defines)")


class ExportableDetector(nn.Module):
    """The evaluation model as the exported graph computes it: a padded batch and its padding mask in, the
    one-to-one queries' logits and boxes out; with a PostProcess also the top-k scores, labels and boxes in
    pixels of the original sizes."""

    def __init__(self, model, postprocess=None):
        super().__init__()
        self.model = model
        self.postprocess = postprocess

    def forward(self, images, mask, orig_sizes=None):
        out = self.model(NestedTensor(images, mask), one2one_only=True)
        outputs = (out["pred_logits"], out["pred_boxes"])
        if self.postprocess is not None:
            outputs += self.postprocess.top_detections(out, orig_sizes)
        return outputs


def example_inputs(size, with_postprocess, batch=2):
    """Inputs to trace with: `batch` random images of `size` (h, w), the second one padded (batch 2: torch.export
    would take a batch of 1 for a constant)."""
    h, w = size
    images = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(batch, h, w, dtype=torch.bool)
    mask[1:, h * 3 // 4:, :] = True
    mask[1:, :, w * 3 // 4:] = True
    images[mask[:, None].expand_as(images)] = 0.0
    inputs = (images, mask)
    if with_postprocess:
        inputs += (torch.tensor([[h, w]] * batch, dtype=torch.long),)
    return inputs


def _dynamic_shapes(with_postprocess, batch, height, width):
    """dynamic_shapes of the inputs (images, mask[, orig_sizes]) with these dims for batch, height and width."""
    shapes = ({0: batch, 2: height, 3: width}, {0: batch, 1: height, 2: width})
    return shapes + ({0: batch},) if with_postprocess else shapes


def _clean_graph(program):
    """Constant folding and unused-node removal on the exported program's graph, in place."""
    import onnx_ir.passes.common as passes
    from onnxscript.optimizer import fold_constants

    fold_constants(program.model)
    for cleanup in (passes.RemoveUnusedNodesPass(), passes.RemoveUnusedFunctionsPass(),
                    passes.RemoveUnusedOpsetsPass()):
        cleanup(program.model)


def _check_dynamic_inputs(model_proto, with_postprocess):
    """Batch, height and width must have stayed symbolic: a fixed one means the export specialised the graph."""
    names = list(INPUTS) + [POSTPROCESS_INPUT] * with_postprocess
    axes = {"images": (0, 2, 3), "mask": (0, 1, 2), POSTPROCESS_INPUT: (0,)}
    for value in model_proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        fixed = [axis for axis in axes[value.name] if not dims[axis].dim_param]
        if fixed:
            raise RuntimeError(f"the exported graph fixed axes {fixed} of input {value.name!r} to "
                               f"{[dims[a].dim_value for a in fixed]}; it would run on that size only")
    if [v.name for v in model_proto.graph.input] != names:
        raise RuntimeError(f"unexpected graph inputs {[v.name for v in model_proto.graph.input]}")


def export_onnx(model, path, postprocess=None, example_size=EXAMPLE_SIZE, metadata=None, opset=None):
    """Write the evaluation graph of `model` (a DeformableDETR) to `path`.

    postprocess: a PostProcess to include (then the graph takes "orig_sizes" and returns the top-k detections);
    example_size: (h, w) traced with, each side at least MIN_EXAMPLE_SIDE;
    metadata: {key: str} written into the file (util.onnx_runtime's keys); opset: ONNX opset, one of
    supported_opsets() (default torch's). Returns the onnx ModelProto written.
    """
    if len(example_size) != 2 or min(example_size) < MIN_EXAMPLE_SIDE:
        raise ValueError(f"the example size traced with must be at least {MIN_EXAMPLE_SIDE} x {MIN_EXAMPLE_SIDE} "
                         f"(a graph traced on a smaller image could only run on sizes like it), got {example_size}")
    onnx, _ = import_onnx_packages()
    if opset is not None and opset not in supported_opsets():
        raise ValueError(f"opset {opset} cannot be written: {opsets_written()}")
    with_postprocess = postprocess is not None
    wrapper = ExportableDetector(model, postprocess).eval()
    inputs = example_inputs(example_size, with_postprocess)
    # no autograd: checkpointing (--use_checkpoint, Swin's block checkpointing) is then off; under torch.export
    # deformable attention takes the PyTorch path (grid_sample: standard operators), see use_compiled()
    with torch.no_grad():
        # Dim.AUTO: dynamic, within the ranges the model allows (e.g. two-stage needs as many encoder tokens as
        # queries); _check_dynamic_inputs makes sure that no axis ended up fixed
        auto = torch.export.Dim.AUTO
        try:
            exported = torch.export.export(wrapper, inputs, strict=False,
                                           dynamic_shapes=_dynamic_shapes(with_postprocess, auto, auto, auto))
        except Exception as err:  # torch.export raises many types; the tools report RuntimeError in one line
            message = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise RuntimeError(f"torch.export cannot capture this model at {tuple(example_size)}: "
                               f"{type(err).__name__}: {message}") from err
        with warnings.catch_warnings():  # torch.onnx notes that it names the batch axis once for both inputs
            warnings.filterwarnings("ignore", message="# The axis name: batch will not be used")
            program = torch.onnx.export(
                exported, inputs, dynamo=True, optimize=False, opset_version=opset, verbose=False,
                dynamic_shapes=_dynamic_shapes(with_postprocess, "batch", "height", "width"),  # names the axes
                input_names=list(INPUTS) + [POSTPROCESS_INPUT] * with_postprocess,
                output_names=list(OUTPUTS) + list(POSTPROCESS_OUTPUTS) * with_postprocess)
    _clean_graph(program)
    written = program.model.opset_imports.get("")
    if opset is not None and written != opset:
        raise RuntimeError(f"torch.onnx wrote opset {written} instead of the requested {opset}; {path} not written")
    for key, value in (metadata or {}).items():
        program.model.metadata_props[key] = str(value)
    program.save(str(path), external_data=False)
    model_proto = onnx.load(str(path))
    _check_dynamic_inputs(model_proto, with_postprocess)
    return model_proto


def export_metadata(val_scale, max_size, topk, names):
    """The metadata util.onnx_runtime reads: the evaluation resize, top-k and category names {id: name}."""
    return {VAL_SCALE_KEY: val_scale, MAX_SIZE_KEY: max_size, TOPK_KEY: topk,
            NAMES_KEY: json.dumps({str(k): v for k, v in sorted(names.items())})}


def check_sizes(val_scale, max_size):
    """Three image sizes (h, w) of the evaluation resize other than the traced 4:3 one: a 3:2 landscape, a portrait
    and a square whose sides are multiples of 32 (sizes a backbone may treat apart: no padding)."""
    landscape = (val_scale, min(max_size, val_scale * 3 // 2))
    portrait = (min(max_size, val_scale * 5 // 4), val_scale * 3 // 4)
    side = max(32, val_scale // 32 * 32)
    return [landscape, portrait, (side, side)]


def _session_with_proposals(onnx, path, two_stage):
    """An onnxruntime session of the file that also returns the two-stage proposal ranking (the indices output
    of the TopK in the transformer) as "proposal_indices"; one-stage: the file as it is."""
    ort = import_onnxruntime()
    model_proto = onnx.load(str(path))
    if two_stage:
        topk = [node for node in model_proto.graph.node if node.op_type == "TopK" and any(
            prop.key == "namespace" and "DeformableTransformer" in prop.value for prop in node.metadata_props)]
        if len(topk) != 1:
            raise RuntimeError(f"{path}: cannot find the two-stage proposal selection (the TopK of the transformer) "
                               f"in the graph ({len(topk)} candidates)")
        model_proto.graph.node.append(onnx.helper.make_node("Identity", [topk[0].output[1]], ["proposal_indices"]))
        model_proto.graph.output.append(onnx.helper.make_tensor_value_info("proposal_indices", onnx.TensorProto.INT64,
                                                                           None))
    return ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])


@contextmanager
def pinned_proposals(model, indices, tolerance):
    """Within the block, two-stage `model` keeps the proposals `indices` [B, K] (onnxruntime's ranking) instead of
    its own top-k, after checking that they are a top-k of its own scores up to `tolerance`: proposals whose scores
    are closer than float rounding may be ranked either way, and with mixed selection the order decides which
    query content meets which proposal, so the outputs are only comparable for the same ranking."""
    transformer = model.transformer

    def select(scores, k):
        chosen = torch.from_numpy(indices).to(scores.device)
        kept = scores.gather(1, chosen)  # [B, K]
        rest = scores.scatter(1, chosen, float("-inf")).max(1).values  # best proposal left out, [B]
        if chosen.shape[1] != k or (kept[:, 1:] - kept[:, :-1]).max() > tolerance or \
                (rest - kept.min(1).values).max() > tolerance:
            raise RuntimeError("onnxruntime selects other two-stage proposals than PyTorch's top-k beyond rounding "
                               f"(tolerance {tolerance:.0e})")
        return chosen

    transformer.select_proposals = select  # the instance attribute hides the static method
    try:
        yield
    finally:
        del transformer.select_proposals


def check_export(model, path, sizes, postprocess=None, tolerance=CHECK_TOLERANCE, seed=0):
    """onnx.checker on the file, then onnxruntime (CPU) against PyTorch: one random image of each size alone and
    the first two padded into one batch; two-stage models rank the proposals as onnxruntime did (pinned_proposals).
    Returns [(image sizes, max |logits diff|, max |boxes diff|)]; raises RuntimeError when a difference exceeds
    `tolerance`."""
    onnx, _ = import_onnx_packages()
    onnx.checker.check_model(str(path), full_check=True)
    with_postprocess = OnnxDetector(path).with_postprocess
    if with_postprocess != (postprocess is not None):
        raise ValueError(f"{path}: exported {'with' if with_postprocess else 'without'} the post-processing")
    session = _session_with_proposals(onnx, path, model.two_stage)
    gen = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, h, w, generator=gen) for h, w in sizes]
    batches = [[image] for image in images] + ([images[:2]] if len(images) > 1 else [])
    model.eval()
    report = []
    for batch in batches:
        samples = nested_tensor_from_tensor_list(batch)
        orig_sizes = torch.tensor([[2 * im.shape[1], 2 * im.shape[2]] for im in batch])
        feed = {"images": samples.tensors.numpy(), "mask": samples.mask.numpy()}
        if with_postprocess:
            feed[POSTPROCESS_INPUT] = orig_sizes.numpy()
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
        pinned = pinned_proposals(model, got["proposal_indices"], tolerance) if model.two_stage else nullcontext()
        with torch.no_grad(), pinned:
            expected = ExportableDetector(model, postprocess)(samples.tensors, samples.mask, orig_sizes)
        diffs = [float(np.abs(got[name] - want.numpy()).max()) for name, want in zip(OUTPUTS, expected)]
        shapes = [tuple(im.shape[1:]) for im in batch]
        report.append((shapes, *diffs))
        if max(diffs) > tolerance:
            raise RuntimeError(f"{path}: onnxruntime differs from PyTorch on images {shapes}: max |logits diff| "
                               f"{diffs[0]:.2e}, max |boxes diff| {diffs[1]:.2e} (tolerance {tolerance:.0e})")
    return report
