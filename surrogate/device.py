"""Device and precision choice, shared by the train and generate stages (each resolves once)."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["resolve_device", "resolve_precision", "cpu_has_native_bf16"]


def resolve_device(name: str, error: type[Exception] = ValueError, local_rank: int = 0) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU raises ``error``.

    Data-parallel ranks on CUDA take GPU ``local_rank``.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise error("device is 'cuda' but torch sees no CUDA device (use device: auto or cpu)")
        return torch.device("cuda", local_rank)
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """AMX / AVX512-BF16 run bf16 matrix products natively; elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on CUDA with bf16 support and on CPUs with native bf16, else ``fp32``."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"
