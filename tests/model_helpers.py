"""Spying on the attention seam: what sfa.sfa_attention receives, and an oracle on the same supports."""

import torch

import sfa


def logits_recording_supports(model, x, supports=None):
    """The model's logits with a spy on the seam's sfa.sfa_attention: without `supports` it records, per
    call, the dtypes it got and the top-k supports of q and k; with `supports` (a recording) it scores
    q and k on exactly those coordinates instead of selecting its own."""
    import models.attention as seam

    seen, original = [], sfa.sfa_attention

    def spy(q, k, v, *, topk_q, topk_k, **kw):
        if supports is None:
            seen.append((q.dtype, k.dtype, v.dtype, sfa.topk_sparsify(q, topk_q).indices,
                         sfa.topk_sparsify(k, topk_k).indices))
            return original(q, k, v, topk_q=topk_q, topk_k=topk_k, **kw)
        *_, q_idx, k_idx = supports[len(seen)]
        seen.append(None)
        def keep(t, idx):
            return t * torch.zeros_like(t).scatter(-1, idx.long(), 1.0)
        d = q.shape[-1]  # topk = D: attention over the given masked tensors as they are
        return original(keep(q, q_idx), keep(k, k_idx), v, topk_q=d, topk_k=d, **kw)

    seam.sfa.sfa_attention = spy
    try:
        logits, _ = model(x)
    finally:
        seam.sfa.sfa_attention = original
    return logits, seen
