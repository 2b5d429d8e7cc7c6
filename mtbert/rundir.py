"""The run directory contract (DESIGN.md): metrics.jsonl as training goes, results.json at
the end (also on failure), checkpoints/ loadable without running pickled code."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _finite(value):
    """JSON has no NaN or infinity: such a value is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path: Path, data):
    """Write atomically: a crash mid-write never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(_finite(data), f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: str | os.PathLike, sinks: list | None = None):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.path / "checkpoints"
        self.sinks = sinks or []  # loggers that receive every event too (W&B)
        self._metrics = open(self.path / "metrics.jsonl", "a")

    def event(self, event: str, step: int, **fields):
        record = _finite({"step": step, "event": event, **fields})
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        for sink in self.sinks:
            sink.event(record)

    def write_results(self, results: dict):
        write_json(self.path / "results.json", results)

    def save_model(self, model: torch.nn.Module, name: str = "best", meta: dict | None = None):
        self.checkpoints.mkdir(exist_ok=True)
        tmp = self.checkpoints / f"{name}.safetensors.tmp"
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in (meta or {}).items()})
        os.replace(tmp, self.checkpoints / f"{name}.safetensors")

    def close(self):
        self._metrics.close()


def load_model_weights(model: torch.nn.Module, path: str | os.PathLike):
    """Load a safetensors checkpoint into `model` (no pickle involved)."""
    model.load_state_dict(load_file(str(path)))
