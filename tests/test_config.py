"""Every config composes, and every bad value is reported before training, naming its key."""

from pathlib import Path

import pytest
from hydra.utils import instantiate

from conftest import compose_config
from mtbert.errors import ConfigError, DataError
from mtbert.build import Setup
from mtbert.config import build_objectives, declared_tasks
from mtbert.rundir import RunDir
from mtbert.trainer import Trainer

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


make = compose_config


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_builds(group, option):
    cfg = make(f"{group}={option}")
    tasks = declared_tasks(cfg)
    assert set(tasks) == {"sst", "para", "sts"}
    build_objectives(cfg, tasks)
    instantiate(cfg.sampler)
    instantiate(cfg.schedule)
    instantiate(cfg.optim.gradient, tasks=list(tasks))
    instantiate(cfg.weighting, tasks=list(tasks))


def test_table1_rows_are_experiments():
    rows = {"milestone_baseline", "random_sequential", "rr_under", "rr_over", "rro_hp_cs"}
    assert rows <= set(options("experiment"))
    cfg = make("experiment=rro_hp_cs")
    assert cfg.optim.lr.heads.sst == 9.5e-4 and cfg.schedule.gamma == 0.7
    assert cfg.loss.objectives.sts._target_.endswith("CosineEmbedding")
    assert list(make("experiment=milestone_baseline").sampler.tasks) == ["sst"]


def test_budgets():
    paper = make("budget=paper")
    assert (paper.trainer.epochs, paper.data.batch_size, paper.model.dropout) == (30, 64, 0.3)
    assert make("budget=smoke").trainer.max_seconds is not None


def test_data_root_from_environment(monkeypatch):
    monkeypatch.setenv("MTBERT_DATA_DIR", "/somewhere/else")
    assert make().data.root == "/somewhere/else"
    monkeypatch.delenv("MTBERT_DATA_DIR")
    assert make().data.root == "data"


@pytest.mark.parametrize("override, error, message", [
    ("sampler.tasks=[sst,imdb]", ConfigError, r"sampler.tasks names unknown task\(s\) \['imdb'\]"),
    ("sampler.sigma=0", ConfigError, "^sampler.sigma must be a positive integer or null, got 0$"),
    ("+loss.weights.cfimdb=2", ConfigError, "loss.weights names unknown task"),
    ("optim.lr.heads={sst:1e-3}", ConfigError, r"optim.lr.heads has no learning rate for task\(s\) \['para', 'sts'\]"),
    ("optim.lr.encoder=0", ConfigError, "optim.lr for encoder must be > 0"),
    ("data.bad_rows=drop", ValueError, "data.bad_rows must be 'skip' or 'error'"),
    ("trainer.precision=fp8", ValueError, "trainer.precision must be one of"),
    ("schedule.gamma=1.5", ConfigError, r"^schedule.gamma must lie in \(0, 1\], got 1.5$"),
    ("loss.objectives.sst.class_weights=[1,2]", ConfigError,
     r"^loss.objectives.sst.class_weights has 2 values; task sst has 5 classes$"),
    ("model.pooling=max", ConfigError, "^model.pooling must be one of"),
    ("loss.objectives.sts._target_=mtbert.losses.CrossEntropy", ConfigError,
     "loss.objectives.sts: CrossEntropy needs a classification task"),
    ("~data.tasks.sts.files.dev", ConfigError, "data.tasks.sts.files has no dev file"),
    ("trainer.evals_per_epoch=0", ConfigError, r"trainer.evals_per_epoch must be a whole number >= 1, got 0"),
    ("trainer.evals_per_epoch=null", ConfigError, "trainer.evals_per_epoch must be a whole number >= 1, got None"),
    ("trainer.max_steps=0", ConfigError, "trainer.max_steps must be a whole number >= 1 or null, got 0"),
    ("trainer.on_nonfinite=ignore", ConfigError, "trainer.on_nonfinite must be 'error' or 'skip'"),
    ("loss.weights.sts=inf", ConfigError, r"loss.weights must be finite and >= 0, got \{'sts': inf\}"),
    ("loss.weights.sst=nan", ConfigError, "loss.weights must be finite and >= 0"),
    ("trainer.eval_every_steps=-2", ConfigError, "trainer.eval_every_steps must be a whole number >= 1 or null"),
    ("trainer.eval_tasks=[sst,imdb]", ConfigError, r"trainer.eval_tasks names unknown task\(s\) \['imdb'\]"),
    ("trainer.eval_tasks=[sst]", ConfigError, r"trainer.eval_tasks=\['sst'\] leaves out trained task\(s\) "
     r"\['para', 'sts'\] \(sampler.tasks\).*or set trainer.eval_tasks=null"),
    ("model.pair_encoding.sts=cross", ConfigError,
     r"model.pair_encoding.sts=cross contradicts loss.objectives.sts \(CosineMSE\)"),
])
def test_bad_values_name_their_key(override, error, message, data_dir, tmp_path):
    cfg = make("model=tiny", f"data.root={data_dir}", f"data.cache_dir={tmp_path}/c", override)
    with pytest.raises(error, match=message):
        Trainer(cfg, RunDir(tmp_path / "run"))


def test_missing_data_directory_says_how_to_get_it(tmp_path):
    cfg = make("model=tiny", f"data.root={tmp_path}/nowhere")
    with pytest.raises(DataError, match=r"data.root=.*nowhere is not a directory. Get the CS224N files with "
                       r"`python -m mtbert.data download --to data` .*--source hub.*MTBERT_DATA_DIR"):
        Setup(cfg, RunDir(tmp_path / "run"))


def test_a_task_added_by_override_needs_an_adaptive_target_before_training(data_dir, tmp_path):
    """The README's `+data.tasks.NAME={...}` syntax; the adaptive sampler's missing target is
    a ConfigError in Setup, before the model loads, not a traceback at the first step."""
    added = ("+data.tasks.sst_copy={files: {train: ids-sst-train.csv, dev: ids-sst-dev.csv}, "
             "sentences: [sentence], label: sentiment, classes: 5}")
    cfg = make("model=tiny", f"data.root={data_dir}", "sampler=adaptive", added)
    with pytest.raises(ConfigError, match=r"sampler.targets has no target for task\(s\) \['sst_copy'\]; "
                                          r"add one per trained task, e.g. '\+sampler.targets.sst_copy=0.8'"):
        Setup(cfg, RunDir(tmp_path / "run"))
    cfg = make("model=tiny", f"data.root={data_dir}", f"data.cache_dir={tmp_path}/c", "sampler=adaptive",
               added, "+sampler.targets.sst_copy=0.5", "optim.lr.heads=1e-3")
    assert set(Setup(cfg, RunDir(tmp_path / "run")).train) == {"sst", "para", "sts", "sst_copy"}


def test_help_shows_the_common_commands_and_the_groups():
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, str(CONF.parent / "train.py"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert proc.stdout.startswith("mtbert: multitask fine-tuning")
    assert "python -m mtbert.data download --to data" in proc.stdout
    assert "experiment: milestone_baseline, random_sequential" in proc.stdout
