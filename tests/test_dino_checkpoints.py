"""Official DINO checkpoint layouts (built by hand: no downloads here), k-NN on known features,
and the attention weights used by visualize_attention."""

from __future__ import annotations

import builtins

import pytest
import torch
import torchvision

from dino import eval_knn
from dino.checkpoints import load_pretrained_backbone
from dino.models import build_backbone
from dino.visualize_attention import last_self_attention, threshold_masks
from ssl_runtime.errors import UserError

DIM, DEPTH, PATCH = 96, 2, 16  # vit_pico's width and depth, at the official 224 / 16 geometry


def official_vit_state(dim: int = DIM, depth: int = DEPTH, patch: int = PATCH, tokens: int = 197) -> dict:
    """A backbone state dict with the key names and shapes of facebookresearch/dino's ViT."""
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g)

    state = {"cls_token": t(1, 1, dim), "pos_embed": t(1, tokens, dim),
             "patch_embed.proj.weight": t(dim, 3, patch, patch), "patch_embed.proj.bias": t(dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        state.update({
            b + "norm1.weight": t(dim), b + "norm1.bias": t(dim),
            b + "attn.qkv.weight": t(3 * dim, dim), b + "attn.qkv.bias": t(3 * dim),
            b + "attn.proj.weight": t(dim, dim), b + "attn.proj.bias": t(dim),
            b + "norm2.weight": t(dim), b + "norm2.bias": t(dim),
            b + "mlp.fc1.weight": t(4 * dim, dim), b + "mlp.fc1.bias": t(4 * dim),
            b + "mlp.fc2.weight": t(dim, 4 * dim), b + "mlp.fc2.bias": t(dim),
        })
    state.update({"norm.weight": t(dim), "norm.bias": t(dim)})
    return state


def official_head_state(dim: int = DIM, out_dim: int = 32) -> dict:
    return {"mlp.0.weight": torch.randn(2048, dim), "mlp.0.bias": torch.zeros(2048),
            "mlp.2.weight": torch.randn(2048, 2048), "mlp.2.bias": torch.zeros(2048),
            "mlp.4.weight": torch.randn(256, 2048), "mlp.4.bias": torch.zeros(256),
            "last_layer.weight_g": torch.ones(out_dim, 1), "last_layer.weight_v": torch.randn(out_dim, 256)}


def assert_loaded(model, state):
    own = model.state_dict()
    for key, value in state.items():
        assert torch.equal(own[key], value), key


def test_plain_official_backbone_loads_exactly(tmp_path, capsys):
    state = official_vit_state()
    torch.save(state, tmp_path / "dino_pico16_pretrain.pth")
    model = build_backbone("vit_pico", PATCH, 224)
    load_pretrained_backbone(model, str(tmp_path / "dino_pico16_pretrain.pth"), "teacher")
    assert_loaded(model, state)
    assert f"loaded: {len(state)} tensors" in capsys.readouterr().out


@pytest.mark.parametrize("key, prefix", [("teacher", "backbone."), ("student", "module.backbone.")])
def test_full_training_checkpoint_drops_head_and_prefixes(tmp_path, capsys, key, prefix):
    # official layout: teacher keys `backbone.*` / `head.*`, DDP student keys `module.backbone.*` / `module.head.*`
    backbone, head = official_vit_state(), official_head_state()
    full = {
        "teacher": {**{"backbone." + k: v for k, v in backbone.items()},
                    **{"head." + k: v for k, v in head.items()}},
        "student": {**{"module.backbone." + k: v + 1 for k, v in backbone.items()},
                    **{"module.head." + k: v for k, v in head.items()}},
        "epoch": 100, "optimizer": {}, "dino_loss": {"center": torch.zeros(1, 32)},
    }
    torch.save(full, tmp_path / "full.pth")
    model = build_backbone("vit_pico", PATCH, 224)
    load_pretrained_backbone(model, str(tmp_path / "full.pth"), key)
    expected = {k[len(prefix):]: v for k, v in full[key].items() if k.startswith(prefix)}
    assert_loaded(model, expected)
    text = capsys.readouterr().out
    assert f"Take key {key}" in text and "dropped 8 projection-head tensors" in text


def test_mismatches_are_reported_not_skipped(tmp_path):
    state = official_vit_state()
    missing = {k: v for k, v in state.items() if k != "blocks.1.attn.qkv.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(UserError, match=r"1 missing key\(s\): blocks.1.attn.qkv.weight"):
        load_pretrained_backbone(build_backbone("vit_pico", PATCH, 224), str(tmp_path / "missing.pth"))
    deeper = official_vit_state(depth=3)
    torch.save(deeper, tmp_path / "deeper.pth")
    with pytest.raises(UserError, match=r"unexpected key\(s\): blocks.2"):
        load_pretrained_backbone(build_backbone("vit_pico", PATCH, 224), str(tmp_path / "deeper.pth"))
    wider = official_vit_state(dim=192)
    torch.save(wider, tmp_path / "wider.pth")
    with pytest.raises(UserError, match="shape mismatch"):
        load_pretrained_backbone(build_backbone("vit_pico", PATCH, 224), str(tmp_path / "wider.pth"))
    torch.save({"model_ema": state, "epoch": 3}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="top-level keys: epoch, model_ema"):
        load_pretrained_backbone(build_backbone("vit_pico", PATCH, 224), str(tmp_path / "other.pth"))
    with pytest.raises(UserError, match="does not exist"):
        load_pretrained_backbone(build_backbone("vit_pico", PATCH, 224), str(tmp_path / "nope.pth"))


def test_position_embedding_resampled_for_small_models(tmp_path, capsys):
    torch.save(official_vit_state(), tmp_path / "w.pth")
    model = build_backbone("vit_pico", PATCH, 32)  # a 2x2 grid instead of 14x14
    load_pretrained_backbone(model, str(tmp_path / "w.pth"))
    assert model.pos_embed.shape == (1, 5, DIM)
    assert "position embedding resampled" in capsys.readouterr().out


def test_resnet50_uses_torchvision_key_names():
    ours = set(build_backbone("resnet50").state_dict())
    official = set(torchvision.models.resnet50(weights=None).state_dict())
    assert ours == official - {"fc.weight", "fc.bias"}


def test_attention_weights_match_unfused_timm_path():
    torch.manual_seed(0)
    model = build_backbone("vit_pico", 4, 32).eval().double()  # float64: any CPU agrees to ~1e-16
    images = torch.randn(2, 3, 24, 32, dtype=torch.float64)
    ours = last_self_attention(model, images)
    captured = {}
    attn = model.blocks[-1].attn
    attn.fused_attn = False
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: captured.__setitem__("a", o))
    with torch.no_grad():
        model.forward_features(images)
    handle.remove()
    assert ours.shape == (2, 3, 1 + 6 * 8, 1 + 6 * 8)
    # weights in [0, 1] from 32-term float64 dot products: ~1e-15 apart; a wrong scale is O(0.1)
    assert torch.allclose(ours, captured["a"], rtol=0, atol=1e-12)
    assert torch.allclose(ours.sum(-1), torch.ones(2, 3, 49, dtype=torch.float64), rtol=0, atol=1e-12)


def test_threshold_masks_keep_requested_mass():
    attn = torch.tensor([[0.1, 0.6, 0.3], [0.05, 0.8, 0.15]])
    # head 0 needs its two largest patches to hold 70 % of the mass, head 1 only its largest
    assert threshold_masks(attn, 0.7).tolist() == [[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]]


def test_knn_on_saved_features_with_known_answer(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(builtins, "print", builtins.print)
    basis = torch.eye(4)
    train = torch.cat([basis[:2].repeat(3, 1)])  # 3 samples each of class 0 (e0) and class 1 (e1)
    train_labels = torch.tensor([0, 1] * 3)
    test = torch.stack([basis[0], basis[1], basis[0], basis[1]])
    test_labels = torch.tensor([0, 1, 0, 0])  # the last one is "mislabelled": 75 % top-1
    for name, tensor in zip(eval_knn.FEATURE_FILES, (train, test, train_labels, test_labels)):
        torch.save(tensor, tmp_path / name)
    eval_knn.main(["--load_features", str(tmp_path), "--nb_knn", "1", "3", "--device", "cpu"])
    text = capsys.readouterr().out
    assert "1-NN classifier result: Top1: 75.0, Top5: 75.0" in text  # top-5 of 1 neighbour = top-1
    assert "3-NN classifier result: Top1: 75.0, Top5: 100.0" in text
