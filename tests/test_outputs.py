"""Results on disk: atomic files, resuming an interrupted run, merging runs made in parallel."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from benchmarks.merge import merge
from benchmarks.outputs import ResultsWriter
from benchmarks.readme import main as readme_main
from benchmarks.runner import RunResult


def _result(final: float) -> RunResult:
    matrix = np.array([[0.9, 0.0], [0.5, final]])
    return RunResult(matrix, class_balanced=np.array([0.45, final]), seen_class_balanced=np.array([0.9, final]),
                     forgetting=0.4, bwt=-0.4, train_seconds=1.5)


def _run_dir(path, seeds, context):
    writer = ResultsWriter(path, context=context)
    for seed in seeds:
        writer.add("bench", "dkvb", seed, _result(0.5 + seed / 10))
    (path / "run.json").write_text(json.dumps({"command": f"run {seeds}", "wall_clock_seconds": 10.0 + len(seeds),
                                               "torch_threads": 1, "torch": "x", "finished": "today"}))
    return writer


def test_results_files_are_complete_and_leave_no_temporary_files(tmp_path):
    _run_dir(tmp_path, [0, 1], {"epochs": 200})
    results = pd.read_csv(tmp_path / "results.csv")
    assert list(results.seed) == [0, 1] and results.final_accuracy.tolist() == [0.5, 0.6]
    assert (results.epochs == 200).all()
    assert len(pd.read_csv(tmp_path / "accuracy_matrix.csv")) == 2 * 4
    assert "| bench | dkvb | 2 | 55.0 ± 5.0 |" in (tmp_path / "summary.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_resume_keeps_finished_runs_and_refuses_other_settings(tmp_path):
    _run_dir(tmp_path, [0], {"epochs": 200, "weights": "default"})
    resumed = ResultsWriter(tmp_path, context={"epochs": 200, "weights": "default"}, resume=True)
    assert resumed.done("bench", "dkvb", 0) and not resumed.done("bench", "dkvb", 1)
    resumed.add("bench", "dkvb", 1, _result(0.7))
    assert pd.read_csv(tmp_path / "results.csv").seed.tolist() == [0, 1]
    with pytest.raises(ValueError, match="epochs"):
        ResultsWriter(tmp_path, context={"epochs": 2000, "weights": "default"}, resume=True)
    assert not ResultsWriter(tmp_path, context={"epochs": 2000}).done("bench", "dkvb", 0)  # no resume: fresh


def test_resume_accepts_a_setting_that_applies_to_some_methods_only(tmp_path):
    """Such a column is empty on the other methods' rows, so pandas reads it back as floats (200.0)."""
    context, applies = {"baseline_epochs": 200}, {"baseline_epochs": {"linear"}}
    writer = ResultsWriter(tmp_path, context=context, applies_to=applies)
    writer.add("bench", "dkvb", 0, _result(0.5))
    writer.add("bench", "linear", 0, _result(0.2))
    assert ResultsWriter(tmp_path, context=context, applies_to=applies, resume=True).done("bench", "linear", 0)
    with pytest.raises(ValueError, match="baseline_epochs"):
        ResultsWriter(tmp_path, context={"baseline_epochs": 2000}, applies_to=applies, resume=True)


def test_merge_combines_seeds_and_refuses_overlaps(tmp_path):
    _run_dir(tmp_path / "a", [0, 1], {"epochs": 200})
    _run_dir(tmp_path / "b", [2], {"epochs": 200})
    merge([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
    results = pd.read_csv(tmp_path / "merged" / "results.csv")
    assert results.seed.tolist() == [0, 1, 2]
    assert "| bench | dkvb | 3 |" in (tmp_path / "merged" / "summary.md").read_text()
    assert len(pd.read_csv(tmp_path / "merged" / "accuracy_matrix.csv")) == 3 * 4
    info = json.loads((tmp_path / "merged" / "run.json").read_text())
    assert info["command"] == "run [0, 1] ; run [2]" and info["merged_runs"] == 2 and "note" not in info
    with pytest.raises(ValueError, match="overlap"):
        merge([tmp_path / "a", tmp_path / "a"], tmp_path / "bad")


def test_merge_refuses_runs_made_with_different_settings(tmp_path):
    _run_dir(tmp_path / "a", [0], {"epochs": 200})
    _run_dir(tmp_path / "b", [1], {"epochs": 2000})
    _run_dir(tmp_path / "c", [2], {"epochs": 200, "ewc_lambda": 1000.0})
    with pytest.raises(ValueError, match=r"epochs: \['200'\] vs \['2000'\]"):
        merge([tmp_path / "a", tmp_path / "b"], tmp_path / "bad")
    with pytest.raises(ValueError, match="ewc_lambda: <missing>"):
        merge([tmp_path / "a", tmp_path / "c"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_merge_compares_a_setting_of_some_methods_only_where_both_runs_have_such_a_method(tmp_path):
    """baseline_epochs applies to the SGD baselines: a run of DKVB alone (the column empty) merges with a
    run that has them, a run whose baselines used other epochs does not."""
    def run(path, method, seed, baseline_epochs):
        writer = ResultsWriter(path, context={"epochs": 200, "baseline_epochs": baseline_epochs},
                               applies_to={"baseline_epochs": {"linear"}})
        writer.add("bench", method, seed, _result(0.5))
        (path / "run.json").write_text(json.dumps({"command": f"run {method}", "wall_clock_seconds": 1.0,
                                                   "torch_threads": 1, "torch": "x", "finished": "today"}))

    run(tmp_path / "sgd", "linear", 0, 20)
    run(tmp_path / "dkvb", "dkvb", 0, 20)
    run(tmp_path / "sgd_other", "linear", 1, 50)
    assert pd.read_csv(tmp_path / "dkvb" / "results.csv").baseline_epochs.isna().all()
    merge([tmp_path / "sgd", tmp_path / "dkvb"], tmp_path / "merged")
    merged = pd.read_csv(tmp_path / "merged" / "results.csv")
    assert merged.method.tolist() == ["linear", "dkvb"] and merged.baseline_epochs.isna().tolist() == [False, True]
    with pytest.raises(ValueError, match=r"baseline_epochs: \['20'\] vs \['50'\]"):
        merge([tmp_path / "merged", tmp_path / "sgd_other"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_merge_records_a_run_stopped_before_writing_run_json(tmp_path):
    _run_dir(tmp_path / "a", [0], {"epochs": 200})
    _run_dir(tmp_path / "b", [1], {"epochs": 200})
    (tmp_path / "b" / "run.json").unlink()
    merge([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
    info = json.loads((tmp_path / "merged" / "run.json").read_text())
    assert info["status"] == "partial" and "not recorded" in info["command"]
    assert info["wall_clock_seconds"] == 11.0  # the recorded run's time, not NaN

    run_json = json.loads((tmp_path / "a" / "run.json").read_text())
    (tmp_path / "a" / "run.json").write_text(json.dumps({**run_json, "note": "reconstructed"}))
    merge([tmp_path / "a", tmp_path / "merged"], tmp_path / "again", replace=True)
    info = json.loads((tmp_path / "again" / "run.json").read_text())
    assert info["note"] == "reconstructed" and info["merged_runs"] == 3

    (tmp_path / "a" / "run.json").write_text(json.dumps({"command": "x", "status": "finished"}))  # only a command
    merge([tmp_path / "a", tmp_path / "b"], tmp_path / "bare")  # raised KeyError after writing the tables
    info = json.loads((tmp_path / "bare" / "run.json").read_text())
    assert info["command"].startswith("x ; ") and info["status"] == "partial"


def test_merge_with_replace_takes_the_later_run_in_the_earlier_place(tmp_path):
    first = _run_dir(tmp_path / "a", [0, 1], {"epochs": 200})
    first.add("bench", "ncm", 0, _result(0.6))
    rerun = ResultsWriter(tmp_path / "b", context={"epochs": 200})
    rerun.add("bench", "dkvb", 1, _result(0.95))
    (tmp_path / "b" / "run.json").write_text((tmp_path / "a" / "run.json").read_text().replace("run [0, 1]", "rerun"))
    with pytest.raises(ValueError, match="--replace"):
        merge([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")

    merge([tmp_path / "a", tmp_path / "b"], tmp_path / "merged", replace=True)
    results = pd.read_csv(tmp_path / "merged" / "results.csv")
    assert list(zip(results.method, results.seed, results.final_accuracy)) == [
        ("dkvb", 0, 0.5), ("ncm", 0, 0.6), ("dkvb", 1, 0.95)]
    matrix = pd.read_csv(tmp_path / "merged" / "accuracy_matrix.csv")
    replaced = matrix[(matrix.method == "dkvb") & (matrix.seed == 1)]
    assert len(replaced) == 4 and replaced.accuracy.max() == 0.95  # only the re-run's matrix
    assert list(dict.fromkeys(zip(matrix.method, matrix.seed))) == [("dkvb", 0), ("dkvb", 1), ("ncm", 0)]
    assert json.loads((tmp_path / "merged" / "run.json").read_text())["command"] == "run [0, 1] ; rerun"


def test_readme_blocks_are_filled_from_the_runs_outputs(tmp_path, monkeypatch):
    _run_dir(tmp_path / "results" / "a", [0, 1], {"epochs": 200})
    _run_dir(tmp_path / "results" / "b", [2], {"epochs": 200})
    merge([tmp_path / "results" / "a", tmp_path / "results" / "b"], tmp_path / "results" / "merged")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:results/a -->\nstale\n<!-- /results:results/a -->\n"
                      "<!-- results:results/merged -->\n<!-- /results:results/merged -->\nend\n")
    monkeypatch.chdir(tmp_path)
    assert readme_main(readme) == 0
    text = readme.read_text()
    assert "stale" not in text and text.startswith("intro\n") and text.endswith("end\n")
    assert "Command: `run [0, 1]` (wall-clock 12 s" in text
    assert "Command: `run [0, 1] ; run [2]` (2 runs merged, the longest 12 s" in text
    assert text.count("| bench | dkvb | 2 |") == 1 and text.count("| bench | dkvb | 3 |") == 1

    ray_run = json.loads((tmp_path / "results" / "a" / "run.json").read_text())  # a Ray run: the cells' threads
    ray_run.update(engine="ray", cell_threads=4, torch_threads=1)
    (tmp_path / "results" / "a" / "run.json").write_text(json.dumps(ray_run))
    merge([tmp_path / "results" / "a", tmp_path / "results" / "b"], tmp_path / "results" / "merged", replace=True)
    assert readme_main(readme) == 0
    text = readme.read_text()
    assert text.count("4 torch thread(s) each") == 2 and "1 torch thread(s) each" not in text

    running = json.loads((tmp_path / "results" / "a" / "run.json").read_text())  # a run still going
    running.update(status="running", wall_clock_seconds=0.0, finished="2026-01-01 10:00 UTC")
    (tmp_path / "results" / "a" / "run.json").write_text(json.dumps(running))
    assert readme_main(readme) == 0
    text = readme.read_text()
    assert "(status: running, 4 torch thread(s) each, started 2026-01-01 10:00 UTC)" in text
    assert "wall-clock 0 s" not in text

    (tmp_path / "results" / "started").mkdir()
    (tmp_path / "results" / "started" / "run.json").write_text((tmp_path / "results" / "a" / "run.json").read_text())
    for folder in ("missing", "started"):  # no run there / a run that has not finished one method yet
        blocks = f"<!-- results:results/{folder} -->\n<!-- /results:results/{folder} -->\n"
        readme.write_text(blocks)
        assert readme_main(readme) == 1
        assert readme.read_text() == blocks  # left as it was


def test_readme_ablation_block_is_the_runs_summary(tmp_path, monkeypatch):
    folder = tmp_path / "results" / "abl"
    folder.mkdir(parents=True)
    (folder / "settings.json").write_text(json.dumps({"benchmark": "bench", "epochs": 200}))
    (folder / "summary.md").write_text("| setting | seeds |\n|---|---|\n| sgd | 3 |\n")
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- ablation:results/abl -->\nold row\n<!-- /ablation:results/abl -->\nb\n")
    monkeypatch.chdir(tmp_path)
    assert readme_main(readme) == 0
    text = readme.read_text()
    assert "old row" not in text and "| sgd | 3 |" in text and "benchmark bench, epochs 200" in text
    (folder / "summary.md").unlink()
    assert readme_main(readme) == 1 and readme.read_text() == text  # nothing to render: left as it was


def test_readme_probe_block_is_the_probes_summary(tmp_path, monkeypatch):
    folder = tmp_path / "results" / "probe"
    folder.mkdir(parents=True)
    (folder / "summary.md").write_text("Command: `probe`\n\n| row | seeds |\n|---|---|\n| lda identity | 1 |\n")
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- probe:results/probe -->\nold\n<!-- /probe:results/probe -->\nb\n")
    monkeypatch.chdir(tmp_path)
    assert readme_main(readme) == 0
    assert readme.read_text() == ("a\n<!-- probe:results/probe -->\nCommand: `probe`\n\n| row | seeds |\n|---|---|\n"
                                  "| lda identity | 1 |\n<!-- /probe:results/probe -->\nb\n")
