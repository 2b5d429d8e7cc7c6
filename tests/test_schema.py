"""A key no file of conf/ declares stops the command, naming it and the nearest declared
keys, before torch loads; the documented extension points stay open (issue 36)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from conftest import ROOT, compose_config
from mtbert.schema import UnknownKeyError, check_keys, declared_keys

CONF = ROOT / "conf"
CHOICES = [f"{group.name}={option.stem}" for group in sorted(CONF.iterdir()) if group.is_dir() and group.name != "hydra"
           for option in sorted(group.glob("*.yaml"))]
HEAVY = ("torch", "transformers", "wandb", "scipy", "optuna")


def check(*overrides: str):
    check_keys(compose_config(*overrides), overrides)


@pytest.mark.parametrize("choice", CHOICES)
def test_every_shipped_option_declares_its_keys(choice):
    check(choice)


# (a typo, with `+`, in each group and in the keys a budget or train.yaml sets; the key it names; what it suggests)
TYPOS = [
    ("+optim.lr.encodr=1e-4", "optim.lr.encodr", "optim.lr.encoder"),
    ("+optim.encoder=1e-4", "optim.encoder", "optim.lr.encoder"),
    ("+data.max_lenght=64", "data.max_lenght", "data.max_length"),
    ("+data.batchsize=16", "data.batchsize", "data.batch_size"),  # set by every budget
    ("+model.dropuot=0.2", "model.dropuot", "model.dropout"),
    ("+model.random_int={hidden_size: 64}", "model.random_int", "model.random_init"),
    ("+sampler.sigmaa=100", "sampler.sigmaa", "sampler.sigma"),
    ("+loss.wieghts.sst=2", "loss.wieghts", "loss.weights"),
    ("+loss.objectives.sts.margn=0.5", "loss.objectives.sts.margn", "loss.objectives.sts.margin"),
    ("+optim.gradient.reduce=mean", "optim.gradient.reduce", "optim.gradient.reduction"),
    ("+weighting.scalarizr={}", "weighting.scalarizr", "weighting.scalarizer"),
    ("+schedule.gama=0.5", "schedule.gama", "schedule.gamma"),
    ("+trainer.max_step=10", "trainer.max_step", "trainer.max_steps"),
    ("+trainer.epoch=3", "trainer.epoch", "trainer.epochs"),  # set by every budget
    ("+diagnostics.grad_evry=5", "diagnostics.grad_evry", "diagnostics.grad_every"),
    ("+logger.projct=x", "logger.projct", "logger.project"),
    ("+sede=1", "sede", "seed"),
    ("schedule.phases=[{train: all, lenght: 1}]", "schedule.phases.0.lenght", "schedule.phases.0.length"),
    ("+optim.gradient.seed=3", "optim.gradient.seed", "seed"),  # build passes the run's seed: this one would be lost
]


@pytest.mark.parametrize("override, key, suggestion", TYPOS, ids=[t[0] for t in TYPOS])
def test_a_key_declared_nowhere_is_refused_with_the_nearest(override, key, suggestion):
    with pytest.raises(UnknownKeyError, match=rf"^unknown config key {key} \(from .*did you mean ([\w.]+ or )*"
                                              rf"{suggestion}( or [\w.]+)*\?\): no file of conf/ declares it"):
        check(override)


@pytest.mark.parametrize("override", ["optim.lr.encodr=1e-4", "sampler.sigmaa=100", "trainer.max_step=10",
                                      "data.batchsize=16", "model.dropuot=0.2", "weighting.lrr=1"])
def test_without_plus_hydra_itself_refuses(override):
    with pytest.raises(ConfigCompositionException, match=rf"Could not override .*\n.*use \+{override}"):
        compose_config(override)


def test_the_message_names_the_key_its_override_and_the_way_out():
    with pytest.raises(UnknownKeyError) as e:
        check("+optim.lr.encodr=1e-4")
    assert str(e.value) == ("unknown config key optim.lr.encodr (from +optim.lr.encodr=1e-4; did you mean "
                            "optim.lr.encoder?): no file of conf/ declares it (Hydra's `+` adds any key, read or not)")
    with pytest.raises(UnknownKeyError, match=r"^unknown config key data.tasks.sst.colour \(from "
                                              r"\+data.tasks.sst.colour=red; data.tasks.sst takes classes, files, id, "
                                              r"label, prediction_header, score_range, sentences\)"):
        check("+data.tasks.sst.colour=red")
    with pytest.raises(UnknownKeyError, match=r"^unknown config keys trainer.max_step \(.*\), sede \(.*\): "
                                              r"no file of conf/ declares them"):
        check("+trainer.max_step=10", "+sede=1")


NEW_TASK = ("+data.tasks.cfimdb={files: {train: ids-cfimdb-train.csv, dev: ids-cfimdb-dev.csv}, "
            "sentences: [sentence], label: sentiment, classes: 2}")


@pytest.mark.parametrize("overrides", [
    (NEW_TASK,),
    (NEW_TASK.replace("classes: 2", "classes: 2, id: qid, prediction_header: Predicted"),),  # a Task field no yaml sets
    (NEW_TASK, "sampler=adaptive", "+sampler.targets.cfimdb=0.9", "+optim.lr.heads.cfimdb=1e-3",
     "+loss.weights.cfimdb=2", "+loss.objectives.cfimdb={_target_: mtbert.losses.CrossEntropy, class_weights: [1, 2]}",
     "+model.pair_encoding.cfimdb=cross", "data.limit.train={cfimdb: 10}", "data.validation={cfimdb: 0.2}"),
    ("experiment=rro_hp_cs", "optim.lr.heads={sst: 1e-3, para: 1e-3, sts: 1e-3}"),
    ("model=tiny", "+model.random_init.hidden_act=gelu", "+model.random_init.model_type=roberta"),  # any transformers key
    ("+model.random_init={model_type: distilbert, dim: 64, n_layers: 2}",),
    ("hpo=paper_rates", "+hpo.space.model.dropout={low: 0.0, high: 0.5}", "+hpo.pruner.n_min_trials=2"),
    ("+optim.optimizer.amsgrad=true", "optim=mgda", "+optim.gradient.aggregator.norm_eps=1e-4"),  # torch/torchjd arguments
    ("weighting=stch", "+weighting.scalarizer.foo=1"),  # torchjd's STCH refuses what it does not take, when built
    ("loss=baseline", "loss.objectives.sst.class_weights=[1,2,1,2,1]"),
    ("budget=smoke", "data.limit.train={sst: 8}"),
    ("hydra.job.chdir=false", "+hydra.job.env_set.FOO=1"),
])
def test_the_extension_points_stay_open(overrides):
    check(*overrides)


def test_a_new_tasks_entry_is_held_to_a_tasks_fields():
    with pytest.raises(UnknownKeyError, match=r"keys data.tasks.cfimdb.files.tset \(from \+data.tasks.cfimdb=\.\.\.; did "
                                              r"you mean data.tasks.cfimdb.files.test\?\), data.tasks.cfimdb.lable \(.*"
                                              r"did you mean data.tasks.cfimdb.label\?\)"):
        check(NEW_TASK.replace("label:", "lable:").replace("}, sentences", ", tset: t.csv}, sentences"))
    with pytest.raises(UnknownKeyError, match=r"loss.objectives.cfimdb.clas_weights .*did you mean "
                                              r"loss.objectives.cfimdb.class_weights\?"):
        check(NEW_TASK, "+loss.objectives.cfimdb={_target_: mtbert.losses.CrossEntropy, clas_weights: [1, 2]}")


@pytest.mark.parametrize("overrides, key, hint", [
    (("experiment=rro_hp_cs", "+optim.lr.heads.sstt=1e-3"), "optim.lr.heads.sstt", "did you mean optim.lr.heads.sst?"),
    (("data.limit.train={sst: 8, paraa: 8}",), "data.limit.train.paraa", "did you mean data.limit.train.para?"),
    (("sampler=adaptive", "+sampler.targets.cfimdb=0.9"), "sampler.targets.cfimdb", "the tasks are sst, para, sts"),
    (("+model.pair_encoding.qqp=cross",), "model.pair_encoding.qqp", "the tasks are sst, para, sts"),
])
def test_a_task_map_entry_of_the_command_line_names_a_task(overrides, key, hint):
    """Entries for a task data.tasks lacks would be ignored (the heads' rate, a row limit),
    so the command line's are refused; a new task's own entries pass (above)."""
    name = key.rpartition(".")[2]
    with pytest.raises(UnknownKeyError, match=rf"^unknown config key {key} \(from [^;]*; no task {name} in data.tasks: "
                                              rf"{re.escape(hint)}\)"):
        check(*overrides)
    check("~data.tasks.sts", "~loss.weights.sts", "~loss.objectives.sts")  # the files' own entries are build's


def test_a_global_package_declares_keys_at_the_root(tmp_path):
    """A `# @package _global_` file (a budget, an experiment) declares the keys it sets where
    they land; a group file, under its group; a defaults list declares nothing."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train.yaml").write_text("{}\n")
    conf = tmp_path / "conf"
    (conf / "fruit").mkdir(parents=True)
    (conf / "train.yaml").write_text("defaults:\n  - _self_\n  - fruit: apple\nseed: 0\n")
    (conf / "fruit" / "apple.yaml").write_text("# An apple.\ncolour: red\n")
    (conf / "budget").mkdir()
    (conf / "budget" / "big.yaml").write_text(
        "# @package _global_\n# Big.\ndefaults:\n  - override /fruit: apple\nfruit:\n  size: 3\ntrainer: {epochs: 2}\n")
    (conf / "where").mkdir()
    (conf / "where" / "there.yaml").write_text("# @package somewhere.else\nkey: 1\n")
    assert declared_keys(conf) - declared_keys(tmp_path / "empty") == {  # less the task maps and a task's fields
        "seed", "fruit", "fruit.colour", "fruit.size", "trainer", "trainer.epochs", "somewhere", "somewhere.else",
        "somewhere.else.key"}


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "MTBERT_DATA_DIR": str(cwd / "data")}
    return subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def imported(stderr: str) -> set[str]:
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def message(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if not line.startswith("import time:")]


@pytest.mark.parametrize("args", [
    ("+optim.lr.encodr=1e-4",),
    ("-m", "+optim.lr.encodr=1e-4", "seed=0,1"),  # refused before the sweep launches
    ("-m", "+optim.lr.encodr=1e-4,2e-4"),  # a swept key: its first job refuses, and the sweep stops
], ids=" ".join)
def test_train_py_refuses_before_torch_loads(args, tmp_path):
    proc = run(*args, cwd=tmp_path)
    lines = message(proc.stderr)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert lines[-1].startswith("error: unknown config key optim.lr.encodr (from +optim.lr.encodr=")
    assert "did you mean optim.lr.encoder?" in lines[-1] and len(lines) == 1, lines
    assert not imported(proc.stderr) & set(HEAVY)
    assert not (tmp_path / "outputs").exists()  # nor a run directory (a swept key's first job has one)


def test_help_and_hydras_own_errors_load_nothing_heavy(tmp_path):
    proc = run("--help", cwd=tmp_path)
    assert proc.returncode == 0 and "experiment: milestone_baseline" in proc.stdout
    assert not imported(proc.stderr) & set(HEAVY)
    proc = run("sampler=rr_ovr", cwd=tmp_path)  # Hydra's own message, several lines
    assert proc.returncode == 1 and "Could not find 'sampler/rr_ovr'" in proc.stderr
    assert not imported(proc.stderr) & set(HEAVY)
