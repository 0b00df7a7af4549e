"""Put results tables into the README from runs' outputs: ``python -m benchmarks.readme``.

Each block ``<!-- results:DIR -->`` ... ``<!-- /results:DIR -->`` in README.md is replaced by
``DIR/summary.md`` and the command and wall-clock time recorded in ``DIR/run.json``; each block
``<!-- speed:DIR -->`` ... ``<!-- /speed:DIR -->`` by the table :func:`render_speed` makes of
``DIR/speed.json`` (written by ``python -m benchmarks.speed --out DIR``); each block
``<!-- ablation:DIR -->`` ... ``<!-- /ablation:DIR -->`` by ``DIR/summary.md`` of a
``python -m benchmarks.ablate --out DIR`` run, under its run settings (``DIR/settings.json``); each
block ``<!-- probe:DIR -->`` ... ``<!-- /probe:DIR -->`` by ``DIR/summary.md`` of a
``python -m benchmarks.metric_probe --out DIR`` run as it is (it starts with its command).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from avalanche_dkvb.atomic_files import atomic_write_text
from benchmarks.outputs import threads_per_cell

BLOCK = re.compile(r"(<!-- (?P<kind>results|speed|ablation|probe):(?P<dir>[^ ]+) -->\n).*?(<!-- /(?P=kind):(?P=dir) -->)",
                   re.DOTALL)
NEEDS = {"results": ("run.json", "summary.md"), "speed": ("speed.json",), "ablation": ("settings.json", "summary.md"),
         "probe": ("summary.md",)}


def render(run_dir: Path) -> str:
    info = json.loads((run_dir / "run.json").read_text())
    runs, seconds = info.get("merged_runs", 1), info["wall_clock_seconds"]
    status, when = info.get("status", "finished"), info["finished"]  # when run.json was last written
    threads = f"{threads_per_cell(info)} torch thread(s) each"
    facts = [] if status == "finished" else [f"status: {status}"]
    if status == "running":  # written as the run starts: no wall-clock time yet
        facts += [threads, f"started {when}"]
    else:
        duration = f"{runs} runs merged, the longest {seconds:.0f} s" if runs > 1 else f"wall-clock {seconds:.0f} s"
        facts += [duration, threads, f"{'finished' if status == 'finished' else 'ended'} {when}"]
    if "note" in info:
        facts.append(f"note: {info['note']}")
    return f"Command: `{info['command']}` ({', '.join(facts)}).\n\n" + (run_dir / "summary.md").read_text()


def render_speed(speed: dict) -> str:
    """Markdown table of one ``speed.json`` (a dict): each stage, the project's figure, the in-run
    baseline and the ratio, under the command, threads, device and versions that produced it."""
    sizes, versions = speed["sizes"], speed["versions"]
    engines = ", ".join(f"{name} {version.split('-')[0]}" for name, version in sorted(versions.items()) if version)
    lines = [f"Command: `{speed['command']}` ({speed['threads']} torch thread(s), fast path "
             f"{speed['fast_path_threads']}, device {speed['device']}, {speed['cpu_count']} CPUs, "
             f"wall-clock {speed['wall_clock_seconds']:.0f} s, finished {speed['finished']}; {engines}).", "",
             "| stage | this project | in-run baseline | ratio |", "|---|---|---|---|"]
    if "extraction_images_per_s" in speed:
        lines += [
            f"| extraction, {speed['encoder']} at {sizes['image_size']} px, batch {sizes['batch_size']}, "
            f"{sizes['extract_images']} {speed['image_set']} images (backend {speed['extraction_backend']}) "
            f"| {speed['extraction_images_per_s']:.1f} img/s | plain eager timm fp32: "
            f"{speed['extraction_eager_images_per_s']:.1f} img/s | {speed['extraction_speedup']:.2f}x "
            f"(max rel. error {speed['extraction_max_rel_error']:.1e}) |",
            f"| image decoding and resizing alone ({sizes['num_workers']} DataLoader worker(s)) "
            f"| {speed['decode_images_per_s']:.0f} img/s | | |",
        ]
    scale = (f"C {sizes['num_codebooks']}, K {sizes['num_keys']}, d_key {sizes['key_dim']}, "
             f"batch {sizes['train_batch']}, {sizes['num_classes']} classes")
    lines += [
        f"| DKVB fast training step ({scale}), in Avalanche's loop with epoch metrics "
        f"| {speed['fast_step_ms']:.3f} ms | generic autograd step: "
        f"{speed['generic_step_ms']:.1f} ms | {speed['fast_step_speedup']:.0f}x |",
    ]
    if "fast_step_alone_ms" in speed:
        lines.append(f"| the same step timed like the generic one, outside Avalanche's loop | "
                     f"{speed['fast_step_alone_ms']:.3f} ms | generic autograd step: {speed['generic_step_ms']:.1f} ms "
                     f"| {speed['fast_step_alone_speedup']:.0f}x |")
    if "fast_step_warm_ms" in speed:
        lines.append(f"| the same step outside the loop with no minibatch gather between steps (the inputs no "
                     f"longer evict the value rows from the caches) | {speed['fast_step_warm_ms']:.3f} ms | "
                     f"generic autograd step: {speed['generic_step_ms']:.1f} ms "
                     f"| {speed['generic_step_ms'] / speed['fast_step_warm_ms']:.0f}x |")
    if "fast_step_spread_ms" in speed:
        lines.append(f"| the same step outside the loop on rows drawn uniformly over all keys (real embeddings "
                     f"spread like this; the stand-in clusters keep their rows in the caches) | "
                     f"{speed['fast_step_spread_ms']:.3f} ms | generic autograd step: {speed['generic_step_ms']:.1f} ms "
                     f"| {speed['generic_step_ms'] / speed['fast_step_spread_ms']:.0f}x |")
    if "memory_copy_gb_per_s" in speed:
        lines.append(f"| value rows moved by that step (read, then read and written) | "
                     f"{speed['fast_step_spread_gb_per_s']:.1f} GB/s | a plain copy on the same threads: "
                     f"{speed['memory_copy_gb_per_s']:.1f} GB/s | "
                     f"{speed['fast_step_spread_gb_per_s'] / speed['memory_copy_gb_per_s']:.2f}x |")
    lines += [
        f"| EMA key initialisation, one epoch over 10,000 embeddings (measured on "
        f"{sizes['key_init_embeddings']:,}) | {speed['key_init_s_per_epoch_10k']:.1f} s | | |",
    ]
    if "key_init_s_10_epochs_50k" in speed:  # older speed.json files timed one epoch with the projection
        lines.append(f"| EMA key initialisation, 10 epochs over 50,000 embeddings (scaled: the projection once, "
                     f"{speed['key_init_setup_s_per_10k']:.1f} s per 10,000, then the epochs) "
                     f"| {speed['key_init_s_10_epochs_50k'] / 60:.1f} min | | |")
    lines += [
        f"| evaluation of 10,000 embeddings, masked search (measured on {sizes['eval_embeddings']:,}"
        + (f"; {100 * speed['eval_used_key_fraction']:.0f} % of the keys used" if "eval_used_key_fraction" in speed
           else "") + f") | {speed['eval_s_per_10k']:.2f} s | | |",
    ]
    if "search_fused_s_per_1k" in speed:
        lines.append(f"| nearest-key search of 1,024 embeddings (all keys), fused kernel "
                     f"| {speed['search_fused_s_per_1k']:.3f} s | matrix products + argmin: "
                     f"{speed['search_matmul_s_per_1k']:.3f} s "
                     f"| {speed['search_matmul_s_per_1k'] / speed['search_fused_s_per_1k']:.1f}x |")
    return "\n".join(lines) + "\n"


def render_ablation(folder: Path) -> str:
    """An ablation's summary table under the run settings it was made with."""
    settings = json.loads((folder / "settings.json").read_text())
    facts = ", ".join(f"{name} {value}" for name, value in settings.items())
    return f"Run settings ({folder}/settings.json): {facts}.\n\n" + (folder / "summary.md").read_text()


def _render_block(kind: str, folder: Path) -> str:
    if kind == "speed":
        return render_speed(json.loads((folder / "speed.json").read_text()))
    if kind == "ablation":
        return render_ablation(folder)
    if kind == "probe":
        return (folder / "summary.md").read_text()
    return render(folder)


def main(readme: Path = Path("README.md")) -> int:
    text = readme.read_text()
    missing = [m["dir"] for m in BLOCK.finditer(text)
               if not all((Path(m["dir"]) / name).exists() for name in NEEDS[m["kind"]])]
    if missing:
        print(f"No finished run in {missing} (expected run.json and summary.md, speed.json, or settings.json and "
              "summary.md there).",
              file=sys.stderr)
        return 1
    atomic_write_text(readme, BLOCK.sub(lambda m: m[1] + _render_block(m["kind"], Path(m["dir"])) + m[4], text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
