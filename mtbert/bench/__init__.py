"""Benchmarks, each measuring its variants side by side in one run: `python -m mtbert.bench`
(speed of the step, the evaluation and a short run), `python -m mtbert.bench.load`
(the step on a machine busy with other processes) and `python -m mtbert.bench.gpu` (the
one-call device check for a lent GPU: facts, the `cuda` tests, matmul peaks, the step in
every precision, a short run)."""

import json
from pathlib import Path


def publish(result: dict, report: str, paths: list[str]):
    """Print the Markdown report and write each `--out` path: .json the result, else the report."""
    print(report)
    for path in map(Path, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n" if path.suffix == ".json" else report)
