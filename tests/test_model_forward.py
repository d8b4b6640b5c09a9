"""Forward and backward of the detector: full-size hybrid model, small variants, padding, hybrid mask, errors."""
import time

import pytest
import torch
from model_helpers import SMALL, TWO_STAGE_HYBRID, build, encoder_tokens, hybrid_total, images, perturb, targets

import models.deformable_detr
import models.deformable_transformer
from models.attention import group_attention_mask, query_self_attention
from util.misc import NestedTensor, nested_tensor_from_tensor_list

FULL_HYBRID = ["--device", "cpu", "--with_box_refine", "--two_stage", "--num_queries_one2one", "300",
               "--num_queries_one2many", "1500", "--k_one2many", "6", "--lambda_one2many", "1.0", "--dropout", "0.0",
               "--mixed_selection", "--look_forward_twice"]


def assert_trainable_grads_finite(model):
    """Every trainable parameter received a finite gradient."""
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {len(missing)} trainable parameters, e.g. {missing[:5]}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradients in {bad[:5]}"


def assert_output_shapes(out, batch, q1, q2, num_classes, dec_layers, aux, two_stage):
    assert out["pred_logits"].shape == (batch, q1, num_classes)
    assert out["pred_boxes"].shape == (batch, q1, 4)
    assert out["pred_logits_one2many"].shape == (batch, q2, num_classes)
    assert out["pred_boxes_one2many"].shape == (batch, q2, 4)
    for key in ("pred_boxes", "pred_boxes_one2many"):
        assert ((out[key] >= 0) & (out[key] <= 1)).all(), f"{key} not in [0, 1]"
    if aux:
        for group, q in (("aux_outputs", q1), ("aux_outputs_one2many", q2)):
            assert len(out[group]) == dec_layers - 1
            for layer in out[group]:
                assert layer["pred_logits"].shape == (batch, q, num_classes)
                assert layer["pred_boxes"].shape == (batch, q, 4)
    else:
        assert "aux_outputs" not in out and "aux_outputs_one2many" not in out
    if two_stage:
        enc = out["enc_outputs"]
        assert enc["pred_logits"].shape[::2] == (batch, num_classes)
        assert enc["pred_boxes"].shape[0] == batch and enc["pred_boxes"].shape[2] == 4
    else:
        assert "enc_outputs" not in out


def test_full_size_hybrid_forward_backward():
    """The R50 H-Deformable-DETR configuration (6+6 layers, 300 + 1500 queries) trains one step on CPU."""
    start = time.perf_counter()
    model, criterion, _, args = build(FULL_HYBRID)
    model.train()
    sizes = [(288, 352), (256, 352)]
    for size in sizes:  # each image alone has enough tokens for the top-1800 proposals, padding aside
        tokens = encoder_tokens(model, [size])
        assert tokens >= 1800, f"two-stage top-1800 needs >= 1800 encoder tokens, {size} has {tokens}"
    tokens = encoder_tokens(model, sizes)
    tgts = targets([3, 2])
    out = model(images(sizes))
    assert_output_shapes(out, 2, 300, 1500, 91, 6, aux=True, two_stage=True)
    assert out["enc_outputs"]["pred_logits"].shape == (2, tokens, 91)
    loss_dict, total = hybrid_total(out, tgts, criterion, args)
    assert torch.isfinite(total)
    assert "loss_ce_one2many" in loss_dict and "loss_giou_enc" in loss_dict and "loss_bbox_4_one2many" in loss_dict
    total.backward()
    assert_trainable_grads_finite(model)
    print(f"full-size R50 hybrid build + forward + loss + backward: {time.perf_counter() - start:.1f} s")


VARIANTS = {
    "one_stage": [],
    "box_refine": ["--with_box_refine"],
    "two_stage": ["--with_box_refine", "--two_stage"],
    "mixed_selection": ["--with_box_refine", "--two_stage", "--mixed_selection"],
    "look_forward_twice": TWO_STAGE_HYBRID,
    "one_level": ["--num_feature_levels", "1", "--with_box_refine"],
    "dc5": ["--dilation", "--with_box_refine"],
    "resnet18": ["--backbone", "resnet18", *TWO_STAGE_HYBRID],
    "resnet34": ["--backbone", "resnet34", "--with_box_refine"],
    "learned_position": ["--position_embedding", "learned", *TWO_STAGE_HYBRID],
    "no_aux_loss": ["--no_aux_loss", *TWO_STAGE_HYBRID],
}
BACKBONE_CHANNELS = {"resnet18": [128, 256, 512], "resnet34": [128, 256, 512], "resnet50": [512, 1024, 2048]}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_small_variant_trains(name):
    """Each model variant runs forward, the hybrid loss and backward, with the documented output shapes."""
    model, criterion, _, args = build(SMALL + VARIANTS[name])
    model.train()
    sizes = [(64, 96), (80, 64)]
    out = model(images(sizes))
    assert_output_shapes(out, 2, 10, 20, 91, 2, aux=args.aux_loss, two_stage=args.two_stage)
    if args.two_stage:
        assert out["enc_outputs"]["pred_logits"].shape[1] == encoder_tokens(model, sizes)
    loss_dict, total = hybrid_total(out, targets([2, 3]), criterion, args)
    assert all(torch.isfinite(v) for v in loss_dict.values())
    total.backward()
    if args.two_stage:
        # the encoder-proposal heads are trained through the _enc terms, with or without the auxiliary losses
        # (upstream dropped their weights with --no_aux_loss, leaving those heads without gradient)
        assert "loss_ce_enc" in loss_dict and "loss_ce_enc" in criterion.weight_dict
        assert all(model.get_parameter(n).grad is not None for n in _proposal_head_parameters(model))
    assert_trainable_grads_finite(model)

    levels = args.num_feature_levels
    expected = BACKBONE_CHANNELS[args.backbone][-1:] if levels == 1 else BACKBONE_CHANNELS[args.backbone]
    assert model.backbone.num_channels == expected
    for proj, channels in zip(model.input_proj, expected):
        assert proj[0].in_channels == channels
    assert len(model.input_proj) == levels
    if args.dilation:
        assert model.backbone.strides == [8, 16, 16]
        layer4 = model.backbone[0].body.layer4  # torchvision dilates from the second block on
        assert layer4[0].conv2.stride == (1, 1) and layer4[1].conv2.dilation == (2, 2)
    if args.position_embedding == "learned":
        assert type(model.backbone[1]).__name__ == "PositionEmbeddingLearned"


def _proposal_head_parameters(model):
    """Names (as named_parameters gives them) of the parameters that only the encoder proposals use."""
    owned = {id(p) for m in (model.class_embed[-1], model.bbox_embed[-1], model.transformer.enc_output,
                             model.transformer.enc_output_norm) for p in m.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in owned]


def _padded_inputs(model, image, other, seed=0):
    """Multi-scale inputs of a batch [image, other] in which `image`'s feature maps are exactly those it has
    alone, the rest of its padded maps filled with large random values."""
    with torch.no_grad():
        alone = model._multi_scale_inputs(nested_tensor_from_tensor_list([image]))
        batch = model._multi_scale_inputs(nested_tensor_from_tensor_list([image, other]))
    gen = torch.Generator().manual_seed(seed)
    srcs, masks, pos = [], [], []
    for (src_a, mask_a, pos_a), (src_b, mask_b, pos_b) in zip(zip(*alone), zip(*batch)):
        h, w = src_a.shape[-2:]
        # the batch's own mask marks exactly the image's map as valid (image sizes are multiples of 64)
        assert not mask_b[0, :h, :w].any() and mask_b[0].sum() == mask_b[0].numel() - h * w
        # and the sine encoding of the valid part does not depend on the padding
        torch.testing.assert_close(pos_b[0, :, :h, :w], pos_a[0], rtol=0, atol=1e-6)
        canvas = torch.randn(src_b.shape[1:], generator=gen) * 10
        canvas[:, :h, :w] = src_a[0]
        src = torch.stack([canvas, src_b[1]])
        mask = torch.stack([mask_b[0], mask_b[1]])
        srcs.append(src)
        masks.append(mask)
        pos.append(model.backbone[1](NestedTensor(src, mask)))
    return srcs, masks, pos


@pytest.mark.parametrize("flags", [[], ["--with_box_refine"], TWO_STAGE_HYBRID], ids=["one_stage", "refine", "hybrid"])
def test_padding_does_not_change_transformer_outputs(flags):
    """An image's predictions do not depend on the padding it gets in a batch with a larger image, given its
    feature maps: padded tokens are masked out of the attention and references follow the valid ratios.

    (The full model is not exactly padding-invariant, as upstream: the ResNet's convolutions see the padded
    border, whose features are non-zero, and the input projections' GroupNorm averages over the padded maps.)
    """
    model, _, _, _ = build(SMALL + flags)
    perturb(model)
    model.eval()
    image, other = images([(64, 128), (128, 192)])
    with torch.no_grad():
        alone = model([image], one2one_only=False)
    srcs, masks, pos = _padded_inputs(model, image, other)
    model._multi_scale_inputs = lambda samples: (srcs, masks, pos)
    with torch.no_grad():
        batched = model([image, other], one2one_only=False)
    for key in ("pred_logits", "pred_boxes", "pred_logits_one2many", "pred_boxes_one2many"):
        torch.testing.assert_close(batched[key][0], alone[key][0], rtol=0, atol=1e-4, msg=key)

    # the masks are what makes this hold: treating the padding as image changes the predictions
    unmasked = [torch.zeros_like(m) for m in masks]
    unmasked_pos = [model.backbone[1](NestedTensor(s, m)) for s, m in zip(srcs, unmasked)]
    model._multi_scale_inputs = lambda samples: (srcs, unmasked, unmasked_pos)
    with torch.no_grad():
        ignored = model([image, other], one2one_only=False)
    assert (ignored["pred_logits"][0] - alone["pred_logits"][0]).abs().max() > 1e-2


def _one2one_train_and_eval(model, imgs):
    """One-to-one outputs of a train-mode forward, and of an eval-mode forward with one-to-one queries only."""
    model.train()
    with torch.no_grad():
        train_out = model(imgs)
    num_queries = model.num_queries
    model.eval()
    model.num_queries = model.num_queries_one2one
    model.transformer.two_stage_num_proposals = model.num_queries
    try:
        with torch.no_grad():
            eval_out = model(imgs)
    finally:
        model.num_queries = num_queries
        model.transformer.two_stage_num_proposals = num_queries
    return train_out, eval_out


def test_hybrid_mask_isolates_one2one_queries(monkeypatch):
    """The one-to-many queries cannot influence the one-to-one ones: training outputs of the one-to-one group
    equal those of evaluation with one-to-one queries only; without the mask they do not."""
    model, _, _, _ = build(SMALL + TWO_STAGE_HYBRID)
    perturb(model)
    imgs = images([(64, 96), (96, 64)])
    train_out, eval_out = _one2one_train_and_eval(model, imgs)
    assert eval_out["pred_logits"].shape == (2, 10, 91)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(train_out[key], eval_out[key], rtol=0, atol=1e-5, msg=key)
    for layer_train, layer_eval in zip(train_out["aux_outputs"], eval_out["aux_outputs"]):
        torch.testing.assert_close(layer_train["pred_logits"], layer_eval["pred_logits"], rtol=0, atol=1e-5)

    def no_groups(attn, query_key, value, groups=None):  # every query attends to every other
        return query_self_attention(attn, query_key, value, None)

    monkeypatch.setattr(models.deformable_transformer, "query_self_attention", no_groups)
    train_out, eval_out = _one2one_train_and_eval(model, imgs)
    assert (train_out["pred_logits"] - eval_out["pred_logits"]).abs().max() > 1e-3


def test_eval_mode_runs_the_one_to_one_queries_alone():
    """Evaluation's switch lives in the model: eval mode (or one2one_only=True) gives exactly what upstream's way,
    lowering num_queries and two_stage_num_proposals from outside, gives; the attributes are left alone."""
    model, _, _, _ = build(SMALL + TWO_STAGE_HYBRID)
    perturb(model)
    imgs = images([(64, 96), (96, 64)])
    _, upstream_way = _one2one_train_and_eval(model, imgs)
    model.eval()
    with torch.no_grad():
        eval_mode = model(imgs)
    model.train()
    with torch.no_grad():
        argument = model(imgs, one2one_only=True)
    assert (model.num_queries, model.transformer.two_stage_num_proposals) == (30, 30)
    for out in (eval_mode, argument):
        assert set(out) == set(upstream_way) == {"pred_logits", "pred_boxes", "aux_outputs", "enc_outputs"}
        assert out["pred_logits"].shape == (2, 10, 91)
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(out[key], upstream_way[key], rtol=0, atol=0, msg=key)
    model.eval()
    with torch.no_grad():
        both = model(imgs, one2one_only=False)
    assert both["pred_logits_one2many"].shape == (2, 20, 91)


def test_hybrid_attention_mask_layout():
    mask = group_attention_mask([2, 3], torch.device("cpu"))
    expected = torch.tensor([[0, 0, 1, 1, 1]] * 2 + [[1, 1, 0, 0, 0]] * 3, dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_use_checkpoint_gives_same_outputs_and_gradients(monkeypatch):
    """--use_checkpoint recomputes the transformer layers in backward: same outputs, same gradients."""
    calls = []
    original = models.deformable_transformer.checkpoint

    def counting_checkpoint(*args, **kwargs):
        calls.append(type(args[0]).__name__)
        return original(*args, **kwargs)

    monkeypatch.setattr(models.deformable_transformer, "checkpoint", counting_checkpoint)
    results = []
    for extra in ([], ["--use_checkpoint"]):
        model, criterion, _, args = build(SMALL + TWO_STAGE_HYBRID + extra)
        if results:
            model.load_state_dict(results[0][0])
        model.train()
        out = model(images([(64, 96), (96, 64)]))
        _, total = hybrid_total(out, targets([2, 1]), criterion, args)
        total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((model.state_dict(), out, grads))
    assert calls.count("DeformableTransformerEncoderLayer") == 1
    assert calls.count("DeformableTransformerDecoderLayer") == 2
    (_, out_plain, grads_plain), (_, out_ckpt, grads_ckpt) = results
    for key in ("pred_logits", "pred_boxes", "pred_logits_one2many", "pred_boxes_one2many"):
        torch.testing.assert_close(out_ckpt[key], out_plain[key], rtol=0, atol=1e-5)
    assert grads_ckpt.keys() == grads_plain.keys()
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("flags", [["--masks"], ["--dataset_file", "coco_panoptic"], ["--frozen_weights", "x"]])
def test_unsupported_options_are_rejected(flags):
    with pytest.raises(NotImplementedError, match="not supported"):
        build(SMALL + flags)


def test_compatibility_flags_are_accepted_and_ignored():
    """Upstream's DETR leftovers parse, sit in one --help group that says they are ignored, and change nothing."""
    import main

    ignored = ["--mask_loss_coef", "3", "--dice_loss_coef", "4", "--coco_panoptic_path", "x", "--remove_difficult"]
    help_text = main.get_args_parser().format_help()
    group = help_text[help_text.index("accepted for compatibility"):]
    assert all(flag in group for flag in ignored if flag.startswith("--"))
    results = []
    for flags in ([], ignored):
        model, criterion, _, _ = build(SMALL + TWO_STAGE_HYBRID + flags)
        model.eval()
        with torch.no_grad():
            results.append((model(images([(64, 96)])), criterion.weight_dict))
    (plain, plain_weights), (with_flags, flag_weights) = results
    assert plain_weights == flag_weights
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(plain[key], with_flags[key])


def test_two_stage_needs_box_refine():
    with pytest.raises(ValueError, match="with_box_refine"):
        build(SMALL + ["--two_stage"])


def test_two_stage_with_more_queries_than_tokens():
    model, _, _, _ = build(SMALL + TWO_STAGE_HYBRID + ["--num_queries_one2one", "200"])
    sizes = [(64, 128)]
    assert encoder_tokens(model, sizes) == 170 < 220
    with pytest.raises(ValueError, match="tokens"):
        model(images(sizes))


def test_swin_tiny_hybrid_forward_backward_on_odd_sizes():
    """A Swin-T H-Deformable-DETR (small transformer) trains one step on a batch of odd-sized images."""
    model, criterion, _, args = build(SMALL + TWO_STAGE_HYBRID + ["--backbone", "swin_tiny"])
    model.train()
    sizes = [(97, 131), (111, 89)]
    out = model(images(sizes))
    assert_output_shapes(out, 2, 10, 20, 91, 2, aux=True, two_stage=True)
    assert model.backbone.num_channels == [192, 384, 768] and model.backbone.strides == [8, 16, 32]
    _, total = hybrid_total(out, targets([2, 3]), criterion, args)
    total.backward()
    assert_trainable_grads_finite(model)
