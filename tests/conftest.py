"""Synthetic data in the CS224N format (no real rows are committed), and helpers."""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import json
import logging
import os
import random
import runpy
import signal
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


def run_train(*overrides: str, cwd: Path, data: Path, check: bool = True, process: bool = False,
              timeout: int = 300) -> subprocess.CompletedProcess:
    """Run train.py as a user would, with its run directory under `cwd`: in this process
    (the same entry point, argv, folder and environment, without paying the imports
    again), or with `process=True` in its own, for what only a process shows (signals,
    threads, a record of a process that died)."""
    env = {"MTBERT_DATA_DIR": str(data), "MTBERT_CACHE_DIR": str(cwd / "cache")}
    command = [sys.executable, str(ROOT / "train.py"), *overrides]
    if process:
        proc = subprocess.run(command, cwd=cwd, env={**os.environ, **env}, capture_output=True,
                              text=True, timeout=timeout)
    else:
        proc = here(lambda: runpy.run_path(command[1], run_name="__main__"), command, command[1:], cwd, env)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_module(module: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in this process: its `main()`, what its `__main__` block calls
    (see `here`)."""
    return here(lambda: importlib.import_module(module).main(), [sys.executable, "-m", module, *args],
                [module, *args], cwd, env or {})


def here(run, command: list[str], argv: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """Run a command's entry point in this process, as the command would: `argv`, folder and
    environment set, its output captured, its exit status what the interpreter would give (a
    message passed to sys.exit goes to stderr, status 1); folder, environment, argv,
    signal handlers and root logger restored afterwards."""
    out, err = io.StringIO(), io.StringIO()
    saved = (os.getcwd(), dict(os.environ), sys.argv,
             {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)},
             logging.root.handlers[:], logging.root.level)
    code = 0
    try:
        os.chdir(cwd)
        os.environ.update(env)
        sys.argv = argv
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                run()
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        os.chdir(saved[0])
        os.environ.clear()
        os.environ.update(saved[1])
        sys.argv = saved[2]
        for sig, handler in saved[3].items():
            signal.signal(sig, handler)
        for handler in set(logging.root.handlers) - set(saved[4]):  # Hydra's, to the run's train.log
            handler.close()
        logging.root.handlers[:] = saved[4]
        logging.root.setLevel(saved[5])
    return subprocess.CompletedProcess(command, code, out.getvalue(), err.getvalue())


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())
