"""A key no file of conf/ declares stops the command, naming it and the nearest declared
keys, before torch loads, and so does a key that only an option the run did not choose
declares; the documented extension points stay open (issue 36)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from conftest import ROOT, compose_config
from mtbert.schema import UnknownKeyError, check_keys, compose, declared_keys

CONF = ROOT / "conf"
CHOICES = [f"{group.name}={option.stem}" for group in sorted(CONF.iterdir()) if group.is_dir() and group.name != "hydra"
           for option in sorted(group.glob("*.yaml"))]
HEAVY = ("torch", "transformers", "wandb", "scipy", "optuna")


def check(*overrides: str):
    """As train.py checks: against the options the overrides choose (Hydra's choices)."""
    compose(overrides)


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
    ("loss=baseline", NEW_TASK, "+loss.objectives.cfimdb={_target_: mtbert.losses.CosineEmbedding, margin: 0.5}"),
    ("loss=baseline", "loss.objectives.sst.class_weights=[1,2,1,2,1]"),
    ("budget=smoke", "data.limit.train={sst: 8}"),
    ("hydra.job.chdir=false", "+hydra.job.env_set.FOO=1"),
])
def test_the_extension_points_stay_open(overrides):
    check(*overrides)


# (overrides, the message): a key another option of the group declares, the chosen one not
OTHER_OPTIONS = [
    (("sampler=rr_under", "+sampler.sigma=3"),
     "sampler.sigma (from +sampler.sigma=3) is a key of sampler=rr_over, not of the chosen sampler=rr_under"),
    (("weighting=equal", "+weighting.lr=1e-3"),  # Equal would take lr and ignore it
     "weighting.lr (from +weighting.lr=1e-3) is a key of weighting=gradnorm, imtl_l or uw, "
     "not of the chosen weighting=equal"),
    (("+sampler.targets={sst: 0.5}",),
     "sampler.targets (from +sampler.targets={sst: 0.5}) is a key of sampler=adaptive, "
     "not of the chosen sampler=rr_over"),
    (("optim=pcgrad", "+optim.gradient.aggregator={_target_: torchjd.aggregation.MGDA}"),
     "optim.gradient.aggregator (from +optim.gradient.aggregator=...) is a key of optim=aligned_mtl, cagrad, config, "
     "dualproj, fairgrad, graddrop, gradvac, imtl_g, mgda, nash_mtl or upgrad, not of the chosen optim=pcgrad"),
    (("+hpo.space.model.dropout={low: 0.0, high: 0.5}",),
     "hpo (from +hpo.space.model.dropout={low: 0.0, high: 0.5}) is a key of hpo=paper_rates or schedule, "
     "not of the chosen hpo=null"),
]


@pytest.mark.parametrize("overrides, text", OTHER_OPTIONS, ids=[" ".join(o) for o, _ in OTHER_OPTIONS])
def test_a_key_of_another_option_is_refused_naming_the_chosen_one(overrides, text):
    with pytest.raises(UnknownKeyError) as e:
        check(*overrides)
    assert str(e.value) == text
    check_keys(compose_config(*overrides), overrides, choices=None)  # a caller without Hydra's choices: any option's


def test_both_kinds_in_one_message():
    with pytest.raises(UnknownKeyError) as e:
        check("sampler=rr_under", "+sampler.sigma=3", "+trainer.max_step=10")
    assert re.fullmatch(r"unknown config key trainer.max_step \(.*\): no file of conf/ declares it \(.*\); "
                        r"sampler.sigma \(from \+sampler.sigma=3\) is a key of sampler=rr_over, not of the chosen "
                        r"sampler=rr_under", str(e.value)), str(e.value)


@pytest.mark.parametrize("overrides", [
    ("experiment=rro_hp_cs", "optim.lr.heads.sst=1e-3", "schedule.phases.1.length=10"),  # its keys and its choices'
    ("experiment=rro_hp_cs_gs", "optim.gradient.reduction=mean"),  # an experiment taking in another: pcgrad's keys
    ("experiment=rr_over", "sampler.sigma=3"),  # the sampler the experiment chose
    ("experiment=milestone_baseline", "sampler.tasks=[sst]"),
    ("budget=paper", "model.dropout=0.2"),
    ("model=tiny", "model.dropout=0.2", "model.pooling=cls", "model.pair_encoding.para=siamese"),  # minilm's, taken in
    ("loss=cosine", "loss.weights.sst=2", "loss.objectives.sst.class_weights=[1,2,1,2,1]"),  # baseline's, taken in
    ("optim=mgda", "optim.lr.encoder=1e-5", "optim.optimizer.weight_decay=0.01"),  # adam's, taken in
])
def test_the_chosen_options_declare_their_keys(overrides):
    check(*overrides)


def test_a_selected_global_file_and_a_defaults_chain_declare_their_keys(tmp_path):
    """A key that only a `# @package _global_` option sets is declared where that option is
    chosen; an option's defaults list declares the keys of the configs it takes in."""
    conf = tmp_path / "conf"
    for folder in ("fruit", "budget"):
        (conf / folder).mkdir(parents=True)
    (conf / "train.yaml").write_text("defaults:\n  - _self_\n  - fruit: apple\n  - budget: null\nseed: 0\n")
    (conf / "fruit" / "apple.yaml").write_text("colour: red\n")
    (conf / "fruit" / "pear.yaml").write_text("size: 2\n")
    (conf / "fruit" / "crab.yaml").write_text("defaults:\n  - apple\n  - _self_\nsour: true\n")
    (conf / "budget" / "big.yaml").write_text("# @package _global_\nfruit:\n  size: 3\n")
    assert compose(["budget=big"], conf).fruit == {"colour": "red", "size": 3}
    assert compose(["fruit=crab", "fruit.colour=green"], conf).fruit == {"colour": "green", "sour": True}
    with pytest.raises(UnknownKeyError, match=r"^fruit.size \(from \+fruit.size=3\) is a key of budget=big or "
                                              r"fruit=pear, not of the chosen budget=null or fruit=apple$"):
        compose(["+fruit.size=3"], conf)
    with pytest.raises(UnknownKeyError, match=r"^fruit.colour \(from \+fruit.colour=red\) is a key of fruit=apple or "
                                              r"crab, not of the chosen fruit=pear$"):
        compose(["fruit=pear", "+fruit.colour=red"], conf)


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


@pytest.mark.parametrize("args", [
    ("sampler=rr_under", "+sampler.sigma=3"),
    ("-m", "sampler=rr_over,rr_under", "+sampler.sigma=3"),  # each combination of swept groups, before the sweep
    ("-m", "sampler=rr_under", "+sampler.sigma=3,4"),  # a swept key: the job refuses (run.main, the job's choices)
], ids=" ".join)
def test_train_py_refuses_a_key_of_another_option_before_torch_loads(args, tmp_path):
    proc = run(*args, cwd=tmp_path)
    lines = message(proc.stderr)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert lines == ["error: sampler.sigma (from +sampler.sigma=3) is a key of sampler=rr_over, not of the chosen "
                     "sampler=rr_under"], lines
    assert not imported(proc.stderr) & set(HEAVY)
    assert not (tmp_path / "outputs").exists()
    assert not (tmp_path / "multirun").exists() or "," in args[-1]  # a swept key's job has its directory


def test_help_and_hydras_own_errors_load_nothing_heavy(tmp_path):
    proc = run("--help", cwd=tmp_path)
    assert proc.returncode == 0 and "experiment: milestone_baseline" in proc.stdout
    assert not imported(proc.stderr) & set(HEAVY)
    proc = run("sampler=rr_ovr", cwd=tmp_path)  # Hydra's own message, several lines
    assert proc.returncode == 1 and "Could not find 'sampler/rr_ovr'" in proc.stderr
    assert not imported(proc.stderr) & set(HEAVY)


@pytest.mark.parametrize("module, args, loads", [
    ("mtbert.predict", ("--help",), ()),
    ("mtbert.predict", ("no-such-run",), ()),
    ("mtbert.analyze", ("--help",), ()),
    ("mtbert.analyze", ("no-such-run",), ()),
    ("mtbert.bench", ("--help",), ()),
    ("mtbert.bench", ("--no-such-flag",), ()),
    ("mtbert.report", ("--help",), ("scipy",)),  # its statistics: no model
], ids=lambda value: " ".join(value) if isinstance(value, tuple) else value)
def test_the_tools_answer_help_and_a_wrong_folder_before_torch_loads(module, args, loads, tmp_path):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", module, *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == (0 if args == ("--help",) else 2 if args[0].startswith("--") else 1), proc.stderr[-2000:]
    assert "no-such-run" in proc.stderr or args[0].startswith("--")
    assert imported(proc.stderr) & set(HEAVY) <= set(loads)


def test_the_benches_check_the_configs_they_compose(tmp_path, monkeypatch):
    from mtbert.bench import load, speed

    monkeypatch.setenv("MTBERT_DATA_DIR", str(tmp_path / "none"))
    expected = "error: " + OTHER_OPTIONS[0][1]
    with pytest.raises(SystemExit) as e:  # before any worker starts
        load.main(["--model", "tiny", "--override", "sampler=rr_under", "--override", "+sampler.sigma=3"])
    assert str(e.value) == expected
    with pytest.raises(SystemExit) as e:  # before any model is built (the data folder is missing)
        speed.main(["--model", "tiny", "--device", "cpu", "--variant", "sampler=rr_under +sampler.sigma=3"])
    assert str(e.value) == expected
