"""The one atomic-write helper: complete files only, the umask's permissions, unique temporary names."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from avalanche_dkvb.atomic_files import atomic_write, atomic_write_text, temporary_sibling  # noqa: E402
from benchmarks.outputs import ResultsWriter, atomic_savefig  # noqa: E402
from benchmarks.runner import RunResult  # noqa: E402


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_files_get_the_umask_permissions(tmp_path, umask_022):
    atomic_write_text(tmp_path / "a.txt", "x")
    writer = ResultsWriter(tmp_path / "run")
    writer.add("bench", "dkvb", 0, RunResult(np.eye(2), np.ones(2), np.ones(2), forgetting=0.0, bwt=0.0,
                                              train_seconds=1.0))
    fig = plt.figure()
    atomic_savefig(fig, tmp_path / "run" / "plot.png")
    plt.close(fig)
    files = [tmp_path / "a.txt", *sorted((tmp_path / "run").iterdir())]
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o644" for p in files}


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "results.csv"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as file:
            file.write(b"half")
            raise RuntimeError("crash mid-write")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]


def test_temporary_names_are_unique_per_write(tmp_path):
    names = {temporary_sibling(tmp_path / "final_accuracy_matrices.png") for _ in range(100)}
    assert len(names) == 100
    assert all(n.name.startswith(".final_accuracy_matrices.png.") and n.name.endswith(".tmp") for n in names)


def test_concurrent_figure_writes_do_not_share_a_temporary_file(tmp_path):
    """Two writers of one figure (two runs on one folder): each has its own temporary file, so
    neither replaces the other's half-written file or finds its temporary name gone."""
    path = tmp_path / "final_accuracy_matrices.png"
    with atomic_write(path) as first:
        first.write(b"first")
        fig = plt.figure()
        atomic_savefig(fig, path)  # completes while the first write is still open
        plt.close(fig)
    assert path.read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
