"""One training step's memory with the tasks' graphs all alive (one backward of the summed
loss) and one at a time (`GradientMethod.collect_by_task`, the default step's), on the
longest examples of each task: the worst step an epoch can meet.

    python experiments/bench/one_graph.py summed|by_task [OVERRIDES...]

Run each mode in a fresh process (the resident set's high-water mark is per process). It
prints, per repetition, the resident set before the step, its peak during the step (VmHWM,
reset first) and the peak of the bytes autograd held for the backward at once (counted
through `torch.autograd.graph.saved_tensors_hooks`). No optimizer step: AdamW's moments
(0.18 GB for MiniLM) come on top of both.
"""

from __future__ import annotations

import ctypes
import gc
import re
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from mtbert.batching import collate
from mtbert.build import Setup
from mtbert.device import autocast
from mtbert.gradients import Sum
from mtbert.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]


def high_water_mib() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) // 1024


def longest(setup: Setup, size: int = 32) -> dict:
    """Each training task's `size` longest examples (a siamese pair counts both sentences)."""
    batches = {}
    for t in setup.train_tasks:
        split = setup.train[t]
        lengths = split.offsets[1:] - split.offsets[:-1]
        if split.pairs:
            lengths = lengths[: len(lengths) // 2] + lengths[len(lengths) // 2:]
        batches[t] = collate(split, torch.argsort(lengths, descending=True)[:size], setup.tokenizer.pad_token_id)
    return batches


def main():
    mode, overrides = sys.argv[1], sys.argv[2:]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["logger=none", "data.limit.dev=64", *overrides])
    s = Setup(cfg, RunDir(Path(f"one_graph_{mode}")))
    s.model.train()
    batches = longest(s)
    print(" ".join(f"{t} {tuple(b.input_ids.shape)}" for t, b in batches.items()))
    shared = s.model.shared_parameters()
    heads = [p for own in s.model.task_parameters().values() for p in own]

    def each_task():
        for t, batch in batches.items():
            with autocast(s.device, s.precision):
                output = s.model(t, batch)
            yield {t: s.objectives[t].loss(output, batch.labels, s.tasks[t])}

    alive, peak = [0], [0]

    class Held:
        def __init__(self, tensor):
            self.tensor = tensor
            self.bytes = 0 if isinstance(tensor, torch.nn.Parameter) else tensor.untyped_storage().nbytes()
            alive[0] += self.bytes
            peak[0] = max(peak[0], alive[0])

        def __del__(self):
            alive[0] -= self.bytes

    for rep in range(3):
        s.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        before, peak[0] = high_water_mib(), 0
        with torch.autograd.graph.saved_tensors_hooks(Held, lambda held: held.tensor):
            if mode == "summed":
                Sum().collect({t: loss for one in each_task() for t, loss in one.items()}, shared, heads)
            else:
                Sum().collect_by_task(each_task(), list(batches), shared, heads)
        print(f"{mode} {rep}: resident {before} MiB before the step, {high_water_mib()} MiB at its peak; "
              f"held for the backward at once: {peak[0] / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
