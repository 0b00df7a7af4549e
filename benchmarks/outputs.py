"""Results on disk: results.csv, the accuracy matrices, summary tables; every file written atomically,
and re-written after each finished run so an interrupted job keeps everything it completed."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from avalanche_dkvb.atomic_files import atomic_write, atomic_write_text

RESULT_COLUMNS = ["benchmark", "method", "seed", "final_accuracy", "avg_incremental_accuracy",
                  "forgetting", "bwt", "train_seconds"]
METRICS = ["final_accuracy", "avg_incremental_accuracy", "forgetting", "bwt", "train_seconds"]


def atomic_savefig(figure, path: Path) -> None:
    """Save a matplotlib figure as PNG atomically (see ``avalanche_dkvb.atomic_files``)."""
    with atomic_write(path) as file:
        figure.savefig(file, format="png", dpi=110, bbox_inches="tight")


class ResultsWriter:
    """Collects run rows and accuracy matrices and keeps ``out_dir`` up to date after each run.

    ``context``: settings columns written on every row, except that a column named in ``applies_to``
    is written only on the rows of the methods listed there (e.g. ``{"ewc_lambda": {"ewc"}}``), and left
    empty on the others; ``unset``: the settings this run leaves at their defaults (no column). With
    ``resume``, the runs already in ``out_dir`` are loaded (and :meth:`done` reports them), after
    checking that their files are sound (:func:`load_results`), that they were made with the same
    ``context`` settings, that the ``unset`` ones were unset there too, and that the file has no
    settings column this run does not know (another benchmark's); ValueError otherwise, naming the file.
    Loading only reads (it may run before the folder is locked).

    A run added again replaces its rows (never two rows of one run); ``order`` lists the
    (benchmark, method, seed) runs in the order the tables keep them, whatever order they finish in
    (runs not listed come after, as added).
    """

    def __init__(self, out_dir: Path, context: dict | None = None, resume: bool = False,
                 applies_to: dict[str, set[str]] | None = None, order: list[tuple[str, str, int]] | None = None,
                 unset: set[str] = frozenset()):
        self.out_dir = Path(out_dir)
        self.context = dict(context or {})  # extra columns, e.g. encoder and benchmark settings
        self.applies_to = dict(applies_to or {})
        self.unset = set(unset) - self.context.keys()
        self.order = {key: i for i, key in enumerate(order or [])}
        self.rows: list[dict] = []
        self.matrix_rows: list[dict] = []
        if resume and (self.out_dir / "results.csv").exists():
            self._load_finished_runs()

    @classmethod
    def read(cls, out_dir: Path) -> "ResultsWriter":
        """The runs in ``out_dir`` as they are, whatever their settings columns (checked sound by
        :func:`load_results`), e.g. to merge them."""
        results, matrices = load_results(Path(out_dir))
        writer = cls(out_dir, context=settings_columns(results))
        writer.rows, writer.matrix_rows = results.to_dict("records"), matrices.to_dict("records")
        return writer

    def _applies(self, column: str, method: str) -> bool:
        return column not in self.applies_to or method in self.applies_to[column]

    def _load_finished_runs(self) -> None:
        results, matrices = load_results(self.out_dir)
        path = self.out_dir / "results.csv"
        known = set(RESULT_COLUMNS) | self.context.keys() | self.applies_to.keys() | self.unset
        unknown = [column for column in results.columns if column not in known]
        if unknown:
            raise ValueError(f"Cannot resume: {path} has the settings columns {unknown}, which this run does "
                             f"not have (another benchmark's results?). Use another --out.")
        for column in self.context.keys() | self.applies_to.keys() | self.unset:
            value = self.context.get(column)
            applies = results.method.map(lambda method: self._applies(column, method))
            cells = results.loc[applies, column] if column in results else pd.Series(["<missing>"] * int(applies.sum()))
            empty = {"<empty>"} if cells.isna().any() else set()
            found = set(cells.dropna().map(setting_text)) | empty
            expected = {setting_text(value)} if value is not None else {"<empty>"}
            if applies.any() and found != expected and not (value is None and column not in results):
                shown = sorted(set(cells.dropna().astype(str)) | empty)  # as the file holds them
                raise ValueError(f"Cannot resume: {path} has {column}={shown}, this run has "
                                 f"{column}={value!r}. Use another --out or the same settings.")
        self.rows = results.to_dict("records")
        self.matrix_rows = matrices.to_dict("records")

    def done(self, benchmark: str, method: str, seed: int) -> bool:
        return any(run_key(r) == (benchmark, method, seed) for r in self.rows)

    def add(self, benchmark: str, method: str, seed: int, result) -> None:
        key = (benchmark, method, seed)
        self.rows = [r for r in self.rows if run_key(r) != key]
        self.matrix_rows = [r for r in self.matrix_rows if run_key(r) != key]
        self.rows.append({"benchmark": benchmark, "method": method, "seed": seed, **result.summary(),
                          **{k: v for k, v in self.context.items() if self._applies(k, method)}})
        for i, row in enumerate(result.accuracy_matrix):
            for j, accuracy in enumerate(row):
                self.matrix_rows.append({"benchmark": benchmark, "method": method, "seed": seed,
                                         "after_experience": i, "on_experience": j, "accuracy": accuracy})
        position = lambda row: self.order.get(run_key(row), len(self.order))  # noqa: E731; sort is stable
        self.rows.sort(key=position)
        self.matrix_rows.sort(key=position)
        self.write()

    @property
    def results(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=RESULT_COLUMNS + list(self.context))

    def write(self) -> None:
        """Each file atomically; results.csv last, so it is the commit record: a process killed between
        the two writes leaves the previous results.csv and a matrix one run ahead (see load_results)."""
        atomic_write_text(self.out_dir / "accuracy_matrix.csv",
                          pd.DataFrame(self.matrix_rows).to_csv(index=False))
        atomic_write_text(self.out_dir / "results.csv", self.results.to_csv(index=False))
        self.write_summaries()

    def write_summaries(self) -> None:
        """summary.csv and summary.md from the rows, each atomically."""
        summary = summarise(self.results)
        atomic_write_text(self.out_dir / "summary.csv", summary.to_csv(index=False))
        atomic_write_text(self.out_dir / "summary.md", to_markdown(summary))


KEY = ["benchmark", "method", "seed"]
MATRIX_COLUMNS = KEY + ["after_experience", "on_experience", "accuracy"]


def setting_text(value) -> str:
    """A setting as compared on resume: a whole float as its integer (a CSV column that is empty on some
    rows comes back as floats, so 200 reads as 200.0), anything else as ``str``."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def run_key(row: dict) -> tuple[str, str, int]:
    return row["benchmark"], row["method"], int(row["seed"])


def load_results(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``run_dir``'s results.csv and accuracy_matrix.csv after checking they are what
    :class:`ResultsWriter` writes: readable CSV, the expected columns, at least one row, accuracies
    in [0, 1], forgetting and BWT in [-1, 1] (or empty), no (benchmark, method, seed) twice, and a
    matrix for every run in results.csv. ValueError naming the file and the problem otherwise. Matrix
    rows of runs not in results.csv are the trace of a write interrupted before its results.csv (which
    :meth:`ResultsWriter.write` writes last): they are dropped, with a warning naming them."""
    results = _read_csv(run_dir / "results.csv", RESULT_COLUMNS)
    _check_range(results, run_dir / "results.csv", ["final_accuracy", "avg_incremental_accuracy"], 0, 1)
    _check_range(results, run_dir / "results.csv", ["forgetting", "bwt"], -1, 1, allow_empty=True)
    _check_unique(results, run_dir / "results.csv", KEY)
    matrices = _read_csv(run_dir / "accuracy_matrix.csv", MATRIX_COLUMNS)
    _check_range(matrices, run_dir / "accuracy_matrix.csv", ["accuracy"], 0, 1)
    _check_unique(matrices, run_dir / "accuracy_matrix.csv", KEY + ["after_experience", "on_experience"])
    runs, matrix_runs = (set(map(tuple, frame[KEY].astype(str).values)) for frame in (results, matrices))
    if runs - matrix_runs:
        raise ValueError(f"{run_dir / 'accuracy_matrix.csv'} does not match {run_dir / 'results.csv'}: runs "
                         f"{sorted(runs - matrix_runs)} have no matrix.")
    if matrix_runs - runs:
        warnings.warn(f"{run_dir / 'accuracy_matrix.csv'} holds runs {sorted(matrix_runs - runs)} that "
                      f"{run_dir / 'results.csv'} does not (a write was interrupted before results.csv); "
                      f"they are dropped and will run again.", RuntimeWarning, stacklevel=2)
        committed = matrices[KEY].astype(str).apply(tuple, axis=1).isin(runs)
        matrices = matrices[committed].reset_index(drop=True)
    return results, matrices


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise ValueError(f"{path} is missing; expected it beside results.csv, as python -m benchmarks writes it.")
    try:
        frame = pd.read_csv(path)
    except (UnicodeDecodeError, pd.errors.EmptyDataError, pd.errors.ParserError) as error:
        raise ValueError(f"{path} is not a readable CSV file ({type(error).__name__}: "
                         f"{' '.join(str(error).split())}).") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{path} lacks the column(s) {missing}; expected {columns}.")
    if frame.empty:
        raise ValueError(f"{path} has a header but no rows.")
    if frame.seed.isna().any() or not pd.api.types.is_integer_dtype(frame.seed) or (frame.seed < 0).any():
        raise ValueError(f"{path} has seeds that are not non-negative integers: {sorted(set(frame.seed.astype(str)))}.")
    return frame


def _check_range(frame: pd.DataFrame, path: Path, columns: list[str], low: float, high: float,
                 allow_empty: bool = False) -> None:
    for column in columns:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = ~(values.between(low, high) | (frame[column].isna() & allow_empty))  # text is outside too
        if bad.any():
            rows = frame.loc[bad, KEY + [column]].head(3).to_dict("records")
            raise ValueError(f"{path} has {int(bad.sum())} {column} value(s) outside [{low}, {high}], e.g. {rows}.")


def _check_unique(frame: pd.DataFrame, path: Path, key: list[str]) -> None:
    repeated = frame[frame.duplicated(key, keep=False)]
    if not repeated.empty:
        raise ValueError(f"{path} has duplicated rows for {key}: {repeated[key].drop_duplicates().head(3).to_dict('records')}.")


def settings_columns(results: pd.DataFrame) -> dict:
    """A writer's ``context`` holding the settings columns of ``results`` as they are (values None:
    each row keeps its own)."""
    return {column: None for column in results.columns if column not in RESULT_COLUMNS}


def read_run_info(run_dir: Path) -> dict:
    """``run_dir/run.json`` as a dict; ValueError naming the file if it is not a JSON object with a
    command."""
    path = run_dir / "run.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not readable JSON ({type(error).__name__}: {error}).") from None
    if not isinstance(info, dict) or "command" not in info:
        raise ValueError(f"{path} is not a run record: expected a JSON object with a 'command'.")
    return info


def threads_per_cell(info: dict) -> int | None:
    """The torch threads each cell of a run used, from its ``run.json`` dict: a Ray cell's own
    (``cell_threads``), else the process's (``torch_threads``; a merged record keeps the largest)."""
    return info.get("cell_threads") if info.get("engine") == "ray" else info.get("torch_threads")


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
