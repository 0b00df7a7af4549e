"""Speed of every stage, with its in-run baselines, into ``speed.json``: ``python -m benchmarks.speed``.

One run measures, in this order and in the same process (so the ratios hold on a shared machine):

* extraction of real CIFAR-10 (JPEG copy) test images at ``--image-size`` through the project's path
  (``inference_encoder`` with ``--backend``, DataLoader decoding) and through plain eager timm fp32 (the
  same network in NCHW, same loader, batch and threads); the passes alternate ``--extract-repeats``
  times (medians), the embeddings are compared, and decoding alone is timed;
* EMA key initialisation (``ema_init_keys``: one epoch and three, alternating ``--key-init-repeats``
  times (medians), so an epoch is told apart from the one-off projection of the heads; the issue's 10
  epochs over 50,000 scaled from them), evaluation (the
  model's eval-mode forward, with the masked search) and the DKVB strategy's fast training step at the
  paper's scale (C 256, K 4096, d_key 14, batch 256), on stand-in embeddings (Gaussian class clusters),
  and the generic autograd step.

The fast step is the median wall-clock time of a training epoch of ``DKVB.train`` (inside Avalanche's
loop, every callback fired, epoch accuracy and loss metrics on) per step, over ``--epochs`` epochs after a
first one that warms up (compiles the kernels; computes the experience's key indices). The generic step is
timed outside the loop (lookup, autograd, clip, SGD), so the fast step is also timed that way
(``fast_step_alone_ms``: forward, loss with its gradient, update) for a like-for-like ratio, the generic
steps alternating with its passes (a machine's load drifts within seconds), and once more
with no minibatch gather between the steps (``fast_step_warm_ms``: the (256, 1280) inputs of each batch
no longer pass through the caches, so the value rows stay there). The stand-in
clusters select few keys per codebook, so their rows stay in the caches; real embeddings spread over
many more (on Tiny-ImageNet with CIFAR-10 keys, 54 % of the keys after one experience), and the step is
then bound by memory: ``fast_step_spread_ms`` times the same step on rows drawn uniformly over all keys
(every row a cache miss), the bound for real data, and ``fast_step_spread_gb_per_s`` is the rate at which
it moves value rows against ``memory_copy_gb_per_s``, a plain copy on the same threads. ``--quick``
shrinks every size so the whole run takes a few minutes on 2 cores. ``benchmarks.readme`` renders the
README's table from the file.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from avalanche.core import SupervisedPlugin
from torch.utils.data import DataLoader, Subset

from avalanche_dkvb import DKVB, create_dkvb_model, ema_init_keys
from avalanche_dkvb.atomic_files import atomic_write_text
from avalanche_dkvb.bottleneck import augmented_heads, augmented_keys, search_keys
from avalanche_dkvb.data import load_image_set
from avalanche_dkvb.data.streams import make_class_incremental_benchmark
from avalanche_dkvb.embeddings import extract_embeddings
from avalanche_dkvb.fast_path import CachedExperienceBatches, FastStep, Kernels, row_dtype, torch_threads
from avalanche_dkvb.strategy import FAST_PATH_MODES
from avalanche_dkvb.encoders import (
    BACKENDS,
    check_backend_settings,
    create_encoder,
    get_encoder_spec,
    inference_encoder,
    max_relative_error,
)
from avalanche_dkvb.validation import check_non_negative_int, check_positive_int
from benchmarks import cli, paths
from benchmarks.runner import make_evaluator

QUICK = {"extract_images": 256, "extract_repeats": 1, "experiences": 5, "per_experience": 5120, "epochs": 10,
         "generic_steps": 3, "key_init_embeddings": 2000, "key_init_repeats": 3, "eval_embeddings": 2000}
FULL = {"extract_images": 1000, "extract_repeats": 3, "experiences": 5, "per_experience": 10_000, "epochs": 20,
        "generic_steps": 10, "key_init_embeddings": 10_000, "key_init_repeats": 3, "eval_embeddings": 10_000}
SIZES = tuple(QUICK)
TRAIN_BATCH = 256  # DKVB's default batch size, the paper's


def synthetic_embeddings(n: int, dim: int, num_classes: int, seed: int):
    """Gaussian class clusters (the same centres for every seed; the seed draws the samples):
    x (n, dim) float32, y (n,) balanced labels."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(12345))
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    return centres[y] + 0.5 * torch.randn(n, dim, generator=g), y


def measure_extraction(args, device: torch.device) -> dict:
    """Images/s of the project's extraction and of plain eager timm fp32 on the same images and loader."""
    spec = get_encoder_spec(args.encoder)
    spec = dataclasses.replace(spec, input_size=args.image_size)
    images = load_image_set(args.image_set, "test", root=args.data_root, transform=spec.transform())
    if args.extract_images > len(images.dataset):
        raise ValueError(f"--extract-images {args.extract_images} is more than the {len(images.dataset)} images of "
                         f"{args.image_set}/test.")
    dataset = Subset(images.dataset, np.linspace(0, len(images.dataset) - 1, args.extract_images).astype(int).tolist())
    weights = None if args.weights == "none" else args.weights
    start = time.perf_counter()
    encoder = create_encoder(args.encoder, weights)
    plain = copy.deepcopy(encoder.body).to(device, memory_format=torch.contiguous_format)  # timm's own, NCHW
    fast = inference_encoder(encoder, args.backend, device, args.threads)
    warm = torch.stack([dataset[i][0] for i in range(min(args.batch_size, len(dataset)))]).to(device)
    with torch.inference_mode():
        fast(warm)  # converts and compiles (per image size), checks against eager
        plain(warm)
    setup_s = time.perf_counter() - start

    def run(model):
        return extract_embeddings(model, dataset, batch_size=args.batch_size, num_workers=args.num_workers,
                                  progress=not args.no_progress)

    timings: dict[str, list[float]] = {"fast": [], "eager": []}
    results = {}
    for _ in range(args.extract_repeats):  # alternate, so both see the same machine load
        for name, model in (("fast", fast), ("eager", plain)):
            results[name] = run(model)
            timings[name].append(results[name].images_per_second)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers)
    start = time.perf_counter()
    for _ in loader:
        pass
    decode_s = time.perf_counter() - start
    fast_rate, eager_rate = statistics.median(timings["fast"]), statistics.median(timings["eager"])
    return {
        "extraction_images_per_s": fast_rate,
        "extraction_eager_images_per_s": eager_rate,
        "extraction_speedup": fast_rate / eager_rate,
        "extraction_backend": fast.backend,
        "extraction_max_rel_error": max_relative_error(torch.from_numpy(results["fast"].embeddings),
                                                       torch.from_numpy(results["eager"].embeddings)),
        "extraction_setup_s": setup_s,
        "decode_images_per_s": len(dataset) / decode_s,
    }


def measure_bottleneck(args, device: torch.device) -> dict:
    """Key init, evaluation, fast and generic step times at the paper's scale on stand-in embeddings."""
    cli.hide_avalanche_deprecations()
    num_classes = 2 * args.experiences
    n = args.experiences * args.per_experience
    train_x, train_y = synthetic_embeddings(n, args.embed_dim, num_classes, seed=0)
    test_x, test_y = synthetic_embeddings(args.eval_embeddings, args.embed_dim, num_classes, seed=1)
    init_x = synthetic_embeddings(args.key_init_embeddings, args.embed_dim, num_classes, seed=2)[0]
    benchmark = make_class_incremental_benchmark(train_x, train_y, test_x, test_y, args.experiences, seed=0)

    torch.manual_seed(0)
    model = create_dkvb_model(args.embed_dim, num_classes, num_codebooks=args.num_codebooks,
                              num_keys=args.num_keys).to(device)
    key_init_s = {3: [], 1: []}
    for repeat in range(args.key_init_repeats):  # alternate, so both see the same machine load
        for epochs in (3, 1):  # the difference is two epochs; what one epoch leaves is the one-off projection
            last = repeat == args.key_init_repeats - 1 and epochs == 1
            bottleneck = model.bottleneck if last else copy.deepcopy(model.bottleneck)  # the model keeps 1 epoch
            start = time.perf_counter()
            ema_init_keys(bottleneck, init_x.to(device), epochs=epochs)
            key_init_s[epochs].append(time.perf_counter() - start)
    one, three = statistics.median(key_init_s[1]), statistics.median(key_init_s[3])
    # the medians' difference, two epochs, is positive unless the run is too small for this machine's noise
    key_epoch_s = max(0.0, three - one) / 2
    key_setup_s = max(0.0, one - key_epoch_s)
    model.bottleneck.freeze_keys()
    print(f"key init on {len(init_x)} embeddings: {key_epoch_s:.1f} s an epoch after {key_setup_s:.1f} s of "
          f"projection", flush=True)

    experience = benchmark.train_stream[0]
    steps_per_epoch = -(-len(experience.dataset) // TRAIN_BATCH)
    epoch_timer = EpochTimer()
    trained = copy.deepcopy(model)
    strategy = DKVB(model=trained, train_epochs=1 + args.epochs, evaluator=make_evaluator([]), device=device,
                    fast_path=args.fast_path, fast_path_threads=args.fast_path_threads, plugins=[epoch_timer])
    strategy.train(experience)
    fast_step_s = statistics.median(epoch_timer.seconds[1:]) / steps_per_epoch
    print(f"fast step: {1e3 * fast_step_s:.3f} ms ({args.epochs} epochs x {steps_per_epoch} steps)", flush=True)
    alone = copy.deepcopy(trained)
    batches = CachedExperienceBatches(alone, experience.dataset.eval(), TRAIN_BATCH, True, device)
    # The generic steps alternate with the passes of fast steps, so both are timed under the same load.
    generic = GenericStep(copy.deepcopy(model), train_x, train_y, args.generic_steps, device)
    kernel_step_s = _time_fast_step_alone(alone, batches, args, device, between_passes=generic.run_next)
    generic_step_s = generic.median_seconds()
    print(f"fast step outside the loop: {1e3 * kernel_step_s:.3f} ms; generic step: {1e3 * generic_step_s:.1f} ms",
          flush=True)
    warm_step_s = _time_fast_step_alone(alone, WarmRows(batches), args, device)
    print(f"fast step with no minibatch gather between steps: {1e3 * warm_step_s:.3f} ms", flush=True)
    spread = copy.deepcopy(trained)
    spread_step_s = _time_fast_step_alone(spread, SpreadRows(spread.bottleneck, device), args, device)
    bottleneck = trained.bottleneck  # each step reads its TRAIN_BATCH x C*k rows, then reads and writes them
    row_bytes = bottleneck.value_dim * bottleneck.values.element_size()
    spread_bytes = 3 * TRAIN_BATCH * bottleneck.num_codebooks * bottleneck.top_k * row_bytes
    copy_bytes_per_s = _copy_bandwidth(trained.bottleneck.values, args.fast_path_threads, args.epochs)
    print(f"fast step on rows spread over all keys: {1e3 * spread_step_s:.3f} ms "
          f"({spread_bytes / spread_step_s / 1e9:.1f} GB/s of value rows; a copy moves "
          f"{copy_bytes_per_s / 1e9:.1f} GB/s)", flush=True)

    trained.eval()  # keys used in training: the eval forward searches only those
    with torch.inference_mode():  # kernels are built and warm from training; the searched keys are not
        start = time.perf_counter()
        for x in test_x.to(device).split(1024):
            trained(x)
        _synchronize(device)
        eval_s = time.perf_counter() - start
    search_s = _time_search(trained.bottleneck, test_x[:1024].to(device))

    return {
        "fast_step_ms": 1e3 * fast_step_s,
        "generic_step_ms": 1e3 * generic_step_s,
        "fast_step_speedup": generic_step_s / fast_step_s,
        "fast_step_alone_ms": 1e3 * kernel_step_s,
        "fast_step_alone_speedup": generic_step_s / kernel_step_s,
        "fast_step_warm_ms": 1e3 * warm_step_s,
        "fast_step_spread_ms": 1e3 * spread_step_s,
        "fast_step_spread_gb_per_s": spread_bytes / spread_step_s / 1e9,
        "memory_copy_gb_per_s": copy_bytes_per_s / 1e9,
        "key_init_s_per_epoch_10k": key_epoch_s * 10_000 / len(init_x),
        "key_init_setup_s_per_10k": key_setup_s * 10_000 / len(init_x),  # projecting the heads, once a run
        "key_init_s_10_epochs_50k": (key_setup_s + 10 * key_epoch_s) * 50_000 / len(init_x),  # linear in N
        "eval_s_per_10k": eval_s * 10_000 / len(test_x),
        "eval_used_key_fraction": float((trained.bottleneck.usage_counts > 0).float().mean()),
        "search_fused_s_per_1k": search_s["fused"],
        "search_matmul_s_per_1k": search_s["matmul"],
    }


def _time_fast_step_alone(model, batches, args, device: torch.device, between_passes=None) -> float:
    """Median seconds of one fast step (forward, loss with its gradient, update) timed like the generic
    step: outside Avalanche's loop, over ``1 + args.epochs`` passes of ``batches`` (the first warms up),
    which yields minibatches ``[x, y, t]`` and sets ``current_rows`` to each one's rows.
    ``between_passes()``, if given, runs before each timed pass, on the process's threads."""
    kernels = Kernels(compiled=args.fast_path == "compiled")
    kernels.prepare(model.bottleneck.values)
    step = FastStep(model, batches, 0.1, kernels)
    times = []
    for epoch in range(1 + args.epochs):  # the first epoch warms up
        if epoch > 0 and between_passes is not None:
            between_passes()
        with torch_threads(args.fast_path_threads):
            for _, y, _ in batches:
                start = time.perf_counter()
                logits = step.forward()
                step.loss(logits, y)
                step.step(0.3)
                _synchronize(device)
                times.append(time.perf_counter() - start)
    return statistics.median(times[len(batches):])


class GenericStep:
    """The generic step, as Avalanche's loop runs it (minus data loading): lookup, autograd, clip, SGD,
    on the first ``steps`` batches of ``x`` (N, D), ``y`` (N,). :meth:`run_next` runs and times the next
    one (nothing once all have run), so they can alternate with other timings."""

    def __init__(self, model, x: torch.Tensor, y: torch.Tensor, steps: int, device: torch.device) -> None:
        self.model, self.device = model.train(), device
        self.optimizer = torch.optim.SGD([model.bottleneck.values], lr=0.3)
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
        self.batches = list(zip(x[:TRAIN_BATCH * steps].split(TRAIN_BATCH), y.split(TRAIN_BATCH)))
        self.seconds: list[float] = []

    def run_next(self) -> None:
        if len(self.seconds) == len(self.batches):
            return
        x, y = (t.to(self.device) for t in self.batches[len(self.seconds)])
        start = time.perf_counter()
        self.optimizer.zero_grad()
        self.criterion(self.model(x), y).backward()
        torch.nn.utils.clip_grad_norm_([self.model.bottleneck.values], 1.0)
        self.optimizer.step()
        _synchronize(self.device)
        self.seconds.append(time.perf_counter() - start)

    def median_seconds(self) -> float:
        """Median seconds of a step, after running those not yet run."""
        while len(self.seconds) < len(self.batches):
            self.run_next()
        return statistics.median(self.seconds)


def _copy_bandwidth(values: torch.Tensor, threads: int | None, repeats: int) -> float:
    """Median bytes per second (read plus written) of copying ``values`` (the value table, or 256 MiB of
    it) on ``threads`` threads: the rate the memory-bound spread step is compared against."""
    source = values.detach().reshape(-1)[: 2**26]
    target = torch.empty_like(source)
    times = []
    with torch_threads(threads):
        for _ in range(1 + repeats):  # the first copy faults the target's pages in
            start = time.perf_counter()
            target.copy_(source)
            _synchronize(source.device)
            times.append(time.perf_counter() - start)
    return 2 * source.numel() * source.element_size() / statistics.median(times[1:])


class WarmRows:
    """The first ``steps`` minibatches of ``batches`` (a :class:`CachedExperienceBatches`), their rows and
    labels only, replayed each pass with nothing between the steps: no gather of the (b, D) inputs evicts
    the value rows from the caches, so the step runs at its kernels' speed. Iterates like ``batches``."""

    def __init__(self, batches, steps: int = 20) -> None:
        kept = [(batches.current_rows, y) for _, y, _ in batches]  # a whole pass: none left half-iterated
        self.batches = kept[:steps]
        self.current_rows: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for rows, y in self.batches:
            self.current_rows = rows
            yield [None, y, None]


class SpreadRows:
    """``steps`` minibatches of random labels whose rows (b, C*k) are drawn uniformly over each
    codebook's keys, fresh each pass: the rows a real data set selects are spread like these, not
    gathered in the caches like the stand-in clusters'. Iterates like :class:`CachedExperienceBatches`."""

    def __init__(self, bottleneck, device: torch.device, steps: int = 20) -> None:
        self.num_keys, self.num_classes = bottleneck.num_keys, bottleneck.value_dim
        self.device, self.steps = device, steps
        self.codebook_of_column = torch.arange(bottleneck.num_codebooks).repeat_interleave(bottleneck.top_k)
        self.row_type = row_dtype(bottleneck.usage_counts.numel())
        self.generator = torch.Generator().manual_seed(0)
        self.current_rows: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            shape = (TRAIN_BATCH, len(self.codebook_of_column))
            offsets = torch.randint(self.num_keys, shape, generator=self.generator)
            rows = self.codebook_of_column * self.num_keys + offsets  # codebook-major, like the lookup's
            self.current_rows = rows.to(device=self.device, dtype=self.row_type)
            y = torch.randint(self.num_classes, (TRAIN_BATCH,), generator=self.generator).to(self.device)
            yield [None, y, None]


def _time_search(bottleneck, x: torch.Tensor) -> dict:
    """Seconds of the nearest-key search of ``x`` (1024 embeddings) with the fused kernel and with the
    matrix products, alternating 3 times (medians); the fused one is the matrix products where it does
    not apply (a GPU, no compiler)."""
    heads_aug, keys_aug = augmented_heads(bottleneck.project(x)), augmented_keys(bottleneck.keys)
    times: dict[str, list[float]] = {"fused": [], "matmul": []}
    for _ in range(3):
        for name in times:
            start = time.perf_counter()
            search_keys(heads_aug, keys_aug, fused=name == "fused")
            _synchronize(x.device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1024 / len(x) for name, values in times.items()}


class EpochTimer(SupervisedPlugin):
    """Wall-clock seconds of each training epoch (``seconds``, in order), as Avalanche's loop runs it."""

    dkvb_fast_path_exact = True  # only reads the clock: the fast path may run with it

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []
        self._start = 0.0

    def before_training_epoch(self, strategy, *args, **kwargs):
        self._start = time.perf_counter()

    def after_training_epoch(self, strategy, *args, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def _check_fast_path(mode: str) -> None:
    if mode not in FAST_PATH_MODES:
        raise ValueError(f"--fast-path must be one of {', '.join(FAST_PATH_MODES)}, got {mode!r}.")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def versions() -> dict:
    """Versions of Python and of the libraries that set the speed."""
    import avalanche
    import timm

    found = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
             "avalanche": avalanche.__version__, "numpy": np.__version__}
    try:
        import openvino

        found["openvino"] = openvino.__version__
    except ImportError:
        found["openvino"] = None
    return found


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__)
    p.add_argument("--out", type=Path, default=Path("runs/speed"), help="writes OUT/speed.json")
    p.add_argument("--quick", action="store_true", help=f"small sizes: {QUICK}")
    for name in SIZES:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                       help=f"default {FULL[name]} ({QUICK[name]} with --quick)")
    p.add_argument("--encoder", default="tf_efficientnet_lite0")
    p.add_argument("--weights", default="default", help="'default', 'none' (random) or a checkpoint path")
    p.add_argument("--image-set", default="cifar10_jpeg")
    p.add_argument("--data-root", type=Path, default=paths.DATA_ROOT)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--backend", default="auto", help=f"one of {', '.join(BACKENDS)}")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--embed-dim", type=int, default=1280, help="size of the stand-in embeddings")
    p.add_argument("--num-codebooks", type=int, default=256)
    p.add_argument("--num-keys", type=int, default=4096)
    p.add_argument("--fast-path", default="compiled", help=f"one of {', '.join(FAST_PATH_MODES)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fast-path-threads", type=int, default=1, help="torch threads of the fast path's epochs")
    p.add_argument("--skip-extraction", action="store_true", help="leave the extraction fields out")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in SIZES:
        if getattr(args, name) is None:
            setattr(args, name, (QUICK if args.quick else FULL)[name])
    p.check(*(lambda name=name: check_positive_int(f"--{name.replace('_', '-')}", getattr(args, name))
              for name in (*SIZES, "image_size", "batch_size", "embed_dim", "num_codebooks", "num_keys", "threads",
                           "fast_path_threads")),
            lambda: _check_fast_path(args.fast_path),
            lambda: check_non_negative_int("--num-workers", args.num_workers),
            lambda: check_backend_settings(args.backend, args.device, args.threads))
    device = check_backend_settings(args.backend, args.device, args.threads)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    record = {"command": " ".join(["python -m benchmarks.speed", *(sys.argv[1:] if argv is None else argv)]),
              "quick": args.quick, "device": str(device), "threads": args.threads,
              "fast_path_threads": args.fast_path_threads, "cpu_count": os.cpu_count(),
              "machine": platform.processor() or platform.machine(),
              "sizes": {name: getattr(args, name) for name in SIZES}
              | {"image_size": args.image_size, "batch_size": args.batch_size, "num_workers": args.num_workers,
                 "embed_dim": args.embed_dim, "num_codebooks": args.num_codebooks, "num_keys": args.num_keys,
                 "key_dim": 14, "fast_path": args.fast_path,
                 "train_batch": TRAIN_BATCH, "num_classes": 2 * args.experiences},
              "encoder": args.encoder, "image_set": args.image_set, "backend": args.backend,
              "versions": versions()}
    try:
        if not args.skip_extraction:
            record |= measure_extraction(args, device)
            print(f"extraction: {record['extraction_images_per_s']:.1f} img/s ({record['extraction_backend']}), "
                  f"eager timm {record['extraction_eager_images_per_s']:.1f} img/s, "
                  f"max rel error {record['extraction_max_rel_error']:.1e}", flush=True)
        record |= measure_bottleneck(args, device)
    except Exception as error:
        return cli.report(p.prog, error, args.debug, cli.RUN_ERROR)
    record["wall_clock_seconds"] = time.perf_counter() - start
    record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    atomic_write_text(args.out / "speed.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out / 'speed.json'} in {record['wall_clock_seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
