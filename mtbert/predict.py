"""Prediction files in the CS224N format from a run's best checkpoint.

    python -m mtbert.predict RUN_DIR [--splits dev test] [--out DIR] [--device cpu]

Writes `<task>-<split>-output.csv` (e.g. sst-dev-output.csv) with the starter code's
layout: a header `id \\t Predicted_Sentiment` and one `id , prediction` line per row. Every
row with an id and its sentences gets a prediction, labelled or not; a split whose file
is missing (there is no quora-test-student.csv) is skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from omegaconf import DictConfig, OmegaConf

from mtbert import console_logging
from mtbert.data import RejectedRows, Task, read_split

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mtbert.predict")


class Best(NamedTuple):
    """A finished run's best model, ready to predict, with what it needs."""

    cfg: DictConfig
    tasks: dict
    objectives: dict
    encodings: dict
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    precision: str


def load_best(run_dir: Path, device: str = "auto", data_root: str | None = None) -> Best:
    """The run's config and `checkpoints/best.safetensors` on `device`; `data_root`
    replaces the run's data.root. The model's modules (torch, transformers) load once the
    run's files are found, so that `--help` and a wrong folder answer at once."""
    config = run_dir / ".hydra" / "config.yaml"
    checkpoint = run_dir / "checkpoints" / "best.safetensors"
    for path in (config, checkpoint):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {run_dir} a finished mtbert run directory?")
    from mtbert.build import build_network
    from mtbert.compat import current_terms
    from mtbert.device import resolve_device, resolve_precision
    from mtbert.rundir import load_model_weights

    cfg = current_terms(OmegaConf.load(config))
    if data_root:
        cfg.data.root = data_root
    tasks, objectives, encodings, model, tokenizer = build_network(cfg)
    load_model_weights(model, checkpoint)
    dev = resolve_device(device)
    model.to(dev)
    return Best(cfg, tasks, objectives, encodings, model, tokenizer, dev, resolve_precision(cfg.trainer.precision, dev)[0])


def write_predictions(run_dir: Path, splits=("dev", "test"), out: Path | None = None,
                      device: str = "auto", data_root: str | None = None) -> list[Path]:
    """Every task's prediction file of each of `splits`, from the run's best checkpoint, into
    `out` (default RUN_DIR/predictions); the files written."""
    best = load_best(run_dir, device, data_root)
    results = run_dir / "results.json"
    recorded = (json.loads(results.read_text()).get("data") or {}) if results.is_file() else {}
    out = out or run_dir / "predictions"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    root = Path(best.cfg.data.root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data.root {root} of {run_dir} is not a folder; pass --data-root DIR")
    for name, task in best.tasks.items():
        for split in splits:
            path = split_file(root, task, split)
            if path is not None:
                trained_on = recorded.get(name, {}).get(split, {}).get("sha256")
                written.append(predict_split(best, task, split, path, trained_on, out))
    return written


def split_file(root: Path, task: Task, split: str) -> Path | None:
    """The task's file of `split`, or None (said) where the task declares none or, for the
    unlabelled test split, where it is missing; a missing labelled split is the run's own: an error."""
    name = task.name
    if split not in task.files:
        print(f"{name} {split}: data.tasks.{name}.files declares no {split} file, skipped")
        return None
    path = root / task.files[split]
    if not path.is_file():
        if split != "test":  # the labelled splits are the run's own: they must be there
            raise FileNotFoundError(f"{name} {split}: {path} not found; pass --data-root DIR")
        print(f"{name} {split}: no file {path}, skipped")
        return None
    return path


def predict_split(best: Best, task: Task, split: str, path: Path, trained_on: str | None, out: Path) -> Path:
    """The prediction file of one task's split, from every usable row of `path`; refused
    where the file is not the one the run recorded (`trained_on`, its SHA-256)."""
    from mtbert.batching import encode
    from mtbert.evaluate import predict

    name = task.name
    rejected = RejectedRows("skip")
    rows = read_split(task, path, rejected, labelled=False)
    if trained_on and trained_on != rows.counts["sha256"]:
        raise ValueError(f"{name} {split}: {path} is not the file the run evaluated "
                         f"(SHA-256 {rows.counts['sha256'][:12]}, was {trained_on[:12]}); pass "
                         "--data-root with the run's data")
    cfg = best.cfg
    enc = encode(rows, best.tokenizer, cfg.data.max_length, best.encodings[name] == "siamese", cfg.data.cache_dir)
    values = predict(best.model, task, best.objectives[name], enc, best.device, best.precision)
    target = out / f"{name}-{split}-output.csv"
    write_prediction_file(target, task, rows.ids, values.tolist())
    print(f"{name} {split}: {len(rows)} predictions -> {target}"
          + (f" ({len(rejected.rows)} unusable rows skipped)" if rejected.rows else ""))
    return target


def write_prediction_file(path: Path, task: Task, ids: list[str], values: list[float]):
    """A CS224N prediction file: a header `id \\t <task's column>`, then `id , prediction`
    lines (`read_predictions` reads it back)."""
    with open(path, "w") as f:
        f.write(f"id \t {task.prediction_header} \n")
        for row_id, value in zip(ids, values):
            text = str(int(value)) if task.classes else f"{value:.6g}"
            f.write(f"{row_id} , {text} \n")


def read_predictions(path: Path) -> dict[str, float]:
    """A CS224N prediction file (`id , prediction` lines after a header) as {id: value}."""
    values = {}
    with open(path) as f:
        next(f)
        for number, line in enumerate(f, 2):
            row_id, _, value = line.partition(",")
            try:
                values[row_id.strip()] = float(value)
            except ValueError:
                raise ValueError(f"{path}, line {number}: expected 'id , prediction', got {line!r}") from None
    return values


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--splits", nargs="+", default=["dev", "test"])
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/predictions")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-root", default=None, help="override the run's data.root")
    args = parser.parse_args(argv)
    console_logging()
    try:
        write_predictions(args.run_dir, args.splits, args.out, args.device, args.data_root)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
