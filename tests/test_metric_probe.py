"""benchmarks.metric_probe on synthetic embeddings: LDA rows, whitening, moment rows, resume."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pandas as pd
import torch

from benchmarks import ablate, metric_probe


def _fake_embeddings(monkeypatch):
    """10 Gaussian classes in 32-d with a skewed covariance; the key-init set is other noise."""
    centres = torch.randn(10, 32, generator=torch.Generator().manual_seed(0))
    scales = torch.logspace(-1, 0.5, 32)

    def embeddings(args, image_set, split, per_class):
        n = 12 if split == "train" else 6
        y = torch.arange(10).repeat_interleave(n)
        g = torch.Generator().manual_seed(hash((image_set, split)) % 1000)
        x = centres[y] + scales * torch.randn(len(y), 32, generator=g)
        return SimpleNamespace(tensors=lambda: (x, y))  # stands in for a CachedEmbeddings

    monkeypatch.setattr(metric_probe, "load_embeddings", embeddings)


def test_zca_whitens_its_reference_without_shrinkage(monkeypatch):
    monkeypatch.setattr(metric_probe, "SHRINKAGE", 0.0)
    x = torch.randn(500, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    white = metric_probe.zca(x)(x).double()
    cov = torch.cov(white.T)
    assert torch.allclose(cov, cov.diagonal().mean() * torch.eye(6, dtype=torch.float64), atol=1e-4)
    assert abs(cov.diagonal().mean() - torch.linalg.eigvalsh(torch.cov(x.T)).mean()) < 1e-3  # scale kept


def test_lda_with_identity_covariance_is_nearest_class_mean():
    x, y = torch.randn(60, 5), torch.arange(3).repeat(20)
    test = torch.randn(40, 5)
    means = torch.stack([x[y == c].mean(0) for c in range(3)])
    logits = metric_probe.lda_predictor(x, y, 3, torch.eye(5, dtype=torch.float64))(test)
    assert torch.equal(logits.argmax(1), torch.cdist(test, means).argmin(1))


def test_probe_writes_every_row_once_and_resumes(monkeypatch, tmp_path):
    _fake_embeddings(monkeypatch)
    small = dataclasses.replace(metric_probe.MOMENTS, num_codebooks=8, num_keys=16, key_dim=4)
    monkeypatch.setattr(metric_probe, "MOMENTS", small)
    argv = ["--seeds", "0", "--key-init-epochs", "1", "--out", str(tmp_path)]
    assert metric_probe.main(argv) == 0
    results = pd.read_csv(tmp_path / "results.csv")
    expected = [f"lda {s}" for s in metric_probe.SOURCES] + [f"moments whitened {w}" for w in metric_probe.WHITENINGS]
    assert list(results["row"]) == expected
    assert results.final_accuracy.between(0, 1).all()
    lda = results.set_index("row").final_accuracy
    assert lda["lda within-class"] > lda["lda identity"]  # the skewed noise is what LDA's covariance corrects
    before = (tmp_path / "results.csv").read_text()
    assert metric_probe.main(argv) == 0
    assert (tmp_path / "results.csv").read_text() == before
    assert "moments whitened own unlabelled" in (tmp_path / "summary.md").read_text()
