from __future__ import annotations

import torch


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, T, hd) -> (B, Hkv*n_rep, T, hd), as grouped-query attention shares K/V heads."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def cls_logits_from_qk(q: torch.Tensor, k: torch.Tensor, n_heads: int, scale: float, row: int = 0) -> torch.Tensor:
    """Pre-softmax attention logits of one query row (the CLS token by default) over all keys.

    q, k: (B, S, H*hd) outputs of a ViT layer's q_proj / k_proj (unscaled).  Returns (B, H, S) in float32.
    """
    b, s, hd_all = k.shape
    hd = hd_all // n_heads
    qr = q[:, row].reshape(b, n_heads, hd).float()  # (B, H, hd)
    kk = k.reshape(b, s, n_heads, hd).float()  # (B, S, H, hd)
    return torch.einsum("bhd,bshd->bhs", qr, kk) * scale


def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int = 1024) -> torch.Tensor:
    """The softmax attention each key receives, summed over every query of its sequence: (B, H, S) float32.

    q, k: (B, H, S, hd) after any position encoding the tower applies (unscaled). Query rows are processed in chunks
    of ``chunk`` (memory B*H*chunk*S); the tower's own attention call is untouched. FLOPs: ``received_flops``.
    """
    b, h, s, _ = q.shape
    kf = k.float()
    total = torch.zeros(b, h, s, dtype=torch.float32, device=q.device)
    for a in range(0, s, chunk):
        logits = torch.einsum("bhrd,bhsd->bhrs", q[:, :, a:a + chunk].float(), kf) * scale
        total += torch.softmax(logits, dim=-1).sum(2)
    return total


def received_logits(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int = 1024) -> torch.Tensor:
    """The no-CLS score: the mean softmax attention each token receives from every query of its sequence, as
    log-probabilities, so that a softmax over keys gives it back as a distribution (what ``cls_logits_from_qk`` gives
    for a CLS row). The rule VisionZip and VisPruner use for towers without a CLS token (SigLIP, Qwen-VL's ViT).

    q, k: (B, H, S, hd) as for ``received_attention``. Returns (B, H, S) float32.
    """
    return log_share(received_attention(q, k, scale, chunk) / q.shape[2])


def log_share(p: torch.Tensor) -> torch.Tensor:
    """log of attention shares, with 0 mapped to the log of the smallest float32 (finite)."""
    return torch.log(p.clamp_min(torch.finfo(torch.float32).tiny))


def received_flops(b: int, h: int, s: int, hd: int) -> float:
    """FLOPs (2 x MACs) of ``received_logits`` on (B, H, S, hd) inputs: the q x k products."""
    return 2.0 * b * h * s * s * hd


def attention_rows(
    q_rows: torch.Tensor,
    k: torch.Tensor,
    rows: torch.Tensor,
    scale: float,
    key_valid: torch.Tensor | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """Softmax attention probabilities of chosen query rows over all keys, computed for those rows only.

    q_rows: (B, H, R, hd) the chosen queries after RoPE; k: (B, H, T, hd) keys after RoPE (K/V heads already
    repeated); rows: (B, R) the rows' indices into T (for causality); key_valid: (B, T) bool, False for padding.
    Returns (B, H, R, T) float32 probabilities; with ``causal`` a row sees keys at or before its own index.
    """
    b, h, t, hd = k.shape
    logits = torch.matmul(q_rows.float(), k.float().transpose(-1, -2)) * scale  # (B, H, R, T)
    allowed = torch.ones(b, 1, rows.shape[1], t, dtype=torch.bool, device=k.device)
    if causal:
        allowed = allowed & (torch.arange(t, device=k.device)[None, None, None, :] <= rows[:, None, :, None])
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)
