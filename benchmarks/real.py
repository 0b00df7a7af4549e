"""Real-image class-incremental benchmarks on cached embeddings of a frozen pre-trained encoder.

Every method and seed of a run shares the same embeddings (computed once, cached on disk); the
seed sets the class order (fixed 0..n-1 for seed 0, shuffled otherwise) and the methods' RNG.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path


from avalanche_dkvb.data import DEFAULT_EXPERIENCES, IMAGE_SETS, NUM_CLASSES
from avalanche_dkvb.embeddings.cache import CachedEmbeddings
from avalanche_dkvb.embeddings.pipeline import cached_embeddings
from avalanche_dkvb.encoders import get_encoder_spec
from avalanche_dkvb.validation import check_divides, check_non_negative_float, check_positive_int, check_seeds
from benchmarks import paths
from benchmarks.methods import SGD_BASELINES
from benchmarks.outputs import ResultsWriter


@dataclass(frozen=True)
class BenchmarkSpec:
    """An image set split into class-incremental experiences, and the different, unlabelled image
    set whose embeddings initialise DKVB's keys."""

    image_set: str
    key_init_set: str


BENCHMARKS = {
    "split_cifar10": BenchmarkSpec("cifar10", "tiny_imagenet"),
    "split_cifar10_jpeg": BenchmarkSpec("cifar10_jpeg", "tiny_imagenet"),
    "split_cifar100": BenchmarkSpec("cifar100", "cifar10"),
    "split_tinyimagenet": BenchmarkSpec("tiny_imagenet", "cifar10_jpeg"),
}

STRENGTHS = {"ewc_lambda": "ewc", "lwf_alpha": "lwf", "si_lambda": "si"}  # CLI-settable strength -> its method

QUICK = {"epochs": 5, "key_init_epochs": 1, "train_per_class": 20, "test_per_class": 10, "key_init_per_class": 10,
         "ridge_projection": 512, "seeds": [0]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("real-image benchmarks (--benchmark other than toy2d)")
    g.add_argument("--encoder", default="tf_efficientnet_lite0", help="encoder name (avalanche_dkvb.encoders)")
    g.add_argument("--weights", default="default", help="'default', 'none' (random init) or a checkpoint path")
    g.add_argument("--image-size", type=int, default=None, help="override the encoder's input resolution")
    g.add_argument("--data-root", type=Path, default=paths.DATA_ROOT, help="folder holding the data sets (%(default)s)")
    g.add_argument("--cache-root", type=Path, default=paths.CACHE_ROOT, help="embedding cache folder (%(default)s)")
    g.add_argument("--download", action="store_true",
                   help=f"download missing data, or extract it from the archives in {paths.ARCHIVE_DIR}")
    g.add_argument("--experiences", type=int, default=None, help="number of experiences")
    g.add_argument("--key-init-set", default=None, help="image set for DKVB's key initialisation")
    g.add_argument("--train-per-class", type=int, default=None, help="first N training images per class")
    g.add_argument("--test-per-class", type=int, default=None, help="first N test images per class")
    g.add_argument("--key-init-per-class", type=int, default=None, help="first N key-init images per class")
    g.add_argument("--epochs", type=int, default=None, help="epochs per experience (default 2000)")
    g.add_argument("--baseline-epochs", type=int, default=None,
                   help="epochs per experience of the SGD baselines (default: --epochs)")
    g.add_argument("--key-init-epochs", type=int, default=None, help="EMA key-init epochs (default 10)")
    g.add_argument("--memory", type=int, default=2000, help="Replay / GDumb buffer size")
    g.add_argument("--ridge-projection", type=int, default=None, help="random features of the ridge baseline (5000)")
    g.add_argument("--ewc-lambda", type=float, default=None, help="EWC penalty strength (100)")
    g.add_argument("--lwf-alpha", type=float, default=None, help="LwF distillation weight (1)")
    g.add_argument("--si-lambda", type=float, default=None, help="SI penalty strength (1)")
    g.add_argument("--quick", action="store_true", help=f"smoke-run profile: {QUICK}")


def resolve(args) -> dict:
    """The run's settings: CLI values, else the --quick profile, else the defaults."""
    quick = QUICK if args.quick else {}

    def pick(name: str, default):
        return getattr(args, name) if getattr(args, name) is not None else quick.get(name, default)

    spec = BENCHMARKS[args.benchmark]
    return {
        "encoder": args.encoder, "weights": args.weights, "image_size": args.image_size,
        "image_set": spec.image_set, "key_init_set": args.key_init_set or spec.key_init_set,
        "experiences": pick("experiences", DEFAULT_EXPERIENCES[spec.image_set]),
        "train_per_class": pick("train_per_class", None), "test_per_class": pick("test_per_class", None),
        "key_init_per_class": pick("key_init_per_class", None),
        "epochs": pick("epochs", 2000), "baseline_epochs": args.baseline_epochs,
        "key_init_epochs": pick("key_init_epochs", 10), "memory": args.memory,
        "ridge_projection": pick("ridge_projection", 5000), "seeds": pick("seeds", [0, 1, 2]),
        **{name: getattr(args, name) for name in STRENGTHS},  # None (the default) leaves no column
    }


POSITIVE_INTS = ("image_size", "train_per_class", "test_per_class", "key_init_per_class", "epochs",
                 "baseline_epochs", "key_init_epochs", "memory",
                 "ridge_projection")  # None: the default, left unchecked


def flags_set(args) -> list[str]:
    """The real-image flags given other values than their defaults in ``args``."""
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    return [_flag(name) for name, value in vars(defaults.parse_args([])).items() if getattr(args, name) != value]


def check_settings(settings: dict) -> None:
    """Raise ValueError or TypeError naming the command-line flag of the first unusable setting of
    :func:`resolve`'s ``settings``; cheap (no data is read), so it runs before anything else."""
    try:
        get_encoder_spec(settings["encoder"])
    except ValueError as error:
        raise ValueError(f"--encoder: {error}") from None
    check_weights(settings["weights"])
    if settings["key_init_set"] not in IMAGE_SETS:
        raise ValueError(f"--key-init-set must be one of {', '.join(IMAGE_SETS)}, got {settings['key_init_set']!r}.")
    for name in POSITIVE_INTS:
        if settings[name] is not None:
            check_positive_int(_flag(name), settings[name])
    for name in STRENGTHS:
        if settings[name] is not None:
            check_non_negative_float(_flag(name), settings[name])
    check_divides("--experiences", settings["experiences"], NUM_CLASSES[settings["image_set"]],
                  f"the number of classes of {settings['image_set']}")
    check_seeds("--seeds", settings["seeds"])


def open_results(args, settings: dict) -> ResultsWriter:
    """The ResultsWriter of ``args.out``: the settings other than the seeds as columns (those left at
    None omitted, and checked on resume to be unset there too), each strength only on its method's
    rows; with ``args.resume``, the finished runs there, checked to have the same settings (ValueError
    otherwise)."""
    context = {k: v for k, v in settings.items() if v is not None and k != "seeds"}
    unset = {k for k, v in settings.items() if v is None and k != "seeds"}
    return ResultsWriter(args.out, context=context, resume=args.resume, unset=unset,
                         applies_to={"baseline_epochs": SGD_BASELINES,
                                     **{name: {method} for name, method in STRENGTHS.items()}})


def check_weights(weights: str) -> None:
    """ValueError unless ``--weights`` is 'default', 'none' or an existing checkpoint file."""
    if weights not in ("default", "none") and not Path(weights).is_file():
        raise ValueError(f"--weights must be 'default', 'none' or an existing checkpoint file, got {weights!r}.")


def load_embeddings(args, image_set: str, split: str, per_class: int | None) -> CachedEmbeddings:
    """The embeddings of ``image_set``/``split`` (the first ``per_class`` images of each class; None: all)
    for ``args``' encoder, weights, image size and data/cache folders, computed once and then read from the
    cache; the one place the benchmark CLIs turn their flags into embeddings."""
    return cached_embeddings(args.encoder, image_set, split, weights=None if args.weights == "none" else args.weights,
                             data_root=args.data_root, cache_root=args.cache_root, archive_dir=paths.ARCHIVE_DIR,
                             download=args.download, image_size=args.image_size, per_class=per_class)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
