"""DINO networks: timm ViTs (with upstream's initialisation and position-embedding resampling),
torchvision's ResNet-50, the DINO projection head and the multi-crop wrapper."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ssl_runtime.errors import UserError

# Upstream's ViT sizes (vision_transformer.py: vit_tiny, vit_small, vit_base); timm's defaults give
# the rest (qkv bias, MLP ratio 4, GELU, LayerNorm eps 1e-6). Any patch size works. vit_pico
# (2 blocks of width 96) is not upstream: it makes CPU runs on 32-pixel images affordable.
VIT_ARCHS: dict[str, dict] = {
    "vit_tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "vit_pico": {"embed_dim": 96, "depth": 2, "num_heads": 3},
}
CNN_ARCHS = ("resnet50",)
ARCH_CHOICES = tuple(VIT_ARCHS) + CNN_ARCHS


def canonical_arch(arch: str) -> str:
    """Upstream renamed DeiT-S to ViT-S: accept the deit_* spellings, reject unknown names."""
    name = arch.replace("deit", "vit")
    if name not in ARCH_CHOICES:
        raise UserError(f"unknown --arch {arch!r}: choose one of {', '.join(ARCH_CHOICES)} "
                        "(XCiT and other torch.hub models need network access and are not offered)")
    return name


def is_vit(arch: str) -> bool:
    return canonical_arch(arch) in VIT_ARCHS


def backbone_is_vit(model: nn.Module) -> bool:
    """A timm VisionTransformer (ours or a timm baseline): [CLS] tokens per block are available."""
    return isinstance(model, VisionTransformer)


def resample_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Upstream DINO's interpolate_pos_encoding: the [CLS] entry as is, the square patch grid
    resized bicubically to `grid` (rows, columns) with scale factor (n + 0.1) / sqrt(N), no
    antialiasing. The 0.1 makes the output size floor to n (facebookresearch/dino#8); as a scale
    factor it also sets where the samples fall, so the result differs from resizing to n x n."""
    rows, cols = grid
    num_patches = pos_embed.shape[1] - 1
    if rows == cols and rows * cols == num_patches:
        return pos_embed
    side, dim = math.sqrt(num_patches), pos_embed.shape[-1]
    patches = pos_embed[:, 1:].reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
    if patches.dtype in (torch.float16, torch.bfloat16):
        patches = patches.float()  # bicubic resampling in half precision loses digits
    patches = F.interpolate(patches, scale_factor=((rows + 0.1) / side, (cols + 0.1) / side),
                            mode="bicubic")
    patches = patches.permute(0, 2, 3, 1).reshape(1, rows * cols, dim).to(pos_embed.dtype)
    return torch.cat((pos_embed[:, :1], patches), dim=1)


class DinoVisionTransformer(VisionTransformer):
    """timm's ViT with upstream DINO's initialisation and position-embedding resampling.

    timm resamples the position embedding for other input sizes with antialiasing, to the exact
    grid; upstream does not (resample_pos_embed), and the features differ at every size but the
    native one (local crops, attention maps at 480 px). Built with dynamic_img_size, so the patch
    embedding accepts any multiple of the patch size and hands over a [B, rows, cols, C] grid.
    """

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        super().init_weights(mode, needs_reset)
        trunc_normal_(self.cls_token, std=0.02)  # upstream; timm draws it from N(0, 1e-6)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        batch, rows, cols, dim = x.shape
        tokens = torch.cat((self.cls_token.expand(batch, -1, -1), x.view(batch, -1, dim)), dim=1)
        return self.pos_drop(tokens + resample_pos_embed(self.pos_embed, (rows, cols)))


def build_backbone(arch: str, patch_size: int = 16, img_size: int = 224,
                   drop_path_rate: float = 0.0) -> nn.Module:
    """A backbone returning one feature vector per image (ViT: final-norm CLS token; CNN: pooled).

    ViTs are built for `img_size`: crops of that size use the position embedding as is, other sizes
    resample it as upstream does. ResNet-50 is torchvision's, as upstream trains it: no stochastic
    depth (upstream passes --drop_path_rate to ViTs only), default initialisation.
    """
    arch = canonical_arch(arch)
    if arch in VIT_ARCHS:
        return DinoVisionTransformer(img_size=img_size, patch_size=patch_size, num_classes=0,
                                     dynamic_img_size=True, drop_path_rate=drop_path_rate,
                                     **VIT_ARCHS[arch])
    model = torchvision.models.resnet50()
    model.num_features = model.fc.in_features
    model.fc = nn.Identity()  # upstream's MultiCropWrapper does the same: pooled 2048-d features
    return model


def trunc_normal_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g * v / ||v|| (row-wise), i.e. torch's classic weight_norm.

    Written out so that the parameters are named `weight_g` / `weight_v` exactly as in official DINO
    checkpoints (torch's parametrizations API would name them `parametrizations.weight.original*`).
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        weight = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear's default initialisation
        # registered in the order of torch's weight_norm (g, then v), as official files list them
        self.weight_g = nn.Parameter(weight.norm(dim=1, keepdim=True))
        self.weight_v = nn.Parameter(weight)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class DINOHead(nn.Module):
    """MLP (GELU, optional BN) -> L2 normalisation -> weight-normalised prototypes layer."""

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            for d_in, d_out in zip(dims[:-1], dims[1:]):
                layers.append(nn.Linear(d_in, d_out))
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(trunc_normal_init)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        with torch.no_grad():
            self.last_layer.weight_g.fill_(1.0)
        # With a frozen unit norm the prototypes stay on the sphere: upstream's stabiliser.
        self.last_layer.weight_g.requires_grad = not norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


def resolution_groups(crops: list[torch.Tensor]) -> list[tuple[int, int]]:
    """[start, end) index ranges of consecutive crops that share a resolution."""
    groups: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops: one backbone pass per run of equal-size crops, then a
    single head pass over all features. Outputs are ordered crop by crop ([crop0 batch, crop1 ...])."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        features = [self.backbone(torch.cat(crops[start:end])) for start, end in resolution_groups(crops)]
        return self.head(torch.cat(features))


def build_dino_networks(args) -> tuple[MultiCropWrapper, MultiCropWrapper, int]:
    """Student (with stochastic depth) and teacher (without), each backbone + DINO head."""
    student_backbone = build_backbone(args.arch, args.patch_size, args.img_size, args.drop_path_rate)
    teacher_backbone = build_backbone(args.arch, args.patch_size, args.img_size, 0.0)
    embed_dim = student_backbone.num_features
    student = MultiCropWrapper(student_backbone, DINOHead(
        embed_dim, args.out_dim, use_bn=args.use_bn_in_head, norm_last_layer=args.norm_last_layer))
    teacher = MultiCropWrapper(teacher_backbone, DINOHead(embed_dim, args.out_dim, args.use_bn_in_head))
    return student, teacher, embed_dim
