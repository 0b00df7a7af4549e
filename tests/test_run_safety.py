"""Runs that refuse nonsense and never lose a result: settings checked before anything is read or
written, one owner per output folder, run.json true however a run ends, damaged inputs named."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks.__main__ import main
from benchmarks.folder_lock import LOCK_NAME, FolderBusy, FolderLock
from benchmarks.merge import main as merge_main
from benchmarks.outputs import ResultsWriter
from benchmarks.runner import RunResult
from benchmarks.toy2d import GRID

REPO = Path(__file__).resolve().parents[1]
REAL = ["--benchmark", "split_cifar10_jpeg", "--quick", "--weights", "none", "--threads", "1"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("argv, message", [
    (REAL + ["--epochs", "0"], "--epochs must be a positive integer, got 0."),
    (REAL + ["--epochs", "-5"], "--epochs must be a positive integer, got -5."),
    (REAL + ["--ewc-lambda", "nan"], "--ewc-lambda must be a finite number >= 0, got nan."),
    (REAL + ["--lwf-alpha", "-1"], "--lwf-alpha must be a finite number >= 0, got -1.0."),
    (REAL + ["--experiences", "0"], "--experiences must be a positive integer, got 0."),
    (REAL + ["--experiences", "3"], "--experiences must divide the number of classes of cifar10_jpeg (10): "
                                    "one of [1, 2, 5, 10], got 3."),
    (REAL + ["--seeds", ""], "--seeds must be a non-empty list of non-negative integers, got []."),
    (REAL + ["--methods", ","], "--methods names no method; leave it out to run all"),
    (REAL + ["--methods", "ncm,ncm"], "--methods names ['ncm'] more than once"),
    (REAL + ["--seeds", "-1"], "--seeds must be a non-empty list of non-negative integers, got [-1]."),
    (REAL + ["--seeds", "0,0"], "--seeds must not repeat a seed, got [0, 0] (repeated: [0])."),
    (REAL + ["--threads", "0"], "--threads must be a positive integer, got 0."),
    (REAL + ["--memory", "-1"], "--memory must be a positive integer, got -1."),
    (REAL + ["--image-size", "0"], "--image-size must be a positive integer, got 0."),
    (REAL + ["--train-per-class", "0"], "--train-per-class must be a positive integer, got 0."),
    (REAL + ["--key-init-set", "mnist"], "--key-init-set must be one of"),
    (REAL + ["--weights", "/nowhere.pt"], "--weights must be 'default', 'none' or an existing checkpoint file"),
    (["--seeds", ""], "--seeds must be a non-empty list of non-negative integers, got []."),
    (["--epochs", "0"], "--epochs apply to the real-image benchmarks only, not to toy2d"),
    (["--cpus-per-cell", "2"], "--cpus-per-cell applies to --engine ray only, not to --engine local."),
    (["--ray-address", "auto", "--gpus-per-cell", "1"], "--ray-address, --gpus-per-cell apply to --engine ray only"),
    (["--engine", "ray", "--cpus-per-cell", "0"], "--cpus-per-cell must be a finite number > 0, got 0.0."),
    (["--engine", "ray", "--cpus-per-cell", "nan"], "--cpus-per-cell must be a finite number > 0, got nan."),
    (["--engine", "ray", "--gpus-per-cell", "-0.5"], "--gpus-per-cell must be a finite number >= 0, got -0.5."),
    (["--engine", "spark"], "argument --engine: invalid choice: 'spark'"),
    (["--device", "cuda"], "--device cuda applies to the real-image benchmarks; the 2D main job runs on the CPU."),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (REAL + ["--engine", "ray", "--device", "cuda"], "--device cuda with --engine ray needs --gpus-per-cell > 0"),
    (REAL + ["--engine", "ray", "--gpus-per-cell", "0.5"], "--gpus-per-cell 0.5 reserves GPUs that --device cpu"),
    pytest.param(REAL + ["--device", "cuda"], "--device cuda: no CUDA device is available here",
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is here")),
])
def test_bad_settings_are_one_line_exit_2_before_anything_is_read_or_written(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--out", str(out), "--data-root", str(tmp_path / "no-data")] if "--benchmark" in argv
             else argv + ["--out", str(out)])
    assert exit_info.value.code == 2
    assert message in _one_error_line(capsys)
    assert not out.exists()


def _finished_real_run(out: Path, epochs: int) -> None:
    """A finished one-seed run of ncm as ``python -m benchmarks`` would leave it in ``out``."""
    writer = ResultsWriter(out, context={"encoder": "tf_efficientnet_lite0", "epochs": epochs})
    writer.add("split_cifar10_jpeg", "ncm", 0, RunResult(np.eye(2), np.ones(2), np.ones(2), forgetting=0.0,
                                                          bwt=0.0, train_seconds=1.0))
    (out / "run.json").write_text(json.dumps({"command": "the first run", "status": "finished"}))


def test_a_refused_resume_leaves_every_file_byte_identical(tmp_path, capsys):
    out = tmp_path / "out"
    _finished_real_run(out, epochs=200)
    before = _snapshot(out)
    status = main(REAL + ["--epochs", "3", "--resume", "--out", str(out), "--data-root", str(tmp_path / "no-data")])
    assert status == 2
    assert "Cannot resume" in _one_error_line(capsys)
    assert _snapshot(out) == before


@pytest.mark.parametrize("damage, message", [
    (lambda out: (out / "results.csv").write_bytes(b"\xff\xfe\x00garbage"), "results.csv is not a readable CSV"),
    (lambda out: (out / "results.csv").write_text(""), "results.csv is not a readable CSV file (EmptyDataError"),
    (lambda out: (out / "results.csv").write_text((out / "results.csv").read_text().splitlines()[0] + "\n"),
     "results.csv has a header but no rows"),
    (lambda out: (out / "results.csv").write_text((out / "results.csv").read_text().replace(",1.0,", ",1.5,", 1)),
     "results.csv has 1 final_accuracy value(s) outside [0, 1]"),
    (lambda out: (out / "results.csv").write_text((out / "results.csv").read_text()
                                                  + (out / "results.csv").read_text().splitlines()[1] + "\n"),
     "results.csv has duplicated rows"),
    (lambda out: (out / "accuracy_matrix.csv").write_text(
        (out / "accuracy_matrix.csv").read_text().replace(",1.0\n", ",-0.2\n", 1)),
     "accuracy_matrix.csv has 1 accuracy value(s) outside [0, 1]"),
    (lambda out: (out / "accuracy_matrix.csv").unlink(), "accuracy_matrix.csv is missing"),
    (lambda out: (out / "run.json").write_text("{not json"), "run.json is not readable JSON"),
])
def test_damaged_inputs_before_resume_or_merge_are_named_in_one_line(tmp_path, capsys, damage, message):
    out = tmp_path / "out"
    _finished_real_run(out, epochs=3)
    damage(out)
    before = _snapshot(out)
    assert main(REAL + ["--epochs", "3", "--resume", "--out", str(out),
                        "--data-root", str(tmp_path / "no-data")]) == 2
    assert message in _one_error_line(capsys)
    assert _snapshot(out) == before
    assert merge_main([str(out), "--out", str(tmp_path / "merged")]) == 2
    assert message in _one_error_line(capsys)


def test_a_write_killed_between_matrix_and_results_resumes_from_results_csv(tmp_path, monkeypatch):
    """ResultsWriter writes accuracy_matrix.csv, then results.csv: a process killed in between leaves the
    previous results.csv and a matrix one run ahead. Resuming keeps the committed run, drops the
    uncommitted run's matrix rows (with a warning) and would run it again."""
    import benchmarks.outputs as outputs

    out = tmp_path / "out"
    _finished_real_run(out, epochs=3)
    writer = ResultsWriter(out, context={"encoder": "tf_efficientnet_lite0", "epochs": 3}, resume=True)
    write = outputs.atomic_write_text

    def killed_before_results(path, text):
        if path.name == "results.csv":
            raise KeyboardInterrupt  # SIGKILL here: the matrix is already replaced, results.csv not yet
        write(path, text)

    monkeypatch.setattr(outputs, "atomic_write_text", killed_before_results)
    with pytest.raises(KeyboardInterrupt):
        writer.add("split_cifar10_jpeg", "ncm", 1, RunResult(np.eye(2), np.ones(2), np.ones(2), forgetting=0.0,
                                                                bwt=0.0, train_seconds=1.0))
    monkeypatch.setattr(outputs, "atomic_write_text", write)
    assert set(pd.read_csv(out / "accuracy_matrix.csv").seed) == {0, 1}
    with pytest.warns(RuntimeWarning, match=r"holds runs \[\('split_cifar10_jpeg', 'ncm', '1'\)\] that .* does not"):
        resumed = ResultsWriter(out, context={"encoder": "tf_efficientnet_lite0", "epochs": 3}, resume=True)
    assert resumed.done("split_cifar10_jpeg", "ncm", 0) and not resumed.done("split_cifar10_jpeg", "ncm", 1)
    assert {row["seed"] for row in resumed.matrix_rows} == {0}


def test_an_error_marks_run_json_failed_with_the_message(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(REAL + ["--epochs", "1", "--out", str(out), "--data-root", str(tmp_path / "no-data")]) == 1
    line = _one_error_line(capsys)
    assert line.startswith("python -m benchmarks: error: cifar10_jpeg not found")
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed" and "cifar10_jpeg not found" in info["error"]
    assert not (out / LOCK_NAME).exists()
    with pytest.raises(FileNotFoundError):  # --debug: the traceback, and still marked failed
        main(REAL + ["--epochs", "1", "--out", str(out), "--data-root", str(tmp_path / "no-data"), "--debug"])
    assert json.loads((out / "run.json").read_text())["status"] == "failed"


def test_a_held_folder_is_refused_in_process(tmp_path, capsys):
    out = tmp_path / "out"
    with FolderLock(out, "python -m benchmarks --the-holder"):
        with pytest.raises(FolderBusy, match=rf"pid {os.getpid()} .*--the-holder"):
            FolderLock(out, "second").acquire()
        assert main(["--methods", "linear", "--seeds", "0", "--out", str(out)]) == 2
        assert f"is in use by another run (pid {os.getpid()}" in _one_error_line(capsys)
    assert not (out / LOCK_NAME).exists()


def _benchmarks(*args: str, out: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "benchmarks", "--methods", "linear", "--seeds", "0",
                             "--threads", "1", "--out", str(out), *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_two_runs_on_one_folder_the_second_is_refused_and_a_killed_holder_is_taken_over(tmp_path, wait_until):
    """Real processes: run A holds --out (stopped mid-run so the folder stands still); run B is refused
    at once, naming A, and changes nothing; A is killed with SIGKILL; run C takes its stale lock over
    and finishes."""
    out = tmp_path / "out"
    first = _benchmarks(out=out)
    wait_until(lambda: ((out / "run.json").exists() and (out / LOCK_NAME).exists()
                        and f'"pid": {first.pid}' in (out / LOCK_NAME).read_text()), first, "run A taking the folder",
               poll_s=0.1)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        before = _snapshot(out)
        second = _benchmarks("--resume", out=out)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2
        assert err.strip().count("\n") == 0
        assert f"is in use by another run (pid {first.pid}" in err and "--methods linear" in err
        assert _snapshot(out) == before
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    third = _benchmarks("--resume", out=out)
    _, err = third.communicate(timeout=180)
    assert third.returncode == 0, err
    assert f"Took over the stale lock of {out} from pid {first.pid}" in err
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert pd.read_csv(out / "results.csv").method.tolist() == ["linear"]
    assert not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("setting, message", [
    ({"epochs": 0}, "epochs must be a positive integer, got 0."),
    ({"baseline_lr": float("nan")}, "baseline_lr must be a finite number > 0, got nan."),
    ({"ewc_lambda": -1.0}, "ewc_lambda must be a finite number >= 0, got -1.0."),
    ({"memory": 0}, "memory must be a positive integer, got 0."),
    ({"baseline_epochs": 0}, "baseline_epochs must be a positive integer, got 0."),
])
def test_method_settings_refuse_what_the_cli_refuses(setting, message):
    import torch

    from benchmarks.methods import MethodSettings
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        MethodSettings(input_dim=4, num_classes=2, key_init_data=torch.zeros(1, 4), **setting)


def test_make_run_writes_into_an_ignored_folder():
    recipe = (REPO / "Makefile").read_text().split("\nrun:")[1].split("\n\n")[0]
    out = recipe.split("--out ")[1].split()[0]
    assert not out.startswith("results")
    assert subprocess.run(["git", "check-ignore", "-q", f"{out}/results.csv"], cwd=REPO).returncode == 0


def test_a_strength_is_written_only_on_its_methods_rows(tmp_path):
    writer = ResultsWriter(tmp_path, context={"epochs": 3, "ewc_lambda": 7.0}, applies_to={"ewc_lambda": {"ewc"}})
    for method in ("ewc", "ncm"):
        writer.add("bench", method, 0, RunResult(np.eye(2), np.ones(2), np.ones(2), forgetting=0.0, bwt=0.0,
                                                 train_seconds=1.0))
    results = pd.read_csv(tmp_path / "results.csv").set_index("method")
    assert results.ewc_lambda["ewc"] == 7.0 and np.isnan(results.ewc_lambda["ncm"])
    assert (results.epochs == 3).all()
    resumed = ResultsWriter(tmp_path, context={"epochs": 3, "ewc_lambda": 7.0}, applies_to={"ewc_lambda": {"ewc"}},
                            resume=True)
    assert resumed.done("bench", "ncm", 0)
    with pytest.raises(ValueError, match=r"has ewc_lambda=\['7.0'\], this run has ewc_lambda=None"):
        ResultsWriter(tmp_path, context={"epochs": 3}, applies_to={"ewc_lambda": {"ewc"}}, resume=True)


# A stand-in for a native extension in the middle of an evaluation: Python code called back from C++
# (pybind11), which turns the KeyboardInterrupt of a signal landing there into an ordinary error, as
# OpenVINO's model conversion does ("KeyboardInterrupt: <EMPTY MESSAGE>"). Only the mlp cell's first
# evaluation waits there (at most 60 s), after printing a line the test waits for.
_NATIVE_EVALUATION = """
import sys, time
import torch
from avalanche.training.templates.base_sgd import BaseSGDTemplate
evaluate = BaseSGDTemplate.eval
waited = []
def eval(self, *args, **kwargs):
    if isinstance(self.model, torch.nn.Sequential) and not waited:
        waited.append(True)
        try:
            print("EVALUATING INSIDE THE EXTENSION", flush=True)
            for _ in range(1200):
                time.sleep(0.05)
        except KeyboardInterrupt as error:
            raise RuntimeError(f"KeyboardInterrupt: {str(error) or '<EMPTY MESSAGE>'}") from None
    return evaluate(self, *args, **kwargs)
BaseSGDTemplate.eval = eval
from benchmarks.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_mid_evaluation_stops_the_run_as_interrupted_even_where_the_code_it_lands_in_converts_it(tmp_path):
    """Real process: the linear cell finishes, then `kill` (SIGTERM) lands in the mlp cell's
    evaluation, inside code that turns the KeyboardInterrupt into another error. The run must stop
    (not report a failed cell and go on), say so, mark run.json interrupted, keep the linear cell's
    rows intact and leave no half-written file or lock."""
    out = tmp_path / "out"
    job = subprocess.Popen([sys.executable, "-c", _NATIVE_EVALUATION, "--methods", "linear,mlp", "--seeds", "0",
                            "--threads", "1", "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in job.stdout:  # the progress output: wait until the mlp cell is evaluating
            lines.append(line)
            if "EVALUATING INSIDE THE EXTENSION" in line:
                break
        assert "linear seed 0 finished" in "".join(lines), "".join(lines)
        job.send_signal(signal.SIGTERM)
        rest, err = job.communicate(timeout=60)
    finally:
        job.kill()
    assert job.returncode == 130, (job.returncode, err)
    assert "Interrupted: the finished runs are in" in err and "failed" not in rest + err, (rest, err)
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted" and "failed_cells" not in info, info
    results = pd.read_csv(out / "results.csv")
    assert results.method.tolist() == ["linear"] and results.final_accuracy.between(0, 1).all()
    matrix = pd.read_csv(out / "accuracy_matrix.csv")
    assert set(matrix.method) == {"linear"} and len(matrix) == 4 * 4 and matrix.accuracy.between(0, 1).all()
    assert not list(out.rglob(".*.tmp")) and not (out / LOCK_NAME).exists()


def _own_handler(signum) -> bool:
    """Whether the program handles ``signum`` itself (not the default action, not Python's plain Ctrl-C)."""
    return signal.getsignal(signum) not in (signal.SIG_DFL, signal.SIG_IGN, signal.default_int_handler, None)


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_swallowed_stop_signal_still_ends_the_run_interrupted_and_cannot_cut_the_final_status_short(
        tmp_path, capsys, monkeypatch, signal_name, stop_signals_not_ignored):
    """In process: the signal lands in the linear cell inside code that swallows the KeyboardInterrupt
    (a library falling back, like OpenVINO's conversion). The cell's result is kept, the mlp cell is
    not started, and run.json ends "interrupted". From the "running" status to the final one the
    program handles the signal itself, and a signal during the final write is held off."""
    import benchmarks.__main__ as cli_main

    signum = getattr(signal, signal_name)
    ran, statuses = [], []

    def run_cell(cell, data):
        ran.append(cell.method)
        assert signal.getsignal(signum) not in (signal.SIG_DFL, signal.SIG_IGN, None), f"{signal_name} would kill"
        try:
            signal.raise_signal(signum)
            time.sleep(0.1)
        except KeyboardInterrupt:
            pass  # swallowed where it landed
        grid = np.zeros((GRID, GRID), dtype=np.int64)
        return RunResult(np.eye(4), np.ones(4), np.ones(4), forgetting=0.0, bwt=0.0, train_seconds=1.0,
                         extra={"regions": [grid] * 4})

    write = cli_main.write_run_info

    def write_run_info(out, args, command, seconds, status, **kwargs):
        statuses.append((status, all(_own_handler(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP))))
        if status != "running" and statuses[-1][1]:
            signal.raise_signal(signum)  # a second signal while the final status is written
        write(out, args, command, seconds, status, **kwargs)

    monkeypatch.setattr(cli_main, "run_cell", run_cell)
    monkeypatch.setattr(cli_main, "write_run_info", write_run_info)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}  # e.g. Ray's
    out = tmp_path / "out"
    assert main(["--methods", "linear,mlp", "--seeds", "0", "--threads", "1", "--out", str(out)]) == 130
    assert "Interrupted: the finished runs are in" in capsys.readouterr().err
    assert ran == ["linear"]
    assert statuses == [("running", True), ("interrupted", True)]
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert pd.read_csv(out / "results.csv").method.tolist() == ["linear"]
    assert not (out / LOCK_NAME).exists()
    assert {s: signal.getsignal(s) for s in before} == before  # put back as they were


def test_a_stop_signal_landing_in_code_called_back_from_a_native_library_waits_until_it_returns():
    """A KeyboardInterrupt raised inside Python code that C++ called (pybind11) aborts the process or
    is swallowed; there the stop waits until the call has returned, then raises in the caller."""
    from benchmarks.__main__ import NATIVE_CALLERS, StopSignals

    where = []
    stand_in = {"__name__": f"{NATIVE_CALLERS[0]}.stand_in", "signal": signal, "time": time, "where": where}
    exec("def convert():\n"
         "    try:\n"
         "        signal.raise_signal(signal.SIGTERM)\n"
         "        time.sleep(0.3)\n"
         "    except KeyboardInterrupt:\n"
         "        where.append('inside the native call')\n", stand_in)
    with StopSignals() as stops:
        try:
            stand_in["convert"]()
            assert stops.requested
            for _ in range(100):
                time.sleep(0.02)
        except KeyboardInterrupt:
            where.append("after it returned")
    assert where == ["after it returned"]


def test_wait_until_fails_naming_the_process_that_ended(wait_until):
    """The tests' wait on a subprocess: a process that exits before the condition holds fails the wait at
    once, with its exit code and stderr, instead of waiting out the timeout."""
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit('broke early')"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with pytest.raises(pytest.fail.Exception, match=r"the thing did not happen \(exit code 1; stderr: broke early"):
        wait_until(lambda: False, process, "the thing")


def test_a_resume_refuses_a_folder_made_with_a_setting_this_run_leaves_unset(tmp_path, capsys):
    """--image-size 32 then no --image-size (224 px) must not mix: the unset setting is checked too, and a
    toy2d run refuses a real benchmark's folder (its settings columns are not toy2d's)."""
    out = tmp_path / "out"
    writer = ResultsWriter(out, context={"encoder": "tf_efficientnet_lite0", "epochs": 3, "image_size": 32})
    writer.add("split_cifar10_jpeg", "ncm", 0, RunResult(np.eye(2), np.ones(2), np.ones(2), forgetting=0.0,
                                                          bwt=0.0, train_seconds=1.0))
    (out / "run.json").write_text(json.dumps({"command": "the first run", "status": "finished"}))
    before = _snapshot(out)
    assert main(REAL + ["--epochs", "3", "--resume", "--out", str(out), "--data-root", str(tmp_path / "no-data")]) == 2
    assert "Cannot resume" in _one_error_line(capsys)  # the quick protocol's settings differ too; image_size:
    with pytest.raises(ValueError, match=r"image_size=\['32'\], this run has image_size=None"):
        ResultsWriter(out, context={"encoder": "tf_efficientnet_lite0", "epochs": 3}, unset={"image_size"},
                      resume=True)
    assert main(["--methods", "linear", "--seeds", "0", "--resume", "--out", str(out)]) == 2
    assert "settings columns ['encoder', 'epochs', 'image_size'], which this run does not have" in \
        _one_error_line(capsys)
    assert _snapshot(out) == before
    assert ResultsWriter(out, context={"encoder": "tf_efficientnet_lite0", "epochs": 3, "image_size": 32},
                         unset={"train_per_class"}, resume=True).done("split_cifar10_jpeg", "ncm", 0)


def test_a_resume_rewrites_the_summaries_a_stopped_commit_left_behind(tmp_path, capsys):
    """Stopped between a cell's results.csv and its summaries: the resume, with nothing left to run,
    rewrites them from results.csv and drops the finished cell's checkpoint."""
    out = tmp_path / "out"
    writer = ResultsWriter(out)
    writer.add("toy2d", "linear", 0, RunResult(np.eye(2), np.ones(2), np.ones(2), forgetting=0.0, bwt=0.0,
                                               train_seconds=1.0))
    (out / "summary.md").write_text("stale\n")
    (out / "summary.csv").unlink()
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "linear_seed0.pt").write_bytes(b"old")
    assert main(["--methods", "linear", "--seeds", "0", "--resume", "--out", str(out)]) == 0
    assert "| toy2d | linear | 1 | 100.0" in (out / "summary.md").read_text()
    assert (out / "summary.csv").exists() and not (out / "checkpoints" / "linear_seed0.pt").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_a_checkpoint_of_another_number_of_experiences_is_refused_by_the_cell_naming_only_what_differs(tmp_path):
    """The driver's check compares the cell's settings; the stream's length, saved too, is checked by
    run_stream, which names the one setting that differs and leaves the checkpoint where it was."""
    from avalanche_dkvb.checkpoint import CheckpointError, save_training_state
    from benchmarks import toy2d
    from benchmarks.runner import make_evaluator, run_stream

    path = tmp_path / "linear_seed0.pt"
    settings = {"benchmark": "toy2d", "method": "linear", "seed": 0}
    save_training_state(path, toy2d.METHODS["linear"](make_evaluator([]), 0),
                        {"settings": dict(settings, experiences=9), "next_experience": 1, "train_seconds": 0.0,
                         "carry": {}})
    strategy = toy2d.METHODS["linear"](make_evaluator([]), 0)
    with pytest.raises(CheckpointError, match=rf"saved with other settings \(experiences: saved 9, now 4\); delete"):
        run_stream(strategy, toy2d.toy2d_benchmark(0), progress=lambda line: None, checkpoint=path, resume=True,
                   settings=settings)
    assert path.exists()


def test_a_checkpoint_of_other_settings_is_refused_before_any_cell_runs(tmp_path, capsys, monkeypatch):
    """A resume whose second cell finds a checkpoint saved for another seed stops before the first
    cell runs (it used to be refused only inside its own cell, after the others had run)."""
    import benchmarks.__main__ as benchmark_cli
    from avalanche_dkvb.checkpoint import save_training_state
    from benchmarks import toy2d
    from benchmarks.runner import checkpoint_path, make_evaluator

    out = tmp_path / "out"
    path = checkpoint_path(out, "linear", 1)
    path.parent.mkdir(parents=True)
    strategy = toy2d.METHODS["linear"](make_evaluator([]), 7)
    save_training_state(path, strategy, {"settings": {"benchmark": "toy2d", "method": "linear", "seed": 7,
                                                      "experiences": 4}})
    ran = []
    monkeypatch.setattr(benchmark_cli, "run_cell", lambda cell, data: ran.append(cell))
    assert main(["--methods", "linear", "--seeds", "0,1", "--resume", "--out", str(out)]) == 1
    assert f"{path}: saved with other settings (seed: saved 7, now 1)" in capsys.readouterr().err
    assert ran == [] and not (out / "results.csv").exists() and path.exists()
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
