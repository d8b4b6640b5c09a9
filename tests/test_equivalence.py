"""The product's faster computations agree with upstream's forms (tests/reference/upstream_forms.py) in float64
(to 1e-9, in practice ~1e-15):

- the compiled CPU deformable-attention op against the grid_sample path (points on, between and off the pixel
  grid, outside every border, padded values), forward and the three gradients;
- the deformable-attention module against upstream's forward (padding mask, grid_sample path), and its sampling
  locations, written as one addcdiv / addcmul (over [.., P * 2]), against upstream's expressions;
- query self-attention as one dense attention per group against nn.MultiheadAttention with the hybrid mask;
- the per-image matching costs against upstream's batched cost matrix, repeated targets costed once;
- the focal loss and the paired GIoU against upstream's expressions (the diagonal of the pairwise GIoU);
- the layers' feed-forward block with its ReLU in place against autograd's Linear / ReLU / Linear;
- the whole model (box-head outputs reused, all the above) against upstream_operations(): every output, loss term
  and parameter gradient, on padded batches; and three training steps with the fused AdamW kernel against
  upstream's forms with the plain AdamW loop.
"""
import contextlib
import copy

import pytest
import torch
from model_helpers import SMALL, TWO_STAGE_HYBRID, build, images, perturb, targets
from reference import upstream_forms
from reference.upstream_forms import UPSTREAM_FORMS, form_name, upstream_operations

import models.ops.modules.ms_deform_attn as msda_module
from models import criterion as criterion_module
from models import deformable_transformer
from models.attention import grouped_self_attention, query_self_attention
from models.criterion import sigmoid_focal_loss, weighted_losses
from models.feed_forward import feed_forward
from models.matcher import HungarianMatcher
from models.ops.functions import ms_deform_attn_core_pytorch, ms_deform_attn_func
from models.ops.functions.extension import get_cpu_extension
from models.ops.functions.ms_deform_attn_func import ms_deform_attn_compiled
from models.ops.modules import MSDeformAttn
from models.optimizer import build_optimizer
from util.box_ops import box_cxcywh_to_xyxy, paired_generalized_box_iou

TOL = dict(rtol=1e-9, atol=1e-9)


@pytest.fixture(scope="module")
def cpu_op():
    """The compiled CPU op (built on first use); skipped where no C++ compiler can build it."""
    module = get_cpu_extension()
    if module is None:
        pytest.skip("the CPU op could not be built here (the PyTorch path is used)")
    return module


def _starts(shapes):
    sizes = shapes.prod(1)
    return torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def _op_inputs(shapes, n=2, num_queries=9, heads=3, channels=5, points=3, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(shapes, dtype=torch.long)
    num_values = int(shapes.prod(1).sum())
    value = torch.randn(n, num_values, heads, channels, generator=gen, dtype=dtype)
    # anywhere from well outside the map to past the far border
    locations = torch.rand(n, num_queries, heads, len(shapes), points, 2, generator=gen, dtype=dtype) * 1.8 - 0.4
    weights = torch.rand(n, num_queries, heads, len(shapes), points, generator=gen, dtype=dtype)
    return value, shapes, locations, weights


def _near_grid_and_borders(locations, shapes, offset):
    """Every third location moved to `offset` pixels from a pixel centre or edge, and a few to `offset` pixels
    inside or outside the map's borders. offset 0 puts them on the kinks of bilinear sampling, where the derivative
    jumps and the rounding of x * W - 0.5 picks the side."""
    size = shapes.flip(-1).to(locations)[:, None, :]  # [L, 1, 2] (W, H)
    on_grid = (torch.round(locations * size * 2) / 2 + offset) / size  # whole and half pixels, shifted
    out = locations.clone()
    out[..., ::3, :] = on_grid[..., ::3, :]
    flat = out.view(-1, len(shapes), out.shape[-2], 2)[:, 0, 0]  # level 0, point 0 of each (image, query, head)
    borders = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [-0.5, 0.5], [0.5, -0.5], [1.5, 0.5]],
                           dtype=out.dtype)  # in pixels beyond the map: 0 is its edge, -0.5 a centre outside
    w, h = shapes[0, 1].item(), shapes[0, 0].item()
    pixels = borders * torch.tensor([w, h], dtype=out.dtype) + offset * torch.tensor([1.0, -1.0], dtype=out.dtype)
    flat[:len(borders)] = pixels / torch.tensor([w, h], dtype=out.dtype)
    return out


@pytest.mark.parametrize("shapes", [[(5, 7), (3, 4), (2, 3)], [(1, 1)], [(6, 2), (1, 5)]], ids=str)
@pytest.mark.parametrize("offset", [1e-6, -1e-6, 0.37])
def test_cpu_op_equals_the_pytorch_path_in_float64(cpu_op, shapes, offset):
    """Forward and gradients, with points a millionth of a pixel from the grid lines and borders (both sides)."""
    value, shapes, locations, weights = _op_inputs(shapes)
    locations = _near_grid_and_borders(locations, shapes, offset)
    inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
    reference = ms_deform_attn_core_pytorch(inputs[0], shapes, inputs[1], inputs[2])
    compiled_inputs = [t.clone().requires_grad_() for t in (value, locations, weights)]
    compiled = ms_deform_attn_compiled(compiled_inputs[0], shapes, _starts(shapes), compiled_inputs[1],
                                       compiled_inputs[2], 64)
    torch.testing.assert_close(compiled, reference, **TOL)
    grad_out = torch.randn(reference.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference.backward(grad_out)
    compiled.backward(grad_out)
    for name, ours, theirs in zip(("value", "locations", "weights"), compiled_inputs, inputs):
        torch.testing.assert_close(ours.grad, theirs.grad, **TOL, msg=name)


@pytest.mark.parametrize("shapes", [[(5, 7), (3, 4), (2, 3)], [(6, 2), (1, 5)]], ids=str)
def test_cpu_op_on_the_kinks_of_bilinear_sampling(cpu_op, shapes):
    """Exactly on pixel centres and borders the sample still agrees (the derivative's side is up to rounding)."""
    value, shapes, locations, weights = _op_inputs(shapes)
    locations = _near_grid_and_borders(locations, shapes, 0.0)
    compiled = cpu_op.ms_deform_attn_forward(value, shapes, _starts(shapes), locations, weights, 64)
    torch.testing.assert_close(compiled, ms_deform_attn_core_pytorch(value, shapes, locations, weights), **TOL)


def test_cpu_op_gradcheck_and_float32(cpu_op):
    value, shapes, locations, weights = _op_inputs([(4, 3), (2, 2)], n=1, num_queries=3, heads=2, channels=2)
    locations = locations.clamp(-0.2, 1.2)
    inputs = [t.requires_grad_() for t in (value, locations, weights)]
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn_compiled(v, shapes, _starts(shapes), loc, w, 64), inputs, eps=1e-6,
        atol=1e-5)
    value, shapes, locations, weights = _op_inputs([(30, 40), (15, 20)], num_queries=200, heads=8, channels=32,
                                                   points=4, dtype=torch.float32)
    torch.testing.assert_close(cpu_op.ms_deform_attn_forward(value, shapes, _starts(shapes), locations, weights, 64),
                               ms_deform_attn_core_pytorch(value, shapes, locations, weights), rtol=1e-5, atol=1e-5)


def test_module_with_padding_mask_equals_upstreams_forward_in_float64(cpu_op):
    """The module (the compiled op, the in-place padding fill, one-pass locations) against upstream's forward."""
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=3).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    gen = torch.Generator().manual_seed(2)
    shapes = torch.tensor([[6, 8], [3, 4]])
    query = torch.randn(2, 7, 16, generator=gen, dtype=torch.float64)
    flatten = torch.randn(2, 60, 16, generator=gen, dtype=torch.float64)
    reference_points = torch.rand(2, 7, 2, 4, generator=gen, dtype=torch.float64)
    mask = torch.zeros(2, 60, dtype=torch.bool)
    mask[1, 30:48] = True  # the second image's padding
    mask[1, 54:] = True
    results = []
    for forward in (MSDeformAttn.forward, upstream_forms.msdeform_attn_forward):
        attn.zero_grad()
        inputs = [t.clone().requires_grad_() for t in (query, flatten, reference_points)]
        out = forward(attn, inputs[0], inputs[2], inputs[1], shapes, _starts(shapes), mask)
        out.pow(2).sum().backward()
        results.append((out, [t.grad for t in inputs], {n: p.grad.clone() for n, p in attn.named_parameters()}))
    (out, input_grads, param_grads), (ref_out, ref_input_grads, ref_param_grads) = results
    torch.testing.assert_close(out, ref_out, **TOL)
    for ours, theirs in zip(input_grads, ref_input_grads):
        torch.testing.assert_close(ours, theirs, **TOL)
    for name in param_grads:
        torch.testing.assert_close(param_grads[name], ref_param_grads[name], **TOL, msg=name)


@pytest.mark.parametrize("coords", [2, 4])
def test_sampling_locations_equal_upstreams_expressions(coords, monkeypatch):
    """The locations, written as one addcdiv (points) / addcmul (boxes), and their gradients, are upstream's."""
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=3).double()
    gen = torch.Generator().manual_seed(3)
    shapes = torch.tensor([[6, 8], [3, 5]])
    query = torch.randn(2, 4, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    flatten = torch.randn(2, 63, 16, generator=gen, dtype=torch.float64)
    reference = torch.rand(2, 4, 2, coords, generator=gen, dtype=torch.float64, requires_grad=True)
    seen = []
    monkeypatch.setattr(msda_module, "ms_deform_attn",
                        lambda value, shapes, starts, locations, weights, step, sizes: seen.append(locations) or
                        value.new_zeros(value.shape[0], locations.shape[1], 16))
    attn(query, reference, flatten, shapes, _starts(shapes))
    offsets = attn.sampling_offsets(query).view(2, 4, 2, 2, 3, 2)
    expected = upstream_forms.sampling_locations(reference, offsets, shapes, attn.n_points)
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=1e-15)
    grad = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    ours = torch.autograd.grad(seen[0], (query, reference), grad)
    theirs = torch.autograd.grad(expected, (query, reference), grad)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


@pytest.mark.parametrize("groups", [(3, 4), (7,), (1, 5, 1), (6, 1)], ids=str)
def test_grouped_attention_equals_the_masked_multihead_attention_in_float64(groups):
    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(16, 4, dropout=0.0).double()
    with torch.no_grad():
        attn.in_proj_bias.normal_()
        attn.out_proj.bias.normal_()
    gen = torch.Generator().manual_seed(4)
    query_key = torch.randn(2, sum(groups), 16, generator=gen, dtype=torch.float64, requires_grad=True)
    value = torch.randn(2, sum(groups), 16, generator=gen, dtype=torch.float64, requires_grad=True)
    ours = grouped_self_attention(attn, query_key, value, groups)
    assert torch.equal(query_self_attention(attn, query_key, value, groups), ours)  # what the model runs
    theirs = upstream_forms.query_self_attention(attn, query_key, value, groups)
    torch.testing.assert_close(ours, theirs, **TOL)
    grad = torch.randn(ours.shape, generator=gen, dtype=torch.float64)
    params = list(attn.parameters())
    for a, b in zip(torch.autograd.grad(ours, [query_key, value, *params], grad),
                    torch.autograd.grad(theirs, [query_key, value, *params], grad)):
        torch.testing.assert_close(a, b, **TOL)


def test_attention_dropout_in_training_keeps_upstreams_computation():
    """With dropout the random masks must be upstream's: the masked nn.MultiheadAttention runs, bit for bit."""
    torch.manual_seed(0)
    attn = torch.nn.MultiheadAttention(16, 4, dropout=0.3).train()
    query_key, value = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    torch.manual_seed(5)
    ours = query_self_attention(attn, query_key, value, (3, 4))
    torch.manual_seed(5)
    theirs = upstream_forms.query_self_attention(attn, query_key, value, (3, 4))
    assert torch.equal(ours, theirs)


def test_per_image_matching_costs_equal_the_batched_cost_matrix():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 11, 7, generator=gen, dtype=torch.float64)
    boxes = torch.cat([0.2 + 0.6 * torch.rand(3, 11, 2, generator=gen, dtype=torch.float64),
                       0.05 + 0.3 * torch.rand(3, 11, 2, generator=gen, dtype=torch.float64)], -1)
    tgts = targets([4, 0, 6], num_classes=7, seed=6)
    tgts = [{k: v.double() if v.is_floating_point() else v for k, v in t.items()} for t in tgts]
    matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2)
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    # upstream: every query of the batch against every target of the batch, then the diagonal blocks
    blocks = upstream_forms.matching_costs(matcher, outputs, tgts).split([len(t["labels"]) for t in tgts], -1)
    for i, t in enumerate(tgts):
        ours = matcher.cost_matrix(logits[i], boxes[i], t["labels"], t["boxes"])
        torch.testing.assert_close(ours, blocks[i][i], rtol=0, atol=1e-12)
    matched = matcher(outputs, tgts)
    assert [len(s) for s, _ in matched] == [4, 0, 6]
    for (src, tgt), (ref_src, ref_tgt) in zip(matched, upstream_forms.matcher_forward(matcher, outputs, tgts)):
        assert torch.equal(src, ref_src) and torch.equal(tgt, ref_tgt)


MODEL_CONFIGS = {
    "hybrid_two_stage_mqs_lft": TWO_STAGE_HYBRID,
    "hybrid_two_stage": ["--with_box_refine", "--two_stage"],
    "one_stage_refine": ["--with_box_refine"],
    "one_stage": [],
}


def _train_step(model, criterion, args, imgs, tgts):
    model.zero_grad()
    out = model([im.clone() for im in imgs])
    losses = criterion(out, copy.deepcopy(tgts))
    weighted_losses(losses, criterion.weight_dict)[1].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, losses, grads


def _flat(out, prefix=""):
    if isinstance(out, dict):
        return {k: v for key, val in out.items() for k, v in _flat(val, f"{prefix}{key}.").items()}
    if isinstance(out, list):
        return {k: v for i, val in enumerate(out) for k, v in _flat(val, f"{prefix}{i}.").items()}
    return {prefix[:-1]: out.detach()}


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_model_equals_upstreams_operation_order_in_float64(name, monkeypatch):
    """Train step and evaluation of a whole model, the product's against upstream_operations(), on a padded
    batch."""
    model, criterion, _, args = build(SMALL + MODEL_CONFIGS[name] + ["--backbone", "resnet18"])
    model.double()
    perturb(model, scale=0.1)
    model.train()
    imgs = [im.double() for im in images([(64, 96), (80, 64)])]
    tgts = [{k: v.double() if v.is_floating_point() else v for k, v in t.items()} for t in targets([3, 2])]

    calls = {"compiled op": 0, "masked attention": 0}
    original_mha = torch.nn.MultiheadAttention.forward

    def counting_op(*a):
        calls["compiled op"] += 1
        return ms_deform_attn_compiled(*a)

    def counting_mha(self, *a, **k):
        calls["masked attention"] += 1
        return original_mha(self, *a, **k)

    monkeypatch.setattr(ms_deform_attn_func, "ms_deform_attn_compiled", counting_op)
    monkeypatch.setattr(torch.nn.MultiheadAttention, "forward", counting_mha)
    fast = _train_step(model, criterion, args, imgs, tgts)
    fast_calls = dict(calls)
    calls.update({k: 0 for k in calls})
    with upstream_operations() as upstream_calls:
        upstream = _train_step(model, criterion, args, imgs, tgts)
    assert calls["compiled op"] == 0 and calls["masked attention"] == args.dec_layers
    assert set(upstream_calls) == {form_name(owner, attribute) for owner, attribute, _ in UPSTREAM_FORMS}
    if get_cpu_extension() is not None:
        assert fast_calls["compiled op"] == args.enc_layers + args.dec_layers
    assert fast_calls["masked attention"] == 0

    (out, losses, grads), (ref_out, ref_losses, ref_grads) = fast, upstream
    flat, ref_flat = _flat(out), _flat(ref_out)
    assert flat.keys() == ref_flat.keys() and losses.keys() == ref_losses.keys() and grads.keys() == ref_grads.keys()
    for key in flat:
        torch.testing.assert_close(flat[key], ref_flat[key], **TOL, msg=key)
    for key in losses:
        torch.testing.assert_close(losses[key], ref_losses[key], **TOL, msg=key)
    for key in grads:
        torch.testing.assert_close(grads[key], ref_grads[key], **TOL, msg=key)

    model.eval()
    with torch.no_grad():
        evaluated = _flat(model(imgs))
        with upstream_operations():
            ref_evaluated = _flat(model(imgs))
    for key in ref_evaluated:
        torch.testing.assert_close(evaluated[key], ref_evaluated[key], **TOL, msg=key)


def test_training_steps_with_the_fused_optimizer_equal_upstreams_in_float64():
    """Three training steps (gradient clipping, AdamW's moments, the backbone's batch statistics): the product's
    forms and the fused AdamW kernel against upstream's forms and the plain AdamW loop."""
    model, criterion, _, args = build(SMALL + TWO_STAGE_HYBRID + ["--backbone", "resnet18"])
    model.double()
    perturb(model, scale=0.1)
    model.train()
    batches = [([im.double() for im in images([(64, 96), (80, 64)], seed=seed)],
                [{k: v.double() if v.is_floating_point() else v for k, v in t.items()}
                 for t in targets([3, 2], seed=seed)]) for seed in range(3)]

    def train(fast):
        trained = copy.deepcopy(model)
        optimizer = build_optimizer(args, trained)[0]
        assert all(group["fused"] for group in optimizer.param_groups)
        if not fast:
            for group in optimizer.param_groups:
                group.update(fused=None, foreach=False)
        for imgs, tgts in batches:
            with contextlib.nullcontext() if fast else upstream_operations():
                _train_step(trained, criterion, args, imgs, tgts)
            torch.nn.utils.clip_grad_norm_(trained.parameters(), args.clip_max_norm)
            optimizer.step()
        return trained.state_dict()

    fast, upstream = train(fast=True), train(fast=False)
    assert not torch.equal(upstream["class_embed.0.bias"], model.state_dict()["class_embed.0.bias"])  # it trained
    for key in upstream:
        torch.testing.assert_close(fast[key], upstream[key], **TOL, msg=key)


def test_upstream_operations_replace_the_product_forms_within_the_block_only():
    product = [getattr(owner, attribute) for owner, attribute, _ in UPSTREAM_FORMS]
    with upstream_operations():
        assert deformable_transformer.feed_forward is not feed_forward
        assert criterion_module.sigmoid_focal_loss is not sigmoid_focal_loss
        assert not ms_deform_attn_func.use_compiled(torch.zeros(1))
    assert [getattr(owner, attribute) for owner, attribute, _ in UPSTREAM_FORMS] == product
    assert deformable_transformer.feed_forward is feed_forward


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_model_on_cuda_equals_upstreams_operation_order():
    """On a GPU: the product (compiled CUDA op, grouped attention, ...) against upstream_operations()."""
    model, criterion, _, args = build(SMALL + TWO_STAGE_HYBRID + ["--backbone", "resnet18", "--device", "cuda"])
    perturb(model, scale=0.1)
    model.cuda().train()
    imgs = [im.cuda() for im in images([(64, 96), (80, 64)])]
    tgts = [{k: v.cuda() for k, v in t.items()} for t in targets([3, 2])]
    out, losses, grads = _train_step(model, criterion, args, imgs, tgts)
    with upstream_operations():
        ref_out, ref_losses, ref_grads = _train_step(model, criterion, args, imgs, tgts)
    for key, value in _flat(ref_out).items():
        torch.testing.assert_close(_flat(out)[key], value, rtol=1e-4, atol=1e-4, msg=key)
    for key in ref_losses:
        torch.testing.assert_close(losses[key], ref_losses[key], rtol=1e-4, atol=1e-4, msg=key)
    for key in ref_grads:
        torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-3, atol=1e-4, msg=key)


@pytest.mark.parametrize("repeats", [1, 3, 6])
def test_matching_repeated_targets_costs_them_once(repeats, monkeypatch):
    """The one-to-many group's targets are each image's boxes repeated: costed once and tiled, the matching is the
    one of the full cost matrix."""
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 40, 7, generator=gen, dtype=torch.float64)
    boxes = torch.cat([0.2 + 0.6 * torch.rand(2, 40, 2, generator=gen, dtype=torch.float64),
                       0.05 + 0.3 * torch.rand(2, 40, 2, generator=gen, dtype=torch.float64)], -1)
    tgts = [{k: v.double() if v.is_floating_point() else v for k, v in t.items()}
            for t in targets([5, 0], num_classes=7, seed=7)]
    repeated = [{"labels": t["labels"].repeat(repeats), "boxes": t["boxes"].repeat(repeats, 1)} for t in tgts]
    matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2)
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    sizes = []
    original = matcher.cost_matrix
    monkeypatch.setattr(matcher, "cost_matrix", lambda *a: sizes.append(len(a[2])) or original(*a))
    tiled = matcher(outputs, repeated, repeats=repeats)
    assert sizes == [5, 0]  # the unique targets only
    full = matcher(outputs, repeated)
    for (src, tgt), (full_src, full_tgt), t in zip(tiled, full, repeated):
        assert torch.equal(src, full_src) and torch.equal(tgt, full_tgt) and len(src) == len(t["labels"])
    with pytest.raises(ValueError, match="not 4 repeats"):
        matcher(outputs, [{"labels": torch.zeros(6, dtype=torch.long), "boxes": boxes[0, :6]}] * 2, repeats=4)


def test_focal_loss_equals_upstreams_expressions_in_float64():
    gen = torch.Generator().manual_seed(8)
    logits = (torch.randn(2, 30, 7, generator=gen, dtype=torch.float64) * 4).requires_grad_()
    onehot = torch.zeros(2, 30, 7, dtype=torch.float64)
    onehot[0, [1, 5, 9], [0, 6, 2]] = 1
    onehot[1, [0, 29], [3, 3]] = 1
    for alpha in (0.25, 0.4, -1):
        ours = sigmoid_focal_loss(logits, onehot, 3.0, alpha=alpha, gamma=2)
        theirs = upstream_forms.sigmoid_focal_loss(logits, onehot, 3.0, alpha=alpha, gamma=2)
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
        torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(theirs, logits)[0],
                                   rtol=1e-10, atol=1e-14)


def test_paired_giou_is_the_diagonal_of_the_pairwise_giou_in_float64():
    gen = torch.Generator().manual_seed(9)
    centres = torch.rand(2, 12, 2, generator=gen, dtype=torch.float64)
    sizes = 0.05 + 0.4 * torch.rand(2, 12, 2, generator=gen, dtype=torch.float64)
    boxes = box_cxcywh_to_xyxy(torch.cat([centres, sizes], -1)).requires_grad_()
    boxes.data[1, 3] = boxes.data[0, 3]  # one identical pair (IoU 1)
    ours = paired_generalized_box_iou(boxes[0], boxes[1])
    theirs = upstream_forms.paired_generalized_box_iou(boxes[0], boxes[1])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-15)
    grad = torch.randn(12, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad(ours, boxes, grad)[0], torch.autograd.grad(theirs, boxes, grad)[0],
                               rtol=0, atol=1e-14)


def _graph_nodes(tensor):
    """Names of the autograd nodes behind tensor."""
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def _feed_forward_block(dropout=0.0, seed=10):
    gen = torch.Generator().manual_seed(seed)
    linear1, linear2 = torch.nn.Linear(6, 16).double(), torch.nn.Linear(16, 6).double()
    for param in [*linear1.parameters(), *linear2.parameters()]:
        param.data = torch.randn(param.shape, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 9, 6, generator=gen, dtype=torch.float64)
    x[0, 0] = 0
    linear1.bias.data[:5] = 0  # a row whose first five hidden units sit exactly on ReLU's kink
    return linear1, linear2, torch.nn.Dropout(dropout), x


@pytest.mark.parametrize("trainable", ["all", "input only", "weights only"])
def test_feed_forward_equals_linear_relu_linear_in_float64(trainable):
    linear1, linear2, dropout, x = _feed_forward_block()
    params = [*linear1.parameters(), *linear2.parameters()]
    for param in params:
        param.requires_grad_(trainable != "input only")
    x.requires_grad_(trainable != "weights only")
    inputs = [t for t in [x, *params] if t.requires_grad]
    ours = feed_forward(linear1, linear2, torch.nn.functional.relu, dropout, x)
    assert "ReluBackward0" not in _graph_nodes(ours)  # the in-place path ran, not autograd's Linear/ReLU/Linear
    theirs = upstream_forms.feed_forward(linear1, linear2, torch.nn.functional.relu, dropout, x)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    grad = torch.randn(theirs.shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    for g_ours, g_theirs in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(theirs, inputs, grad)):
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(feed_forward(linear1, linear2, torch.nn.functional.relu, dropout, x), theirs,
                                   rtol=1e-12, atol=1e-12)


def test_feed_forward_keeps_upstreams_computation_with_dropout_or_another_activation():
    linear1, linear2, dropout, x = _feed_forward_block(dropout=0.5)
    torch.manual_seed(3)
    ours = feed_forward(linear1, linear2, torch.nn.functional.relu, dropout, x)
    torch.manual_seed(3)
    assert torch.equal(ours, upstream_forms.feed_forward(linear1, linear2, torch.nn.functional.relu, dropout, x))
    gelu = feed_forward(linear1, linear2, torch.nn.functional.gelu, dropout.eval(), x)
    assert torch.equal(gelu, upstream_forms.feed_forward(linear1, linear2, torch.nn.functional.gelu, dropout, x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_feed_forward_under_autocast_equals_autocasts_linear_relu_linear(dtype):
    """Under autocast the in-place Function computes with autocast's casts (x and the parameters in its dtype):
    the outputs and every gradient equal autograd's Linear / ReLU / Linear under autocast bit for bit, and the
    parameters' gradients come back in float32."""
    gen = torch.Generator().manual_seed(12)
    linear1, linear2 = torch.nn.Linear(64, 256), torch.nn.Linear(256, 64)
    for param in [*linear1.parameters(), *linear2.parameters()]:
        param.data = torch.randn(param.shape, generator=gen) / 8
    dropout = torch.nn.Dropout(0.0)
    x = torch.randn(2, 37, 64, generator=gen, requires_grad=True)
    inputs = [x, *linear1.parameters(), *linear2.parameters()]
    with torch.autocast("cpu", dtype=dtype):
        ours = feed_forward(linear1, linear2, torch.nn.functional.relu, dropout, x)
        theirs = upstream_forms.feed_forward(linear1, linear2, torch.nn.functional.relu, dropout, x)
        with torch.no_grad():
            ours_no_grad = feed_forward(linear1, linear2, torch.nn.functional.relu, dropout, x)
    assert ours.dtype == dtype and "ReluBackward0" not in _graph_nodes(ours)
    assert torch.equal(ours, theirs) and torch.equal(ours_no_grad, theirs)
    grad = torch.randn(theirs.shape, generator=gen).to(dtype)
    for g_ours, g_theirs in zip(torch.autograd.grad(ours, inputs, grad), torch.autograd.grad(theirs, inputs, grad)):
        assert g_ours.dtype == torch.float32 and torch.equal(g_ours, g_theirs)


def test_feed_forward_under_autocast_leaves_float64_to_autograds_modules():
    """autocast does not cast float64: such a block runs autograd's Linear / ReLU / Linear in float64."""
    linear1, linear2, dropout, x = _feed_forward_block()
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = feed_forward(linear1, linear2, torch.nn.functional.relu, dropout, x)
    assert out.dtype == torch.float64 and "ReluBackward0" in _graph_nodes(out)
    torch.testing.assert_close(out, upstream_forms.feed_forward(linear1, linear2, torch.nn.functional.relu, dropout, x),
                               rtol=0, atol=0)
