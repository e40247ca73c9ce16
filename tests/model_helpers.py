"""Model tests' shared pieces: tiny model shapes and attention kinds, and a spy on the attention seam (what
sfa.sfa_attention receives, and an oracle on the same supports)."""

import torch

import sfa

# Two-layer GPT-2 and Qwen3 (GQA 4/2) small enough for many CPU cases: (preset, overrides) per family.
TINY_MODELS = {
    "gpt2": ("gpt2_tiny", dict(n_layer=2, n_head=4, d_model=64, vocab_size=97, max_seq_len=48)),
    "qwen3": ("qwen3_tiny", dict(n_layer=2, n_head=4, n_kv_head=2, head_dim=16, d_model=64, intermediate_size=96,
                                 vocab_size=97, max_seq_len=48)),
}
# The three attention kinds at sizes those shapes take (None: the preset's dense attention).
TINY_ATTENTIONS = {
    "dense": None,
    "sfa": {"kind": "sfa", "topk_q": 4, "topk_k": 3},
    "short": {"kind": "short", "d_short": 8},
}


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
