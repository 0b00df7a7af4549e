"""Results on disk: results.csv, the accuracy matrices, summary tables; every file written atomically,
and re-written after each finished run so an interrupted job keeps everything it completed."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

RESULT_COLUMNS = ["benchmark", "method", "seed", "final_accuracy", "avg_incremental_accuracy",
                  "forgetting", "bwt", "train_seconds"]
METRICS = ["final_accuracy", "avg_incremental_accuracy", "forgetting", "bwt", "train_seconds"]


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_savefig(figure, path: Path) -> None:
    """Save a matplotlib figure as PNG through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


class ResultsWriter:
    """Collects run rows and accuracy matrices and keeps ``out_dir`` up to date after each run.

    With ``resume``, the runs already in ``out_dir`` are loaded (and :meth:`done` reports them), after
    checking they were made with the same ``context`` settings.
    """

    def __init__(self, out_dir: Path, context: dict | None = None, resume: bool = False):
        self.out_dir = Path(out_dir)
        self.context = dict(context or {})  # extra columns, e.g. encoder and benchmark settings
        self.rows: list[dict] = []
        self.matrix_rows: list[dict] = []
        if resume and (self.out_dir / "results.csv").exists():
            self._load_finished_runs()

    def _load_finished_runs(self) -> None:
        results = pd.read_csv(self.out_dir / "results.csv")
        for column, value in self.context.items():
            found = set(results[column].astype(str)) if column in results else {"<missing>"}
            if found != {str(value)}:
                raise ValueError(f"Cannot resume: {self.out_dir / 'results.csv'} has {column}={sorted(found)}, "
                                 f"this run has {column}={value!r}. Use another --out or the same settings.")
        self.rows = results.to_dict("records")
        self.matrix_rows = pd.read_csv(self.out_dir / "accuracy_matrix.csv").to_dict("records")

    def done(self, benchmark: str, method: str, seed: int) -> bool:
        return any((r["benchmark"], r["method"], int(r["seed"])) == (benchmark, method, seed) for r in self.rows)

    def add(self, benchmark: str, method: str, seed: int, result) -> None:
        self.rows.append({"benchmark": benchmark, "method": method, "seed": seed, **result.summary(),
                          **self.context})
        for i, row in enumerate(result.accuracy_matrix):
            for j, accuracy in enumerate(row):
                self.matrix_rows.append({"benchmark": benchmark, "method": method, "seed": seed,
                                         "after_experience": i, "on_experience": j, "accuracy": accuracy})
        self.write()

    @property
    def results(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=RESULT_COLUMNS + list(self.context))

    def write(self) -> None:
        atomic_write_text(self.out_dir / "results.csv", self.results.to_csv(index=False))
        atomic_write_text(self.out_dir / "accuracy_matrix.csv",
                          pd.DataFrame(self.matrix_rows).to_csv(index=False))
        summary = summarise(self.results)
        atomic_write_text(self.out_dir / "summary.csv", summary.to_csv(index=False))
        atomic_write_text(self.out_dir / "summary.md", to_markdown(summary))


def summarise(results: pd.DataFrame, keys: tuple[str, ...] = ("benchmark", "method")) -> pd.DataFrame:
    """Mean and std over seeds of every metric, one row per ``keys`` value, in run order."""
    grouped = results.groupby(list(keys), sort=False)[METRICS]
    table = grouped.mean().add_suffix("_mean").join(grouped.std(ddof=0).add_suffix("_std"))
    table.insert(0, "seeds", grouped.size())
    return table.reset_index()


def to_markdown(summary: pd.DataFrame) -> str:
    """A Markdown table with 'mean ± std' cells (accuracies in %, times in seconds); the key columns
    are those before ``seeds``."""
    keys = list(summary.columns[:list(summary.columns).index("seeds")])
    header = keys + ["seeds", "final acc. (%)", "avg. incr. acc. (%)", "forgetting (%)", "BWT (%)", "train time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in summary.iterrows():
        cells = [str(r[k]) for k in keys] + [str(r["seeds"])]
        for metric in METRICS:
            scale, digits = (1, 1) if metric == "train_seconds" else (100, 1)
            mean, std = r[f"{metric}_mean"] * scale, r[f"{metric}_std"] * scale
            cells.append("n/a" if np.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
