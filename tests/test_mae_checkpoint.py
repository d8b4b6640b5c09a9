"""MAE / timm ViT files into the ViT backbone: exact copies, position-embedding resize, and the errors."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from model_helpers import SMALL, TINY_VIT, TINY_VIT_SIZE, build, parse, register_tiny_vit

from models.backbone import load_pretrained_backbone
from models.mae_checkpoint import fit_position_embedding, load_mae_checkpoint
from models.swin_transformer import SwinTransformer
from models.vit import ViT, ViTSize


@pytest.fixture(autouse=True)
def tiny_vit(monkeypatch):
    register_tiny_vit(monkeypatch)


def mae_encoder(size=TINY_VIT_SIZE, grid=None, seed=0, cls_slot=True):
    """The encoder tensors of an MAE ViT of `size` with random values: cls_token, pos_embed (grid x grid, with the
    class-token slot), patch embedding, blocks (no relative position tables) and the final norm."""
    gen = torch.Generator().manual_seed(seed)
    dim, hidden = size.embed_dim, int(size.embed_dim * size.mlp_ratio)
    grid = grid or size.pretrain_img_size // size.patch_size
    state = {"cls_token": torch.randn(1, 1, dim, generator=gen),
             "pos_embed": torch.randn(1, int(cls_slot) + grid * grid, dim, generator=gen),
             "patch_embed.proj.weight": torch.randn(dim, 3, size.patch_size, size.patch_size, generator=gen),
             "patch_embed.proj.bias": torch.randn(dim, generator=gen)}
    for i in range(size.depth):
        for name, shape in (("norm1.weight", (dim,)), ("norm1.bias", (dim,)), ("attn.qkv.weight", (3 * dim, dim)),
                            ("attn.qkv.bias", (3 * dim,)), ("attn.proj.weight", (dim, dim)), ("attn.proj.bias", (dim,)),
                            ("norm2.weight", (dim,)), ("norm2.bias", (dim,)), ("mlp.fc1.weight", (hidden, dim)),
                            ("mlp.fc1.bias", (hidden,)), ("mlp.fc2.weight", (dim, hidden)), ("mlp.fc2.bias", (dim,))):
            state[f"blocks.{i}.{name}"] = torch.randn(*shape, generator=gen)
    state["norm.weight"], state["norm.bias"] = torch.randn(dim, generator=gen), torch.randn(dim, generator=gen)
    return state


def mae_decoder(dim=16, seed=1):
    """Tensors of an MAE decoder (present in the visualisation releases), to be dropped."""
    gen = torch.Generator().manual_seed(seed)
    return {"mask_token": torch.randn(1, 1, dim, generator=gen), "decoder_embed.weight": torch.randn(dim, 32),
            "decoder_pos_embed": torch.randn(1, 17, dim), "decoder_blocks.0.attn.qkv.weight": torch.randn(48, dim),
            "decoder_norm.weight": torch.ones(dim), "decoder_pred.weight": torch.randn(768, dim)}


def tiny_vit_model():
    return ViT(TINY_VIT_SIZE)


def assert_encoder_copied(vit, state):
    own = vit.state_dict()
    for key, value in state.items():
        if key in own and key != "pos_embed":
            assert torch.equal(own[key], value), key
    copied = {k for k in state if k in own}
    assert copied == {k for k in own if "rel_pos" not in k}  # every encoder tensor came from the file
    for key in own:
        if "rel_pos" in key:
            assert not own[key].any(), key  # ViTDet's tables: not in MAE, left at zero


def test_official_mae_file_with_decoder_copies_every_encoder_tensor(tmp_path, capsys):
    state = mae_encoder()
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": {**state, **mae_decoder()}, "epoch": 799}, path)
    vit = tiny_vit_model()
    loaded = load_mae_checkpoint(vit, path, name=TINY_VIT)
    assert_encoder_copied(vit, state)
    assert torch.equal(vit.pos_embed, state["pos_embed"])  # same 4 x 4 grid: copied as is
    assert "pos_embed" in loaded
    assert not any(k.startswith(("decoder_", "mask_token", "cls_token", "norm.")) for k in loaded)
    out = capsys.readouterr().out
    assert str(path) in out and "dropped" in out and "left at zero" in out


def test_position_embedding_of_another_grid_is_resized(tmp_path):
    """A 6 x 6 pre-training grid into the model's 4 x 4: the class-token slot kept, the grid resized bicubically
    (as ViTDet resizes at run time); every other tensor still exact."""
    state = mae_encoder(grid=6)
    path = tmp_path / "mae_384.pth"
    torch.save({"model": state}, path)
    vit = tiny_vit_model()
    load_mae_checkpoint(vit, path)
    assert_encoder_copied(vit, state)
    grid = state["pos_embed"][:, 1:].reshape(1, 6, 6, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    assert torch.equal(vit.pos_embed[:, :1], state["pos_embed"][:, :1])
    torch.testing.assert_close(vit.pos_embed[:, 1:], expected, rtol=0, atol=1e-6)


def test_constant_position_embedding_stays_constant_when_resized():
    embed = torch.full((1, 1 + 7 * 7, 4), 0.5)
    fitted = fit_position_embedding(embed, (1, 1 + 3 * 3, 4), "file")
    torch.testing.assert_close(fitted, torch.full((1, 10, 4), 0.5))


def test_timm_plain_and_safetensors_files(tmp_path):
    """timm's files: a plain state dict (no wrapper), or safetensors; a pos_embed without class-token slot gets a
    zero slot."""
    from safetensors.torch import save_file

    state = mae_encoder(cls_slot=False)
    state["head.weight"], state["fc_norm.weight"] = torch.randn(10, 32), torch.ones(32)
    for path in (tmp_path / "pytorch_model.bin", tmp_path / "model.safetensors"):
        if path.suffix == ".safetensors":
            save_file(state, str(path))
        else:
            torch.save(state, path)
        vit = tiny_vit_model()
        load_mae_checkpoint(vit, path)
        assert_encoder_copied(vit, state)
        assert not vit.pos_embed[:, 0].any()
        assert torch.equal(vit.pos_embed[:, 1:], state["pos_embed"])


def test_loaded_through_the_training_entry(tmp_path):
    """main.py's path: load_pretrained_backbone puts the file into model.backbone[0].body.net, nothing else."""
    state = mae_encoder(grid=5)
    path = tmp_path / "mae.pth"
    torch.save({"model": state}, path)
    flags = SMALL + ["--backbone", TINY_VIT, "--pretrained_backbone_path", str(path)]
    model, _, _, _ = build(flags)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("backbone.0.body.net.")}
    load_pretrained_backbone(model, parse(flags))
    assert_encoder_copied(model.backbone[0].body.net, state)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def _expect_error(tmp_path, state, *fragments, name="file.pth", wrap=True):
    path = tmp_path / name
    torch.save({"model": state} if wrap else state, path)
    with pytest.raises(RuntimeError) as info:
        load_mae_checkpoint(tiny_vit_model(), path, name=TINY_VIT)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_resnet_file_is_rejected(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    _expect_error(tmp_path, state, "is not a ViT checkpoint", "conv1.weight", f"--backbone {TINY_VIT}",
                  name="resnet18.pth", wrap=False)


def test_swin_file_is_rejected(tmp_path):
    swin = SwinTransformer(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0)
    state = {**swin.state_dict(), "norm.weight": torch.ones(256), "head.weight": torch.zeros(1000, 256)}
    _expect_error(tmp_path, state, "is not a ViT checkpoint", "patch_embed.proj.weight", name="swin_tiny.pth")


def test_vit_of_another_depth_or_width_names_the_tensors(tmp_path):
    deeper = ViTSize(**{**TINY_VIT_SIZE.__dict__, "depth": 6})
    _expect_error(tmp_path, mae_encoder(deeper), "file: depth 6, width 32", "model: depth 4, width 32",
                  "24 unexpected", "blocks.4.norm1.weight")
    shallower = ViTSize(**{**TINY_VIT_SIZE.__dict__, "depth": 3})
    _expect_error(tmp_path, mae_encoder(shallower), "12 tensors missing", "blocks.3.norm1.weight")
    wider = ViTSize(**{**TINY_VIT_SIZE.__dict__, "embed_dim": 48, "num_heads": 3})
    _expect_error(tmp_path, mae_encoder(wider), "pos_embed is (1, 17, 48)")
    state = mae_encoder()
    state["blocks.2.mlp.fc1.weight"] = torch.zeros(64, 32)
    _expect_error(tmp_path, state, "tensor blocks.2.mlp.fc1.weight is (64, 32) in the file, (128, 32) in the model")


def test_extra_tensors_are_an_error(tmp_path):
    state = {**mae_encoder(), "blocks.0.ls1.gamma": torch.ones(32)}  # e.g. a timm ViT with layer scale
    _expect_error(tmp_path, state, "1 unexpected", "blocks.0.ls1.gamma")


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such.pth"):
        load_mae_checkpoint(tiny_vit_model(), tmp_path / "no_such.pth")
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(RuntimeError, match="broken.safetensors"):
        load_mae_checkpoint(tiny_vit_model(), bad)
    flags = SMALL + ["--backbone", TINY_VIT, "--pretrained_backbone_path", str(tmp_path / "absent.pth")]
    model, _, _, _ = build(flags)
    with pytest.raises(FileNotFoundError, match="MAE pre-trained ViT file"):
        load_pretrained_backbone(model, parse(flags))
