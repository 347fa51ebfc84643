"""Export a backbone as a plain timm state dict (.safetensors and .pth), checked against timm.

The trees load their own checkpoints into their own (timm) backbone; this module writes that
backbone's tensors, rebuilds the model through timm's pretrained loader from each written file,
and compares the features with the original's, so an export that timm would load differently is
never reported as done.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import nn

from .checkpoint import atomic_file, save_atomic
from .errors import UserError
from .timm_interop import TimmSpec

FORMATS = ("safetensors", "pth")


def add_export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True,
                        help="file to write, without extension: <output>.safetensors and <output>.pth")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS,
                        help="file formats to write (default: both)")
    parser.add_argument("--no_verify", action="store_true",
                        help="skip rebuilding the model through timm from each file and comparing features")


def backbone_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's persistent tensors, on the host, contiguous and unshared (safetensors needs it)."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def write_backbone(tensors: dict[str, torch.Tensor], output: str | os.PathLike, spec: TimmSpec,
                   formats=FORMATS) -> list[Path]:
    """<output>.safetensors and/or <output>.pth; both hold the same plain {key: tensor} dict."""
    stem = Path(output)
    if stem.suffix in (".pth", ".safetensors"):
        stem = stem.with_suffix("")
    written = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        if fmt == "pth":
            save_atomic(tensors, path)
        else:
            _save_safetensors(tensors, path, {"timm_model": spec.name, "format": "pt"})
        written.append(path)
    return written


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    try:
        with atomic_file(path) as handle:
            handle.write(save(tensors, metadata=metadata))
    except OSError as exc:
        raise UserError(f"could not write {path} ({exc}): free disk space or choose another "
                        "--output") from exc


@torch.no_grad()
def verify_with_timm(spec: TimmSpec, reference: nn.Module, files: list[Path], img_size: int,
                     atol: float = 1e-5) -> None:
    """Load every file through `spec.create(file)` and compare features with `reference`.

    The key sets must be identical (timm's loader is lenient when num_classes differs from its
    pretrained config, so this is checked here) and the pooled features must agree on a fixed
    random input.
    """
    reference = reference.eval().cpu()
    torch.manual_seed(0)
    images = torch.randn(2, 3, img_size, img_size)
    expected = reference(images)
    own_keys = set(reference.state_dict())
    for path in files:
        try:
            model = spec.create(str(path)).eval()
        except (RuntimeError, TypeError, ValueError, KeyError) as exc:
            raise UserError(f"timm could not load {path} as {spec.name} ({exc})") from None
        if set(model.state_dict()) != own_keys:
            missing = sorted(set(model.state_dict()) - own_keys)[:5]
            extra = sorted(own_keys - set(model.state_dict()))[:5]
            raise UserError(f"{path}: timm's {spec.name} has other keys (missing {missing}, "
                            f"unexpected {extra}); this architecture cannot be exported to timm")
        got = model(images)
        if got.shape != expected.shape or not torch.allclose(got, expected, atol=atol, rtol=1e-4):
            raise UserError(f"{path}: the features of timm's {spec.name} differ from ours "
                            "(this architecture has no exact timm equivalent)")


def export_backbone(model: nn.Module, spec: TimmSpec, args: argparse.Namespace, img_size: int,
                    source: str) -> list[Path]:
    """Write, verify (unless --no_verify) and print the timm call; returns the written files."""
    files = write_backbone(backbone_tensors(model), args.output, spec, args.formats)
    if not args.no_verify:
        verify_with_timm(spec, model, files, img_size)
    checked = "" if args.no_verify else " (checked: timm rebuilds it and its features match)"
    print(f"Exported the backbone of {source} ({len(model.state_dict())} tensors) as timm model "
          f"{spec.name}{checked}:")
    for path in files:
        print(f"  {path}")
    print(f"timm model: {spec.name}")
    print("Load it with:")
    print(f"  import timm\n  model = {spec.python_call(str(files[0]))}")
    return files
