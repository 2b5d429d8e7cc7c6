"""What a resumed run must match to continue exactly: the config it was started with, its
data files' contents and its tokenizer; anything else is refused, naming what changed.
And every rank's random generators, which it restores."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mtbert import distributed
from mtbert.compat import current_terms
from mtbert.errors import ConfigError, DataError

log = logging.getLogger(__name__)

UNCHECKED = ("resume", "data.root", "trainer.keep_last")  # change no number


def check_resumable(state: dict, path: Path, cfg: DictConfig, files: dict, tokenizer_digest: str):
    saved = current_terms(OmegaConf.create(state["config"]))
    changed = sorted(k for k in config_diff(saved, cfg) if k not in UNCHECKED)
    if changed:
        raise ConfigError(f"{path} was written with another config (differs at {changed}); "
                          "resume with the original run's overrides")
    check_same_data(state["data"], files, cfg.data.root)
    if state["tokenizer"] != tokenizer_digest:
        raise ConfigError(f"{path} was trained with another tokenizer than {cfg.model.source} "
                          "gives now (its vocabulary or settings changed): resume with the same one")


def check_same_data(saved: dict, now: dict, root: str):
    """A resumed run trains on the files it started with: same contents (SHA-256), or it
    refuses, naming the files; the same contents in another folder are fine, and logged."""
    changed = []
    for task, splits in saved.items():
        for split, before in splits.items():
            after = now.get(task, {}).get(split)
            if after is None or after["sha256"] != before["sha256"]:
                changed.append(f"{task} {split} was {before['path']} (SHA-256 {before['sha256'][:12]}), now "
                               + (f"{after['path']} ({after['sha256'][:12]})" if after else "not read"))
    if changed:
        raise DataError("the run would resume on other data than it started on: " + "; ".join(changed)
                        + ". Resume with the data it was trained on: python train.py resume=RUN_DIR "
                        "data.root=FOLDER")
    moved = sorted({str(Path(f["path"]).parent) for splits in saved.values() for f in splits.values()}
                   - {str(Path(f["path"]).parent) for splits in now.values() for f in splits.values()})
    if moved:
        log.warning("resuming on the same files (same SHA-256) in another folder: %s, was %s",
                    root, ", ".join(moved))


def config_diff(a: DictConfig, b: DictConfig, prefix: str = "") -> list[str]:
    """Dotted keys whose (unresolved) values differ between two configs."""
    a = OmegaConf.to_container(a) if isinstance(a, DictConfig) else a
    b = OmegaConf.to_container(b) if isinstance(b, DictConfig) else b
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b))
                for k in config_diff(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if a != b else []


def rank_generators() -> dict:
    """Every rank's torch (and CUDA) generator state: each rank draws its own dropout masks."""
    return {"torch": distributed.gather_object(torch.get_rng_state()),
            "cuda": distributed.gather_object(torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])}


def restore_rank_generators(saved: dict):
    torch_rng, cuda_rng = saved["torch"], saved["cuda"]
    if len(torch_rng) != distributed.world_size():
        raise ConfigError(f"the run was saved with {len(torch_rng)} process(es); resume it with as many "
                          f"(now {distributed.world_size()})")
    torch.set_rng_state(torch_rng[distributed.rank()])
    if cuda_rng[distributed.rank()]:
        torch.cuda.set_rng_state_all(cuda_rng[distributed.rank()])
