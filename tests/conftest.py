"""Shared fixtures for the DKVB tests: one CPU thread, a small 2D class-incremental stream, small models,
waiting on a subprocess, stop signals not ignored."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

torch.set_num_threads(1)  # 2 cores shared with other workers


@pytest.fixture(autouse=True)
def _one_thread_and_seeded():
    """One torch thread even if a test (e.g. the CLI) changed it; a fixed global seed so results do
    not depend on which tests ran before (DKVB_TEST_SEED overrides it, to check robustness)."""
    torch.set_num_threads(1)
    torch.manual_seed(int(os.environ.get("DKVB_TEST_SEED", "0")))
    yield
    torch.set_num_threads(1)


@pytest.fixture
def stop_signals_not_ignored():
    """SIGINT, SIGTERM and SIGHUP as a terminal gives them (KeyboardInterrupt for SIGINT, the default for
    the others), restored afterwards. A shell's background job or ``nohup`` starts pytest with some of
    them ignored, which the run rightly keeps (and so would a subprocess, which inherits it); the tests
    of its stop handling need them live."""
    ignored = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
               if signal.getsignal(s) == signal.SIG_IGN}
    for signum in ignored:
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    yield
    for signum, handler in ignored.items():
        signal.signal(signum, handler)


PROCESS_TIMEOUT_S = 900.0
"""How long a test waits for a subprocess to reach a point: only a guard against a hang (on a loaded 2-core
machine a benchmark's first commit has taken more than 4 minutes)."""


@pytest.fixture
def wait_until():
    """``wait_until(condition, process, what)``: poll ``condition()`` while ``process`` (a Popen) runs; if
    it ends first or PROCESS_TIMEOUT_S pass, kill it and fail, naming ``what``, its exit code and the end
    of its stderr (when piped)."""
    def wait(condition, process, what: str, poll_s: float = 0.02) -> None:
        deadline = time.monotonic() + PROCESS_TIMEOUT_S
        while not condition():
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                _, err = process.communicate()
                pytest.fail(f"{what} did not happen (exit code {process.returncode}; stderr: "
                            f"{(err or '')[-2000:]!s})")
            time.sleep(poll_s)
    return wait


@pytest.fixture(scope="session")
def toy_stream():
    """The seeds' 2D stream (4 experiences x 2 classes), 20 training / 20 test points per class."""
    from avalanche_dkvb.data.toy2d import toy2d_benchmark
    return toy2d_benchmark(seed=0, train_per_class=20, test_per_class=20)


@pytest.fixture
def quiet_evaluator():
    """Factory: an EvaluationPlugin with stream/experience accuracy and no loggers."""
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin

    def make(loggers=None):
        return EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=loggers or [])
    return make


@pytest.fixture
def make_model():
    """Factory: a small DKVB model for the 2D stream (8 classes, 4 codebooks x 16 keys of size 2),
    values 1e-3 * randn so that 'unchanged' is not trivially 'still zero'."""
    from avalanche_dkvb import create_dkvb_model

    def make(seed=0, **kwargs):
        options = dict(num_codebooks=4, num_keys=16, key_dim=2, value_init="normal",
                       generator=torch.Generator().manual_seed(seed))
        options.update(kwargs)
        input_dim = options.pop("input_dim", 2)
        return create_dkvb_model(input_dim, 8, **options)
    return make


@pytest.fixture
def init_data():
    """Unlabelled key-initialisation inputs: uniform points of [0, 1]^2."""
    from avalanche_dkvb.data.toy2d import uniform_unit_square
    return uniform_unit_square(256, seed=1)
