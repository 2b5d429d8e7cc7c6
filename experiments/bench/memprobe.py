"""Peak resident memory (RSS) of a `train.py` run, phase by phase (issue 36).

    python experiments/bench/memprobe.py [--out FILE.json] [--saved] -- OVERRIDES...

Runs `train.py OVERRIDES` in this process with the phases of a run wrapped: imports,
setup (model load, data), training steps, evaluations (each task's predictions), the
dev report, checkpoint saves. At every entry to and exit from a phase it reads the
kernel's high-water mark (VmHWM) and resets it (`/proc/self/clear_refs` 5), so each
phase's peak is exact, not sampled, and the run's peak is the largest of them. (The reset
also resets what `/usr/bin/time -v` reports: take the run's peak from this report.)

`--saved` counts the bytes autograd keeps for backward in each training step (the
activations), through `torch.autograd.graph.saved_tensors_hooks`. Nothing here changes a
number.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def status() -> dict[str, int]:
    """VmRSS and VmHWM in KiB."""
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) for k in ("VmRSS", "VmHWM")}


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def heap() -> dict[str, int] | None:
    """glibc's own account (mallinfo2, KiB): in use from the heap, free but held, mmapped chunks."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _Mallinfo2
    m = mallinfo2()
    return {"in_use": m.uordblks // 1024, "free_held": m.fordblks // 1024, "mmapped": m.hblkhd // 1024}


class Phases:
    """Exact per-phase peaks from the kernel's high-water mark, reset at each transition."""

    def __init__(self):
        self.stack: list[str] = []
        self.peak: dict[str, int] = {}  # phase -> peak RSS (KiB) while it was on the stack
        self.calls: dict[str, int] = {}
        self.enter_rss: dict[str, int] = {}  # phase -> RSS at its first entry
        self.exit_rss: dict[str, int] = {}  # phase -> RSS at its last exit
        self.overall = 0
        self.timeline: list[tuple] = []  # (s, event, phase, rss, hwm, glibc's heap account), KiB
        self.t0 = time.perf_counter()

    def _flush(self, event: str, phase: str) -> int:
        s = status()
        hwm = s["VmHWM"]
        self.overall = max(self.overall, hwm)
        for p in self.stack or ["(outside any phase)"]:
            self.peak[p] = max(self.peak.get(p, 0), hwm)
        self.timeline.append((round(time.perf_counter() - self.t0, 2), event, phase, s["VmRSS"], hwm, heap()))
        Path("/proc/self/clear_refs").write_text("5")
        return s["VmRSS"]

    @contextmanager
    def phase(self, name: str):
        rss = self._flush("enter", name)
        self.enter_rss.setdefault(name, rss)
        self.calls[name] = self.calls.get(name, 0) + 1
        self.stack.append(name)
        try:
            yield
        finally:
            self.exit_rss[name] = self._flush("exit", name)
            self.stack.pop()

    def wrap(self, owner, attr: str, name):
        original = getattr(owner, attr)
        probe = self

        def wrapped(*args, **kwargs):
            label = name(*args, **kwargs) if callable(name) else name
            with probe.phase(label):
                return original(*args, **kwargs)

        wrapped.__wrapped__ = original
        setattr(owner, attr, wrapped)

    def report(self) -> dict:
        self._flush("end", "")
        return {"peak_kib": self.overall,
                "phases": {p: {"peak_kib": self.peak[p], "calls": self.calls.get(p, 0),
                               "rss_at_first_entry_kib": self.enter_rss.get(p),
                               "rss_at_last_exit_kib": self.exit_rss.get(p)} for p in self.peak},
                "timeline": self.timeline}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--saved", action="store_true", help="count the bytes saved for backward per step")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    probe = Phases()

    with probe.phase("imports (torch, transformers, scipy, hydra; wandb with logger=wandb)"):
        import torch
        import transformers  # noqa: F401
        import scipy.stats  # noqa: F401
        import mtbert.run  # noqa: F401
        from mtbert import build, evaluate, gradients, rundir, trainer
        if not any(o.startswith("logger=none") for o in args.overrides):
            import mtbert.logger  # noqa: F401

    probe.wrap(trainer.Trainer, "__init__", "trainer setup (model, optimizer, data)")
    probe.wrap(build, "build_network", "  model load")
    probe.wrap(build.Setup, "_load_data", "  data (read, tokenize or cache)")
    probe.wrap(trainer.Trainer, "training_step", "training steps")
    probe.wrap(gradients.GradientMethod, "collect_by_task", "  forward and backward, one task after another")
    probe.wrap(gradients.GradientMethod, "apply", "  the gradient method combines")
    probe.wrap(torch.optim.AdamW, "step", "  optimizer step")
    probe.wrap(trainer.Trainer, "evaluate", lambda self, last=False: f"evaluation on {self.selected_on}")
    probe.wrap(trainer.Trainer, "report_dev", "dev report (last and chosen checkpoints)")
    probe.wrap(trainer.Trainer, "save_last", "save last.pt")
    probe.wrap(rundir.RunDir, "save_model", "save best.safetensors")
    probe.wrap(trainer, "load_model_weights", "load best.safetensors")
    probe.wrap(evaluate, "predict", lambda model, task, *a, **k: f"  predict {task.name}")

    saved = []
    if args.saved:
        step = trainer.Trainer.training_step

        def counted(self, batches):
            total = [0]
            seen = set()

            def pack(t):
                key = (t.untyped_storage().data_ptr(), t.dtype)
                if key not in seen and not isinstance(t, torch.nn.Parameter):
                    seen.add(key)
                    total[0] += t.untyped_storage().nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = step(self, batches)
            saved.append(total[0])
            return out

        trainer.Trainer.training_step = counted

    sys.argv = [str(ROOT / "train.py"), *args.overrides]
    os.chdir(ROOT)
    import runpy
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
    out = probe.report()
    out["threads"] = torch.get_num_threads()
    out["overrides"] = args.overrides
    out["env"] = {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "ONEDNN_", "OMP_", "DNNL_"))}
    if saved:
        out["saved_for_backward_bytes"] = {"max": max(saved), "median": sorted(saved)[len(saved) // 2],
                                           "steps": len(saved)}
    width = max(map(len, out["phases"]))
    print(f"\npeak RSS {out['peak_kib'] / 2**20:.2f} GiB ({out['peak_kib'] * 1024 / 1e9:.2f} GB)")
    for p, v in out["phases"].items():
        print(f"{p:<{width}}  peak {v['peak_kib'] / 1024:8.0f} MiB  calls {v['calls']:4d}  "
              f"first entry {(v['rss_at_first_entry_kib'] or 0) / 1024:6.0f}  "
              f"last exit {(v['rss_at_last_exit_kib'] or 0) / 1024:6.0f} MiB")
    if saved:
        print(f"saved for backward per step: max {max(saved) / 2**20:.0f} MiB, median "
              f"{sorted(saved)[len(saved) // 2] / 2**20:.0f} MiB")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
