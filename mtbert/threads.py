"""How torch's CPU threads wait, chosen before torch loads (`mtbert/__init__.py`).

Between parallel regions OpenMP's threads spin, ready for the next one. On an idle
machine that is the fastest; on a machine busy with other processes they spin against
them and every region waits for a thread that lost its core: a MiniLM step ran 4-5x
slower with 3 competing processes on 2 cores, 2.0-2.4x with passive waiting (sleeping).
Passive waiting costs 5-30% on an idle machine, though (`python -m mtbert.bench.load`,
experiments/bench/load-minilm-cpu.md). So mtbert looks once, as it starts: if other processes keep
the cores busy, OMP_WAIT_POLICY=PASSIVE; else torch's default. The policy changes speed
only, never a number. A user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
"""

from __future__ import annotations

import os
import time

BUSY_CORES = 0.5  # other processes' use of the machine, in cores, above which threads wait passively


def busy_cores(seconds: float = 0.05) -> float | None:
    """Cores kept busy over a short look at /proc/stat (None where there is none). This
    process sleeps meanwhile, so what it sees is the other processes' work."""
    def sample():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 == total0:
        return 0.0
    return (busy1 - busy0) / (total1 - total0) * (os.cpu_count() or 1)


def choose_wait_policy(environ=os.environ) -> str | None:
    """Set OMP_WAIT_POLICY=PASSIVE when the machine is busy; returns what it set, if anything."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return None
    busy = busy_cores()
    if busy is None or busy < BUSY_CORES:
        return None
    environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "PASSIVE"
