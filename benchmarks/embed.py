"""Pre-compute cached embeddings: ``python -m benchmarks.embed --encoder NAME --image-sets A,B``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from avalanche_dkvb.data import IMAGE_SETS
from avalanche_dkvb.embeddings.pipeline import cached_embeddings
from avalanche_dkvb.encoders import BACKENDS, check_backend_settings, list_encoders
from avalanche_dkvb.validation import check_non_negative_int, check_positive_int
from benchmarks import cli, paths


def _check_choices(flag: str, values: list[str], allowed, many: bool = True) -> None:
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        what = "a comma-separated list of" if many else "one of"
        raise ValueError(f"{flag} must be {what} {', '.join(allowed)}, got {', '.join(unknown or values) or 'nothing'}.")


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="python -m benchmarks.embed", description=__doc__)
    p.add_argument("--encoder", default="tf_efficientnet_lite0")
    p.add_argument("--weights", default="default", help="'default', 'none' (random) or a checkpoint path")
    p.add_argument("--image-sets", default="cifar10_jpeg,tiny_imagenet")
    p.add_argument("--splits", default="train,test")
    p.add_argument("--data-root", type=Path, default=paths.DATA_ROOT)
    p.add_argument("--cache-root", type=Path, default=paths.CACHE_ROOT)
    p.add_argument("--download", action="store_true",
                   help=f"download missing data, or extract it from the archives in {paths.ARCHIVE_DIR}")
    p.add_argument("--image-size", type=int, default=None, help="override the encoder's input resolution")
    p.add_argument("--train-per-class", type=int, default=None, help="first N training images per class")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-workers", type=int, default=1, help="DataLoader processes decoding and resizing images")
    p.add_argument("--backend", default="auto", help=f"one of {', '.join(BACKENDS)}: 'auto' = OpenVINO on the CPU "
                   "where installed (same embeddings within 1e-4), else eager PyTorch")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    args = p.parse_args(argv)
    image_sets, splits = args.image_sets.split(","), args.splits.split(",")
    p.check(lambda: _check_choices("--encoder", [args.encoder], list_encoders(), many=False),
            lambda: _check_choices("--image-sets", image_sets, IMAGE_SETS),
            lambda: _check_choices("--splits", splits, ("train", "test")),
            *(lambda name=name: check_positive_int(f"--{name.replace('_', '-')}", getattr(args, name))
              for name in ("batch_size", "threads", "image_size", "train_per_class")
              if getattr(args, name) is not None),
            lambda: check_non_negative_int("--num-workers", args.num_workers),
            lambda: check_backend_settings(args.backend, args.device, args.threads))
    torch.set_num_threads(args.threads)
    weights = None if args.weights == "none" else args.weights
    for image_set in image_sets:
        for split in splits:
            start = time.perf_counter()
            try:
                cached = cached_embeddings(args.encoder, image_set, split, weights=weights, data_root=args.data_root,
                                           cache_root=args.cache_root, archive_dir=paths.ARCHIVE_DIR,
                                           download=args.download,
                                           image_size=args.image_size, batch_size=args.batch_size,
                                           num_workers=args.num_workers, backend=args.backend,
                                           device=args.device, threads=args.threads,
                                           per_class=args.train_per_class if split == "train" else None)
            except Exception as error:
                return cli.report(p.prog, error, args.debug, cli.RUN_ERROR)
            state = "cached" if cached.from_cache else "computed"
            print(f"{image_set}/{split}: {cached.embeddings.shape} {state} in {time.perf_counter() - start:.1f} s "
                  f"-> {cached.path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
