"""Memory that a run holds without using it: oneDNN's kernel caches and the C allocator's
free pages, bounded or handed back (issue 36; figures in experiments/bench/memory.md).
Neither changes a number: the same kernels compute the same bits, and a trim only returns
pages no tensor holds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

# oneDNN (torch's bf16 matmuls on CPUs) makes a kernel for each shape it multiplies and keeps
# it in two caches, its own and ideep's (torch's wrapper of it), 1024 kernels each by default.
# With dynamic padding nearly every batch brings shapes of its own, so both fill with kernels
# a run may never use again: about 240 MiB each for 160 shapes of MiniLM's feed-forward layer.
# A bound of 64 still lets the layers of a forward or backward share their kernels; a kernel
# evicted is made again when its shape comes back.
KERNEL_CACHES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "64"}


def limit_kernel_caches(environ=os.environ) -> dict[str, str]:
    """Bound the kernel caches the environment leaves unset (a user's own setting wins);
    returns what it set. oneDNN and ideep read these as they make their first kernel, so
    `mtbert/__init__.py` calls this before anything in mtbert computes."""
    chosen = {k: v for k, v in KERNEL_CACHES.items() if k not in environ}
    environ.update(chosen)
    return chosen


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (macOS, musl, Windows: nothing to call)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_memory():
    """Hand the memory the C allocator holds free back to the system (glibc: malloc_trim).

    A training step or an evaluation frees its activations, but glibc keeps much of them
    (its threshold for returning memory rises with the largest block freed), so the next
    would peak on top of memory nothing uses. Costs milliseconds, and the faults of the
    pages when they are used again: 2% of an fp32 step."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def trim_before_backward(layer, args, output):
    """Forward hook of an encoder layer: when the layer recomputes its activations (a wide
    batch under `model.gradient_checkpointing`), glibc's free memory is handed back just
    before the layer's backward. Each layer's recomputation allocates its activations anew,
    and glibc, rather than reuse the blocks the layer above freed, grows its heap: one
    32 x 128-token batch in fp32 added 806 MiB to the resident set where its tensors need
    252, and 351 with this hook (experiments/bench/memory.md). CPU only: a GPU's
    activations are not glibc's."""
    if not (layer.training and layer.gradient_checkpointing):
        return
    hidden = output if hasattr(output, "register_hook") else output[0]  # a tensor, or a tuple or ModelOutput
    if hidden.requires_grad and hidden.device.type == "cpu":
        hidden.register_hook(lambda grad: release_memory())
