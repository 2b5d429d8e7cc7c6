"""The run directory contract (README, "What a run writes"): metrics.jsonl as training
goes, results.json from the start to the end (also on failure), checkpoints/ loadable
without running pickled code. torch loads only where a checkpoint is written or read, so
that the report and `--help` read run directories without it."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from mtbert.errors import CheckpointError

if TYPE_CHECKING:
    import torch

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
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as any new file, whatever mode the writer gave it
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# results.json: every field on every status (completed, failed, interrupted, running; pruned
# for a trial that mtbert.tune stopped early), so that a reader never guesses whether a key
# is missing or the run never got there
RESULTS = {"status": "failed", "experiment": None, "seed": None, "dev": None, "dev_last": None,
           "validation": None, "selected_on": None, "best_epoch": None,
           "best_step": None, "steps": 0, "examples_seen": {}, "skipped_steps": 0, "overflow_steps": 0, "train_seconds": 0.0,
           "device": None, "precision": None, "provenance": None, "data": {}, "tokenizer": None,
           "parameters": None, "process": None, "error": None}


def this_process() -> dict:
    """Who is training a run: what tells a live `running` record from one whose process died."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "updated": time.time()}


def process_alive(process: dict | None) -> bool | None:
    """Whether the process a `running` record names still runs: known on its own host only
    (None elsewhere, or for a record that names none)."""
    if not process or process.get("host") != socket.gethostname():
        return None
    try:
        os.kill(process["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def results_record(**fields) -> dict:
    unknown = sorted(set(fields) - set(RESULTS))
    if unknown:
        raise KeyError(f"{unknown} are not results.json fields (rundir.RESULTS)")
    return {**RESULTS, **fields}


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

    def rewind(self, step: int):
        """Keep only the events up to `step` (the checkpoint a run resumes from; -1 for a
        run that starts afresh), so that steps trained again after a kill are not logged
        twice. Events of a killed attempt beyond its last checkpoint are dropped."""
        self._metrics.close()
        path = self.path / "metrics.jsonl"
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        if len(kept) < len(lines):
            log.warning("metrics.jsonl: dropped %d event(s) after step %d, from an attempt that "
                        "ended past its last checkpoint", len(lines) - len(kept), step)
            with atomic(path) as tmp:
                tmp.write_text("".join(kept))
        self._metrics = open(path, "a")

    def event(self, event: str, step: int, **fields):
        record = _finite({"step": step, "event": event, **fields})
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        for sink in self.sinks:
            sink.event(record)

    def write_results(self, results: dict):
        write_json(self.path / "results.json", results_record(**results))

    def update_results(self, fields: dict):
        """results.json's fields a running run has reached (the best evaluation so far, steps,
        seconds), over the record it started with; the status stays `running`."""
        path = self.path / "results.json"
        record = json.loads(path.read_text()) if path.is_file() else {}
        self.write_results({**record, **fields, "status": "running", "process": this_process()})

    def write_rejected(self, rejected):
        """`rejected_rows.tsv`, when any data row was skipped."""
        if rejected.rows:
            rejected.write(self.path / "rejected_rows.tsv")

    def save_model(self, model: torch.nn.Module, name: str = "best", meta: dict | None = None):
        from safetensors.torch import save_file

        self.checkpoints.mkdir(exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        with atomic(self.checkpoints / f"{name}.safetensors") as tmp:
            save_file(state, str(tmp), metadata={k: json.dumps(v) for k, v in (meta or {}).items()})

    def save_checkpoint(self, state: dict, name: str = "last"):
        save_checkpoint(state, self.checkpoints / f"{name}.pt")

    def drop_checkpoint(self, name: str = "last"):
        """Delete `<name>.pt` and its siblings: a completed run no longer needs them."""
        path = self.checkpoints / f"{name}.pt"
        for file in (*_candidates(path), *map(_legacy_digest, _candidates(path))):
            file.unlink(missing_ok=True)

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

    def update_results(self, fields: dict):
        pass

    def rewind(self, step: int):
        pass

    def write_rejected(self, rejected):
        pass

    def save_model(self, model, name="best", meta=None):
        pass

    def save_checkpoint(self, state, name="last"):
        pass

    def drop_checkpoint(self, name="last"):
        pass

    def close(self):
        pass


def load_model_weights(model: torch.nn.Module, path: str | os.PathLike):
    """Load a safetensors checkpoint into `model` (no pickle involved)."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))


MARK = b"\nmtbert-sha256:"  # the trailer: MARK + 64 hex digits of the SHA-256 of what precedes it


class _HashingWriter:
    """A file to write to that keeps the SHA-256 of what was written (torch.save calls write)."""

    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()


def save_checkpoint(state: dict, path: Path):
    """Write `state` as `path` so that a kill at any point leaves the newest complete
    checkpoint loadable. Each file carries its own SHA-256, so data and digest move
    together. The new state is written and synced as `<name>.next.pt`; the current
    `<name>.pt` becomes `<name>.prev.pt`; `<name>.next.pt` becomes `<name>.pt`. A file
    found damaged is moved aside when loaded, so it is never kept as the fallback.
    torch.save streams into the file through a writer that hashes what passes: building
    the bytes in memory first held the state two to three times over (0.26 GB each for
    MiniLM with AdamW), the peak of a run that saves mid-training (experiments/bench/memory.md)."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    following = _sibling(path, "next")
    with atomic(following) as tmp, open(tmp, "wb") as f:
        writer = _HashingWriter(f)
        torch.save(state, writer)
        f.write(MARK + writer.sha256.hexdigest().encode())
    if path.exists():
        os.replace(path, _sibling(path, "prev"))
    os.replace(following, path)
    for old in (path, _sibling(path, "prev")):  # digests beside older checkpoints: now inside
        _legacy_digest(old).unlink(missing_ok=True)
    _sync_folder(path.parent)


def checkpoint_exists(path: Path) -> bool:
    return any(c.exists() for c in _candidates(path))


def load_checkpoint(path: Path) -> dict:
    """Load the newest usable of `<name>.next.pt` (left by a save that was cut short),
    `<name>.pt` and `<name>.prev.pt`, verifying each one's digest (tensors and plain data
    only: no pickled code runs). A damaged file is renamed `*.corrupt` and named in the log.
    Only a missing or wrong digest proves damage: a file that cannot be read, or intact
    bytes that cannot be loaded (no memory, another torch), stop the resume and stay where
    they are, and a stop request (guards.Interrupted) passes through untouched."""
    errors = []
    for candidate in _candidates(path):
        if not candidate.exists():
            continue
        try:
            data = _verified_bytes(candidate)
        except _Damaged as e:
            errors.append(f"{candidate.name}: {e}")
            os.replace(candidate, candidate.with_name(candidate.name + ".corrupt"))
            continue
        state = _load_intact(candidate, data)
        if errors:
            log.error("checkpoint(s) unusable, moved aside as *.corrupt (%s); resuming from %s",
                      "; ".join(errors), candidate)
        else:
            log.info("loaded %s", candidate)
        return state
    if not errors:
        raise CheckpointError(f"no checkpoint in {path.parent} ({path.name}, its .next and .prev are all "
                              "missing): the run cannot resume. Start it afresh in a new directory.")
    raise CheckpointError("no usable checkpoint: " + "; ".join(errors) +
                          f". Delete {path.parent} to start the run afresh.")


class _Damaged(CheckpointError):
    """A checkpoint whose SHA-256 is missing or wrong: the one proof of damage."""


def _verified_bytes(path: Path) -> bytes:
    """The checkpoint's data, once its SHA-256 matches. A read error proves no damage: it
    is a plain CheckpointError, and the file stays where it is."""
    try:
        data = path.read_bytes()
        if data[-64 - len(MARK):-64] == MARK:
            data, digest = data[:-64 - len(MARK)], data[-64:]
        elif _legacy_digest(path).exists():  # written by an older mtbert: the digest beside it
            digest = _legacy_digest(path).read_bytes().strip()
        else:
            raise _Damaged("it has no SHA-256 (truncated, or not an mtbert checkpoint)")
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}; nothing was moved aside. Resume again "
                              "once it is readable, or delete it to resume from an older checkpoint") from e
    if hashlib.sha256(data).hexdigest().encode() != digest:
        raise _Damaged("its SHA-256 does not match (truncated or corrupt)")
    return data


def _load_intact(path: Path, data: bytes) -> dict:
    """torch.load of bytes whose digest matched: they are what was saved, so a failure here
    (no memory, a torch that cannot read them, pickled code) is no damage of the file."""
    import torch

    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is intact (its SHA-256 matches) but cannot be loaded "
                              f"({type(e).__name__}: {e}); nothing was moved aside") from e


def _candidates(path: Path) -> list[Path]:
    return [_sibling(path, "next"), path, _sibling(path, "prev")]


def _sibling(path: Path, kind: str) -> Path:
    return path.with_name(f"{path.stem}.{kind}{path.suffix}")


def _legacy_digest(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sync_folder(folder: Path):
    """Make the renames in `folder` durable (a power loss, not only a kill)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
