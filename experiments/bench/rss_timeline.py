"""Run a command under /usr/bin/time -v and sample its process's VmRSS from outside (issue 36).

    python experiments/bench/rss_timeline.py OUT_PREFIX -- COMMAND...

Writes OUT_PREFIX.time (time -v's report: the maximum resident set size), OUT_PREFIX.tsv
(seconds, VmRSS KiB, VmHWM KiB every 0.5 s) and OUT_PREFIX.log (the command's output),
so that the peak is the kernel's and the timeline says which phase reached it. The
command itself is left as it is: nothing inside it is patched or reset.
"""

import subprocess
import sys
import time
from pathlib import Path


def status(pid: int) -> tuple[int, int] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    if "VmRSS" not in fields:  # exited, not yet reaped
        return None
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def main():
    prefix, command = Path(sys.argv[1]), sys.argv[sys.argv.index("--") + 1:]
    with open(f"{prefix}.log", "w") as log:
        proc = subprocess.Popen(["/usr/bin/time", "-v", "-o", f"{prefix}.time", *command],
                                stdout=log, stderr=subprocess.STDOUT)
        start, child = time.time(), None
        with open(f"{prefix}.tsv", "w") as tsv:
            tsv.write("seconds\tvmrss_kib\tvmhwm_kib\n")
            while proc.poll() is None:
                if child is None:
                    kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
                    found = kids.read_text().split() if kids.exists() else []
                    child = int(found[0]) if found else None
                s = status(child) if child else None
                if s:
                    tsv.write(f"{time.time() - start:.1f}\t{s[0]}\t{s[1]}\n")
                    tsv.flush()
                time.sleep(0.5)
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
