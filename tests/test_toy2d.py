"""The main job on the seeds' 2D stream, run through its command line in-process: DKVB keeps every
class, the linear probe and the MLP forget; every output file is written."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from avalanche_dkvb.data.toy2d import NUM_CLASSES, STAGES, toy2d_benchmark, uniform_unit_square

METHODS = ["dkvb", "linear", "mlp"]


@pytest.fixture(scope="module")
def job_output(tmp_path_factory):
    from benchmarks.__main__ import main
    out = tmp_path_factory.mktemp("toy2d")
    start = time.perf_counter()
    assert main(["--methods", ",".join(METHODS), "--seeds", "0", "--out", str(out), "--threads", "1"]) == 0
    torch.set_num_threads(1)
    return out, time.perf_counter() - start


def test_results_columns_and_ranges(job_output):
    out, _ = job_output
    results = pd.read_csv(out / "results.csv")
    for column in ["benchmark", "method", "seed", "final_accuracy", "avg_incremental_accuracy", "forgetting",
                   "train_seconds"]:
        assert column in results.columns, column
    assert sorted(results["method"]) == METHODS
    assert set(results["benchmark"]) == {"toy2d"} and set(results["seed"]) == {0}
    for column in ["final_accuracy", "avg_incremental_accuracy"]:
        assert results[column].between(0.0, 1.0).all(), column
    assert results["forgetting"].between(-1.0, 1.0).all()
    assert (results["train_seconds"] > 0).all()


def test_dkvb_keeps_classes_baselines_forget(job_output):
    out, _ = job_output
    final = pd.read_csv(out / "results.csv").set_index("method")["final_accuracy"]
    assert final["dkvb"] >= 0.9
    assert final["linear"] < 0.4
    assert final["mlp"] < 0.4
    forgetting = pd.read_csv(out / "results.csv").set_index("method")["forgetting"]
    assert forgetting["dkvb"] < forgetting["linear"] and forgetting["dkvb"] < forgetting["mlp"]


def test_accuracy_matrix_consistent_with_results(job_output):
    out, _ = job_output
    matrix = pd.read_csv(out / "accuracy_matrix.csv")
    assert {"method", "seed", "after_experience", "on_experience", "accuracy"} <= set(matrix.columns)
    assert matrix["accuracy"].between(0.0, 1.0).all()
    results = pd.read_csv(out / "results.csv").set_index("method")
    for method in METHODS:
        rows = matrix[matrix["method"] == method]
        assert len(rows) == len(STAGES) ** 2
        last = rows[rows["after_experience"] == len(STAGES) - 1]["accuracy"]
        # balanced test set (same points per class): mean over experiences == class-balanced accuracy
        assert last.mean() == pytest.approx(results.loc[method, "final_accuracy"], abs=1e-6)
        seen = rows[rows["on_experience"] <= rows["after_experience"]].groupby("after_experience")["accuracy"].mean()
        assert seen.mean() == pytest.approx(results.loc[method, "avg_incremental_accuracy"], abs=1e-6)


def test_summary_and_plots_written(job_output):
    out, seconds = job_output
    summary = (out / "summary.md").read_text()
    for method in METHODS:
        assert f"| toy2d | {method} |" in summary
        png = out / f"decision_regions_{method}_seed0.png"
        assert png.exists() and png.stat().st_size > 1000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / "logs" / f"{method}_seed0" / "eval_results.csv").exists()
        training = pd.read_csv(out / "logs" / f"{method}_seed0" / "training_results.csv")
        assert (training.training_loss > 0).all() and training.training_accuracy.max() > 0.5  # not 0 placeholders
    assert (out / "summary.csv").exists()
    assert seconds < 300, f"the main job took {seconds:.0f} s for one seed"


def test_cli_refuses_unknown_method(tmp_path):
    from benchmarks.__main__ import main
    with pytest.raises(SystemExit):
        main(["--methods", "dkvb,ewc", "--out", str(tmp_path)])
    assert not (tmp_path / "results.csv").exists()


def test_toy2d_stream_matches_the_seeds():
    benchmark = toy2d_benchmark(seed=0, train_per_class=10, test_per_class=5)
    assert len(benchmark.train_stream) == len(STAGES) == 4
    for exp, stage, (train_n, test_n) in zip(benchmark.train_stream, STAGES, [(20, 10)] * 4):
        assert sorted(exp.classes_in_this_experience) == sorted(label for label, _ in stage)
        assert len(exp.dataset) == train_n
        x = torch.stack([exp.dataset[i][0] for i in range(len(exp.dataset))])
        y = torch.tensor([exp.dataset[i][1] for i in range(len(exp.dataset))])
        for label, centre in stage:  # points lie around their class centre (std 0.035)
            assert torch.allclose(x[y == label].mean(0), torch.tensor(centre), atol=0.05)
    assert sum(len(e.dataset) for e in benchmark.test_stream) == 5 * NUM_CLASSES
    # same seed -> same data; different seed -> different data
    again = toy2d_benchmark(seed=0, train_per_class=10, test_per_class=5)
    assert torch.equal(benchmark.train_stream[0].dataset[0][0], again.train_stream[0].dataset[0][0])
    other = toy2d_benchmark(seed=1, train_per_class=10, test_per_class=5)
    assert not torch.equal(benchmark.train_stream[0].dataset[0][0], other.train_stream[0].dataset[0][0])
    square = uniform_unit_square(500, seed=0)
    assert square.shape == (500, 2) and square.min() >= 0 and square.max() <= 1


def test_a_killed_run_keeps_its_finished_runs_and_says_it_was_interrupted(tmp_path, wait_until):
    out = tmp_path / "out"
    job = subprocess.Popen([sys.executable, "-m", "benchmarks", "--seeds", "0,1", "--threads", "1", "--out", str(out)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_until((out / "results.csv").exists, job, "the run's first commit", poll_s=0.2)
    job.terminate()  # SIGTERM, as `kill` sends
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 130, stderr
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and info["wall_clock_seconds"] > 0
    finished = pd.read_csv(out / "results.csv")
    assert 1 <= len(finished) < 6 and finished.final_accuracy.notna().all()
    assert not list(out.glob(".*.tmp"))  # no half-written file left behind
