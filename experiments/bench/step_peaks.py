"""Each training step's peak resident memory, with its batches' shapes (issue 36).

    python experiments/bench/step_peaks.py OUT.json -- OVERRIDES...

Runs `train.py OVERRIDES` in this process with `Trainer.training_step` wrapped: before a
step it resets the kernel's high-water mark (`/proc/self/clear_refs` 5), after it reads
VmHWM, so each step's peak is exact, not sampled. OUT.json gets, per step, the resident
set it started from, its peak and each task's batch shape (rows x padded tokens), written
every 20 steps. Nothing here changes a number.
"""

import json
import runpy
import sys
from pathlib import Path

from mtbert import trainer

ROOT = Path(__file__).resolve().parents[2]


def status_mib(field: str) -> int:
    return int(Path("/proc/self/status").read_text().split(f"{field}:")[1].split()[0]) // 1024


def main():
    out, overrides = Path(sys.argv[1]), sys.argv[sys.argv.index("--") + 1:]
    steps, training_step = [], trainer.Trainer.training_step

    def measured(self, batches):
        Path("/proc/self/clear_refs").write_text("5")
        start = status_mib("VmRSS")
        losses = training_step(self, batches)
        steps.append({"step": self.step + 1, "start_mib": start, "peak_mib": status_mib("VmHWM"),
                      "shapes": {t: list(b.input_ids.shape) for t, b in batches.items()}})
        if len(steps) % 20 == 0:
            out.write_text(json.dumps(steps))
        return losses

    trainer.Trainer.training_step = measured
    sys.argv = [str(ROOT / "train.py"), *overrides]
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    finally:
        out.write_text(json.dumps(steps))


if __name__ == "__main__":
    main()
