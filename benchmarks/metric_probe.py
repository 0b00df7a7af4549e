"""Where the gap between DKVB's moment values and streaming LDA comes from: the metric.

``python -m benchmarks.metric_probe --out DIR [--seeds 0] ...`` (the ablation's embedding flags) writes
``DIR/results.csv`` and ``DIR/summary.md`` with two kinds of rows, final class-balanced accuracy on the
whole test set:

- ``lda <source>``: linear discriminant analysis in closed form (class means of the labelled training set,
  covariance ``0.9 S + 0.1 mean(diag S) I``) with S from ``within-class`` (the labelled training set's
  pooled within-class scatter: what streaming LDA estimates), ``own unlabelled`` (the total covariance of
  the stream's training inputs without labels), ``key-init data`` (the total covariance of the other data
  set the keys are initialised on, known before any label), or ``identity`` (nearest class mean). Final
  accuracy does not depend on the order of the stream, so no seed applies.
- ``moments whitened <source>``: the ablation's "moments K 256 d_key 64" setting trained class-
  incrementally on embeddings ZCA-whitened with the same shrunk S (``none``: not whitened; ``own
  unlabelled`` is a deviation: a statistic of every experience's inputs before training).

Rows already in ``results.csv`` are skipped (one writer per folder, files rewritten atomically per row).
"""

from __future__ import annotations

import sys
import time

import pandas as pd
import torch

from avalanche_dkvb.data import make_class_incremental_benchmark
from benchmarks import ablate
from benchmarks.folder_lock import FolderLock
from benchmarks.outputs import atomic_write_text
from benchmarks.real import BENCHMARKS, load_embeddings

SHRINKAGE = 0.1
MOMENTS = ablate.GRID["moments K 256 d_key 64"]
SOURCES = ("within-class", "own unlabelled", "key-init data", "identity")
WHITENINGS = ("none", "key-init data", "own unlabelled")


def _shrunk(cov: torch.Tensor) -> torch.Tensor:
    """``(1 - SHRINKAGE) S + SHRINKAGE mean(diag S) I`` of a (D, D) covariance S."""
    return (1 - SHRINKAGE) * cov + SHRINKAGE * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype)


def shrunk_covariance(x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (D, D) float64: the shrunk total covariance of ``x``."""
    return _shrunk(torch.cov(x.double().T))


def within_class_covariance(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Pooled within-class covariance of (N, D) ``x``, shrunk like :func:`shrunk_covariance`."""
    centred = x.double() - torch.stack([x[y == c].double().mean(0) for c in range(num_classes)])[y]
    return _shrunk(centred.T @ centred / (len(x) - num_classes))


def lda_predictor(x: torch.Tensor, y: torch.Tensor, num_classes: int, cov: torch.Tensor):
    """Logits (B, V) of the LDA with class means of (x, y) and covariance ``cov``."""
    means = torch.stack([x[y == c].double().mean(0) for c in range(num_classes)])  # (V, D)
    weights = torch.linalg.solve(cov, means.T).T  # (V, D)
    bias = -0.5 * (weights * means).sum(1)
    return lambda batch: batch.double() @ weights.T + bias


def zca(reference: torch.Tensor):
    """The whitening fitted on ``reference`` (N, D): x -> (x - mean) C^-1/2 sqrt(mean eigenvalue), with C
    its shrunk covariance (the overall scale kept, so key distances stay comparable)."""
    mean = reference.double().mean(0)
    eigenvalues, vectors = torch.linalg.eigh(shrunk_covariance(reference))
    matrix = vectors @ torch.diag(eigenvalues.rsqrt()) @ vectors.T * eigenvalues.mean().sqrt()
    return lambda x: ((x.double() - mean) @ matrix).float()


def _summary_line(row: str, stats: pd.Series) -> str:
    """A table line: the LDA rows are closed form (no seed), the moment rows mean ± std over seeds."""
    if row.startswith("lda"):
        return f"| {row} | none | {100 * stats['mean']:.2f} |"
    return f"| {row} | {int(stats['count'])} | {100 * stats['mean']:.2f} ± {100 * stats['std']:.2f} |"


def main(argv=None) -> int:
    # the ablation's flags; --settings and --epochs do not apply here
    args = ablate.parse_args(argv, prog="python -m benchmarks.metric_probe", description=__doc__)
    torch.set_num_threads(args.threads)
    command = " ".join(["python -m benchmarks.metric_probe", *(sys.argv[1:] if argv is None else argv)])
    with FolderLock(args.out, command):
        return _run(args, command)


def _run(args, command: str) -> int:
    spec = BENCHMARKS[args.benchmark]
    train_x, train_y = load_embeddings(args, spec.image_set, "train", args.train_per_class).tensors()
    test_x, test_y = load_embeddings(args, spec.image_set, "test", None).tensors()
    other_x, _ = load_embeddings(args, spec.key_init_set, "train", args.key_init_per_class).tensors()
    num_classes = int(train_y.max()) + 1
    experiences = args.experiences  # parse_args put in the data set's default
    path = args.out / "results.csv"
    results = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=["row", "seed"])
    done = set(zip(results["row"], results["seed"]))

    def record(row: str, seed: int, accuracy: float, seconds: float) -> None:
        nonlocal results
        print(f"  {row} seed {seed}: {100 * accuracy:.2f} % ({seconds:.0f} s)", flush=True)
        results = pd.concat([results, pd.DataFrame([{"row": row, "seed": seed, "final_accuracy": accuracy,
                                                     "seconds": seconds}])], ignore_index=True)
        atomic_write_text(path, results.to_csv(index=False))
        write_summary()

    def write_summary() -> None:
        summary = results.groupby("row", sort=False).final_accuracy.agg(["count", "mean", "std"]).fillna(0.0)
        lines = [f"Command: `{command}`", "", "| row | seeds | final acc. (%) |", "|---|---|---|"]
        lines += [_summary_line(row, s) for row, s in summary.iterrows()]
        atomic_write_text(args.out / "summary.md", "\n".join(lines) + "\n")

    print(f"[metric_probe] {command}", flush=True)
    covariances = {"within-class": lambda: within_class_covariance(train_x, train_y, num_classes),
                   "own unlabelled": lambda: shrunk_covariance(train_x),
                   "key-init data": lambda: shrunk_covariance(other_x),
                   "identity": lambda: torch.eye(train_x.shape[1], dtype=torch.float64)}
    for source in SOURCES:
        if (f"lda {source}", -1) not in done:
            start = time.perf_counter()
            predict = lda_predictor(train_x, train_y, num_classes, covariances[source]())
            record(f"lda {source}", -1, ablate.class_balanced_accuracy(predict, test_x, test_y, num_classes),
                   time.perf_counter() - start)
    for whitening in WHITENINGS:
        if all((f"moments whitened {whitening}", seed) in done for seed in args.seeds):
            continue
        reference = {"none": None, "key-init data": other_x, "own unlabelled": train_x}[whitening]
        transform = (lambda x: x) if reference is None else zca(reference)  # only the one whitening needed
        white_train, white_test = transform(train_x), transform(test_x)
        keys = ablate.KeyBank(train_x.shape[1], num_classes, {"other": transform(other_x)}, args.key_init_epochs)
        for seed in args.seeds:
            if (f"moments whitened {whitening}", seed) in done:
                continue
            start = time.perf_counter()
            model, error = keys.model(MOMENTS, seed)
            torch.manual_seed(seed)
            stream = make_class_incremental_benchmark(white_train, train_y, white_test, test_y, experiences, seed=seed)
            strategy = ablate.train(MOMENTS, model, error, stream, args.epochs)
            accuracy = ablate.class_balanced_accuracy(ablate.predictor(strategy), white_test, test_y, num_classes)
            record(f"moments whitened {whitening}", seed, accuracy, time.perf_counter() - start)
    write_summary()
    print((args.out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
