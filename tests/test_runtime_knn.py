"""Weighted k-NN voting against hand-computed answers, and feature extraction order."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ssl_runtime import knn


def test_separable_clusters_are_classified_perfectly():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    train_y = torch.arange(3).repeat_interleave(20)
    test_y = torch.arange(3).repeat_interleave(5)
    train = F.normalize(centres[train_y] + 0.05 * torch.randn(60, 8, generator=g), dim=1)
    test = F.normalize(centres[test_y] + 0.05 * torch.randn(15, 8, generator=g), dim=1)
    results = knn.knn_classify_all(train, train_y, test, test_y, ks=[1, 10, 20], num_classes=3, chunk=4)
    assert results == {1: (100.0, 100.0), 10: (100.0, 100.0), 20: (100.0, 100.0)}


def test_weights_follow_exp_of_similarity_over_temperature():
    # one query along x; neighbours: one of class 0 at similarity 1.0, two of class 1 at 0.9
    train = torch.tensor([[1.0, 0.0], [0.9, math.sqrt(1 - 0.81)], [0.9, -math.sqrt(1 - 0.81)]])
    train_y = torch.tensor([0, 1, 1])
    query, label = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    # T=0.07: exp(1/.07)=1.6e6 vs 2*exp(.9/.07)=7.7e5 -> class 0 wins
    assert knn.knn_classify(train, train_y, query, label, k=3, temperature=0.07)[0] == 100.0
    # T=1: e^1=2.72 vs 2*e^0.9=4.92 -> class 1 wins, class 0 is second (inside top-5)
    assert knn.knn_classify(train, train_y, query, label, k=3, temperature=1.0) == (0.0, 100.0)
    # k=1 only sees the nearest neighbour
    assert knn.knn_classify(train, train_y, query, label, k=1, temperature=1.0)[0] == 100.0


def test_k_larger_than_the_training_set_is_clamped():
    train = F.normalize(torch.eye(3), dim=1)
    result = knn.knn_classify(train, torch.tensor([0, 1, 2]), train, torch.tensor([0, 1, 2]), k=200)
    assert result[0] == 100.0


def test_result_line_matches_upstream():
    assert knn.result_line(20, 91.5, 99.0) == "20-NN classifier result: Top1: 91.5, Top5: 99.0"


class _Points(Dataset):
    def __init__(self, n):
        self.x = torch.randn(n, 4)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], i % 2


def test_extract_features_keeps_dataset_order(cpu_ctx):
    dataset = _Points(11)
    loader = torch.utils.data.DataLoader(knn.IndexedDataset(dataset), batch_size=4, shuffle=True)
    feats, labels = knn.extract_features(torch.nn.Identity(), loader, cpu_ctx)
    assert torch.allclose(feats, F.normalize(dataset.x, dim=1))
    assert labels.tolist() == [i % 2 for i in range(11)]


def test_evaluate_knn_end_to_end_on_images(tiny_imagefolder, cpu_ctx):
    import torchvision.transforms as T
    from ssl_runtime.data import SafeImageFolder
    tf = T.Compose([T.Grayscale(), T.ToTensor(), T.Lambda(lambda t: t.flatten())])
    train = SafeImageFolder(tiny_imagefolder / "train", tf)
    val = SafeImageFolder(tiny_imagefolder / "val", tf)
    results = knn.evaluate_knn(torch.nn.Identity(), train, val, cpu_ctx, batch_size=7, num_workers=0,
                               ks=(1, 5))
    assert results[1][0] == pytest.approx(100.0)  # raw pixels separate the striped classes
