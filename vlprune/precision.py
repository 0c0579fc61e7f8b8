"""Which dtype to run in: bfloat16 only where the device computes it natively.

On a CPU without AVX-512 BF16 or AMX (e.g. AVX2 only) bfloat16 matmuls are emulated and 10-90x slower than
float32, so ``"auto"`` picks float32 there and says why.
"""
from __future__ import annotations

DTYPES = ("auto", "float32", "bfloat16", "float16")


def native_bf16(device) -> bool:
    """Whether ``device`` (a ``torch.device`` or its name) computes in bfloat16 natively: a CUDA device that
    supports it, or a CPU with AVX-512 BF16 or AMX."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(f()) for f in probes if f is not None)


def auto_dtype(requested: str = "auto", device="cpu"):
    """``(torch.dtype, reason)`` for ``requested`` in :data:`DTYPES` on ``device``: "auto" is bfloat16 where the
    device computes it natively, else float32; any other name is taken as given."""
    import torch

    if requested not in DTYPES:
        raise ValueError(f"dtype {requested!r} is not one of {', '.join(DTYPES)}; e.g. --dtype auto")
    if requested != "auto":
        return getattr(torch, requested), "as asked"
    dev = torch.device(device)
    if native_bf16(dev):
        why = ("the GPU computes bfloat16 natively" if dev.type == "cuda"
               else "this CPU has AVX-512 BF16 / AMX, so bfloat16 is native")
        return torch.bfloat16, f"auto: {why}"
    why = ("this CPU has no native bfloat16 (no AVX-512 BF16 or AMX), where bfloat16 is emulated and slow"
           if dev.type == "cpu" else f"{dev.type} has no native bfloat16")
    return torch.float32, f"auto: {why}"
