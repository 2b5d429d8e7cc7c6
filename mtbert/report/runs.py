"""The runs a report reads: every job under the sweep folders given, with its row's name,
status and results, and how it was made (`MADE_WITH`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from mtbert.rundir import process_alive

# What a run's numbers depend on beyond its row's config: runs of one row must agree on them.
MADE_WITH = ("selected on", "precision", "device", "code")
UNKNOWN = "unknown"  # a run from before results.json recorded it


@dataclass
class Job:
    path: Path
    experiment: str | None
    overrides: list[str]  # the job's command-line overrides, seed and experiment aside
    seed: int
    status: str  # completed | failed | interrupted | missing (no results.json)
    results: dict = field(default_factory=dict)
    trained: list[str] | None = None  # `sampler.tasks` (None: every declared task)
    row: str = ""

    @property
    def dev(self) -> dict:
        return self.results.get("dev") or {}

    @property
    def made_with(self) -> dict[str, str]:
        """Each of MADE_WITH as one comparable string. Runs from before `selected_on` chose
        on dev; before `provenance`, only the top-level precision and device kind are known."""
        r = self.results
        p = r.get("provenance") or {}
        return {"selected on": r.get("selected_on") or "dev",
                "precision": p.get("precision") or r.get("precision") or UNKNOWN,
                "device": device_name(p.get("device"), r.get("device")), "code": code_name(p.get("code"))}



def device_name(device: dict | None, kind: str | None = None) -> str:
    """`Intel Xeon ... (AVX512)` or `NVIDIA H100 ... (capability 9.0)`: what decides the arithmetic."""
    if not device:
        return f"{kind} ({UNKNOWN} model)" if kind else UNKNOWN
    detail = device.get("isa") or (f"capability {device['capability']}" if device.get("capability") else None)
    return (device.get("name") or device.get("type") or UNKNOWN) + (f" ({detail})" if detail else "")


def code_name(code: dict | None) -> str:
    """The commit's short hash, `+dirty` with uncommitted changes; the package version without a checkout."""
    if not code:
        return UNKNOWN
    if not code.get("commit"):
        return f"mtbert {code.get('version') or UNKNOWN} (no git checkout)"
    return code["commit"][:10] + ("+dirty" if code.get("dirty") else "")


def find_jobs(folders: list[Path]) -> list[Job]:
    jobs = []
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder")
        for config in sorted(folder.rglob(".hydra/config.yaml")):
            jobs.append(read_job(config.parent.parent))
    if not jobs:
        raise FileNotFoundError(f"no jobs (folders with .hydra/config.yaml) under {folders}")
    common = set.intersection(*(set(j.overrides) for j in jobs))
    for job in jobs:  # a row is named by its experiment and the overrides that tell it apart
        own = [o for o in job.overrides if o not in common]
        job.row = " ".join(([job.experiment] if job.experiment else []) + own) or "default"
    short = {job.row: " ".join(map(short_number, job.row.split(" "))) for job in jobs}
    if len(set(short.values())) == len(short):  # the short names still tell the rows apart
        for job in jobs:
            job.row = short[job.row]
    return jobs


def short_number(override: str) -> str:
    """`lr=0.0009079068091925258` (a tuned value) as `lr=0.000908`: a row's name, not its record."""
    key, _, value = override.partition("=")
    try:
        number = float(value)
    except ValueError:
        return override
    return f"{key}={number:.3g}" if len(value) > 8 and not value.lstrip("-").isdigit() else override


def read_job(path: Path) -> Job:
    cfg = OmegaConf.load(path / ".hydra" / "config.yaml")
    hydra = OmegaConf.load(path / ".hydra" / "hydra.yaml").hydra
    experiment = hydra.runtime.choices.get("experiment")
    overrides = [o for o in hydra.overrides.task if not o.startswith(("seed=", "experiment="))]
    trained = OmegaConf.select(cfg, "sampler.tasks")
    trained = list(trained) if trained is not None else None
    results_file = path / "results.json"
    if not results_file.is_file():
        return Job(path, experiment, overrides, cfg.seed, "missing", trained=trained)
    results = json.loads(results_file.read_text())
    return Job(path, experiment, overrides, results.get("seed", cfg.seed), results["status"], results,
               trained)



def running_note(process: dict | None) -> str:
    """A `running` run: live, dead (killed without a record: rerun the sweep to resume it), or
    on another host, with its last sign of life."""
    alive = process_alive(process)
    if alive is False:
        return f"running, but its process (pid {process['pid']}) is gone: killed; rerun its sweep to resume it"
    if alive:
        return f"running (pid {process['pid']})"
    if process:
        return f"running on {process['host']} (last update {datetime.fromtimestamp(process['updated']):%Y-%m-%d %H:%M})"
    return "running (no process recorded: an older run, or killed)"
