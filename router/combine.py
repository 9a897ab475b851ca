"""How the router's probabilities become expert weights at one denoising step (docs/design.md §4).

p = softmax(r(x_t, t)); every mode returns weights w (B, K) that are zero off the selected set
and sum to 1 over it, so the combined velocity is v = Σ_k w_k v_k.
"""

from __future__ import annotations

import torch

MODES = ("top1", "topk", "threshold", "full")


def routing_weights(
    probs: torch.Tensor, mode: str, k: int = 2, tau: float = 0.2, available: torch.Tensor | None = None
) -> torch.Tensor:
    """Expert weights (B, K) from router probabilities (B, K).

    ``available`` (K,) bool masks experts that cannot serve: their probability is dropped and
    the rest renormalised before selection (the fallback to the next-best expert).
    """
    if available is not None:
        if not bool(available.any()):
            raise ValueError("no expert is available")
        probs = probs * available.to(probs.dtype)
        probs = probs / probs.sum(-1, keepdim=True).clamp(min=1e-12)
    if mode == "full":
        return probs
    if mode in ("top1", "topk"):
        kk = 1 if mode == "top1" else k
        n_avail = probs.shape[-1] if available is None else int(available.sum())
        kk = max(1, min(kk, n_avail))
        idx = probs.topk(kk, dim=-1).indices
        mask = torch.zeros_like(probs).scatter_(-1, idx, 1.0)
    elif mode == "threshold":
        mask = (probs >= tau).to(probs.dtype)
        argmax = torch.zeros_like(probs).scatter_(-1, probs.argmax(-1, keepdim=True), 1.0)
        mask = torch.maximum(mask, argmax)  # never empty: keep the argmax
    else:
        raise ValueError(f"unknown routing mode {mode!r}; choose one of {MODES}")
    w = probs * mask
    return w / w.sum(-1, keepdim=True).clamp(min=1e-12)
