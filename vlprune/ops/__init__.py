"""Pure tensor math shared by methods and adapters (no host imports).

Legend for shape comments: B batch, N visual tokens, T sequence, D hidden, H heads, K kept, R query rows.
"""
from .attention import attention_rows, cls_logits_from_qk, log_share, received_attention, repeat_kv
from .merge import MergePlan, identity_plan, merge_batch, merge_tokens, window_merge_plan, window_similarity
from .pool import pool_grid, pooled_grid_shape
from .select import topk_sorted

__all__ = ["attention_rows", "cls_logits_from_qk", "log_share", "received_attention", "repeat_kv", "MergePlan", "identity_plan", "merge_batch", "merge_tokens", "window_merge_plan",
           "window_similarity", "pool_grid", "pooled_grid_shape", "topk_sorted"]
