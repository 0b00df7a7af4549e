"""Paper-scale speed of DKVB training through the Avalanche strategy: ``python -m benchmarks.speed``.

The authors' CIFAR-10 protocol: C 256 codebooks x K 4096 keys, d_key 14, batch 256, 5 experiences
x 10,000 embeddings x 2000 epochs, SGD lr 0.3. Embeddings are stand-ins (Gaussian class clusters of
the given size) since only the time is measured here; once the embeddings exist the time does not
depend on where they came from. Reports: key-initialisation time, the fast path's time for the whole
protocol, and the generic (autograd) path's median time per step, measured in the same process.
"""

from __future__ import annotations

import statistics
import time

import torch

from avalanche_dkvb import DKVB, create_dkvb_model, ema_init_keys
from avalanche_dkvb.data.streams import make_class_incremental_benchmark
from avalanche_dkvb.validation import check_positive_int
from benchmarks import cli
from benchmarks.runner import make_evaluator


def synthetic_embeddings(n: int, dim: int, num_classes: int, seed: int):
    """Gaussian class clusters (the same centres for every seed; the seed draws the samples):
    x (n, dim) float32, y (n,) balanced labels."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(12345))
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    return centres[y] + 0.5 * torch.randn(n, dim, generator=g), y


def main(argv=None) -> None:
    p = cli.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__)
    p.add_argument("--epochs", type=int, default=2000)
    p.add_argument("--experiences", type=int, default=5)
    p.add_argument("--per-experience", type=int, default=10_000)
    p.add_argument("--embed-dim", type=int, default=1280)
    p.add_argument("--generic-steps", type=int, default=10, help="steps timed on the generic path")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    p.check(*(lambda name=name: check_positive_int(f"--{name.replace('_', '-')}", getattr(args, name))
              for name in ("epochs", "experiences", "per_experience", "embed_dim", "generic_steps", "threads")))
    torch.set_num_threads(args.threads)
    cli.hide_avalanche_deprecations()
    num_classes = 2 * args.experiences
    n = args.experiences * args.per_experience
    train_x, train_y = synthetic_embeddings(n, args.embed_dim, num_classes, seed=0)
    test_x, test_y = synthetic_embeddings(n // 5, args.embed_dim, num_classes, seed=1)
    benchmark = make_class_incremental_benchmark(train_x, train_y, test_x, test_y, args.experiences, seed=0)

    torch.manual_seed(0)
    model = create_dkvb_model(args.embed_dim, num_classes)
    start = time.perf_counter()
    ema_init_keys(model.bottleneck, synthetic_embeddings(10_000, args.embed_dim, num_classes, seed=2)[0], epochs=1)
    model.bottleneck.freeze_keys()
    print(f"key init (EMA, 1 epoch of 10,000 embeddings): {time.perf_counter() - start:.1f} s", flush=True)

    strategy = DKVB(model=model, train_epochs=args.epochs, evaluator=make_evaluator([]), fast_path_threads=1)
    start = time.perf_counter()
    for i, experience in enumerate(benchmark.train_stream):
        strategy.train(experience)
        print(f"fast path: experience {i + 1}/{args.experiences} done at {time.perf_counter() - start:.1f} s",
              flush=True)
    fast_seconds = time.perf_counter() - start
    steps = args.experiences * args.epochs * -(-args.per_experience // 256)
    eval_start = time.perf_counter()
    accuracy = strategy.eval(benchmark.test_stream)["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    print(f"fast path: {steps} steps in {fast_seconds:.1f} s ({1e3 * fast_seconds / steps:.3f} ms/step, "
          f"including index computation); eval of {len(test_y)} test embeddings "
          f"{time.perf_counter() - eval_start:.1f} s, accuracy {accuracy:.3f}")

    # One generic step, as Avalanche's loop runs it (minus data loading): lookup, autograd, clip, SGD.
    optimizer = torch.optim.SGD([model.bottleneck.values], lr=0.3)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    model.train()
    step_times = []
    for x, y in zip(train_x[:256 * args.generic_steps].split(256), train_y.split(256)):
        start = time.perf_counter()
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_([model.bottleneck.values], 1.0)
        optimizer.step()
        step_times.append(time.perf_counter() - start)
    per_step = statistics.median(step_times)
    print(f"generic path (nearest-key search + autograd + dense SGD): median {1e3 * per_step:.1f} ms/step "
          f"over {len(step_times)} steps -> {steps * per_step / 3600:.1f} h for the protocol; "
          f"fast-path speed-up {per_step * steps / fast_seconds:.0f}x")


if __name__ == "__main__":
    main()
