"""Pre-compute cached embeddings: ``python -m benchmarks.embed --encoder NAME --image-sets A,B``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from avalanche_dkvb.data import DEFAULT_DATA_ROOT
from avalanche_dkvb.embeddings.pipeline import DEFAULT_CACHE_ROOT, cached_embeddings


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.embed", description=__doc__)
    p.add_argument("--encoder", default="tf_efficientnet_lite0")
    p.add_argument("--weights", default="default", help="'default', 'none' (random) or a checkpoint path")
    p.add_argument("--image-sets", default="cifar10_jpeg,tiny_imagenet")
    p.add_argument("--splits", default="train,test")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--cache-root", type=Path, default=DEFAULT_CACHE_ROOT)
    p.add_argument("--download", action="store_true", help="download / extract missing data")
    p.add_argument("--image-size", type=int, default=None, help="override the encoder's input resolution")
    p.add_argument("--train-per-class", type=int, default=None, help="first N training images per class")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    weights = None if args.weights == "none" else args.weights
    for image_set in args.image_sets.split(","):
        for split in args.splits.split(","):
            start = time.perf_counter()
            cached = cached_embeddings(args.encoder, image_set, split, weights=weights, data_root=args.data_root,
                                       cache_root=args.cache_root, download=args.download,
                                       image_size=args.image_size, batch_size=args.batch_size,
                                       per_class=args.train_per_class if split == "train" else None)
            state = "cached" if cached.from_cache else "computed"
            print(f"{image_set}/{split}: {cached.embeddings.shape} {state} in {time.perf_counter() - start:.1f} s "
                  f"-> {cached.path}", flush=True)


if __name__ == "__main__":
    main()
