"""`train.py` with rank 1 slowed on purpose (tests only): it starts its loop later and
sleeps a varying while in every step, so that the ranks' clocks disagree on when a log,
a save or the time limit is due."""

import os
import random
import runpy
import sys
import time
from pathlib import Path

import mtbert.trainer

if os.environ.get("RANK") == "1":
    step, fit, jitter = mtbert.trainer.Trainer.training_step, mtbert.trainer.Trainer.fit, random.Random(1)

    def slow_step(self, batches):
        time.sleep(jitter.uniform(0.0, 0.06))
        return step(self, batches)

    def late_fit(self):
        time.sleep(0.7)
        return fit(self)

    mtbert.trainer.Trainer.training_step, mtbert.trainer.Trainer.fit = slow_step, late_fit

train = Path(__file__).resolve().parents[2] / "train.py"
sys.argv[0] = str(train)
runpy.run_path(str(train), run_name="__main__")
