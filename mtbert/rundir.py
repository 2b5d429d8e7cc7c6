"""The run directory contract (DESIGN.md): metrics.jsonl as training goes, results.json at
the end (also on failure), checkpoints/ loadable without running pickled code."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)


def _finite(value):
    """JSON has no NaN or infinity: such a value is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


@contextlib.contextmanager
def atomic(path: Path):
    """A temporary path beside `path` to write to; once written and on disk it replaces
    `path` in one step, so a crash mid-write never leaves a half-written file (the
    process id keeps concurrent writers of a shared cache apart)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data):
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(_finite(data), indent=2))


def read_events(run_dir: Path, kind: str) -> list[dict]:
    """The run's `kind` events from metrics.jsonl (none if it has no such file)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    with open(path) as f:
        return [e for e in map(json.loads, f) if e["event"] == kind]


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

    def write_rejected(self, rejected):
        """`rejected_rows.tsv`, when any data row was skipped."""
        if rejected.rows:
            rejected.write(self.path / "rejected_rows.tsv")

    def save_model(self, model: torch.nn.Module, name: str = "best", meta: dict | None = None):
        self.checkpoints.mkdir(exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        with atomic(self.checkpoints / f"{name}.safetensors") as tmp:
            save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in (meta or {}).items()})

    def save_checkpoint(self, state: dict, name: str = "last"):
        save_checkpoint(state, self.checkpoints / f"{name}.pt")

    def close(self):
        self._metrics.close()


class ReadOnlyRunDir(RunDir):
    """The run directory as ranks other than 0 see it: they read it, only rank 0 writes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"

    def event(self, event: str, step: int, **fields):
        pass

    def write_results(self, results: dict):
        pass

    def write_rejected(self, rejected):
        pass

    def save_model(self, model, name="best", meta=None):
        pass

    def save_checkpoint(self, state, name="last"):
        pass

    def close(self):
        pass


def load_model_weights(model: torch.nn.Module, path: str | os.PathLike):
    """Load a safetensors checkpoint into `model` (no pickle involved)."""
    model.load_state_dict(load_file(str(path)))


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(state: dict, path: Path):
    """Write `state` atomically beside a SHA-256 of its bytes; the previous checkpoint is
    kept as `<name>.prev.pt` so a damaged file always has a good one to fall back on."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        os.replace(path, _previous(path))
        if _digest_file(path).exists():
            os.replace(_digest_file(path), _digest_file(_previous(path)))
    with atomic(path) as tmp:
        tmp.write_bytes(data)
    _digest_file(path).write_text(hashlib.sha256(data).hexdigest())


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint (tensors and plain data only: no pickled code runs), verifying its
    digest; a missing, truncated or corrupt file falls back to the previous one."""
    errors = []
    for candidate in (path, _previous(path)):
        try:
            data = candidate.read_bytes()
            digest = _digest_file(candidate)
            if not digest.exists() or digest.read_text().strip() != hashlib.sha256(data).hexdigest():
                raise CheckpointError("its SHA-256 does not match (truncated or corrupt)")
            state = torch.load(io.BytesIO(data), weights_only=True)
        except Exception as e:
            errors.append(f"{candidate}: {e}")
            continue
        if errors:
            log.error("checkpoint %s is unusable (%s); resuming from %s", path, errors[0], candidate)
        return state
    raise CheckpointError("no usable checkpoint: " + "; ".join(errors) +
                          ". Delete the checkpoints/ folder to start the run afresh.")


def _previous(path: Path) -> Path:
    return path.with_name(path.stem + ".prev" + path.suffix)


def _digest_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")
