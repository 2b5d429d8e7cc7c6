"""Side-by-side speed benchmark (issue 6): `python -m mtbert.bench [--model minilm ...]`.

One process, one backbone, the same real data, four kinds of work:
  naive   the loop a CS224N starter user writes, kept as the baseline: each batch
          tokenized from strings and padded to its longest, fp32, the tasks one after
          another, each with its own backward; then one AdamW step on their summed loss,
          the paper's update (its Eq. 1) and mtbert's, so that the two differ only in how
          they run it (`--naive-update per_task` steps after every task instead);
  bare    forward, losses, one backward and an AdamW step on batches made before the
          clock starts, nothing else: the floor for framework overhead (a copy of mtbert
          adam's batch streams makes the very same batches);
  mtbert  the project's own `Trainer.next_batches` + `Trainer.training_step`, with
          optim=adam and optim=pcgrad (and on request fp32, unbucketed and `--variant`
          'KEY=VALUE ...' variants, each timed beside the default);
  eval    `mtbert.evaluate.evaluate` over the full dev sets.
With `--train-steps N`, a short real run then trains a fresh mtbert (`Trainer.fit`, as
`python train.py` does) and a fresh naive loop for N steps each, the same examples of
every task, and scores both on the full dev sets; the naive loop is also scored after
as many seconds of training as mtbert took: whether the speed costs accuracy, and what
it buys.
Machines that run this are often shared, so the variants are interleaved, in an order
reversed every other round (A B C C B A ...: whoever runs a batch shape first pays for
building its kernels), for `--rounds` rounds; every figure is a median over rounds, and
every ratio is taken within a round, then its median.

Counting: sentences are encoder input sequences, as the trainer's log counts them (a
siamese pair is two, a cross-encoded pair one); tokens are non-pad tokens. Model FLOPs
are 6 * N * tokens per training step and 2 * N * tokens in evaluation, N the
transformer-layer parameters one task's forward runs (its `sharing` option's: top_layers'
shared layers and the task's copies, lora's base and the task's adapters), less 2 * tokens
per parameter that does not train (lora's frozen base: no weight gradient), plus SMART's
extra forwards and backwards (`step_flops`); embeddings are lookups, pooler, shared layer
(MMoE's experts) and heads act once per sentence, attention scores add about 1% at these
lengths: all left out. Utilisation (MFU) is that rate over the fastest of a few large
matmuls timed here in the same precision.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra.errors import HydraException
from hydra.utils import instantiate

from mtbert.batching import Batch
from mtbert import schema
from mtbert.bench import publish
from mtbert.bench.cli import arguments
from mtbert.data import RejectedRows, read_split
from mtbert.device import autocast, resolve_device, resolve_precision
from mtbert.errors import USER_ERRORS
from mtbert.evaluate import evaluate
from mtbert.memory import release_memory
from mtbert.paper import PAPER_KEYS, label
from mtbert.regularizer import Smart
from mtbert.rundir import RunDir, read_events
from mtbert.build import build_network, param_groups
from mtbert.checks import run_reads
from mtbert.config import row_limit
from mtbert.trainer import Trainer

CONF = Path(__file__).resolve().parents[2] / "conf"
TARGETS = {  # issue 6, CPU with MiniLM
    "speedup_vs_naive": (">=", 2.0),
    "mean_vs_naive": (">=", 0.0),  # dev mean, mtbert minus naive, after the same examples
    "overhead_vs_bare": ("<=", 0.05),
    "pcgrad_vs_adam": ("<=", 1.15),
    "eval_seconds": ("<=", 60.0),
}


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PEAK_SECONDS = 0.25  # a matmul of the peak search longer than this ends it (one fp32 1024-square: 0.1 s on one AVX2 core)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of the fastest of a few large square matmuls: the practical peak. It runs
    in every round, beside the variants, and the best round counts. The size doubles up
    to the cap while a matmul stays short: a CPU without native bf16 multiplies bf16 at
    well under 1 GFLOP/s, and one 2048-square product would take minutes."""
    cap, inner = (8192, 10) if device.type == "cuda" else (2048, 1)
    best, size = 0.0, 256
    while size <= cap:
        a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
        a @ b
        seconds = float("inf")
        for _ in range(3):
            sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                a @ b
            sync(device)
            seconds = min(seconds, time.perf_counter() - start)
        best = max(best, 2 * size**3 * inner / seconds)
        if seconds > PEAK_SECONDS:
            break
        size *= 2
    return best


def layer_params(model, task: str | None = None) -> list[torch.nn.Parameter]:
    """The parameters of N in the FLOPs formula: the transformer layers one task's forward
    runs (the first task's by default), asked of the sharing option, since it is not always
    `model.encoder`: top_layers runs the shared layers then the task's own copies, lora has
    every task's adapters in the encoder but runs the task's alone. Embeddings and pooler
    are left out; every option gives each task's forward as many."""
    task = task or next(iter(model.heads))
    others = {id(p) for t, params in model.task_parameters().items() if t != task for p in params}
    return [p for n, p in model.sharing.encoder(model, task).named_parameters()
            if not n.startswith(("embeddings.", "pooler.")) and id(p) not in others]


def step_flops(runner) -> tuple[int, int]:
    """(N, model FLOPs per token of a training step). A plain step costs 2 FLOPs per
    parameter for the forward, 2 for the input's gradient and 2 for the weight's where the
    parameter trains: 6N with all of it trained, less with a frozen base (lora). SMART does
    more per task and step, and its extra passes are counted: each ascent step a forward and
    a backward to the noise alone (4N), its term a forward and a full backward (4N + 2 per
    trained parameter), the Bregman teacher a forward (2N)."""
    params = layer_params(runner.model)
    n, trained = sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
    flops = 4 * n + 2 * trained
    smart = getattr(runner, "regularizer", None)
    if isinstance(smart, Smart):
        flops += smart.steps * 4 * n + 4 * n + 2 * trained + (2 * n if smart.bregman else 0)
    return n, flops


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator):
    """Example indices as a shuffled DataLoader gives them, pass after pass."""
    while True:
        yield from torch.randperm(n, generator=generator).split(batch_size)


class NaiveLoop:
    """The starter's loop: strings tokenized per batch, fp32, a backward per task, and one
    AdamW step per step ("combined") or per task ("per_task": three updates per step).
    AdamW has mtbert's rates and settings, so only the implementation differs."""

    precision = "fp32"

    def __init__(self, cfg, train_tasks: list[str], device: torch.device, update: str = "combined"):
        self.update = update
        torch.manual_seed(cfg.seed)
        self.tasks, self.objectives, self.encodings, self.model, self.tokenizer = build_network(cfg)
        self.model.to(device).train()
        # mtbert's AdamW settings, in torch's default (foreach) implementation
        self.optimizer = instantiate(cfg.optim.optimizer, fused=False)(param_groups(self.model, cfg.optim.lr,
                                                                                    self.tasks))
        self.train_tasks, self.device, self.max_length = train_tasks, device, cfg.data.max_length
        root = Path(cfg.data.root).expanduser()
        self.splits = {t: read_split(self.tasks[t], root / self.tasks[t].files["train"], RejectedRows(),
                                     labelled=True, limit=row_limit(cfg.data.limit.train, t))
                       for t in train_tasks}
        generator = torch.Generator().manual_seed(cfg.seed)
        self.orders = {t: shuffled_batches(len(self.splits[t]), cfg.data.batch_size, generator)
                       for t in train_tasks}

    def tokenize(self, task: str, index: torch.Tensor) -> Batch:
        split, rows = self.splits[task], index.tolist()
        texts = [[column[i] for i in rows] for column in split.texts]
        if self.encodings[task] == "siamese":
            texts = [texts[0] + texts[1]]
        cross = self.encodings[task] == "cross"
        out = self.tokenizer(*texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt", return_token_type_ids=cross)
        labels = torch.tensor([split.labels[i] for i in rows], dtype=torch.float32)
        return Batch(out["input_ids"], out["attention_mask"], out.get("token_type_ids"), labels, index)

    def step(self) -> list[Batch]:
        batches = []
        for i, t in enumerate(self.train_tasks, 1):
            batch = self.tokenize(t, next(self.orders[t])).to(self.device)
            loss = self.objectives[t].loss(self.model(t, batch), batch.labels, self.tasks[t])
            loss.backward()
            if self.update == "per_task" or i == len(self.train_tasks):
                self.optimizer.step()
                self.optimizer.zero_grad()
            batches.append(batch)
        return batches


class BareStep:
    """The floor: forward, losses, one backward, an AdamW step; batches come ready-made."""

    def __init__(self, cfg, device: torch.device, precision: str, streams: dict):
        torch.manual_seed(cfg.seed)
        self.tasks, self.objectives, _, self.model, _ = build_network(cfg)
        self.model.to(device).train()
        if cfg.trainer.compile:
            self.model.compile_encoder()
        self.optimizer = instantiate(cfg.optim.optimizer)(param_groups(self.model, cfg.optim.lr, self.tasks))
        self.device, self.precision, self.streams = device, precision, streams
        self.ready = []

    def prepare(self, steps: int):
        self.ready = [{t: stream.next().to(self.device) for t, stream in self.streams.items()}
                      for _ in range(steps)]

    def step(self) -> list[Batch]:
        batches = self.ready.pop(0)
        losses = []
        for t, batch in batches.items():
            with autocast(self.device, self.precision):
                output = self.model(t, batch)
            losses.append(self.objectives[t].loss(output, batch.labels, self.tasks[t]))
        sum(losses).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return list(batches.values())


class MtbertStep:
    """The project's step, as `Trainer.fit` runs it: next_batches, then training_step."""

    def __init__(self, cfg, run_dir: Path):
        self.trainer = Trainer(cfg, RunDir(run_dir))
        s = self.trainer.setup
        self.model, self.precision, self.tasks, self.regularizer = s.model, s.precision, s.train_tasks, s.regularizer
        self.model.train()

    def step(self) -> list[Batch]:
        batches = self.trainer.next_batches(self.tasks)
        self.trainer.training_step(batches)
        return list(batches.values())


class Timing:
    """Per-round seconds, sentences and tokens of one variant."""

    def __init__(self, runner):
        self.runner = runner
        self.seconds, self.sentences, self.tokens = [], [], []
        self.working_mb = 0.0  # CUDA: peak above what was allocated before its steps

    def run(self, steps: int, device: torch.device, record: bool = True):
        if hasattr(self.runner, "prepare"):
            self.runner.prepare(steps)
        if device.type == "cuda":
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        batches = [b for _ in range(steps) for b in self.runner.step()]
        sync(device)
        seconds = time.perf_counter() - start
        if device.type == "cuda":
            self.working_mb = max(self.working_mb, (torch.cuda.max_memory_allocated(device) - before) / 2**20)
        if record:  # counted after the clock stops: no host sync inside the timed steps
            self.seconds.append(seconds)
            self.sentences.append(sum(b.num_sequences for b in batches))
            self.tokens.append(int(sum(b.num_tokens for b in batches)))

    def rate(self, i: int) -> float:
        return self.sentences[i] / self.seconds[i]

    def summary(self, steps: int, peak: float) -> dict:
        layer_n, per_token = step_flops(self.runner)
        flops = [per_token * tok / sec for tok, sec in zip(self.tokens, self.seconds)]
        return {
            "precision": self.runner.precision, "layer_params": layer_n, "flops_per_token": per_token,
            "sentences_per_s": statistics.median(self.rate(i) for i in range(len(self.seconds))),
            "tokens_per_s": statistics.median(t / s for t, s in zip(self.tokens, self.seconds)),
            "step_seconds": statistics.median(s / steps for s in self.seconds),
            "mfu": statistics.median(flops) / peak,
            "rounds": {"seconds": self.seconds, "sentences": self.sentences, "tokens": self.tokens},
            **({"working_mb": self.working_mb} if self.working_mb else {}),
        }


def per_round(a: Timing, b: Timing, fn) -> float:
    """Median over rounds of fn(a's round, b's round): a ratio measured side by side."""
    return statistics.median(fn(a, b, i) for i in range(len(a.seconds)))


def machine(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")] if cpuinfo.exists() else []
        name = names[0] if names else platform.processor()
    return {"device": device.type, "name": name, "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average_start": os.getloadavg()[0],
            "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ}}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


MEMORY_MARK = "mtbert-bench-memory: "  # the line a --memory-of child prints its result on


def rss_mb(field: str = "VmRSS") -> float | None:
    """This process's resident set (VmRSS) or its peak so far (VmHWM), from /proc (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak (VmHWM) to the present resident set (Linux: clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_of(args, name: str) -> dict:
    """Peak memory of one variant alone, in the child process the bench starts for it: the
    variant built (`built_alone`), then as many steps as it takes in the bench (warmup, then
    every round); `eval`: mtbert adam's model built and the full dev evaluation. The peak
    (VmHWM) counts from the child's start, so whatever setup allocates counts too: SMART's
    EMA teacher (`regularizer.bregman` > 0), every task's top layers or adapters."""
    device, precision, config = setting(args)
    out = {"start_mb": rss_mb()}
    with tempfile.TemporaryDirectory(prefix="mtbert-bench-memory-") as tmp:
        runner = built_alone(args, name, config, device, precision, Path(tmp), out)
        if runner is not None:
            timing = Timing(runner)
            for steps in (args.warmup, *[args.steps] * args.rounds):
                timing.run(steps, device, record=False)
            out["steps"] = args.warmup + args.rounds * args.steps
        out["peak_mb"] = rss_mb("VmHWM") or peak_memory_mb(torch.device("cpu"))
        if device.type == "cuda":
            out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def built_alone(args, name: str, config, device: torch.device, precision: str, tmp: Path, out: dict):
    """The runner of variant `name`, built as the bench builds it but alone; `eval` is run
    here (no runner). `bare` takes adam's batch streams from a helper that is freed (and the
    peak reset, on Linux: `out["helper_freed"]`) before bare is built."""
    specs = mtbert_variants(args, precision)
    if name == "eval":
        adam = MtbertStep(config("optim=adam"), tmp / "adam")
        s = adam.trainer.setup
        evaluate(s.model, s.dev, s.objectives, device, s.precision, log_every=None)
        return None
    if name == "naive":
        cfg = config("optim=adam")
        return NaiveLoop(cfg, list(cfg.sampler.get("tasks") or cfg.data.tasks), device, args.naive_update)
    if name == "bare":
        helper = MtbertStep(config("optim=adam"), tmp / "adam")
        streams = copy.deepcopy({t: helper.trainer.streams[t] for t in helper.tasks})
        del helper
        gc.collect()
        release_memory()
        out["helper_freed"] = reset_peak_rss()  # False: the peak includes the helper's
        return BareStep(config("optim=adam"), device, precision, streams)
    if name in specs:
        overrides, folder = specs[name]
        return MtbertStep(config(*overrides), tmp / folder)
    raise ValueError(f"no variant {name!r}; the variants: {variant_names(args, precision)} and eval")


def memory_per_variant(args, names: list[str]) -> dict:
    """Each variant's peak memory measured alone, one child process each (`--memory-of`):
    in the bench's own process every variant is loaded at once. A child that fails is
    recorded with its last error line, and the bench goes on."""
    out = {}
    for name in names:
        print(f"memory: {name} in its own process", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", "mtbert.bench", *args.argv, "--memory-of", name],
                              capture_output=True, text=True)
        line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith(MEMORY_MARK)), None)
        if proc.returncode == 0 and line:
            out[name] = json.loads(line[len(MEMORY_MARK):])
        else:
            out[name] = {"error": (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]}
    return out


def setting(args) -> tuple[torch.device, str, object]:
    """The bench's device, precision and config (`configurer`), alike in the bench and in each
    `--memory-of` child; `--threads` set first."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)[0]
    return device, precision, configurer(args, device, precision)


def configurer(args, device: torch.device, precision: str):
    """The bench's config for a list of overrides, its keys checked against the options
    chosen, as train.py does (mtbert.schema)."""
    base = [f"model={args.model}", f"data.batch_size={args.batch_size}", f"trainer.device={device.type}",
            "logger=none", *(["trainer.compile=true"] if args.compile else []), *args.override]
    return lambda *overrides: schema.compose([*base, f"trainer.precision={precision}", *overrides], CONF)


def mtbert_variants(args, precision: str) -> dict[str, tuple[tuple[str, ...], str]]:
    """The mtbert variants beside `mtbert adam`: name -> (config overrides, run folder), in
    the order they run within a round (naive and bare are built apart)."""
    other = "fp32" if precision == "bf16" else "bf16"
    out = {"mtbert adam": (("optim=adam",), "adam"), "mtbert pcgrad": (("optim=pcgrad",), "pcgrad")}
    if args.compare_precision:
        out[f"mtbert adam {other}"] = (("optim=adam", f"trainer.precision={other}"), other)
    if args.compare_bucketing:
        out["mtbert adam unbucketed"] = (("optim=adam", "trainer.bucket_batches=1"), "unbucketed")
    for i, override in enumerate(args.variant):
        out[f"mtbert adam {override}"] = (("optim=adam", *override.split()), f"variant{i}")
    return out


def variant_names(args, precision: str) -> list[str]:
    """Every timed variant, in the order they run within a round."""
    mtbert = list(mtbert_variants(args, precision))
    return ["naive", "mtbert adam", "bare", *mtbert[1:]]


def run(args) -> dict:
    """The bench: each variant's memory alone first (`--memory`), then every variant built
    and timed in interleaved rounds, the ratios, the dev evaluation and the short run."""
    device, precision, config = setting(args)
    info = machine(device)
    for override in args.variant:  # a variant's bad key stops the bench before any process starts
        config("optim=adam", *override.split())
    run_reads(config("optim=adam"))  # as does a bad option or data folder
    memory = None
    if args.memory:  # before this process loads its variants, so that the two never add up
        memory = memory_per_variant(args, variant_names(args, precision) + (["eval"] if args.eval else []))
    with tempfile.TemporaryDirectory(prefix="mtbert-bench-") as tmp:
        variants = built_variants(args, config, device, precision, Path(tmp))
        adam = variants["mtbert adam"].runner
        layer_n = sum(p.numel() for p in layer_params(adam.model))  # eval's N: mtbert adam's
        peaks = timed_rounds(args, variants, device, precision)
        result = {"machine": info, "command": "python -m mtbert.bench " + " ".join(args.argv),
                  "settings": {"model": args.model, "precision": precision, "batch_size": args.batch_size,
                               "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
                               "compile": args.compile, "tasks": adam.tasks, "overrides": args.override,
                               "naive_update": args.naive_update},
                  "layer_params": layer_n, "matmul_peak_flops": peaks,
                  "variants": {n: v.summary(args.steps, peaks[v.runner.precision])
                               for n, v in variants.items()}}
        result["ratios"] = ratios(variants, precision, "fp32" if precision == "bf16" else "bf16", args.variant)
        if args.eval:
            result["eval"] = run_eval(adam, device, layer_n, peaks[precision])
        if args.train_steps:
            variants.clear()  # free the timed models first
            del adam
            result["short_run"] = short_run(config, args.train_steps, device, Path(tmp) / "short",
                                            args.naive_update)
        info["load_average_end"] = os.getloadavg()[0]
        result["peak_memory_mb"] = peak_memory_mb(device)
        if memory is not None:
            result["memory_per_variant"] = memory
        result["targets"] = targets(result)
    return result


def built_variants(args, config, device: torch.device, precision: str, tmp: Path) -> dict[str, Timing]:
    """Every variant's runner, built in this process, each in its Timing, in the order they
    run within a round; mtbert adam first, whose batch streams bare copies (same batches)."""
    specs = mtbert_variants(args, precision)
    adam = MtbertStep(config("optim=adam"), tmp / "adam")
    streams = copy.deepcopy({t: adam.trainer.streams[t] for t in adam.tasks})  # same batches as adam
    variants = {}
    for name in variant_names(args, precision):
        if name == "naive":
            runner = NaiveLoop(config("optim=adam"), adam.tasks, device, args.naive_update)
        elif name == "bare":
            runner = BareStep(config("optim=adam"), device, precision, streams)
        elif name == "mtbert adam":
            runner = adam
        else:
            overrides, folder = specs[name]
            runner = MtbertStep(config(*overrides), tmp / folder)
        variants[name] = Timing(runner)
    return variants


def timed_rounds(args, variants: dict[str, Timing], device: torch.device, precision: str) -> dict[str, float]:
    """A warmup round, then `--rounds` timed ones, the variants' order reversed every other
    round, each with the matmul peak of the precisions they run in; the best peak of each."""
    used = {precision, *(v.runner.precision for v in variants.values())}
    peaks = {p: 0.0 for p in DTYPES if p in used}  # a peak only where a variant needs it
    for r in range(args.rounds + 1):  # round 0 is the warmup
        for p in peaks:
            peaks[p] = max(peaks[p], matmul_peak(device, DTYPES[p]))
        for v in list(variants.values())[::-1 if r % 2 else 1]:
            v.run(args.warmup if r == 0 else args.steps, device, record=r > 0)
        if r:
            rates = ", ".join(f"{n} {v.rate(r - 1):.1f} sent/s" for n, v in variants.items())
            print(f"round {r}/{args.rounds}: {rates}", file=sys.stderr, flush=True)
    return peaks


def ratios(v: dict[str, Timing], precision: str, other: str, overrides: list[str]) -> dict:
    """The issue's comparisons; each from rounds run side by side."""
    out = {
        "speedup_vs_naive": per_round(v["mtbert adam"], v["naive"], lambda a, b, i: a.rate(i) / b.rate(i)),
        "overhead_vs_bare": per_round(v["mtbert adam"], v["bare"],
                                      lambda a, b, i: a.seconds[i] / b.seconds[i] - 1),
    }
    if "mtbert pcgrad" in v:  # same batches as adam (same seed), so step time compares directly
        out["pcgrad_vs_adam"] = per_round(v["mtbert pcgrad"], v["mtbert adam"],
                                          lambda a, b, i: a.seconds[i] / b.seconds[i])
    if f"mtbert adam {other}" in v:
        bf16, fp32 = ((v["mtbert adam"], v[f"mtbert adam {other}"]) if precision == "bf16"
                      else (v[f"mtbert adam {other}"], v["mtbert adam"]))
        out["bf16_speedup"] = per_round(bf16, fp32, lambda a, b, i: a.rate(i) / b.rate(i))
    if "mtbert adam unbucketed" in v:
        out["bucketing_speedup"] = per_round(v["mtbert adam"], v["mtbert adam unbucketed"],
                                             lambda a, b, i: a.rate(i) / b.rate(i))
    for override in overrides:  # what the default gains over that setting
        out[f"speedup_vs {override}"] = per_round(v["mtbert adam"], v[f"mtbert adam {override}"],
                                                  lambda a, b, i: a.rate(i) / b.rate(i))
    return out


def run_eval(adam: MtbertStep, device, layer_n: int, peak: float) -> dict:
    """Time mtbert's full dev evaluation."""
    s = adam.trainer.setup
    sync(device)
    start = time.perf_counter()
    evaluate(s.model, s.dev, s.objectives, device, s.precision)
    sync(device)
    seconds = time.perf_counter() - start
    tokens = sum(int(enc.offsets[-1]) for _, enc in s.dev.values())
    return {"seconds": seconds, "examples": {n: len(enc) for n, (_, enc) in s.dev.items()},
            "sentences_per_s": sum(len(enc.offsets) - 1 for _, enc in s.dev.values()) / seconds,
            "tokens_per_s": tokens / seconds, "mfu": 2 * layer_n * tokens / seconds / peak}


def short_run(config, steps: int, device: torch.device, run_dir: Path, naive_update: str) -> dict:
    """mtbert's `Trainer.fit` and the naive loop, each from the same initial weights for
    `steps` steps (one batch of every task per step), scored by the same evaluation (in
    mtbert's precision: the scores are of the weights). Training seconds leave out
    evaluation; the naive loop is also scored once it has trained as long as mtbert."""
    trainer = Trainer(config("optim=adam", f"trainer.max_steps={steps}", "trainer.evals_per_epoch=1"),
                      RunDir(run_dir))
    s = trainer.setup
    print(f"short run: mtbert, {steps} steps", file=sys.stderr, flush=True)
    start = time.perf_counter()
    fit = trainer.fit()
    mtbert_seconds = time.perf_counter() - start - sum(e["eval_seconds"] for e in read_events(run_dir, "eval"))
    out = {"steps": steps, "mtbert": {"steps": steps, "train_seconds": mtbert_seconds,
                                      "sentences_per_s": trainer.sentences / mtbert_seconds, "dev": fit["dev"]}}

    naive = NaiveLoop(config("optim=adam"), s.train_tasks, device, naive_update)
    seconds = sentences = 0.0
    for step in range(1, steps + 1):
        sync(device)
        tick = time.perf_counter()
        sentences += sum(b.num_sequences for b in naive.step())
        sync(device)
        seconds += time.perf_counter() - tick
        scored = {"steps": step, "train_seconds": seconds, "sentences_per_s": sentences / seconds}
        if "naive, mtbert's time" not in out and (seconds >= mtbert_seconds or step == steps):
            out["naive, mtbert's time"] = {**scored, "dev": evaluate(naive.model, s.dev, naive.objectives,
                                                                      device, s.precision)}
        if step % max(1, steps // 10) == 0:
            print(f"short run: naive, step {step}/{steps}, {seconds:.0f} s", file=sys.stderr, flush=True)
    out["naive"] = {**scored, "dev": evaluate(naive.model, s.dev, naive.objectives, device, s.precision)}
    means = out["mtbert"]["dev"]["mean"], out["naive"]["dev"]["mean"]
    out["mean_vs_naive"] = None if None in means else means[0] - means[1]  # None: a constant STS prediction
    return out


def target_values(result: dict) -> dict:
    values = dict(result["ratios"])
    if "eval" in result:
        values["eval_seconds"] = result["eval"]["seconds"]
    if "short_run" in result:
        values["mean_vs_naive"] = result["short_run"]["mean_vs_naive"]
    return values


def targets(result: dict) -> dict:
    values = target_values(result)
    return {k: {"value": values[k], "target": f"{op} {bound}",
                "met": None if values[k] is None else values[k] >= bound if op == ">=" else values[k] <= bound}
            for k, (op, bound) in TARGETS.items() if k in values}


def markdown(r: dict) -> str:
    """The result as the bench's report: how it was measured, the variants' table, the
    ratios against their targets, the short run and each variant's memory where measured."""
    lines = [*header_markdown(r), *variants_markdown(r), *ratios_markdown(r)]
    if "short_run" in r:
        lines += short_run_markdown(r["short_run"])
    if "memory_per_variant" in r:
        lines += memory_markdown(r["memory_per_variant"], r["machine"]["device"] == "cuda")
    lines += ["", f"Peak memory of the bench process (all variants loaded): {r['peak_memory_mb']:,.0f} MiB."]
    return "\n".join(lines) + "\n"


def header_markdown(r: dict) -> list[str]:
    """The title, the command and how the figures were measured and counted."""
    m, s, peaks = r["machine"], r["settings"], r["matmul_peak_flops"]
    env = "".join(f"{k}={v} " for k, v in m["env"].items())
    return [
        f"# mtbert bench: {s['model']}, {m['device']} ({m['name']}), {s['precision']}", "",
        f"`{env}{r['command']}`", "",
        f"torch {m['torch']}, {m['torch_threads']} threads on {m['cpu_cores']} cores; load average "
        f"{m['load_average_start']:.1f} at start, {m['load_average_end']:.1f} at end. Batch "
        f"{s['batch_size']} per task, tasks {'+'.join(s['tasks'])}; {s['rounds']} interleaved rounds "
        f"of {s['steps']} steps after {s['warmup']} warmup step(s); medians over rounds. The naive "
        f"loop's AdamW update: {s['naive_update']}.", "",
        "Matmul peak: " + ", ".join(f"{p} {f / 1e12:.3f} TFLOP/s" for p, f in peaks.items())
        + "; model FLOPs per token of a training step: 6N, N the transformer-layer parameters one "
        "task's forward runs (its sharing option's), less 2 per parameter that does not train "
        "(a frozen base); SMART's extra passes counted (per ascent step 4N, its term 4N + 2 per "
        f"trained parameter, the Bregman teacher 2N); eval 2 * N * tokens, N = {r['layer_params']:,}.", "",
    ]


def variants_markdown(r: dict) -> list[str]:
    """Each variant's speed and utilisation, and the dev evaluation's."""
    lines = ["| variant | precision | N | FLOPs/token | sentences/s | tokens/s | s/step | MFU |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, v in r["variants"].items():
        per_n = v["flops_per_token"] / v["layer_params"]
        lines.append(f"| {name} | {v['precision']} | {v['layer_params']:,} | {per_n:.1f}N | {v['sentences_per_s']:.1f} "
                     f"| {v['tokens_per_s']:.0f} | {v['step_seconds']:.3f} | {v['mfu']:.1%} |")
    if "eval" in r:
        e = r["eval"]
        lines.append(f"| eval (full dev, {sum(e['examples'].values()):,} examples) | {r['settings']['precision']} "
                     f"| {r['layer_params']:,} | 2.0N | {e['sentences_per_s']:.1f} | {e['tokens_per_s']:.0f} "
                     f"| {e['seconds']:.1f} s total | {e['mfu']:.1%} |")
    return lines


def ratios_markdown(r: dict) -> list[str]:
    """The issue's ratios, each beside its target."""
    lines = ["", "| ratio (median of per-round ratios) | value | target | met |", "|---|---:|---|---|"]
    for k, value in target_values(r).items():
        t = r["targets"].get(k, {"target": "", "met": None})
        met = {True: "yes", False: "NO", None: ""}[t["met"]]
        lines.append(f"| {k} | {'n/a' if value is None else f'{value:.3f}'} | {t['target']} | {met} |")
    return lines


def short_run_markdown(short: dict) -> list[str]:
    """The short real run: mtbert and the naive loop, their speed and dev scores."""
    lines = ["", f"Short real run: {short['steps']} steps from the same initial weights; "
             "dev scores of the final weights:", "",
             "| run | steps | training s | sentences/s | " + " | ".join(map(label, PAPER_KEYS)) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(PAPER_KEYS)]
    for name in ("mtbert", "naive", "naive, mtbert's time"):
        v, d = short[name], short[name]["dev"]
        cells = " | ".join("n/a" if d[k] is None else f"{d[k]:.3f}"
                           for k in PAPER_KEYS)
        lines.append(f"| {name} | {v['steps']} | {v['train_seconds']:.0f} | {v['sentences_per_s']:.1f} | {cells} |")
    return lines


def memory_markdown(memory: dict, cuda: bool) -> list[str]:
    """Each variant's peak memory alone, in its own process (and its CUDA peak on a GPU)."""
    lines = ["", "Peak memory of each variant alone, in its own process (built, then its warmup and "
             "timed steps; eval: the model and the full dev evaluation); resident set, MiB:", "",
             "| variant | peak | at start (imports) |" + (" CUDA peak |" if cuda else ""),
             "|---|---:|---:|" + ("---:|" if cuda else "")]
    for name, v in memory.items():
        if "error" in v:
            lines.append(f"| {name} | failed: {v['error']} | |" + (" |" if cuda else ""))
            continue
        start = "n/a" if v["start_mb"] is None else f"{v['start_mb']:,.0f}"
        cell = f" {v['cuda_peak_mb']:,.0f} |" if "cuda_peak_mb" in v else (" |" if cuda else "")
        lines.append(f"| {name} | {v['peak_mb']:,.0f} | {start} |{cell}")
    return lines


def main(argv: list[str] | None = None) -> dict:
    args = arguments().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.memory_of:
        result = memory_of(args, args.memory_of)
        print(MEMORY_MARK + json.dumps(result), flush=True)
        return result
    try:
        result = run(args)
    except (HydraException, schema.UnknownKeyError, *USER_ERRORS) as e:  # a bad option, key or data folder
        sys.exit(f"error: {e}")
    publish(result, markdown(result), args.out)
    return result
