"""Put results tables into the README from runs' outputs: ``python -m benchmarks.readme``.

Each block ``<!-- results:DIR -->`` ... ``<!-- /results:DIR -->`` in README.md is replaced by
``DIR/summary.md`` and the command and wall-clock time recorded in ``DIR/run.json``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from avalanche_dkvb.atomic_files import atomic_write_text

BLOCK = re.compile(r"(<!-- results:(?P<dir>[^ ]+) -->\n).*?(<!-- /results:(?P=dir) -->)", re.DOTALL)


def render(run_dir: Path) -> str:
    info = json.loads((run_dir / "run.json").read_text())
    runs, seconds = info.get("merged_runs", 1), info["wall_clock_seconds"]
    facts = [f"{runs} runs merged, the longest {seconds:.0f} s" if runs > 1 else f"wall-clock {seconds:.0f} s",
             f"{info['torch_threads']} torch thread(s) each", f"finished {info['finished']}"]
    if info.get("status", "finished") != "finished":
        facts.insert(0, f"status: {info['status']}")
    if "note" in info:
        facts.append(f"note: {info['note']}")
    return f"Command: `{info['command']}` ({', '.join(facts)}).\n\n" + (run_dir / "summary.md").read_text()


def main(readme: Path = Path("README.md")) -> int:
    text = readme.read_text()
    missing = [m["dir"] for m in BLOCK.finditer(text)
               if not all((Path(m["dir"]) / name).exists() for name in ("run.json", "summary.md"))]
    if missing:
        print(f"No finished run in {missing} (expected run.json and summary.md there).", file=sys.stderr)
        return 1
    atomic_write_text(readme, BLOCK.sub(lambda m: m[1] + render(Path(m["dir"])) + m[3], text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
