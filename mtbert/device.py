"""Device and numeric precision: bf16 autocast where the hardware computes it natively."""

from __future__ import annotations

import contextlib
import os

import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when there is a GPU; under torchrun each rank takes GPU LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("trainer.device=cuda but no CUDA device is available; use trainer.device=cpu")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    return device


def native_bf16_cpu() -> str | None:
    """The instructions that compute bf16 on this CPU (AVX512_BF16 or AMX), or None: there
    torch emulates bf16, and it is slower than fp32. Also None where torch's kernels are
    capped below AVX-512 (`ATEN_CPU_CAPABILITY=avx2`): they then emulate bf16 on any CPU."""
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return None
    for name, probe in (("AMX", "_is_amx_tile_supported"), ("AVX512_BF16", "_is_avx512_bf16_supported")):
        if getattr(torch.cpu, probe, lambda: False)():
            return name
    return None


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """The precision and why: 'auto' is bf16 where the hardware computes it natively (CUDA
    compute capability 8.0 or more; a CPU with AVX512_BF16 or AMX), fp16 with loss scaling
    on CUDA 7.x (a T4 or V100, which report bf16 as supported but emulate it), else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"trainer.precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision, f"trainer.precision={precision}"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return "bf16", f"auto: compute capability {major}.{minor} computes bf16 natively"
        if major == 7:
            return "fp16", f"auto: compute capability {major}.{minor} has fp16 tensor cores but no bf16 units"
        return "fp32", f"auto: compute capability {major}.{minor} has neither bf16 units nor fp16 tensor cores"
    if device.type == "cpu":
        if isa := native_bf16_cpu():
            return "bf16", f"auto: the CPU computes bf16 natively ({isa})"
        return "fp32", (f"auto: no native bf16 (AVX512_BF16 or AMX, with torch's kernels at AVX-512; "
                        f"they run at {torch.backends.cpu.get_cpu_capability()})")
    return "fp32", f"auto: the {device.type} has no native bf16"


def autocast(device: torch.device, precision: str):
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()
