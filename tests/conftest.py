"""Synthetic data in the CS224N format (no real rows are committed), and helpers."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

WORDS = {
    0: ["awful", "dreadful", "boring"], 1: ["dull", "weak", "flat"], 2: ["okay", "plain", "fine"],
    3: ["nice", "warm", "solid"], 4: ["superb", "brilliant", "great"],
}
TOPICS = ["cats", "dogs", "rain", "stocks", "music", "football", "cooking", "trains"]


def _write(path: Path, header: list[str], rows: list[list[str]]):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)


def write_cs224n(root: Path, n: int = 60, seed: int = 0) -> Path:
    """Write all eight CS224N files (train/dev/test) with `n` rows each, learnable labels
    and the real files' quirks: leading spaces, quoted fields, SST test's extra column."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)

    def hexid():
        return "".join(rng.choice("0123456789abcdef") for _ in range(25))

    def sst_row(i, labelled=True):
        label = rng.randrange(5)
        sentence = " The film is " + " ".join(rng.choice(WORDS[label]) for _ in range(3)) + " ."
        return [str(i), hexid(), sentence] + ([str(label)] if labelled else [])

    def pair(i):
        a, b = rng.sample(TOPICS, 2)
        same = rng.random() < 0.5
        s1 = f"What do you think about {a}?"
        s2 = f'"Tell me about {a if same else b}"' if i % 7 == 0 else f"Tell me about {a if same else b}"
        return s1, s2, same

    for split in ("train", "dev"):
        _write(root / f"ids-sst-{split}.csv", ["", "id", "sentence", "sentiment"],
               [sst_row(i) for i in range(n)])
        rows = []
        for i in range(n):
            s1, s2, same = pair(i)
            rows.append([str(i), hexid(), s1, s2, "1.0" if same else "0.0"])
        _write(root / f"quora-{split}.csv", ["", "id", "sentence1", "sentence2", "is_duplicate"], rows)
        rows = []
        for i in range(n):
            s1, s2, same = pair(i)
            score = rng.uniform(3.5, 5.0) if same else rng.uniform(0.0, 2.0)
            rows.append([str(i), hexid(), s1, s2, f"{score:.2f}"])
        _write(root / f"sts-{split}.csv", ["", "id", "sentence1", "sentence2", "similarity"], rows)
    _write(root / "ids-sst-test-student.csv", ["0", "", "id", "sentence"],
           [[str(i + 1), f"{i}.0"] + sst_row(i, labelled=False)[1:] for i in range(n)])
    _write(root / "sts-test-student.csv", ["", "id", "sentence1", "sentence2"],
           [[str(i), hexid(), *pair(i)[:2]] for i in range(n)])
    return root


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return write_cs224n(tmp_path / "data")


def compose_config(*overrides: str, data: Path | None = None, cache: Path | None = None):
    """The run's config as `python train.py OVERRIDES` composes it; with `data` (and
    `cache`), on those folders."""
    from hydra import compose, initialize_config_dir

    paths = ([f"data.root={data}"] if data else []) + ([f"data.cache_dir={cache}"] if cache else [])
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[*paths, *overrides])


def run_train(*overrides: str, cwd: Path, data: Path, check: bool = True,
              timeout: int = 300) -> subprocess.CompletedProcess:
    """Run train.py as a user would, with its run directory under `cwd`."""
    env = {**os.environ, "MTBERT_DATA_DIR": str(data), "MTBERT_CACHE_DIR": str(cwd / "cache")}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())
