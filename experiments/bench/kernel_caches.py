"""Do the kernel-cache bounds take effect when mtbert sets them, torch already loaded? (issue 36)

    OMP_NUM_THREADS=1 python experiments/bench/kernel_caches.py [--widths 160]

Starts one fresh process per variant; each multiplies bf16 matrices of as many shapes as
`--widths` (MiniLM's feed-forward layer, forward and backward, a batch of 32 sequences of
each width from 8 up, as dynamic padding makes them) and reports its resident set, then
again after glibc's malloc_trim (the free memory glibc held, which varies from run to
run, handed back: what is left is in use, the kernels included). The
variants: torch's defaults; the bounds in the environment before Python starts; the
bounds set by `import mtbert` after `import torch`; one cache bounded, the other not;
caches of one kernel. oneDNN and
ideep read their capacities when they make their first kernel, so a bound set after
torch loads but before any bf16 matmul counts as if set before start: the two must agree,
and differ from the defaults. RSS only; the seconds printed are not a benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, sys, time
import torch
if sys.argv[1] == "late":
    import mtbert  # sets the bounds, torch already loaded (mtbert.memory)
import ctypes
rss = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
torch.manual_seed(0)
up, down = torch.nn.Linear(384, 1536), torch.nn.Linear(1536, 384)
start, t0 = rss(), time.perf_counter()
for width in range(8, 8 + int(sys.argv[2])):
    x = torch.randn(32 * width, 384, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        y = down(torch.nn.functional.gelu(up(x)))
    y.float().sum().backward()
end = rss()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # what glibc holds free goes back: what remains is in use
keys = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
print(json.dumps({"start_mib": start, "end_mib": end, "held_mib": rss(), "seconds": round(time.perf_counter() - t0, 1),
                  "env": {k: os.environ.get(k) for k in keys}}))
"""

VARIANTS = {  # name -> (how the child sets the bounds, the environment it starts with)
    "torch's defaults (1024 each)": ("none", {}),
    "64 each, in the environment at start": ("none", {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64",
                                                      "LRU_CACHE_CAPACITY": "64"}),
    "64 each, set by `import mtbert` after `import torch`": ("late", {}),
    "oneDNN's 64, ideep's 1024": ("none", {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"}),
    "oneDNN's 1024, ideep's 64": ("none", {"LRU_CACHE_CAPACITY": "64"}),
    "1 each, in the environment at start": ("none", {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1",
                                                     "LRU_CACHE_CAPACITY": "1"}),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, default=160, help="distinct widths (shapes) multiplied")
    args = parser.parse_args()
    base = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
    for name, (mode, env) in VARIANTS.items():
        proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(args.widths)], env={**base, **env},
                              capture_output=True, text=True, check=True)
        r = json.loads(proc.stdout.splitlines()[-1])
        print(f"{name:55s} RSS {r['start_mib']:5d} -> {r['end_mib']:5d} MiB, {r['held_mib']:5d} after malloc_trim"
              f"  ({r['seconds']} s)  {r['env']}",
              flush=True)


if __name__ == "__main__":
    main()
