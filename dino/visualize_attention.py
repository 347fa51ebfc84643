"""Self-attention maps of the [CLS] token in the last block (facebookresearch/dino visualize_attention.py).

    python dino/visualize_attention.py --arch vit_small --patch_size 8 \
        --pretrained_weights dino_deitsmall8_pretrain.pth --image_path img.jpg --output_dir attn
Writes img.png, attn-head<i>.png per head and, with --threshold, mask_th<t>_head<i>.png.

Several images (several --image_path values, a folder, or --num_images N validation images of the
dataset) are drawn in one picture instead, <output_dir>/attention_grid.png: one row per image with
the image, the mean attention over heads and each head's map.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python dino/visualize_attention.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms  # noqa: E402

from dino.augment import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from dino.checkpoints import add_pretrained_args, load_or_random  # noqa: E402
from dino.models import build_backbone, canonical_arch, is_vit  # noqa: E402
from ssl_runtime.data import SafeImageFolder, load_rgb, resolve_data_path  # noqa: E402
from ssl_runtime.device import add_device_arg  # noqa: E402
from ssl_runtime.distributed import single_process_context  # noqa: E402
from ssl_runtime.errors import UserError, main_entry  # noqa: E402
from ssl_runtime.pictures import draw_grid  # noqa: E402

# A few anchor colours of matplotlib's default 'viridis' map (upstream saves with plt.imsave).
VIRIDIS = np.array([
    [68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
    [31, 158, 137], [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37],
], dtype=np.float64)
MASK_COLOR = np.array([255.0, 0.0, 0.0])  # upstream draws its single mask in the first HSV colour


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Visualize Self-Attention maps")
    add_pretrained_args(parser, patch_size=8)
    parser.add_argument("--image_path", default=None, type=str, nargs="+",
                        help="image to visualise (default: the first validation image of Fashion-MNIST); "
                             "several images or a folder: one grid picture, attention_grid.png")
    parser.add_argument("--num_images", default=None, type=int,
                        help="draw this many validation images of --data_path in attention_grid.png")
    parser.add_argument("--data_path", default=None, type=str,
                        help="dataset root for --num_images (default: the bundled Fashion-MNIST)")
    parser.add_argument("--cell", default=96, type=int, help="side of each picture in attention_grid.png")
    parser.add_argument("--image_size", default=(480, 480), type=int, nargs="+",
                        help="resize the image to this size (one number: the shorter side)")
    parser.add_argument("--output_dir", default=".", help="where the visualisations are written")
    parser.add_argument("--threshold", type=float, default=None,
                        help="also save masks keeping this fraction of each head's attention mass")
    add_device_arg(parser)
    return parser


def colorize(values: np.ndarray) -> Image.Image:
    """Min-max normalise a 2-D map and paint it with the viridis colour ramp."""
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    positions = np.linspace(0.0, 1.0, len(VIRIDIS))
    rgb = np.stack([np.interp(scaled, positions, VIRIDIS[:, c]) for c in range(3)], axis=-1)
    return Image.fromarray(rgb.round().astype(np.uint8))


def overlay_mask(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Tint the masked pixels of an HxWx3 uint8 image, as upstream's apply_mask does."""
    mask = mask[..., None]
    blended = image * (1 - alpha * mask) + alpha * mask * MASK_COLOR
    return Image.fromarray(blended.clip(0, 255).astype(np.uint8))


@torch.no_grad()
def last_self_attention(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Softmax attention weights [B, heads, tokens, tokens] of the last block.

    timm's blocks use the fused SDPA kernel, which never materialises the weights; so the input of
    the last attention layer is captured with a hook and the weights are recomputed from its qkv
    projection (training keeps the fused path untouched).
    """
    attn = model.blocks[-1].attn
    captured: dict[str, torch.Tensor] = {}
    handle = attn.register_forward_pre_hook(lambda _module, args: captured.__setitem__("x", args[0]))
    try:
        model.forward_features(images)
    finally:
        handle.remove()
    x = captured["x"]
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def threshold_masks(attentions: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per head, the smallest set of patches holding `threshold` of the attention mass."""
    values, order = torch.sort(attentions, dim=1)
    values = values / values.sum(dim=1, keepdim=True)
    keep_sorted = torch.cumsum(values, dim=1) > (1 - threshold)
    return torch.gather(keep_sorted, 1, torch.argsort(order, dim=1)).float()


def open_image(path: str | None) -> Image.Image:
    if path is None:
        dataset = SafeImageFolder(resolve_data_path(None, need=("val",)) / "val")
        path = dataset.samples[0][0]
        print(f"No --image_path given: using {path} from the default dataset "
              "(upstream downloads an image from its paper, which needs network access).")
    elif not Path(path).is_file():
        raise UserError(f"--image_path {path} is not a file: pass the path of an image")
    try:
        return load_rgb(path)
    except OSError as exc:
        raise UserError(f"cannot read {path} as an image ({exc})") from None


def visualize(args: argparse.Namespace) -> list[Path]:
    args.arch = canonical_arch(args.arch)
    if args.num_images is not None or len(args.image_path or []) > 1 or \
            any(Path(p).is_dir() for p in args.image_path or []):
        return [visualize_batch(args)]
    args.image_path = args.image_path[0] if args.image_path else None
    if not is_vit(args.arch):
        raise UserError(f"attention maps need a ViT: --arch {args.arch} is not one")
    if len(args.image_size) not in (1, 2) or min(args.image_size) < args.patch_size:
        raise UserError(f"--image_size needs one or two sizes of at least the patch size, got {args.image_size}")
    if args.threshold is not None and not 0 < args.threshold <= 1:
        raise UserError(f"--threshold is a fraction of the attention mass in (0, 1], got {args.threshold}")
    ctx = single_process_context(args.device)
    model = build_backbone(args.arch, args.patch_size, args.img_size)
    load_or_random(model, args.pretrained_weights, args.checkpoint_key, args.arch, args.trust_checkpoint)
    model = model.to(ctx.device).eval()
    for p in model.parameters():
        p.requires_grad = False

    transform = transforms.Compose([
        transforms.Resize(args.image_size if len(args.image_size) == 2 else args.image_size[0]),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    img = transform(open_image(args.image_path))
    # crop so that both sides are multiples of the patch size
    height = img.shape[1] - img.shape[1] % args.patch_size
    width = img.shape[2] - img.shape[2] % args.patch_size
    img = img[:, :height, :width].unsqueeze(0)
    grid_h, grid_w = height // args.patch_size, width // args.patch_size

    attentions = last_self_attention(model, img.to(ctx.device))
    heads = attentions.shape[1]
    cls_attention = attentions[0, :, 0, model.num_prefix_tokens:].reshape(heads, -1).float().cpu()

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "img.png"]
    torchvision.utils.save_image(torchvision.utils.make_grid(img, normalize=True, scale_each=True), written[0])
    maps = F.interpolate(cls_attention.reshape(1, heads, grid_h, grid_w), scale_factor=args.patch_size,
                         mode="nearest")[0].numpy()
    for j in range(heads):
        written.append(out / f"attn-head{j}.png")
        colorize(maps[j]).save(written[-1])
        print(f"{written[-1]} saved.")

    if args.threshold is not None:
        masks = threshold_masks(cls_attention, args.threshold).reshape(1, heads, grid_h, grid_w)
        masks = F.interpolate(masks, scale_factor=args.patch_size, mode="nearest")[0].numpy()
        image = np.asarray(Image.open(written[0]).convert("RGB"), dtype=np.float64)
        for j in range(heads):
            written.append(out / f"mask_th{args.threshold}_head{j}.png")
            overlay_mask(image, masks[j]).save(written[-1])
            print(f"{written[-1]} saved.")
    return written


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def batch_image_paths(args: argparse.Namespace) -> list[str]:
    """--num_images validation images (a fixed random choice), or the given files and folders."""
    if args.num_images is not None:
        if args.num_images <= 0:
            raise UserError(f"--num_images must be positive, got {args.num_images}")
        dataset = SafeImageFolder(resolve_data_path(args.data_path, need=("val",)) / "val")
        chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:args.num_images]
        return [dataset.samples[i][0] for i in sorted(chosen.tolist())]
    paths: list[str] = []
    for given in args.image_path:
        path = Path(given)
        if path.is_dir():
            found = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserError(f"--image_path {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif path.is_file():
            paths.append(str(path))
        else:
            raise UserError(f"--image_path {path} is neither an image nor a folder")
    return paths


def visualize_batch(args: argparse.Namespace) -> Path:
    """One picture for many images: per row the image, the heads' mean attention, then each head."""
    if not is_vit(args.arch):
        raise UserError(f"attention maps need a ViT: --arch {args.arch} is not one")
    if args.cell <= 0:
        raise UserError(f"--cell must be positive, got {args.cell}")
    paths = batch_image_paths(args)
    height, width = (args.image_size * 2)[:2]
    height, width = height - height % args.patch_size, width - width % args.patch_size
    if min(height, width) < args.patch_size:
        raise UserError(f"--image_size must be at least the patch size {args.patch_size}")
    ctx = single_process_context(args.device)
    model = build_backbone(args.arch, args.patch_size, args.img_size)
    load_or_random(model, args.pretrained_weights, args.checkpoint_key, args.arch, args.trust_checkpoint)
    model = model.to(ctx.device).eval()

    originals = [load_rgb(path).resize((width, height), Image.Resampling.BICUBIC) for path in paths]
    normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    images = torch.stack([normalize(image) for image in originals]).to(ctx.device)
    attentions = last_self_attention(model, images)
    grid_h, grid_w = height // args.patch_size, width // args.patch_size
    cls = attentions[:, :, 0, model.num_prefix_tokens:].float().cpu()
    cls = cls.reshape(len(paths), -1, grid_h, grid_w).numpy()
    heads = cls.shape[1]
    rows = [[image, colorize(maps.mean(axis=0))] + [colorize(m) for m in maps]
            for image, maps in zip(originals, cls)]
    captions = [["image", "mean"] + [f"head {j}" for j in range(heads)]] * len(rows)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "attention_grid.png"
    draw_grid(rows, args.cell, captions=captions).save(path)
    print(f"{path} saved: {len(rows)} images x (image, mean, {heads} heads) of {grid_h}x{grid_w} patches.")
    return path


@main_entry
def main(argv: list[str] | None = None) -> None:
    visualize(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    main()
