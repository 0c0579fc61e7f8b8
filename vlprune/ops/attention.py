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


def received_attention(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int = 1024,
                       fused: bool | None = None) -> tuple[torch.Tensor, float]:
    """The softmax attention each key receives, summed over every query of its sequence: ((B, H, S) float32, the
    FLOPs (2 x MACs) of its matrix products).

    q, k: (B, H, S, hd) after any position encoding the tower applies (unscaled), in the tower's dtype. The tower's
    own attention call is untouched. On the CPU two calls of torch's fused attention kernel give it without an S x S
    matrix: the first gives each query's log normaliser lse_q, the second runs keys as queries over the queries with
    the logit k.q*scale - lse_q (folded into one extra dimension) and returns log sum_q exp(...) = log of the sum
    wanted (the kernel also multiplies by values of the same width: 4*B*H*S*S*(2*hd + 1) FLOPs in all). Elsewhere
    (or with ``fused=False``) softmax rows are summed ``chunk`` queries at a time: 2*B*H*S*S*(hd + 1).
    """
    b, h, s, hd = q.shape
    kernel = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if fused is None:
        fused = q.device.type == "cpu" and kernel is not None
    if fused:
        _, lse = kernel(q, k, k, 0.0, False, scale=scale)  # (B, H, S) log normaliser of each query row
        qq = torch.cat([q * scale, (-lse[..., None]).to(q.dtype)], -1)
        kk = torch.cat([k, torch.ones_like(k[..., :1])], -1)
        _, lse_k = kernel(kk, qq, qq, 0.0, False, scale=1.0)
        return lse_k.float().exp(), 4.0 * b * h * s * s * (2 * hd + 1)
    kt = k.float().transpose(-1, -2)
    qs = q.float() * scale
    total = torch.zeros(b, h, s, dtype=torch.float32, device=q.device)
    for a in range(0, s, chunk):
        p = torch.matmul(qs[:, :, a:a + chunk], kt)
        p.sub_(p.amax(-1, keepdim=True)).exp_()
        total += torch.matmul((1.0 / p.sum(-1, keepdim=True)).transpose(-1, -2), p).squeeze(-2)
    return total, 2.0 * b * h * s * s * (hd + 1)


def log_share(p: torch.Tensor) -> torch.Tensor:
    """log of attention shares, with 0 mapped to the log of the smallest float32 (finite)."""
    return torch.log(p.clamp_min(torch.finfo(torch.float32).tiny))


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
