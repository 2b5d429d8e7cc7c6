"""What a run's numbers depend on beyond its config: the code, the libraries, the machine
and the arithmetic it used (`results.json`'s `provenance`), so a table can say what it
compares and warn when its rows were made differently."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

LIBRARIES = ("torch", "transformers", "torchjd")


def code_version() -> dict:
    """The git commit of the checkout mtbert runs from, and whether it had changes; or the
    installed package's version where there is no checkout."""
    here = Path(__file__).resolve().parent

    def git(*args) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "version": metadata.version("mtbert")}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status), "version": metadata.version("mtbert")}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_record(device: torch.device) -> dict:
    """The device's kind, name and what decides its arithmetic: the ISA torch's CPU kernels
    use, or the GPU's compute capability."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}"}
    return {"type": device.type, "name": cpu_model(), "isa": torch.backends.cpu.get_cpu_capability()}


def provenance(device: torch.device, precision: str, precision_reason: str | None = None) -> dict:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"code": code_version(), "versions": versions, "device": device_record(device),
            "threads": torch.get_num_threads(), "precision": precision, "precision_reason": precision_reason}
