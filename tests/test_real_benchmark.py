"""End to end: images on disk -> encoder -> embedding cache -> every method through the CLI; strength sweeps."""

from __future__ import annotations

import argparse
import json

import pandas as pd
import pytest
import torch
from PIL import Image

from avalanche_dkvb.data import CIFAR10_CLASSES
from benchmarks import methods
from benchmarks.__main__ import main
from benchmarks.real import add_arguments, resolve
from benchmarks.runner import make_evaluator
from benchmarks.sweep import main as sweep_main, parse_args as parse_sweep_args


def _write_cifar10_jpeg_tree(root, per_class: int) -> None:
    """root/cifar10-jpeg/{train,test}/<class>/NNNN.jpg; each class a colour, each image jittered."""
    for split in ("train", "test"):
        for label, name in enumerate(CIFAR10_CLASSES):
            folder = root / "cifar10-jpeg" / split / name
            folder.mkdir(parents=True)
            for j in range(per_class):
                colour = (25 * label + j, 250 - 25 * label, (60 * label + 7 * j) % 256)
                Image.new("RGB", (32, 32), colour).save(folder / f"{j:04d}.jpg", quality=95)


def test_every_method_runs_end_to_end_and_reuses_the_cache(tmp_path, capsys):
    _write_cifar10_jpeg_tree(tmp_path / "data", per_class=4)
    out = tmp_path / "out"
    argv = ["--benchmark", "split_cifar10_jpeg", "--quick", "--epochs", "2", "--weights", "none",
            "--image-size", "32", "--key-init-set", "cifar10_jpeg", "--data-root", str(tmp_path / "data"),
            "--cache-root", str(tmp_path / "cache"), "--out", str(out), "--threads", "1"]
    assert main(argv) == 0

    results = pd.read_csv(out / "results.csv")
    assert list(results.method) == list(methods.METHODS)
    for column in ("final_accuracy", "avg_incremental_accuracy"):
        assert results[column].between(0, 1).all(), column
    assert (results.benchmark == "split_cifar10_jpeg").all() and (results.encoder == "tf_efficientnet_lite0").all()
    matrix = pd.read_csv(out / "accuracy_matrix.csv")
    assert len(matrix) == len(methods.METHODS) * 5 * 5  # 5 experiences x 5 test experiences per method
    for name in ("summary.md", "summary.csv", "accuracy_curves.png", "final_accuracy_matrices.png"):
        assert (out / name).stat().st_size > 0, name
    assert list((out / "logs" / "dkvb_seed0" / "tb").glob("events.out.tfevents.*"))
    assert (out / "logs" / "ncm_seed0" / "eval_results.csv").stat().st_size > 0

    cache_files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    capsys.readouterr()
    assert main(argv[:-2] + ["--out", str(tmp_path / "again"), "--methods", "ncm"]) == 0
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cache_files  # nothing recomputed
    again = pd.read_csv(tmp_path / "again" / "results.csv")
    assert again.final_accuracy.iloc[0] == results.set_index("method").final_accuracy["ncm"]


def test_regularisation_strengths_reach_the_strategies_and_are_recorded_only_when_set():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--ewc-lambda", "7", "--si-lambda", "3"])
    args.benchmark, args.seeds = "split_cifar10_jpeg", None
    settings = resolve(args)
    assert (settings["ewc_lambda"], settings["si_lambda"], settings["lwf_alpha"]) == (7.0, 3.0, None)

    s = methods.MethodSettings(input_dim=4, num_classes=3, key_init_data=torch.zeros(1, 4),
                               ewc_lambda=7.0, lwf_alpha=0.5, si_lambda=3.0)
    plugins = {name: {type(p).__name__: p for p in methods.METHODS[name](s, make_evaluator([])).plugins}
               for name in ("ewc", "lwf", "si")}
    assert plugins["ewc"]["EWCPlugin"].ewc_lambda == 7.0
    assert plugins["lwf"]["LwFPlugin"].lwf.alpha == 0.5
    assert plugins["si"]["CopyingSynapticIntelligencePlugin"].si_lambda == [3.0]


def test_baseline_epochs_reach_only_the_sgd_baselines():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--epochs", "20", "--baseline-epochs", "3"])
    args.benchmark, args.seeds = "split_cifar10_jpeg", None
    assert (resolve(args)["epochs"], resolve(args)["baseline_epochs"]) == (20, 3)
    s = methods.MethodSettings(input_dim=4, num_classes=3, key_init_data=torch.zeros(1, 4), epochs=20,
                               baseline_epochs=3)
    epochs = {name: methods.METHODS[name](s, make_evaluator([])).train_epochs for name in ("dkvb", "linear", "joint")}
    assert epochs == {"dkvb": 20, "linear": 3, "joint": 3}
    assert methods.SGD_BASELINES <= set(methods.METHODS) and "dkvb" not in methods.SGD_BASELINES


def test_sweep_runs_each_strength_and_tabulates_them(tmp_path):
    _write_cifar10_jpeg_tree(tmp_path / "data", per_class=2)
    out = tmp_path / "sweep"
    argv = ["--out", str(out), "--ewc-lambda", "1,1e6", "--si-lambda", "10",
            "--benchmark", "split_cifar10_jpeg", "--quick", "--epochs", "2", "--weights", "none", "--image-size", "32",
            "--key-init-set", "cifar10_jpeg", "--data-root", str(tmp_path / "data"),
            "--cache-root", str(tmp_path / "cache"), "--threads", "1"]
    assert sweep_main(argv) == 0

    results = pd.read_csv(out / "results.csv")
    assert list(results.strength) == ["ewc_lambda=1", "ewc_lambda=1e6", "si_lambda=10"]
    assert list(results.method) == ["ewc", "ewc", "si"]
    assert list(results.ewc_lambda.iloc[:2]) == [1.0, 1e6] and results.si_lambda.iloc[2] == 10.0
    assert "| split_cifar10_jpeg | ewc | ewc_lambda=1e6 | 1 |" in (out / "summary.md").read_text()
    assert json.loads((out / "run.json").read_text())["status"] == "finished"

    first = (out / "ewc_1" / "results.csv").read_text()
    assert sweep_main(argv) == 0  # resumed: every run is already there and is kept as it was
    assert (out / "ewc_1" / "results.csv").read_text() == first


@pytest.mark.parametrize("argv, message", [
    (["--out", "x", "--benchmark", "split_cifar10_jpeg"], "nothing to sweep"),
    (["--out", "x", "--ewc-lambda", "1", "--methods", "dkvb"], "set by the sweep"),
    (["--out", "x", "--ewc-lambda", "1,strong"], "invalid numbers value"),
    (["--out", "x", "--ewc-lambda", "1", "--benchmark", "split_cifar10_jpeg", "--epocs", "5"], "unrecognized arguments"),
    (["--out", "x", "--si-lambda", "1", "--benchmark", "toy2d"], "unknown method(s) ['si'] for toy2d"),
])
def test_sweep_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_sweep_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_cuda_trains_and_evaluates_every_kind_of_method_on_the_gpu(tmp_path, monkeypatch):
    """--device cuda reaches the strategies (each model ends on the GPU) and the run finishes."""
    _write_cifar10_jpeg_tree(tmp_path / "data", per_class=2)
    devices = {}

    def on(name):
        factory = methods.METHODS[name]

        def spy(settings, evaluator):
            strategy = factory(settings, evaluator)
            devices[name] = (settings.device, strategy)
            return strategy
        return spy

    for name in ("dkvb", "linear", "ncm", "slda"):
        monkeypatch.setitem(methods.METHODS, name, on(name))
    argv = ["--benchmark", "split_cifar10_jpeg", "--quick", "--epochs", "2", "--weights", "none",
            "--image-size", "32", "--key-init-set", "cifar10_jpeg", "--data-root", str(tmp_path / "data"),
            "--cache-root", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--threads", "1",
            "--methods", "dkvb,linear,ncm,slda", "--device", "cuda"]
    assert main(argv) == 0
    assert json.loads((tmp_path / "out" / "run.json").read_text())["device"] == "cuda"
    for name, (device, strategy) in devices.items():
        assert device == "cuda" and strategy.device.type == "cuda", name
        assert all(p.device.type == "cuda" for p in strategy.model.parameters()), name
    assert pd.read_csv(tmp_path / "out" / "results.csv").final_accuracy.between(0, 1).all()
