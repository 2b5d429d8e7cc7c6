"""The training step on a machine busy with other work: `python -m mtbert.bench.load`.

Torch's CPU threads wait for each other at every parallel region; when other processes
hold the cores, how they wait decides the speed. Each candidate setting (a thread count
and OpenMP's wait policy, fixed when torch loads, so one worker process per setting)
times the same prepared batches of mtbert's training step, with 0, 1 and 3 (`--loads`)
CPU-bound processes competing, all interleaved round by round so that every setting
meets the same machine. Figures are step seconds, medians over rounds; ratios are to
the idle step of the first setting (torch's own default) within each round. mtbert's
default is the policy `mtbert.threads` chooses at each load (asked in the same place, as
a new run would); its target (issue 16): with N competing processes on C cores no more
than about (N + C) / C times that idle time, a fair share of the machine, and at most 3%
slower on an idle one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from hydra.errors import HydraException

from mtbert import schema
from mtbert.bench import publish
from mtbert.threads import choose_wait_policy

# name -> (environment, torch threads or None for torch's choice); the first is the reference
SETTINGS = {
    "spin (torch's default)": ({"GOMP_SPINCOUNT": "300000"}, None),  # libgomp's 3 ms spin, as if unset
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, None),
    "brief spin (GOMP_SPINCOUNT=10000)": ({"GOMP_SPINCOUNT": "10000"}, None),  # about 0.1 ms, then sleep
    "spin, 1 thread": ({"GOMP_SPINCOUNT": "300000"}, 1),
    "passive, 1 thread": ({"OMP_WAIT_POLICY": "PASSIVE"}, 1),
}
CHOICES = {None: "spin (torch's default)", "PASSIVE": "passive"}  # what mtbert.threads chooses -> its row
IDLE_COST = 1.03
BUSY = "while True: pass"
PREFIX = "mtbert-load "  # the worker's protocol lines on stdout; anything else is its log


def worker(args):
    """Build mtbert's step once, prepare `--steps` steps' batches, then time them on request."""
    import tempfile

    import torch
    from mtbert.bench.speed import MtbertStep

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = schema.compose(overrides(args))
    with tempfile.TemporaryDirectory(prefix="mtbert-load-") as tmp:
        step = MtbertStep(cfg, Path(tmp) / "run")
        batches = [step.trainer.next_batches(step.tasks) for _ in range(args.steps)]
        step.trainer.training_step(batches[0])  # warm up: kernels built, optimizer state made
        print(PREFIX + json.dumps({"threads": torch.get_num_threads(), "precision": step.precision}), flush=True)
        for _ in sys.stdin:
            start = time.perf_counter()
            for b in batches:
                step.trainer.training_step(b)
            print(PREFIX + json.dumps(time.perf_counter() - start), flush=True)


def overrides(args) -> list[str]:
    return [f"model={args.model}", "logger=none", f"trainer.precision={args.precision}",
            f"data.batch_size={args.batch_size}", *args.override]


class Worker:
    def __init__(self, name: str, args):
        env, threads = SETTINGS[name]
        clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        command = [sys.executable, "-m", "mtbert.bench.load", "--worker", "--model", args.model,
                   "--precision", args.precision, "--batch-size", str(args.batch_size),
                   "--steps", str(args.steps), *(["--threads", str(threads)] if threads else []),
                   *(f"--override={o}" for o in args.override)]
        self.proc = subprocess.Popen(command, env={**clean, **env}, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.name, self.env = name, env

    def reply(self):
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])
        raise RuntimeError(f"the worker for {self.name!r} ended (exit {self.proc.wait()}); see its log above")

    def time(self) -> float:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self.reply()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def run(args) -> dict:
    cores, load_average = os.cpu_count(), [os.getloadavg()[0]]
    workers = [Worker(name, args) for name in args.settings]
    try:
        info = {w.name: w.reply() for w in workers}  # each built and warmed up, one after another
        seconds = {w.name: {n: [] for n in args.loads} for w in workers}
        chosen = {n: [] for n in args.loads}
        for r in range(args.rounds):
            for n in args.loads:
                busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(n)]
                try:
                    time.sleep(1.0 if n else 0.0)
                    chosen[n].append(choose_wait_policy({}))  # what mtbert would choose, starting now
                    for w in workers[::-1 if r % 2 else 1]:
                        seconds[w.name][n].append(w.time())
                finally:
                    for p in busy:
                        p.kill()
                        p.wait()
            print(f"round {r + 1}/{args.rounds}: " + "; ".join(
                f"{w.name} " + " ".join(f"{seconds[w.name][n][-1] / args.steps:.2f}" for n in args.loads)
                for w in workers) + " s/step at loads " + ",".join(map(str, args.loads)),
                file=sys.stderr, flush=True)
        load_average.append(os.getloadavg()[0])
    finally:
        for w in workers:
            w.close()
    reference = seconds[args.settings[0]][args.loads[0]]
    table = {name: {n: {"step_seconds": statistics.median(s) / args.steps,
                        "vs_idle": statistics.median(x / ref for x, ref in zip(s, reference)),
                        "rounds": s}
                    for n, s in per_load.items()}
             for name, per_load in seconds.items()}
    return {"command": "python -m mtbert.bench.load " + " ".join(args.argv), "cpu_cores": cores,
            "settings": {w.name: {"env": w.env, **info[w.name]} for w in workers},
            "model": args.model, "batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds,
            "load_average": load_average, "seconds": table, "chosen": chosen,
            "targets": targets(table, chosen, cores)}


def targets(table: dict, chosen: dict, cores: int) -> dict:
    """mtbert's default at each load: the row of the policy it chose there (the choice
    most often made over the rounds), against the issue's bounds."""
    out = {}
    for n, choices in chosen.items():
        row = CHOICES[max(set(choices), key=choices.count)]
        if row not in table:
            continue
        bound, value = IDLE_COST if n == 0 else (n + cores) / cores, table[row][n]["vs_idle"]
        out[f"{n} competing"] = {"chosen": row, "value": value, "target": f"<= {bound:.2f}", "met": value <= bound}
    return out


def markdown(r: dict) -> str:
    loads = list(next(iter(r["seconds"].values())))
    lines = [f"# mtbert bench.load: {r['model']}, {r['cpu_cores']} cores", "", f"`{r['command']}`", "",
             f"Batch {r['batch_size']} per task, the same {r['steps']} prepared steps per measurement, "
             f"{r['rounds']} interleaved rounds; load average {r['load_average'][0]:.1f} at start, "
             f"{r['load_average'][1]:.1f} at end. Step seconds (medians), and in brackets the ratio to "
             "the first setting's idle step, within each round.", "",
             "| setting | threads | " + " | ".join(f"{n} competing" for n in loads) + " |",
             "|---|---:|" + "---:|" * len(loads)]
    for name, per_load in r["seconds"].items():
        cells = " | ".join(f"{v['step_seconds']:.2f} ({v['vs_idle']:.2f}x)" for v in per_load.values())
        lines.append(f"| {name} | {r['settings'][name]['threads']} | {cells} |")
    if r["targets"]:
        lines += ["", "mtbert's default: the wait policy `mtbert.threads` chose at each load, and its ratio.", "",
                  "| load | chosen | ratio to idle | target | met |", "|---|---|---:|---|---|"]
        for k, t in r["targets"].items():
            lines.append(f"| {k} | {t['chosen']} | {t['value']:.2f} | {t['target']} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(prog="python -m mtbert.bench.load", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm", help="a conf/model option")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    parser.add_argument("--batch-size", type=int, default=32, help="per task")
    parser.add_argument("--steps", type=int, default=3, help="prepared steps, timed together")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--loads", type=lambda s: [int(n) for n in s.split(",")], default=[0, 1, 3],
                        help="numbers of competing busy processes, comma-separated (first: the idle one)")
    parser.add_argument("--settings", type=lambda s: s.split(";"), default=list(SETTINGS)[:2] + ["spin, 1 thread"],
                        help=f"';'-separated, of {list(SETTINGS)}; the first is the reference")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Hydra override (repeatable)")
    parser.add_argument("--out", action="append", default=[], metavar="PATH", help=".json or .md (repeatable)")
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    unknown = sorted(set(args.settings) - set(SETTINGS))
    if unknown:
        parser.error(f"--settings: unknown {unknown}; choose from {list(SETTINGS)}")
    args.argv = sys.argv[1:] if argv is None else argv
    try:  # a bad option or key stops the bench before any worker starts (mtbert.schema, as train.py)
        schema.compose(overrides(args))
    except (HydraException, schema.UnknownKeyError) as e:
        sys.exit(f"error: {e}")
    result = run(args)
    publish(result, markdown(result), args.out)
    return result


if __name__ == "__main__":
    main()
