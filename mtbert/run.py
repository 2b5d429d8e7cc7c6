"""One Hydra job: train, and write results.json whatever happens (completed, failed,
interrupted), so a sweep never loses track of a job."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mtbert.evaluate import format_table
from mtbert.rundir import RunDir
from mtbert.trainer import train

log = logging.getLogger(__name__)


def main(cfg: DictConfig) -> dict:
    hydra = HydraConfig.get()
    run = RunDir(hydra.runtime.output_dir)
    results = {"status": "failed", "experiment": hydra.runtime.choices.get("experiment"),
               "seed": cfg.seed, "dev": None, "best_epoch": None, "steps": 0,
               "examples_seen": {}, "train_seconds": 0.0, "error": None}
    start = time.perf_counter()
    try:
        results.update(train(cfg, run), status="completed")
    except KeyboardInterrupt:
        results.update(status="interrupted", error="interrupted (SIGINT)")
        raise
    except Exception as e:
        results["error"] = f"{type(e).__name__}: {e}"
        if hydra.mode != RunMode.MULTIRUN:
            raise
        log.exception("job failed; the sweep goes on (see %s/results.json)", run.path)
    finally:
        if not results["train_seconds"]:
            results["train_seconds"] = time.perf_counter() - start
        run.write_results(results)
        run.close()
    print(format_table(results["dev"]))
    print(f"run directory: {Path(run.path).resolve()}")
    return results
