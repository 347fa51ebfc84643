"""Pictures of what a model learned: image grids and nearest-neighbour grids (PIL only).

Grid geometry (every cell the same size, so a picture's size is known in advance):
  slot   = cell + 2 * BORDER                       (the coloured frame is drawn around each image)
  width  = PAD + cols * (slot + PAD) + first_gap
  height = PAD + rows * (slot + caption + PAD)      (caption = CAPTION pixels when captions are drawn)
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from .data import build_loader, load_rgb
from .distributed import DistContext
from .errors import UserError
from .knn import IndexedDataset, extract_features

PAD = 4
BORDER = 3
CAPTION = 12
QUERY_GAP = 8  # extra space between a query and its neighbours
BACKGROUND = (255, 255, 255)
QUERY_COLOR = (40, 90, 200)
SAME_COLOR = (30, 160, 60)
OTHER_COLOR = (210, 40, 40)


def grid_size(rows: int, cols: int, cell: int, captions: bool = False, first_gap: int = 0) -> tuple[int, int]:
    slot = cell + 2 * BORDER
    return (PAD + cols * (slot + PAD) + first_gap,
            PAD + rows * (slot + (CAPTION if captions else 0) + PAD))


def draw_grid(cells: Sequence[Sequence[Image.Image]], cell: int,
              borders: Sequence[Sequence[tuple | None]] | None = None,
              captions: Sequence[Sequence[str]] | None = None, first_gap: int = 0) -> Image.Image:
    """Paste equally sized (cell x cell) images in rows, each in an optional coloured frame."""
    rows, cols = len(cells), max(len(row) for row in cells)
    canvas = Image.new("RGB", grid_size(rows, cols, cell, captions is not None, first_gap), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    slot = cell + 2 * BORDER
    row_height = slot + (CAPTION if captions is not None else 0) + PAD
    for r, row in enumerate(cells):
        for c, image in enumerate(row):
            x = PAD + c * (slot + PAD) + (first_gap if c > 0 else 0)
            y = PAD + r * row_height
            color = borders[r][c] if borders is not None else None
            if color is not None:
                draw.rectangle([x, y, x + slot - 1, y + slot - 1], fill=color)
            # small maps and images are enlarged without blurring their pixels
            resample = Image.Resampling.NEAREST if min(image.size) < cell else Image.Resampling.BILINEAR
            canvas.paste(image.convert("RGB").resize((cell, cell), resample), (x + BORDER, y + BORDER))
            if captions is not None and captions[r][c]:
                draw.text((x, y + slot), captions[r][c][:max(slot // 6, 1)], fill=(0, 0, 0))
    return canvas


def raw_image(dataset: Dataset, index: int) -> Image.Image:
    """The untransformed image behind dataset[index] (an ImageFolder, or a Subset of one)."""
    while hasattr(dataset, "dataset") and hasattr(dataset, "indices"):  # torch Subset
        dataset, index = dataset.dataset, dataset.indices[index]
    return load_rgb(dataset.samples[index][0])


def nearest_neighbours(model: torch.nn.Module, train_set: Dataset, query_set: Dataset, ctx: DistContext,
                       num_queries: int, k: int, batch_size: int, num_workers: int,
                       seed: int = 0) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """(query indices, neighbour indices [Q, k], cosine similarities [Q, k]) in feature space.

    Queries are a fixed random choice (by `seed`) of `num_queries` images of `query_set`.
    """
    if len(train_set) < k:
        raise UserError(f"the training set has {len(train_set)} images, fewer than --k {k}")
    chosen = torch.randperm(len(query_set), generator=torch.Generator().manual_seed(seed))[:num_queries]
    queries = sorted(chosen.tolist())
    query_subset = torch.utils.data.Subset(query_set, queries)

    def features(dataset: Dataset, desc: str) -> torch.Tensor:
        loader = build_loader(IndexedDataset(dataset), batch_size, num_workers, ctx, shuffle=False,
                              drop_last=False)
        return extract_features(model, loader, ctx, desc=desc)[0]

    train_f = features(train_set, "train features")
    query_f = features(query_subset, "query features")
    similarity, neighbours = (query_f @ train_f.T).topk(k, dim=1)
    return queries, neighbours.cpu(), similarity.cpu()


def neighbour_grid(train_set: Dataset, query_set: Dataset, queries: list[int], neighbours: torch.Tensor,
                   cell: int = 64) -> Image.Image:
    """One row per query: the query (blue frame), then its neighbours framed green when they share
    its label and red otherwise; captions name the classes."""
    classes = getattr(train_set, "classes", None)
    train_targets, query_targets = _targets(train_set), _targets(query_set)

    def name(label: int) -> str:
        return classes[label] if classes else str(label)

    cells, borders, captions = [], [], []
    for q, row in zip(queries, neighbours.tolist()):
        label = query_targets[q]
        cells.append([raw_image(query_set, q)] + [raw_image(train_set, i) for i in row])
        borders.append([QUERY_COLOR] + [SAME_COLOR if train_targets[i] == label else OTHER_COLOR
                                        for i in row])
        captions.append([name(label)] + [name(train_targets[i]) for i in row])
    return draw_grid(cells, cell, borders, captions, first_gap=QUERY_GAP)


def _targets(dataset: Dataset) -> list[int]:
    if hasattr(dataset, "targets"):
        return list(dataset.targets)
    if hasattr(dataset, "dataset") and hasattr(dataset, "indices"):
        inner = _targets(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    raise UserError("the dataset has no labels (targets): use an ImageFolder")


def add_neighbour_args(parser, default_png: str = "nearest_neighbors.png") -> None:
    parser.add_argument("--png", default=default_png, help="picture to write")
    parser.add_argument("--num_queries", default=8, type=int,
                        help="query images (rows), a fixed random choice")
    parser.add_argument("--k", default=8, type=int, help="neighbours shown per query")
    parser.add_argument("--cell", default=64, type=int, help="side of each image in the picture, in pixels")
    parser.add_argument("--seed", default=0, type=int, help="seed of the query choice")


def check_neighbour_args(args) -> None:
    for name in ("num_queries", "k", "cell"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")


def write_neighbour_grid(model: torch.nn.Module, train_set: Dataset, query_set: Dataset, ctx: DistContext,
                         args, batch_size: int, num_workers: int) -> Image.Image:
    """Find the neighbours, draw them, save args.png (rank 0) and print what share the label."""
    model = model.to(ctx.device).eval()
    queries, neighbours, _ = nearest_neighbours(model, train_set, query_set, ctx, args.num_queries, args.k,
                                                batch_size, num_workers, args.seed)
    picture = neighbour_grid(train_set, query_set, queries, neighbours, args.cell)
    if ctx.is_main:
        from pathlib import Path

        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        picture.save(args.png)
        train_targets, query_targets = _targets(train_set), _targets(query_set)
        same = sum(train_targets[i] == query_targets[q] for q, row in zip(queries, neighbours.tolist())
                   for i in row)
        print(f"{args.png} saved: {len(queries)} queries x {args.k} neighbours among {len(train_set)} "
              f"training images; {100.0 * same / neighbours.numel():.1f}% share the query's label",
              flush=True)
    return picture
