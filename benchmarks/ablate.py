"""DKVB settings grid on cached embeddings: every setting trained class-incrementally AND i.i.d.

``python -m benchmarks.ablate --out DIR [--settings a,b] [--seeds 0,1,2] ...`` runs each setting of
the grid (one change from the default: C 256, K 4096, d_key 14, top-k 1, keys by 5 EMA epochs with the
authors' dead-key rule on a different data set, SGD lr 0.3, label smoothing 0.1; or one change from
count values, or a MomentValues setting) on the benchmark's class-incremental stream and on one
experience holding every class (i.i.d.), and records the final class-balanced accuracy on the whole
test set. Keys are initialised once per (``Setting.keys_id``, seed) and shared by the settings that use
them. Every seed of a setting runs before the next setting, the headline settings first.
Resumable: rows already in ``DIR/results.csv`` (same run settings, same setting definitions) are
skipped; one run writes a folder at a time (``run.lock``), every file rewritten atomically after each
row. Writes ``results.csv`` (one row per setting x seed x mode), ``summary.csv``/``summary.md``
(class-incremental and i.i.d. side by side, mean ± std over seeds) and ``ablation.png`` (accuracy
against setting). SGD settings train through DKVB's default fast path (C++ kernels on the CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from avalanche.training.plugins import EvaluationPlugin

from avalanche_dkvb import DKVB, CountValues, MomentValues, create_dkvb_model, init_keys
from avalanche_dkvb.data import DEFAULT_EXPERIENCES, NUM_CLASSES, make_class_incremental_benchmark
from avalanche_dkvb.validation import check_divides, check_positive_int, check_seeds
from benchmarks import paths
from benchmarks.folder_lock import FolderLock
from benchmarks.outputs import atomic_savefig, atomic_write_text
from benchmarks.real import BENCHMARKS, check_weights, load_embeddings

OWN_DATA_NOTE = "deviation: keys initialised on the stream's own unlabelled training inputs (every experience)"
MODES = ("class_incremental", "iid")


@dataclass(frozen=True)
class Setting:
    """One DKVB configuration (``key_init_epochs`` None: the run's ``--key-init-epochs``). ``key_init_data``: "other" (a different data set, as the paper), "own"
    (the stream's own unlabelled training inputs: a deviation from the class-incremental rules) or
    "both". ``distance_temperature``: distance-weighted top-k for count rules, as a multiple of the
    keys' mean squared quantisation error on the key-init data (fixed before any labelled data).
    ``moment_weight``: count values plus per-(key, class) head means (:class:`MomentValues`)."""

    name: str
    value_rule: str = "sgd"  # "sgd" (DKVB) or a CountValues rule
    smoothing: float = 1.0  # count rules only
    distance_temperature: float | None = None  # count rules only
    moment_weight: float | None = None  # count rules only: MomentValues with this weight
    num_codebooks: int = 256
    num_keys: int = 4096
    key_dim: int = 14
    top_k: int = 1
    top_k_reduction: str = "sum"  # the authors'; sgd only (count rules average)
    key_init_data: str = "other"
    key_init_method: str = "ema"
    key_init_epochs: int | None = None
    dead_key_rule: str = "authors"  # ema only
    value_init: str = "zeros"  # sgd only
    lr: float = 0.3  # sgd only
    label_smoothing: float = 0.1  # sgd only
    epochs_factor: int = 1  # sgd only: epochs = epochs_factor * --epochs

    @property
    def note(self) -> str:
        return OWN_DATA_NOTE if self.key_init_data in ("own", "both") else ""

    @property
    def keys_id(self) -> tuple:
        """What the keys depend on: settings with equal ids share one key initialisation."""
        return (self.num_codebooks, self.num_keys, self.key_dim, self.key_init_data, self.key_init_method,
                self.key_init_epochs, self.dead_key_rule if self.key_init_method == "ema" else None)


def _grid() -> dict[str, Setting]:
    sgd, counts = Setting("sgd"), Setting("counts", value_rule="log_posterior")
    change = dataclasses.replace
    settings = [
        sgd, counts,
        change(counts, name="counts smoothing 0.1", smoothing=0.1),
        change(counts, name="counts raw (no log)", value_rule="counts"),
        change(sgd, name="sgd lr 100", lr=100.0),
        change(sgd, name="sgd lr 10000", lr=1e4),
        change(sgd, name="sgd label smoothing 0", label_smoothing=0.0),
        change(sgd, name="sgd values init normal", value_init="normal"),
        change(sgd, name="sgd 10x epochs", epochs_factor=10),
        change(sgd, name="sgd top-k 4 mean", top_k=4, top_k_reduction="mean"),
    ]
    for base in (sgd, change(counts, smoothing=0.1)):
        label = "sgd" if base.value_rule == "sgd" else "counts 0.1"
        settings += [
            change(base, name=f"{label} top-k 4", top_k=4),
            change(base, name=f"{label} C 64", num_codebooks=64),
            change(base, name=f"{label} K 256", num_keys=256),
            change(base, name=f"{label} d_key 8", key_dim=8),
            change(base, name=f"{label} d_key 32", key_dim=32),
            change(base, name=f"{label} k-means keys", key_init_method="kmeans", key_init_epochs=2),
            change(base, name=f"{label} dead keys reset (ours)", dead_key_rule="reset"),
            change(base, name=f"{label} key init 1 epoch", key_init_epochs=1),
            change(base, name=f"{label} own-data keys", key_init_data="own"),
            change(base, name=f"{label} keys on both", key_init_data="both"),
            change(base, name=f"{label} C 1024", num_codebooks=1024),
        ]
    counts01 = change(counts, smoothing=0.1)
    moments = change(counts01, name="moments K 256", num_keys=256, moment_weight=3.0)
    settings += [
        moments,
        change(moments, name="moments K 256 weight 1", moment_weight=1.0),
        change(moments, name="moments K 64", num_keys=64),
        change(moments, name="moments K 4096", num_keys=4096),
        change(moments, name="moments K 256 top-k 4", top_k=4),
        change(moments, name="moments C 1024 K 256", num_codebooks=1024),
        change(moments, name="moments K 256 d_key 24", key_dim=24),
        change(moments, name="moments K 256 d_key 32", key_dim=32),
        change(moments, name="moments K 64 top-k 4", num_keys=64, top_k=4),
        change(moments, name="moments K 256 d_key 64", key_dim=64),
        change(moments, name="moments K 64 d_key 32", num_keys=64, key_dim=32),
        change(moments, name="moments C 1024 K 256 d_key 32", num_codebooks=1024, key_dim=32),
        change(moments, name="moments K 256 d_key 128", key_dim=128),
        change(moments, name="moments C 1024 K 256 d_key 64", num_codebooks=1024, key_dim=64),
        change(counts01, name="counts 0.1 top-k 4 distance-weighted", top_k=4, distance_temperature=0.5),
        change(counts01, name="counts 0.1 top-k 16 distance-weighted", top_k=16, distance_temperature=0.5),
        change(counts01, name="counts 0.1 C 1024 top-k 4", num_codebooks=1024, top_k=4),
    ]
    return {s.name: s for s in settings}


GRID = _grid()
EXPENSIVE = ("C 1024", "10x epochs")  # 4x the key-init time, 10x the training time


FIRST = ("sgd", "counts smoothing 0.1", "counts", "counts raw (no log)", "counts 0.1 top-k 4",
         "counts 0.1 top-k 4 distance-weighted", "moments K 256", "counts 0.1 K 256", "moments K 256 weight 1",
         "moments K 256 top-k 4", "moments K 64", "sgd K 256")  # the headline rows, run first


def _default_order() -> list[str]:
    """All but the expensive settings: ``FIRST``, then the others grouped by key initialisation (so a
    run stopped early has finished whole groups)."""
    names = list(FIRST) + [name for name in GRID
                           if name not in FIRST and not any(part in name for part in EXPENSIVE)]
    first_use = {}
    for name in names:
        first_use.setdefault(GRID[name].keys_id, len(first_use))
    return names[:len(FIRST)] + sorted(names[len(FIRST):], key=lambda name: first_use[GRID[name].keys_id])


DEFAULT_SETTINGS = _default_order()


def parse_args(argv=None, prog: str = "python -m benchmarks.ablate", description: str = __doc__) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", default="split_cifar10_jpeg", choices=sorted(BENCHMARKS))
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                        help=f"comma-separated setting names (default: all but {' and '.join(EXPENSIVE)}); all: {', '.join(GRID)}")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (class order, key init, shuffling)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--encoder", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="default", help="'default', 'none' (random init) or a checkpoint path")
    parser.add_argument("--image-size", type=int, default=None, help="override the encoder's input resolution")
    parser.add_argument("--train-per-class", type=int, default=None, help="first N training images per class")
    parser.add_argument("--key-init-per-class", type=int, default=None, help="first N key-init images per class")
    parser.add_argument("--experiences", type=int, default=None, help="class-incremental experiences")
    parser.add_argument("--epochs", type=int, default=200, help="SGD epochs per experience")
    parser.add_argument("--key-init-epochs", type=int, default=5, help="EMA key-initialisation epochs")
    parser.add_argument("--data-root", type=Path, default=paths.DATA_ROOT)
    parser.add_argument("--cache-root", type=Path, default=paths.CACHE_ROOT)
    parser.add_argument("--download", action="store_true",
                        help=f"extract missing data from the archives in {paths.ARCHIVE_DIR}")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    args.settings = [name.strip() for name in args.settings.split(",") if name.strip()]
    unknown = [name for name in args.settings if name not in GRID]
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; expected some of {list(GRID)}")
    try:
        args.seeds = [int(seed) for seed in args.seeds.split(",") if seed]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    try:
        check_weights(args.weights)
    except ValueError as error:
        parser.error(str(error))
    image_set = BENCHMARKS[args.benchmark].image_set
    if args.experiences is None:
        args.experiences = DEFAULT_EXPERIENCES[image_set]
    optional = [name for name in ("image_size", "train_per_class", "key_init_per_class")
                if getattr(args, name) is not None]
    try:  # before any embeddings are read
        for name in ("epochs", "key_init_epochs", "threads", "experiences", *optional):
            check_positive_int(f"--{name.replace('_', '-')}", getattr(args, name))
        check_divides("--experiences", args.experiences, NUM_CLASSES[image_set], f"the number of classes of {image_set}")
        check_seeds("--seeds", args.seeds)
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    return args


def class_balanced_accuracy(predict, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> float:
    """Mean over classes of the accuracy of ``predict`` (inputs (B, D) -> logits (B, V)) on ``x``, ``y``."""
    with torch.no_grad():
        pred = torch.cat([predict(batch).argmax(1) for batch in x.split(1024)])
    return float(np.mean([(pred[y == c] == c).float().mean().item() for c in range(num_classes)]))


def predictor(strategy):
    """Eval-mode logits of the trained strategy: CountValues' own (it applies its key weights), else the model's."""
    if isinstance(strategy, CountValues):
        return strategy.logits
    strategy.model.eval()
    return strategy.model


class KeyBank:
    """Models with initialised, frozen keys, one key initialisation per (``Setting.keys_id``, seed),
    built on first use; also each one's mean squared quantisation error on the key-init data. Only the
    bottleneck's buffers (projection, keys, usage, frozen flag) are shared: each model keeps its own
    initial values (``Setting.value_init``)."""

    def __init__(self, input_dim: int, num_classes: int, data: dict[str, torch.Tensor], key_init_epochs: int):
        self.input_dim, self.num_classes, self.data, self.epochs = input_dim, num_classes, data, key_init_epochs
        self.states: dict[tuple, tuple[dict, float]] = {}

    def model(self, setting: Setting, seed: int):
        """(model, quantisation error): the setting's model with its keys initialised and frozen."""
        key = (*setting.keys_id, seed)
        model = create_dkvb_model(self.input_dim, self.num_classes, num_codebooks=setting.num_codebooks,
                                  num_keys=setting.num_keys, key_dim=setting.key_dim, top_k=setting.top_k,
                                  top_k_reduction=setting.top_k_reduction, value_init=setting.value_init,
                                  generator=torch.Generator().manual_seed(seed))
        if key not in self.states:
            start = time.perf_counter()
            data = self.data[setting.key_init_data]
            options = {"dead_key_rule": setting.dead_key_rule} if setting.key_init_method == "ema" else {}
            init_keys(model.bottleneck, data, setting.key_init_method, epochs=setting.key_init_epochs or self.epochs,
                      generator=torch.Generator().manual_seed(seed), **options)
            model.bottleneck.freeze_keys()
            error = float(model.bottleneck.quantization_error(data))
            self.states[key] = ({k: v.clone() for k, v in model.bottleneck.named_buffers()}, error)
            print(f"  keys {key}: {time.perf_counter() - start:.0f} s, quantisation error {error:.3f}", flush=True)
        buffers, error = self.states[key]
        for name, buffer in model.bottleneck.named_buffers():
            buffer.copy_(buffers[name])
        return model, error


def train(setting: Setting, model, quantisation_error: float, benchmark, epochs: int):
    """Train ``model`` on the stream; returns the strategy (its ``predict`` gives eval-mode labels)."""
    quiet = EvaluationPlugin(loggers=[])
    if setting.value_rule == "sgd":
        strategy = DKVB(model=model, lr=setting.lr, label_smoothing=setting.label_smoothing,
                        train_epochs=setting.epochs_factor * epochs, evaluator=quiet)
    elif setting.moment_weight is not None:
        strategy = MomentValues(model=model, value_rule=setting.value_rule, smoothing=setting.smoothing,
                                moment_weight=setting.moment_weight,
                                head_variance=quantisation_error / setting.key_dim, evaluator=quiet)
    else:
        temperature = setting.distance_temperature
        strategy = CountValues(model=model, value_rule=setting.value_rule, smoothing=setting.smoothing,
                               distance_temperature=None if temperature is None else temperature * quantisation_error,
                               evaluator=quiet)
    for experience in benchmark.train_stream:
        strategy.train(experience)
    return strategy


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """One row per setting (grid order): mean ± std over seeds of both modes."""
    rows = []
    for name in [n for n in GRID if n in set(results.setting)]:
        part = results[results.setting == name]
        row = {"setting": name, "seeds": part.seed.nunique()}
        for mode in MODES:
            acc = 100 * part[part["mode"] == mode].final_accuracy
            row[mode] = f"{acc.mean():.2f} ± {acc.std(ddof=0):.2f}" if len(acc) else ""
            row[f"{mode}_mean"] = acc.mean() if len(acc) else np.nan
        row["train_seconds_ci"] = part[part["mode"] == MODES[0]].train_seconds.mean()
        row["note"] = GRID[name].note
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(summary: pd.DataFrame) -> str:
    lines = ["| setting | seeds | class-incremental (%) | i.i.d. (%) | train time, class-incr. (s) | note |",
             "|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        lines.append(f"| {r.setting} | {r.seeds} | {r.class_incremental} | {r.iid} | {r.train_seconds_ci:.1f} "
                     f"| {r.note} |")
    return "\n".join(lines) + "\n"


def plot(summary: pd.DataFrame, results: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.35 * len(summary) + 1.2))
    positions = np.arange(len(summary))
    for offset, mode, marker in ((-0.15, "class_incremental", "o"), (0.15, "iid", "s")):
        grouped = [100 * results[(results.setting == s) & (results["mode"] == mode)].final_accuracy
                   for s in summary.setting]
        ax.errorbar([g.mean() for g in grouped], positions + offset, xerr=[g.std(ddof=0) for g in grouped],
                    fmt=marker, capsize=2, label="class-incremental" if mode == MODES[0] else "i.i.d.")
    ax.set_yticks(positions, [s + (" *" if GRID[s].note else "") for s in summary.setting])
    ax.invert_yaxis()
    ax.set_xlabel("final class-balanced accuracy (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("DKVB settings (* keys on the stream's own unlabelled inputs: a deviation)", fontsize=9)
    atomic_savefig(fig, path)
    plt.close(fig)


def write_outputs(out: Path, results: pd.DataFrame, context: dict) -> None:
    """Each file atomically; settings.json before results.csv, so rows never exist without their settings."""
    atomic_write_text(out / "settings.json", json.dumps(context, indent=2))
    atomic_write_text(out / "results.csv", results.to_csv(index=False))
    summary = summarise(results)
    atomic_write_text(out / "summary.csv", summary.to_csv(index=False))
    atomic_write_text(out / "summary.md", to_markdown(summary))
    plot(summary, results, out / "ablation.png")


def load_finished(out: Path, context: dict) -> pd.DataFrame:
    """Rows already in ``out`` (empty if none); ValueError if they were made with other run settings."""
    if not (out / "results.csv").exists():
        return pd.DataFrame()
    if not (out / "settings.json").exists():  # only from a run before settings.json was written first
        raise ValueError(f"{out} holds results.csv without the settings.json that says how it was made; "
                         "use another --out, or restore settings.json.")
    previous = json.loads((out / "settings.json").read_text())
    if previous != context:
        raise ValueError(f"{out} holds an ablation with other settings ({previous}); expected {context}. "
                         "Use another --out.")
    return pd.read_csv(out / "results.csv")


def setting_json(setting: Setting) -> str:
    return json.dumps(dataclasses.asdict(setting), sort_keys=True)


def is_finished(results: pd.DataFrame, setting: Setting, seed: int, mode: str) -> bool:
    """Whether ``results`` holds this (setting, seed, mode); ValueError if its row was made with another
    definition of the setting (the grid changed since), so a resumed table never mixes the two."""
    if not len(results):
        return False
    rows = results[(results.setting == setting.name) & (results.seed == seed) & (results["mode"] == mode)]
    if not len(rows):
        return False
    if (rows.setting_json != setting_json(setting)).any():
        raise ValueError(f"The finished row of setting {setting.name!r} (seed {seed}, {mode}) was made with "
                         f"another definition of it ({rows.setting_json.iloc[0]}); expected "
                         f"{setting_json(setting)}. Use another --out.")
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = BENCHMARKS[args.benchmark]
    # "weights" only when not the default, so folders written before ablate had --weights still resume
    context = {"benchmark": args.benchmark, "encoder": args.encoder, "image_size": args.image_size,
               "train_per_class": args.train_per_class, "key_init_per_class": args.key_init_per_class,
               "experiences": args.experiences, "epochs": args.epochs,
               "key_init_epochs": args.key_init_epochs, "key_init_set": spec.key_init_set,
               **({} if args.weights == "default" else {"weights": args.weights})}
    command = " ".join(["python -m benchmarks.ablate", *(sys.argv[1:] if argv is None else argv)])
    with FolderLock(args.out, command):  # one writer per folder: two runs would overwrite each other's rows
        return _run(args, spec, context, command)


def _run(args, spec, context: dict, command: str) -> int:
    results = load_finished(args.out, context)
    train_x, train_y = load_embeddings(args, spec.image_set, "train", args.train_per_class).tensors()
    test_x, test_y = load_embeddings(args, spec.image_set, "test", None).tensors()
    other_x, _ = load_embeddings(args, spec.key_init_set, "train", args.key_init_per_class).tensors()
    num_classes = int(train_y.max()) + 1
    keys = KeyBank(train_x.shape[1], num_classes, {"other": other_x, "own": train_x,
                                                   "both": torch.cat([other_x, train_x])}, args.key_init_epochs)
    print(f"[ablate] {command}\n  train {tuple(train_x.shape)}, test {tuple(test_x.shape)}, "
          f"key init {tuple(other_x.shape)} ({spec.key_init_set})", flush=True)
    streams = {seed: {"class_incremental": make_class_incremental_benchmark(
                          train_x, train_y, test_x, test_y, context["experiences"], seed=seed),
                      "iid": make_class_incremental_benchmark(train_x, train_y, test_x, test_y, 1, seed=seed)}
               for seed in args.seeds}
    for name in args.settings:  # every seed of a setting before the next setting
        setting = GRID[name]
        for seed in args.seeds:
            for mode in MODES:
                if is_finished(results, setting, seed, mode):
                    continue
                model, quantisation_error = keys.model(setting, seed)
                torch.manual_seed(seed)
                start = time.perf_counter()
                strategy = train(setting, model, quantisation_error, streams[seed][mode], args.epochs)
                seconds = time.perf_counter() - start
                accuracy = class_balanced_accuracy(predictor(strategy), test_x, test_y, num_classes)
                print(f"  {name} [{mode}] seed {seed}: {100 * accuracy:.2f} % ({seconds:.0f} s)", flush=True)
                row = {"setting": name, "seed": seed, "mode": mode, "final_accuracy": accuracy,
                       "train_seconds": seconds, **dataclasses.asdict(setting), "note": setting.note,
                       "setting_json": setting_json(setting)}
                del row["name"]
                results = pd.concat([results, pd.DataFrame([row])], ignore_index=True)
                write_outputs(args.out, results, context)
    print(to_markdown(summarise(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
