"""Mid-stream resume: save after experience k, rebuild, load, continue == an uninterrupted run;
unsupported strategies, damaged and mismatching checkpoints are refused with one line."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from avalanche.training import EWC, LwF, Naive, Replay
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from avalanche_dkvb import DKVB
from avalanche_dkvb.checkpoint import CheckpointError, load_training_state, save_training_state
from avalanche_dkvb.in_memory_batches import InMemoryBatchesPlugin
from avalanche_dkvb.metrics import dkvb_metrics, headline_metrics


def _evaluator(dkvb: bool) -> EvaluationPlugin:
    return EvaluationPlugin(*headline_metrics(), *(dkvb_metrics() if dkvb else []), loggers=[])


def _dkvb(make_model, init_data):
    return DKVB(model=make_model(), train_mb_size=16, train_epochs=3, eval_mb_size=256, evaluator=_evaluator(True),
                init_data=init_data, key_init_kwargs={"epochs": 2}, fast_path="eager")


def _sgd(cls, **kwargs):
    def build(make_model, init_data):
        model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 8))
        return cls(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                   criterion=nn.CrossEntropyLoss(), train_mb_size=16, train_epochs=3, eval_mb_size=256,
                   evaluator=_evaluator(False), plugins=[InMemoryBatchesPlugin()], **kwargs)
    return build


def _metrics(strategy) -> dict:
    out = {}
    for i, m in enumerate(strategy.evaluator.metrics):
        for name in ("rows", "history", "seen_classes"):
            if hasattr(m, name):
                out[f"{i}.{name}"] = getattr(m, name)
    return out


def _run(build, make_model, init_data, stream, path=None, stop_after=None):
    """Train experience by experience; with ``stop_after=k``, save after experience k and continue
    in a fresh strategy loaded from the file (RNG scrambled in between)."""
    torch.manual_seed(0)
    strategy = build(make_model, init_data)
    start = 0
    for i, experience in enumerate(stream.train_stream):
        if i < start:
            continue
        strategy.train(experience)
        strategy.eval(stream.test_stream)
        if i == stop_after:
            save_training_state(path, strategy, {"next": i + 1, "note": "x"})
            torch.manual_seed(123), np.random.seed(5), random.seed(7)  # a new process
            torch.manual_seed(0)
            strategy = build(make_model, init_data)
            extra = load_training_state(path, strategy)
            assert extra == {"next": i + 1, "note": "x"}
            start = extra["next"]
    return strategy


@pytest.mark.parametrize("build", [_dkvb, _sgd(Naive), _sgd(EWC, ewc_lambda=10.0), _sgd(LwF, alpha=1.0, temperature=2.0)],
                         ids=["dkvb", "naive_adam", "ewc", "lwf"])
def test_resume_after_an_experience_equals_an_uninterrupted_run(build, toy_stream, make_model, init_data, tmp_path):
    straight = _run(build, make_model, init_data, toy_stream)
    resumed = _run(build, make_model, init_data, toy_stream, tmp_path / "state.pt", stop_after=1)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert _metrics(straight) == _metrics(resumed)
    assert straight.clock.train_iterations == resumed.clock.train_iterations
    assert len(_metrics(straight)["0.history"]) == 4


def test_refused_strategies_and_bad_files(toy_stream, make_model, init_data, tmp_path):
    model = nn.Linear(2, 8)
    replay = Replay(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), criterion=nn.CrossEntropyLoss(),
                    mem_size=10, evaluator=_evaluator(False))
    with pytest.raises(CheckpointError, match="strategy Replay: its replay buffer"):
        save_training_state(tmp_path / "r.pt", replay)
    assert not (tmp_path / "r.pt").exists()

    torch.manual_seed(0)
    strategy = _dkvb(make_model, init_data)
    strategy.train(toy_stream.train_stream[0])
    path = tmp_path / "state.pt"
    save_training_state(path, strategy, {"next": 1})
    other = DKVB(model=make_model(num_keys=8), train_mb_size=16, train_epochs=3, evaluator=_evaluator(True),
                 init_data=init_data, key_init_kwargs={"epochs": 2})
    with pytest.raises(CheckpointError, match="saved with other settings .*parameters"):
        load_training_state(path, other)
    path.write_bytes(path.read_bytes()[:665])
    with pytest.raises(CheckpointError, match="damaged"):
        load_training_state(path, _dkvb(make_model, init_data))
    with pytest.raises(CheckpointError, match="cannot save"):  # extra must be plain data
        save_training_state(path, strategy, {"bad": object()})


def test_kill_9_mid_stream_then_resume_equals_an_uninterrupted_run(tmp_path, capsys, wait_until):
    """A real `python -m benchmarks` (toy2d, DKVB, seed 0) killed with SIGKILL once its first
    checkpoint (after experience 1 of 4) exists; `--resume` continues from it and writes the same
    results.csv (all but train_seconds) and accuracy_matrix.csv as an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import pandas as pd

    from benchmarks.__main__ import main

    repo = Path(__file__).resolve().parents[1]
    argv = ["--methods", "dkvb", "--seeds", "0", "--threads", "1"]
    out = tmp_path / "killed"
    checkpoint = out / "checkpoints" / "dkvb_seed0.pt"
    process = subprocess.Popen([sys.executable, "-m", "benchmarks", *argv, "--out", str(out)], cwd=repo,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(checkpoint.exists, process, "the first checkpoint", poll_s=0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "results.csv").exists()  # killed inside the (method, seed) run

    assert main([*argv, "--out", str(out), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert not checkpoint.exists()
    reference = tmp_path / "reference"
    assert main([*argv, "--out", str(reference)]) == 0

    def read(folder, name):
        return pd.read_csv(folder / name).drop(columns=["train_seconds"], errors="ignore")

    for name in ("results.csv", "accuracy_matrix.csv"):
        pd.testing.assert_frame_equal(read(out, name), read(reference, name), check_exact=True)
    assert (out / "decision_regions_dkvb_seed0.png").exists()


def test_checkpoint_of_other_settings_is_refused_before_anything_changes(toy_stream, make_model, init_data,
                                                                         tmp_path):
    """Same shapes, other top-k, label smoothing or value rule: refused. A checkpoint written before the
    settings were recorded still loads, and one its strategy's own state refuses leaves the model as it was."""
    from avalanche_dkvb import CountValues

    torch.manual_seed(0)
    strategy = _dkvb(make_model, init_data)
    strategy.train(toy_stream.train_stream[0])
    save_training_state(tmp_path / "dkvb.pt", strategy)
    for model, options, setting in ((make_model(top_k=2), {}, "top_k"), (make_model(), {"label_smoothing": 0.0},
                                                                          "label_smoothing")):
        other = DKVB(model=model, train_mb_size=16, train_epochs=3, eval_mb_size=256, evaluator=_evaluator(True),
                     init_data=init_data, key_init_kwargs={"epochs": 2}, **options)
        with pytest.raises(CheckpointError, match=f"saved with other settings .*{setting}"):
            load_training_state(tmp_path / "dkvb.pt", other)

    def counting(**options):
        return CountValues(model=make_model(), init_data=init_data, key_init_kwargs={"epochs": 2},
                           evaluator=_evaluator(True), **options)

    weighted = counting(distance_temperature=0.05)
    weighted.train(toy_stream.train_stream[0])
    save_training_state(tmp_path / "counts.pt", weighted)
    with pytest.raises(CheckpointError, match="saved with other settings .*distance_temperature"):
        load_training_state(tmp_path / "counts.pt", counting())
    with pytest.raises(CheckpointError, match="saved with other settings .*value_rule"):
        load_training_state(tmp_path / "counts.pt", counting(distance_temperature=0.05, value_rule="counts"))

    state = torch.load(tmp_path / "counts.pt", weights_only=True)
    del state["fingerprint"]["settings"]  # as written before settings were recorded
    torch.save(state, tmp_path / "old.pt")
    load_training_state(tmp_path / "old.pt", counting(distance_temperature=0.05))  # loads
    uniform = counting()
    before = {k: v.clone() for k, v in uniform.model.state_dict().items()}
    with pytest.raises(CheckpointError, match="does not match this strategy .*distance_temperature"):
        load_training_state(tmp_path / "old.pt", uniform)
    assert all(torch.equal(before[k], v) for k, v in uniform.model.state_dict().items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rng_state_is_restored(toy_stream, make_model, init_data, tmp_path):
    """The fast path shuffles on the data's device: a resumed CUDA run draws what the saved one would."""
    torch.manual_seed(0)
    strategy = _dkvb(make_model, init_data)
    strategy.train(toy_stream.train_stream[0])
    torch.zeros(1, device="cuda")  # CUDA in use, as on a CUDA run
    torch.cuda.manual_seed_all(5)
    save_training_state(tmp_path / "state.pt", strategy)
    expected = torch.randperm(100, device="cuda")
    torch.cuda.manual_seed_all(6)
    load_training_state(tmp_path / "state.pt", _dkvb(make_model, init_data))
    assert torch.equal(torch.randperm(100, device="cuda"), expected)
