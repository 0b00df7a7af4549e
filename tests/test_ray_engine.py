"""The Ray engine against the local one, on one local Ray cluster (num_cpus=2) shared by the tests:
the same numbers and plots, a worker killed mid-cell retried without duplicate rows, a failing cell
reported while the others finish, a killed driver resumed with only the unfinished cells, and the
local engine with Ray missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import benchmarks.__main__ as benchmark_cli
from benchmarks.__main__ import main
from benchmarks.engine import Progress
from benchmarks.outputs import ResultsWriter
from benchmarks.runner import RunResult, checkpoint_path, run_cell
from test_real_benchmark import _write_cifar10_jpeg_tree

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance with 2 CPUs for all the tests here; its address (for other drivers)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def real_args(tmp_path_factory):
    """A tiny Split-CIFAR10 (JPEG) run: 4 images per class, random-weight encoder at 32 px."""
    root = tmp_path_factory.mktemp("real")
    _write_cifar10_jpeg_tree(root / "data", per_class=4)
    return ["--benchmark", "split_cifar10_jpeg", "--quick", "--epochs", "2", "--weights", "none", "--image-size", "32",
            "--key-init-set", "cifar10_jpeg", "--data-root", str(root / "data"), "--cache-root", str(root / "cache"),
            "--threads", "1"]


def _tables(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_csv(out / "results.csv").drop(columns="train_seconds"), pd.read_csv(out / "accuracy_matrix.csv")


def _assert_same_run(out: Path, reference: Path, pngs: list[str]) -> None:
    for ours, theirs in zip(_tables(out), _tables(reference)):
        pd.testing.assert_frame_equal(ours, theirs, check_exact=True)
    for name in pngs:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_ray_gives_the_local_engines_results_tables_and_plots(tmp_path, ray_cluster, real_args):
    cells = ["--methods", "linear,ncm,slda", "--seeds", "0,1"]
    assert main(real_args + cells + ["--out", str(tmp_path / "local")]) == 0
    assert main(real_args + cells + ["--out", str(tmp_path / "ray"), "--engine", "ray"]) == 0
    _assert_same_run(tmp_path / "ray", tmp_path / "local", ["accuracy_curves.png", "final_accuracy_matrices.png"])
    results = pd.read_csv(tmp_path / "ray" / "results.csv")
    assert list(zip(results.method, results.seed)) == [(m, s) for s in (0, 1) for m in ("linear", "ncm", "slda")]
    info = json.loads((tmp_path / "ray" / "run.json").read_text())
    assert (info["status"], info["engine"], info["cpus_per_cell"], info["cell_threads"]) == ("finished", "ray", 1.0, 1)
    assert (tmp_path / "ray" / "logs" / "ncm_seed1" / "eval_results.csv").stat().st_size > 0


def test_embeddings_read_by_the_workers_from_the_cache_give_the_same_results(tmp_path, ray_cluster, real_args):
    cells = ["--methods", "ncm,slda", "--seeds", "2"]
    assert main(real_args + cells + ["--out", str(tmp_path / "local")]) == 0
    assert main(real_args + cells + ["--out", str(tmp_path / "ray"), "--engine", "ray",
                                     "--embeddings-via", "cache", "--cpus-per-cell", "0.5"]) == 0
    _assert_same_run(tmp_path / "ray", tmp_path / "local", ["accuracy_curves.png"])


def test_a_sweep_on_ray_equals_the_local_sweep(tmp_path, ray_cluster, real_args):
    """Every (strength, seed) cell of the sweep fanned out at once gives the local sweep's tables."""
    from benchmarks.sweep import main as sweep_main
    sweep = ["--ewc-lambda", "1,1e6", "--si-lambda", "10", "--seeds", "0,1"] + real_args
    assert sweep_main(["--out", str(tmp_path / "local")] + sweep) == 0
    assert sweep_main(["--out", str(tmp_path / "ray"), "--engine", "ray"] + sweep) == 0
    ours, theirs = (pd.read_csv(tmp_path / name / "results.csv").drop(columns="train_seconds") for name in ("ray", "local"))
    pd.testing.assert_frame_equal(ours, theirs, check_exact=True)
    for run in ("ewc_1", "ewc_1e6", "si_10"):
        _assert_same_run(tmp_path / "ray" / run, tmp_path / "local" / run, ["accuracy_curves.png"])
        assert json.loads((tmp_path / "ray" / run / "run.json").read_text())["status"] == "finished"
    assert list(pd.read_csv(tmp_path / "ray" / "results.csv").strength) == (
        ["ewc_lambda=1"] * 2 + ["ewc_lambda=1e6"] * 2 + ["si_lambda=10"] * 2)


def test_a_worker_killed_mid_cell_is_retried_without_duplicate_rows(tmp_path, ray_cluster, real_args, monkeypatch):
    """The worker running the linear probe dies (os._exit) once its first checkpoint exists; Ray runs
    the cell again, which continues from that checkpoint, and the tables equal an uninterrupted local run."""
    cells = real_args + ["--methods", "linear,ncm", "--seeds", "3", "--epochs", "20"]
    assert main(cells + ["--out", str(tmp_path / "local")]) == 0
    killed = tmp_path / "killed-once"

    def dies_once_mid_cell(cell, data):
        if cell.method == "linear" and not killed.exists():
            checkpoint = checkpoint_path(cell.out, cell.method, cell.seed)

            def kill_at_first_checkpoint():
                while not checkpoint.exists():
                    time.sleep(0.005)
                killed.write_text(str(os.getpid()))
                os._exit(1)
            threading.Thread(target=kill_at_first_checkpoint, daemon=True).start()
        return run_cell(cell, data)

    monkeypatch.setattr(benchmark_cli, "run_cell", dies_once_mid_cell)
    assert main(cells + ["--out", str(tmp_path / "ray"), "--engine", "ray"]) == 0
    assert killed.exists()
    _assert_same_run(tmp_path / "ray", tmp_path / "local", ["final_accuracy_matrices.png"])
    assert not list((tmp_path / "ray" / "checkpoints").glob("*.pt"))
    # the killed attempt's CSV log is kept beside the retry's: it holds the rows the uninterrupted run
    # logged up to the kill (all of experience 0, maybe a few epochs of experience 1), the retry's the rest
    ray_logs, local_logs = (tmp_path / run / "logs" / "linear_seed3" for run in ("ray", "local"))
    assert sorted(path.name for path in ray_logs.glob("training_results*.csv")) == [
        "training_results.attempt1.csv", "training_results.csv"]
    killed_rows, retry_rows, local_rows = (_rows(path) for path in (
        ray_logs / "training_results.attempt1.csv", ray_logs / "training_results.csv",
        local_logs / "training_results.csv"))
    assert killed_rows == local_rows[:len(killed_rows)]
    first_experience = [row for row in local_rows if row.startswith("0,")]
    assert killed_rows[:len(first_experience)] == first_experience
    assert retry_rows == local_rows[len(first_experience):]


def _rows(csv_path: Path) -> list[str]:
    """The data rows of one of Avalanche's CSV logs (its header dropped), in file order."""
    return csv_path.read_text().splitlines()[1:]


def test_a_failing_cell_is_reported_the_others_finish_and_resume_runs_only_it(tmp_path, ray_cluster, real_args,
                                                                              monkeypatch, capsys):
    out, ran = tmp_path / "out", tmp_path / "ran"
    ran.mkdir()
    cells = ["--methods", "ncm,linear", "--seeds", "0,1", "--out", str(out), "--engine", "ray"]

    def breaks_linear_seed_1(cell, data):
        (ran / f"{cell.method}{cell.seed}").touch()
        if (cell.method, cell.seed) == ("linear", 1) and not (ran / "fixed").exists():
            raise ValueError("this cell is broken")
        return run_cell(cell, data)

    monkeypatch.setattr(benchmark_cli, "run_cell", breaks_linear_seed_1)
    assert main(real_args + cells) == 1
    err = capsys.readouterr().err
    assert "1 of 4 cells failed: split_cifar10_jpeg linear seed 1 (ValueError: this cell is broken)" in err
    assert sorted(p.name for p in ran.iterdir()) == ["linear0", "linear1", "ncm0", "ncm1"]
    results = pd.read_csv(out / "results.csv")
    assert list(zip(results.method, results.seed)) == [("ncm", 0), ("linear", 0), ("ncm", 1)]
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed"
    assert info["failed_cells"] == [{"cell": "split_cifar10_jpeg linear seed 1",
                                     "error": "ValueError: this cell is broken"}]

    for name in ("linear0", "linear1", "ncm0", "ncm1"):
        (ran / name).unlink()
    (ran / "fixed").touch()
    assert main(real_args + cells + ["--resume"]) == 0
    assert sorted(p.name for p in ran.iterdir()) == ["fixed", "linear1"]  # only the missing cell ran
    results = pd.read_csv(out / "results.csv")
    assert list(zip(results.method, results.seed)) == [("ncm", 0), ("linear", 0), ("ncm", 1), ("linear", 1)]
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_a_killed_driver_resumed_runs_only_the_unfinished_cells(tmp_path, ray_cluster, real_args, monkeypatch,
                                                               wait_until):
    """A real driver process on the shared cluster is killed (SIGKILL) after its first commit;
    --resume keeps the committed cells, runs only the others, and no cell has two rows."""
    out, ran = tmp_path / "out", tmp_path / "ran"
    seeds = set(range(6))
    cells = real_args + ["--methods", "linear", "--seeds", "0,1,2,3,4,5", "--epochs", "20", "--out", str(out),
                         "--engine", "ray"]
    driver = subprocess.Popen([sys.executable, "-m", "benchmarks", *cells, "--ray-address", ray_cluster], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until((out / "results.csv").exists, driver, "the driver's first commit")
        os.kill(driver.pid, signal.SIGKILL)
    finally:
        if driver.returncode is None:  # not yet reaped (wait_until reaps it when it fails)
            driver.kill()
            driver.communicate()
    committed = set(pd.read_csv(out / "results.csv").seed)
    assert 1 <= len(committed) < len(seeds)

    ran.mkdir()

    def records(cell, data):
        (ran / str(cell.seed)).touch()
        return run_cell(cell, data)

    monkeypatch.setattr(benchmark_cli, "run_cell", records)
    assert main(cells + ["--resume"]) == 0
    assert {int(p.name) for p in ran.iterdir()} == seeds - committed
    results = pd.read_csv(out / "results.csv")
    assert list(results.seed) == sorted(seeds)
    assert len(pd.read_csv(out / "accuracy_matrix.csv")) == len(seeds) * 5 * 5


def test_the_local_engine_runs_without_ray_and_ray_missing_is_one_line(tmp_path):
    """With ``ray`` unimportable, the local engine runs (it never imports Ray) and ``--engine ray``
    is refused before any work, naming the extra to install."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["ray"] = None  # import ray raises ImportError
        from benchmarks.__main__ import main
        assert main(["--methods", "linear", "--seeds", "0", "--threads", "1", "--out", {str(tmp_path / 'local')!r}]) == 0
        assert sys.modules["ray"] is None
        try:
            main(["--engine", "ray", "--out", {str(tmp_path / 'ray')!r}])
        except SystemExit as exit:
            sys.exit(exit.code)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "python -m benchmarks: error: --engine ray needs Ray, which is not installed here: "
        "pip install 'avalanche-dkvb[ray]'.")
    assert pd.read_csv(tmp_path / "local" / "results.csv").method.tolist() == ["linear"]
    assert not (tmp_path / "ray").exists()


def _result(final: float) -> RunResult:
    return RunResult(np.full((2, 2), final), np.full(2, final), np.full(2, final), forgetting=0.0, bwt=0.0,
                     train_seconds=1.0)


def test_cells_committed_in_any_order_or_twice_give_one_row_each_in_table_order(tmp_path):
    order = [("bench", method, seed) for seed in (0, 1) for method in ("a", "b")]
    writer = ResultsWriter(tmp_path, order=order)
    for key, final in [(order[3], 0.1), (order[0], 0.2), (order[3], 0.3), (order[2], 0.4), (order[1], 0.5)]:
        writer.add(*key, _result(final))
    results = pd.read_csv(tmp_path / "results.csv")
    assert list(zip(results.method, results.seed)) == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    assert list(results.final_accuracy) == [0.2, 0.5, 0.4, 0.3]  # the later commit of ("b", 1) replaced the first
    matrix = pd.read_csv(tmp_path / "accuracy_matrix.csv")
    assert len(matrix) == 4 * 4 and list(matrix.accuracy[-4:]) == [0.3] * 4


def test_progress_shows_finished_running_failed_elapsed_and_an_estimate():
    now = [100.0]
    progress = Progress(total=5, clock=lambda: now[0])
    now[0] += 30.0
    progress.finished, progress.failed = 1, 1
    assert progress.line(running=2) == "[cells: 1/5 finished, 2 running, 1 failed; 0:30 elapsed, about 0:45 left]"
    now[0] += 3600.0
    progress.finished = 4
    assert progress.line(running=0) == "[cells: 4/5 finished, 0 running, 1 failed; 1:00:30 elapsed]"


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_reaches_the_runs_own_handler_while_the_driver_waits_on_ray(signame, stop_signals_not_ignored):
    """ray.init replaces SIGTERM's handler with Ray's (it exits the driver at once, so run.json would
    stay "running"); the engine puts the run's own handler back, and Ctrl-C or kill stop the driver
    within seconds while it waits in ray.wait for a long cell. Real process, its own Ray."""
    script = textwrap.dedent(f"""
        import os, signal, sys, threading, time
        import ray
        from benchmarks.__main__ import StopSignals
        from benchmarks.engine import _signal_handlers_kept
        with StopSignals():
            with _signal_handlers_kept():
                ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")
            long_cell = ray.remote(lambda: time.sleep(60)).remote()
            threading.Timer(2, os.kill, (os.getpid(), signal.{signame})).start()
            start = time.monotonic()
            try:
                ray.wait([long_cell], num_returns=1)
                print("NOT INTERRUPTED")
            except KeyboardInterrupt:
                print("INTERRUPTED" if time.monotonic() - start < 20 else "LATE")
        ray.shutdown()
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "INTERRUPTED", (done.returncode, done.stdout, done.stderr)


def test_a_cluster_too_small_for_one_cell_is_refused_before_the_embeddings_load(tmp_path, ray_cluster, real_args,
                                                                               monkeypatch, capsys):
    monkeypatch.setattr(benchmark_cli.Job, "load_data", lambda job: pytest.fail("the embeddings were loaded"))
    out = tmp_path / "out"
    assert main(real_args + ["--engine", "ray", "--cpus-per-cell", "3", "--out", str(out)]) == 1
    assert "the Ray cluster has 2 CPUs and 0 GPUs, less than one cell's --cpus-per-cell 3" in capsys.readouterr().err
    assert not (out / "results.csv").exists()
