"""Weighted k-NN evaluation on frozen features (upstream DINO's protocol), shared by both trees."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .distributed import DistContext, all_gather_uneven
from .progress import progress

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07


class IndexedDataset(Dataset):
    """Returns (image, label, index) so features can be put back in dataset order after gathering."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image, label, index


@torch.no_grad()
def extract_features(model: torch.nn.Module, loader, ctx: DistContext,
                     desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features and labels of a loader over an IndexedDataset, in dataset order,
    gathered from every rank (the padding a DistributedSampler adds is dropped)."""
    model.eval()
    feats, labels, indices = [], [], []
    for images, targets, index in progress(loader, desc=desc):
        out = model(images.to(ctx.device, non_blocking=True))
        feats.append(F.normalize(out.float(), dim=1))
        labels.append(targets.to(ctx.device, non_blocking=True))
        indices.append(index.to(ctx.device, non_blocking=True))
    feats_t = all_gather_uneven(torch.cat(feats))
    labels_t = all_gather_uneven(torch.cat(labels))
    index_t = all_gather_uneven(torch.cat(indices))
    size = len(loader.dataset)
    ordered = feats_t.new_zeros((size, feats_t.shape[1]))
    ordered_labels = labels_t.new_zeros(size)
    ordered[index_t] = feats_t  # duplicates from padding write identical rows
    ordered_labels[index_t] = labels_t
    return ordered, ordered_labels


@torch.no_grad()
def knn_classify_all(train_features: torch.Tensor, train_labels: torch.Tensor,
                     test_features: torch.Tensor, test_labels: torch.Tensor, ks: Sequence[int],
                     temperature: float = DEFAULT_TEMPERATURE, num_classes: int | None = None,
                     chunk: int = 1024) -> dict[int, tuple[float, float]]:
    """Top-1 / top-5 accuracy (percent) of weighted k-NN voting for several k at once.

    Each of the k nearest training features (cosine similarity s) votes for its class with
    weight exp(s / temperature). One top-k search at the largest k serves every smaller k.
    """
    num_classes = int(num_classes or int(train_labels.max()) + 1)
    ks = sorted(set(int(k) for k in ks))
    max_k = min(ks[-1], train_features.shape[0])
    correct = {k: torch.zeros(2, dtype=torch.float64) for k in ks}
    for start in range(0, test_features.shape[0], chunk):
        features = test_features[start:start + chunk]
        targets = test_labels[start:start + chunk].view(-1, 1)
        similarity, neighbours = (features @ train_features.T).topk(max_k, dim=1)
        neighbour_labels = train_labels[neighbours]
        weights = (similarity / temperature).exp()
        for k in ks:
            k_eff = min(k, max_k)
            votes = torch.zeros(features.shape[0], num_classes, device=features.device,
                                dtype=weights.dtype)
            votes.scatter_add_(1, neighbour_labels[:, :k_eff], weights[:, :k_eff])
            ranked = votes.argsort(dim=1, descending=True)
            hits = ranked.eq(targets)
            correct[k][0] += hits[:, :1].sum().item()
            correct[k][1] += hits[:, :min(5, k, num_classes)].sum().item()
    total = test_features.shape[0]
    return {k: (float(c[0] * 100.0 / total), float(c[1] * 100.0 / total)) for k, c in correct.items()}


def knn_classify(train_features, train_labels, test_features, test_labels, k: int,
                 temperature: float = DEFAULT_TEMPERATURE, num_classes: int | None = None,
                 chunk: int = 1024) -> tuple[float, float]:
    return knn_classify_all(train_features, train_labels, test_features, test_labels, [k],
                            temperature, num_classes, chunk)[k]


def result_line(k: int, top1: float, top5: float) -> str:
    """The line upstream DINO prints; launch scripts read the 10-NN Top1 from it."""
    return f"{k}-NN classifier result: Top1: {top1}, Top5: {top5}"


def evaluate_knn(backbone: torch.nn.Module, train_set: Dataset, val_set: Dataset, ctx: DistContext,
                 batch_size: int, num_workers: int, ks: Sequence[int] = DEFAULT_KS,
                 temperature: float = DEFAULT_TEMPERATURE) -> dict[int, tuple[float, float]]:
    """Extract features of both splits on every rank, then vote; returns {k: (top1, top5)}."""
    from .data import build_loader

    def features(dataset: Dataset, desc: str):
        loader = build_loader(IndexedDataset(dataset), batch_size, num_workers, ctx,
                              shuffle=False, drop_last=False)
        return extract_features(backbone, loader, ctx, desc=desc)

    train_f, train_y = features(train_set, "train features")
    val_f, val_y = features(val_set, "val features")
    num_classes = len(getattr(train_set, "classes", [])) or None
    return knn_classify_all(train_f, train_y, val_f, val_y, ks, temperature, num_classes)


# (ours) The k-NN probe run during training: fixed random subsets, so that successive readings
# compare the network with itself (not with other images), small enough to take seconds.
PROBE_TRAIN_IMAGES = 5000
PROBE_VAL_IMAGES = 1000
PROBE_K = 20


class KnnProbe:
    """Every `every` epochs, the weighted 20-NN top-1 accuracy (upstream's voting, T = 0.07) of a
    backbone's features on fixed subsets of train/ (PROBE_TRAIN_IMAGES) and val/ (PROBE_VAL_IMAGES).

    A cheap reading of whether the features improve while training runs; the full evaluation
    (eval_knn, all images) stays the figure to report. Every rank must call it (features are
    extracted in shards and gathered).
    """

    def __init__(self, train_set, val_set, every: int, ctx: DistContext, batch_size: int,
                 num_workers: int, seed: int = 0):
        from .data import limit_images

        self.train_set = limit_images(train_set, PROBE_TRAIN_IMAGES, seed)
        self.val_set = limit_images(val_set, PROBE_VAL_IMAGES, seed)
        self.every, self.ctx = every, ctx
        self.batch_size, self.num_workers = batch_size, num_workers

    def due(self, epoch: int) -> bool:
        """After epoch `epoch` (0-based) every `every` epochs."""
        return self.every > 0 and (epoch + 1) % self.every == 0

    def __call__(self, backbone: torch.nn.Module) -> float:
        """Top-1 accuracy (percent); the backbone's train/eval mode is left as it was."""
        was_training = backbone.training
        try:
            results = evaluate_knn(backbone, self.train_set, self.val_set, self.ctx, self.batch_size,
                                   self.num_workers, ks=(PROBE_K,))
        finally:
            backbone.train(was_training)
        return results[PROBE_K][0]

    def line(self, epoch: int, top1: float, what: str) -> str:
        return (f"k-NN probe after epoch {epoch}: {PROBE_K}-NN top-1 {top1:.2f} % ({what}; "
                f"{len(self.train_set)} train / {len(self.val_set)} val images)")
