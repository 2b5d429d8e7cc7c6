"""Hyperparameter search: an Optuna study over any keys of the config, with pruning.

    python -m mtbert.tune hpo=paper_rates experiment=rro_hp_cs budget=equal_steps logger=none

The search space, objective, sampler and pruner are the `hpo` config group
(`conf/hpo/*.yaml`); every other argument is an override of `train.py`'s config, shared by
all trials. Each trial is a normal run directory (`DIR/trials/NNNN/`: results.json,
metrics.jsonl, .hydra/config.yaml) trained in this process; it reports its score on the held-out
validation rows (`data.validation`; never the dev sets, which only report) at every
evaluation, and the pruner may end it there (results.json says `pruned`). The study
lives in `DIR/study.db` (SQLite): the same command again continues it, and several copies
of it (shells, or SLURM array tasks) share it. At the end: `best.yaml` with the best
trial's overrides and the `python train.py` command that reproduces it, `trials.csv`, and
the optimisation history, parameter importances and slice plots as PNG.

Hydra's Optuna sweeper plugin (hydra-optuna-sweeper 1.3) is not used: it pins optuna<3,
and installing it replaces the current Optuna with 2.10 (2021).
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
import warnings
from pathlib import Path

import optuna
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from mtbert import schema
from mtbert.schema import UnknownKeyError

log = logging.getLogger(__name__)
CONF = Path(__file__).resolve().parents[1] / "conf"
KINDS = ("float", "int", "categorical")


class SpaceError(ValueError):
    pass


def compose_config(overrides: list[str]) -> DictConfig:
    """The run's config, its keys checked against the options it chose (mtbert.schema)."""
    return schema.compose(overrides, CONF, job_name="tune")


def suggest(trial: optuna.Trial, key: str, spec: dict):
    kind = spec.get("type", "float")
    if kind == "categorical":
        return trial.suggest_categorical(key, list(spec["choices"]))
    suggest_number = trial.suggest_float if kind == "float" else trial.suggest_int
    return suggest_number(key, spec["low"], spec["high"], log=spec.get("log", False),
                          **({"step": spec["step"]} if spec.get("step") is not None else {}))


def check_space(space: dict, base: list[str]):
    """Every parameter well formed and a key of the config: an error names the first that
    is not, before any trial runs."""
    if not space:
        raise SpaceError("hpo.space is empty: name at least one config key to search")
    for key, spec in space.items():
        where = f"hpo.space.{key}"
        kind = spec.get("type", "float")
        if kind not in KINDS:
            raise SpaceError(f"{where}.type must be one of {KINDS}, got {kind!r}")
        if kind == "categorical":
            if not spec.get("choices"):
                raise SpaceError(f"{where} needs a non-empty `choices` list")
            value = spec["choices"][0]
        else:
            if "low" not in spec or "high" not in spec or not spec["low"] < spec["high"]:
                raise SpaceError(f"{where} needs `low` < `high`, got {spec}")
            if spec.get("log") and spec["low"] <= 0:
                raise SpaceError(f"{where}: a log scale needs `low` > 0, got {spec['low']}")
            value = spec["low"]
        try:
            cfg = compose_config([*base, f"{key}={value}"])
        except (HydraException, UnknownKeyError) as e:
            raise SpaceError(f"{where}: {key} cannot be set in this config ({e})") from None
        if OmegaConf.select(cfg, key) is None and value is not None:
            raise SpaceError(f"{where}: {key} is not a key of the config")


def overrides_of(params: dict) -> list[str]:
    return [f"{key}={'null' if value is None else value}" for key, value in params.items()]


class Objective:
    """One trial: a run of the base config with the trial's values, its score the best
    evaluation's `hpo.metric` (`mean`: the run's own selection score) on the split that
    chooses its checkpoints: the held-out rows, so the dev sets only report."""

    def __init__(self, base: list[str], hpo: DictConfig, trials_dir: Path, sweep: str):
        self.base, self.hpo, self.trials_dir, self.sweep = base, hpo, trials_dir, sweep
        self.seeded = False

    def seed_sampler(self, trial: optuna.Trial):
        """Offset `hpo.sampler.seed` by this process's first trial number. Copies of the command
        sharing the study, or the same command resuming it, would otherwise replay one seed's
        draws and train the same values twice; a fresh study in one process keeps the seed."""
        self.seeded = True
        seed = self.hpo.sampler.get("seed")
        if seed is not None and trial.number:
            trial.study.sampler = instantiate(self.hpo.sampler, seed=seed + trial.number)

    def score(self, metrics: dict) -> float:
        from mtbert.evaluate import selection_score

        if self.hpo.metric == "mean":
            return selection_score(metrics)
        value = metrics.get(self.hpo.metric)
        return float("nan") if value is None else value

    def __call__(self, trial: optuna.Trial) -> float:
        from mtbert.evaluate import format_table  # torch, transformers, W&B: once a trial runs
        from mtbert.job import run_job
        from mtbert.logger import RunIdentity

        if not self.seeded:
            self.seed_sampler(trial)
        params = {key: suggest(trial, key, dict(spec)) for key, spec in self.hpo.space.items()}
        overrides = [*self.base, *overrides_of(params)]
        cfg = compose_config(overrides)
        run_dir = self.trials_dir / f"{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        trial.set_user_attr("overrides", overrides)
        (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
        OmegaConf.save(OmegaConf.create(overrides), run_dir / ".hydra" / "overrides.yaml")

        def report(step: int, metrics: dict) -> bool:
            trial.report(self.score(metrics), step)
            return trial.should_prune()

        # a trial is never resumed (a killed one fails, a new one is drawn): its last.pt always goes
        results = run_job(cfg, run_dir, RunIdentity({}, f"trial {trial.number}: " + " ".join(overrides_of(params)),
                                            self.sweep), on_eval=report, always_drop_last=True,
                          label_interrupts=True, on_failure=lambda e, results: failed(trial, e, results))
        print(format_table(results["dev"]))
        if results["status"] == "pruned":
            raise optuna.TrialPruned(f"pruned at step {results['steps']}")
        return self.score(results[results["selected_on"]])  # the held-out rows, unless data.validation=null


def failed(trial: optuna.Trial, e: BaseException, results: dict) -> bool:
    """A failed trial names its error in the study; the study goes on (Optuna records the
    trial failed), unless the trial was interrupted: then the study stops with it."""
    from mtbert.guards import Interrupted

    trial.set_user_attr("error", results["error"])
    if isinstance(e, Interrupted):
        trial.study.stop()
        raise RuntimeError(results["error"]) from e
    return False


def write_outputs(study: optuna.Study, directory: Path, hpo: DictConfig) -> dict | None:
    """trials.csv, the plots, and best.yaml (None while no trial has completed)."""
    keys = list(hpo.space)
    with open(directory / "trials.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", "state", hpo.metric, *keys, "minutes", "run_dir", "error"])
        for t in study.trials:
            minutes = t.duration.total_seconds() / 60 if t.duration else None
            writer.writerow([t.number, t.state.name, t.value, *(t.params.get(k) for k in keys),
                             minutes, t.user_attrs.get("run_dir"), t.user_attrs.get("error")])
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    plot(study, directory, len(complete))
    if not complete:
        return None
    best = study.best_trial
    record = {"metric": hpo.metric, "direction": hpo.direction, "value": best.value, "trial": best.number,
              "run_dir": best.user_attrs["run_dir"], "params": best.params,
              "overrides": best.user_attrs["overrides"],
              "command": "python train.py " + " ".join(best.user_attrs["overrides"])}
    OmegaConf.save(OmegaConf.create(record), directory / "best.yaml")
    return record


def plot(study: optuna.Study, directory: Path, complete: int):
    from optuna.visualization import matplotlib as vis
    plots = {"history.png": vis.plot_optimization_history, "slices.png": vis.plot_slice}
    if complete >= 2:  # importances compare completed trials
        plots["importances.png"] = vis.plot_param_importances
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's matplotlib plots are "experimental"
        for name, draw in plots.items():
            if not complete:
                break
            axes = draw(study)
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.set_size_inches(max(6.0, 3.5 * len(study.best_trial.params)), 4.5)
            figure.savefig(directory / name, dpi=110, bbox_inches="tight")
            figure.clf()


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    hpo, base = search_of(args.overrides)
    directory = (args.dir or Path("tuning") / hpo.name).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    study = open_study(hpo, directory)
    run_trials(study, Objective(base, hpo, directory / "trials", str(directory)), args.trials or hpo.trials)
    return announce(write_outputs(study, directory, hpo), hpo, directory)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mtbert.tune", description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="train.py overrides; hpo=NAME picks the search space")
    parser.add_argument("--dir", type=Path, help="the study's folder (default tuning/<hpo name>)")
    parser.add_argument("--trials", type=int, help="finished trials to reach, pruned and failed "
                                                  "included (default hpo.trials)")
    return parser.parse_args(argv)


def search_of(overrides: list[str]) -> tuple[DictConfig, list[str]]:
    """The search (`hpo`) and the runs' own overrides, checked before any trial runs: an
    unknown option or key, no search space or a malformed one ends the command, naming it."""
    try:  # an unknown option (Hydra's message says which) or a key the chosen options do not declare
        cfg = compose_config(overrides)
    except (HydraException, UnknownKeyError) as e:
        sys.exit(f"error: {e}")
    if cfg.get("hpo") is None:
        sys.exit("error: name a search space, e.g. hpo=paper_rates (conf/hpo/)")
    hpo = cfg.hpo
    base = [o for o in overrides if o.lstrip("~+").split("=")[0].split(".")[0] != "hpo"]  # the runs' own
    try:
        check_space(OmegaConf.to_container(hpo.space), base)
    except SpaceError as e:
        sys.exit(f"error: {e}")
    return hpo, base


def open_study(hpo: DictConfig, directory: Path) -> optuna.Study:
    """The study in `directory/study.db`, created or continued: the same command again, or
    a copy of it, shares it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(f"sqlite:///{directory / 'study.db'}", heartbeat_interval=60,
                                             grace_period=180)  # a killed trial is marked failed
    return optuna.create_study(study_name=hpo.name, storage=storage, direction=hpo.direction,
                               sampler=instantiate(hpo.sampler), pruner=instantiate(hpo.pruner),
                               load_if_exists=True)


def run_trials(study: optuna.Study, objective: Objective, wanted: int):
    """Trials until `wanted` have finished, pruned and failed ones included, counted over
    every copy of the command that shares the study."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    finished = optuna.study.MaxTrialsCallback(wanted, states=states)  # copies sharing the study stop too
    done = len(study.get_trials(states=states))
    log.info("study %s in %s: %d of %d trials finished", study.study_name, objective.sweep, done, wanted)
    if done < wanted:
        study.optimize(objective, n_trials=wanted - done, callbacks=[finished, progress(wanted, done)],
                       catch=(Exception,))


def announce(best: dict | None, hpo: DictConfig, directory: Path) -> dict | None:
    """The best trial and its command, and the files written; None while no trial has completed."""
    if best is None:
        log.warning("no trial completed; see %s/trials.csv", directory)
        return None
    print(f"best trial {best['trial']}: {hpo.metric} {best['value']:.4f}\n{best['command']}")
    written = [n for n in ("best.yaml", "trials.csv", "history.png", "slices.png", "importances.png")
               if (directory / n).exists()]
    print(f"written to {directory}: {', '.join(written)}")
    return best


def progress(wanted: int, done: int):
    """A line after each trial: how many are done, the best so far, and an ETA."""
    started = time.perf_counter()

    def report(study: optuna.Study, trial: optuna.trial.FrozenTrial):
        finished = [t for t in study.trials if t.state.is_finished()]
        per_trial = (time.perf_counter() - started) / max(len(finished) - done, 1)
        best = study.best_value if any(t.state == optuna.trial.TrialState.COMPLETE for t in finished) else None
        log.info("trial %d %s | %d/%d finished | best %s | ETA %.0f min", trial.number, trial.state.name.lower(),
                 len(finished), wanted, "-" if best is None else f"{best:.4f}",
                 per_trial * max(wanted - len(finished), 0) / 60)
    return report


if __name__ == "__main__":
    main()
