"""Get the CS224N files: from the minBERT starter repository (or any mirror), or built
from the Hugging Face hub's copies (GLUE QQP with all its training pairs, GLUE STS-B,
SST-5). Every file is checked by the project's own reader before it takes its name, so
a folder that `download` filled is one that training accepts.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from tqdm import tqdm

from mtbert.data import RejectedRows, Task, read_split
from mtbert.errors import DataError

STARTER = "https://raw.githubusercontent.com/gpoesia/minbert-default-final-project/main/data"
DECLARATIONS = Path(__file__).resolve().parents[2] / "conf" / "data" / "cs224n.yaml"
# Hugging Face copies of each task: dataset, config, {hub column: CS224N column}
HUB = {
    "sst": ("SetFit/sst5", None, {"text": "sentence", "label": "sentiment"}),
    "para": ("nyu-mll/glue", "qqp", {"question1": "sentence1", "question2": "sentence2",
                                      "label": "is_duplicate"}),
    "sts": ("nyu-mll/glue", "stsb", {"sentence1": "sentence1", "sentence2": "sentence2",
                                      "label": "similarity"}),
}
HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}


@dataclass
class Outcome:
    file: str
    status: str  # downloaded | present | built | failed | missing (optional file)
    counts: dict | None = None
    detail: str = ""


def cs224n_files() -> list[tuple[Task, str, str]]:
    """(task, split, file name) of every file the CS224N data config declares."""
    tasks = OmegaConf.to_container(OmegaConf.load(DECLARATIONS).tasks)
    out = []
    for name, spec in tasks.items():
        spec["score_range"] = tuple(spec["score_range"]) if spec.get("score_range") else None
        task = Task(name=name, **spec)
        out += [(task, split, file) for split, file in task.files.items()]
    return out


def check(task: Task, split: str, path: Path, shown_as: Path | None = None) -> dict:
    """The reader's counts for a file (a DataError if training would refuse it); its
    warnings and errors name `shown_as`, the file a temporary copy becomes."""
    shown_as = shown_as or path

    def rename(record: logging.LogRecord) -> bool:
        record.msg, record.args = record.getMessage().replace(str(path), str(shown_as)), ()
        return True

    reader = logging.getLogger("mtbert.data")
    reader.addFilter(rename)
    try:
        return read_split(task, path, RejectedRows("skip"), labelled=split != "test").counts
    except DataError as e:
        raise DataError(str(e).replace(str(path), str(shown_as))) from None
    finally:
        reader.removeFilter(rename)


def download(to: Path, base_url: str = STARTER) -> list[Outcome]:
    """Fetch every declared file missing or invalid in `to`; test files are optional."""
    to.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for task, split, name in cs224n_files():
        target = to / name
        if target.is_file():
            try:
                outcomes.append(Outcome(name, "present", check(task, split, target)))
                continue
            except DataError as e:
                print(f"{target} is present but unusable ({e}); fetching it again")
        url = f"{base_url.rstrip('/')}/{name}"
        part = partial(to, name)
        try:
            fetch(url, part)
            counts = check(task, split, part, shown_as=target)
            os.replace(part, target)  # only a complete, valid file takes the name
            outcomes.append(Outcome(name, "downloaded", counts))
        except (urllib.error.URLError, OSError, DataError) as e:
            absent = getattr(e, "code", None) == 404 or isinstance(getattr(e, "reason", e), FileNotFoundError)
            why = f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
            status = "missing" if absent and split == "test" else "failed"  # a test file is optional
            outcomes.append(Outcome(name, status, detail=f"{url}: {why}"))
        finally:
            part.unlink(missing_ok=True)
    part.parent.rmdir()
    return outcomes


def fetch(url: str, path: Path, chunk: int = 1 << 16):
    """Stream `url` (http, https or file) into `path` with a progress bar; a transfer that
    ends before its announced length is an error, never a short file."""
    with urllib.request.urlopen(url, timeout=60) as response:
        length = response.headers.get("Content-Length")
        total, got = (int(length) if length else None), 0
        with open(path, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=Path(url).name,
                                         mininterval=1.0) as bar:  # kept at its end: 100%, the size
            try:
                while block := response.read(chunk):
                    f.write(block)
                    got += len(block)
                    bar.update(len(block))
            except http.client.IncompleteRead as e:
                got += len(e.partial)
    if total is not None and got < total:
        raise OSError(f"transfer cut short: {got:,} of {total:,} bytes")


def build_from_hub(to: Path, load=None) -> list[Outcome]:
    """Write the CS224N layout from the hub's copies. `load` is `datasets.load_dataset`
    (a test passes its own). Ids are the first 25 hex digits of a SHA-1 of the source,
    split and row index, so they are stable and unique; the test files carry no labels."""
    if load is None:
        try:
            from datasets import load_dataset as load
        except ImportError:
            raise SystemExit("--source hub needs the datasets package: pip install -e '.[hub]'") from None
    to.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for task, split, name in cs224n_files():
        dataset, config, columns = HUB[task.name]
        source = f"{dataset}/{config}" if config else dataset
        try:
            rows = load(dataset, config, split=HUB_SPLITS[split])
        except Exception as e:  # the hub's errors have no common base class
            outcomes.append(Outcome(name, "failed", detail=f"{source} {HUB_SPLITS[split]}: {e}"))
            continue
        kept = [c for c in columns if split != "test" or columns[c] != task.label]
        target, part = to / name, partial(to, name)
        with open(part, "w", encoding="utf-8", newline="") as f:
            f.write("\t".join(["", "id", *(columns[c] for c in kept)]) + "\n")
            for i, row in enumerate(rows):
                row_id = hashlib.sha1(f"{source}/{split}/{i}".encode()).hexdigest()[:25]
                cells = [clean(row[c]) for c in kept]
                f.write("\t".join([str(i), row_id, *cells]) + "\n")
        try:
            counts = check(task, split, part, shown_as=target)
            os.replace(part, target)
            outcomes.append(Outcome(name, "built", counts, detail=source))
        except DataError as e:
            outcomes.append(Outcome(name, "failed", detail=str(e)))
        finally:
            part.unlink(missing_ok=True)
    part.parent.rmdir()
    return outcomes


def partial(to: Path, name: str) -> Path:
    """Where a file is written and checked before it takes its name (messages name it)."""
    folder = to / f".partial-{os.getpid()}"
    folder.mkdir(exist_ok=True)
    return folder / name


def clean(value) -> str:
    """A cell of the tab-separated file: tabs and line breaks inside text become spaces."""
    return " ".join(value.split()) if isinstance(value, str) else f"{value:g}"


def summary(outcomes: list[Outcome], to: Path) -> str:
    lines = [f"{'file':<26} {'status':<10} {'rows':>8} {'valid':>8} {'skipped':>8}  detail"]
    for o in outcomes:
        c = o.counts or {}
        lines.append(f"{o.file:<26} {o.status:<10} {c.get('rows', '-'):>8} {c.get('valid', '-'):>8} "
                     f"{c.get('skipped', '-'):>8}  {o.detail}")
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        lines += ["", f"{len(failed)} file(s) failed. Check the network (a proxy is set with "
                  "HTTPS_PROXY), try a mirror with --base-url URL (file:///path/to/folder works), "
                  f"or download the files by hand into {to}."]
    else:
        lines += ["", f"ready: python train.py data.root={to}   (or export MTBERT_DATA_DIR={to})"]
    return "\n".join(lines)
