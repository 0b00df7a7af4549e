"""Merge runs of one benchmark made in separate processes (e.g. seeds in parallel):
``python -m benchmarks.merge RUN_DIR [RUN_DIR ...] --out DIR [--replace]``.

Concatenates their results.csv and accuracy_matrix.csv, refuses runs made with different settings
(encoder, epochs, ... : the columns beside the metrics) and, unless ``--replace``, runs that share a
(benchmark, method, seed); with ``--replace`` a later run's rows supersede an earlier run's (e.g. a
method re-run after a fix). Writes summary.csv/.md, the plots and a run.json listing every command.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd

from avalanche_dkvb.atomic_files import atomic_write_text
from benchmarks import cli
from benchmarks.folder_lock import FolderBusy, FolderLock
from benchmarks.outputs import (RESULT_COLUMNS, ResultsWriter, read_run_info, run_key, setting_text, settings_columns,
                                threads_per_cell)
from benchmarks.plots import plot_accuracy_curves, plot_final_matrices

PROG = "python -m benchmarks.merge"


def merge(run_dirs: list[Path], out: Path, replace: bool = False) -> ResultsWriter:
    missing = [str(d) for d in run_dirs if not (d / "results.csv").exists()]
    if missing:
        raise FileNotFoundError(f"No results.csv in {missing}; expected folders written by python -m benchmarks.")
    runs = [ResultsWriter.read(d) for d in run_dirs]  # each folder's results and matrices
    _check_same_settings(run_dirs, runs)
    infos = [_run_info(d) for d in run_dirs]  # read before writing: out may be one of run_dirs
    rows, matrix_rows = _combine(runs, replace)
    results = pd.DataFrame(rows)
    writer = ResultsWriter(out, context=settings_columns(results))
    writer.rows = results.sort_values(["seed"], kind="stable").to_dict("records")
    writer.matrix_rows = matrix_rows
    writer.write()
    plot_accuracy_curves(writer, out / "accuracy_curves.png")
    plot_final_matrices(writer, out / "final_accuracy_matrices.png")
    notes = [i["note"] for i in infos if "note" in i]  # e.g. how a run.json was reconstructed
    atomic_write_text(out / "run.json", json.dumps({
        "command": " ; ".join(i["command"] for i in infos),
        "status": "finished" if all(i.get("status", "finished") == "finished" for i in infos) else "partial",
        "wall_clock_seconds": max((seconds for seconds in (i.get("wall_clock_seconds", math.nan) for i in infos)
                                   if not math.isnan(seconds)), default=math.nan),
        "torch_threads": max(threads_per_cell(i) or 0 for i in infos),
        "torch": next((i["torch"] for i in infos if i.get("torch")), None),
        "finished": max(i.get("finished", "") for i in infos),  # a run.json needs only its command
        "merged_runs": sum(i.get("merged_runs", 1) for i in infos),
        **({"note": " ; ".join(notes)} if notes else {})}, indent=2))
    return writer


def _combine(runs: list[ResultsWriter], replace: bool) -> tuple[list[dict], list[dict]]:
    """Every run's result and matrix rows, each (benchmark, method, seed) from one run: the only one,
    or with ``replace`` the last one, kept at the place where it first appeared."""
    owner, order, overlaps = {}, [], []
    for i, run in enumerate(runs):
        for row in run.rows:
            key = run_key(row)
            if key in owner:
                overlaps.append(key)
            else:
                order.append(key)
            owner[key] = i
    if overlaps and not replace:
        raise ValueError(f"The runs overlap; each (benchmark, method, seed) must come from one run, or pass "
                         f"--replace to let later runs supersede earlier ones: {sorted(set(overlaps))}")
    rows = {(i, run_key(row)): row for i, run in enumerate(runs) for row in run.rows}
    matrices = {key: [] for key in order}
    for i, run in enumerate(runs):
        for row in run.matrix_rows:
            if owner[run_key(row)] == i:
                matrices[run_key(row)].append(row)
    return [rows[owner[key], key] for key in order], [row for key in order for row in matrices[key]]


def _settings(run: ResultsWriter) -> dict:
    """The run's settings columns (everything in results.csv beside the metrics) and their values where
    they apply: a setting of some methods only (e.g. ``baseline_epochs``) is empty on the other rows."""
    frame = pd.DataFrame(run.rows)
    return {c: sorted(set(frame[c].dropna().map(setting_text))) for c in frame.columns if c not in RESULT_COLUMNS}


def _check_same_settings(run_dirs: list[Path], runs: list[ResultsWriter]) -> None:
    """ValueError unless every run has the same settings columns, each with the same values wherever both
    runs have a method it applies to (a run of DKVB alone merges with one whose SGD baselines set
    ``baseline_epochs``)."""
    reference = _settings(runs[0])
    for run_dir, run in zip(run_dirs[1:], runs[1:]):
        settings = _settings(run)
        differing = sorted(c for c in reference.keys() | settings.keys()
                           if c not in reference or c not in settings
                           or (reference[c] and settings[c] and reference[c] != settings[c]))
        if differing:
            details = ", ".join(f"{c}: {reference.get(c, '<missing>')} vs {settings.get(c, '<missing>')}"
                                for c in differing)
            raise ValueError(f"Cannot merge {run_dirs[0]} and {run_dir}: they were run with different settings "
                             f"({details}); only runs of the same settings can share a table.")


def _run_info(run_dir: Path) -> dict:
    """The run's run.json; a run stopped before it could write one is recorded as such."""
    if (run_dir / "run.json").exists():
        return read_run_info(run_dir)
    return {"command": f"<not recorded: the run in {run_dir} was stopped before writing run.json>",
            "status": "stopped", "wall_clock_seconds": float("nan"), "torch_threads": None, "torch": None,
            "finished": ""}


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog=PROG, description=__doc__)
    p.add_argument("run_dirs", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--replace", action="store_true",
                   help="a later run's (benchmark, method, seed) rows supersede an earlier run's")
    args = p.parse_args(argv)
    command = " ".join([PROG, *(sys.argv[1:] if argv is None else argv)])
    try:
        with FolderLock(args.out, command):
            merge(args.run_dirs, args.out, replace=args.replace)
    except (FolderBusy, ValueError, OSError) as error:  # unusable inputs: nothing is written
        return cli.report(PROG, error, args.debug, cli.USAGE_ERROR)
    print((args.out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
