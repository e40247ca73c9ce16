"""HF transformers interop: weights in (`from_hf`) and out (`to_hf`), and "sfa" as an HF attention.

Importing this module registers "sfa" with transformers' AttentionInterface *and*
AttentionMaskInterface. Both are needed in transformers 5.x: for an implementation name missing from
the mask interface the model builds no causal mask at all (it passes None), silently. With the mask
registered as SDPA's, HF hands us None exactly when the mask is plain causal; we then call
sfa.sfa_attention(causal=True) (any backend); any other mask (padding) goes through the reference
identity SFA(q, k, v) = SDPA(topk_mask(q), topk_mask(k), v) with that mask. None means SDPA's top-left
causal alignment (HF relies on it for a StaticCache's prefill), which sfa_hf_attention reproduces.

An HF model runs SFA with `config._attn_implementation = "sfa"` (or `attn_implementation="sfa"` in
from_pretrained) and `config.sfa_topk` (+ optional `sfa_topk_k`, `sfa_backend`). HF applies the
attention function to q and k after RoPE (and QK-norm), which is exactly where SFA belongs.

`to_hf` of an SFA model also writes `"attn_implementation": "sfa"` into config.json, so a plain
`from_pretrained(dir)` reloads it running SFA, or, in a process that has not imported models.hf, fails
with transformers' "attn_implementation="sfa" is not supported" instead of silently running dense.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import sfa

from .attention import AttentionConfig
from .gpt2 import GPT2, GPT2Config
from .qwen3 import Qwen3, Qwen3Config

# HF GPT-2 stores these projections as Conv1D, weight (in, out): transpose to nn.Linear's (out, in).
GPT2_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def sfa_hf_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention function: q (B, Hq, N, D), k/v (B, Hkv, Nk, ·) -> ((B, N, Hq, Dv), None)."""
    config = module.config
    topk_q = getattr(config, "sfa_topk", None)
    if topk_q is None:
        raise ValueError('attn_implementation "sfa" needs config.sfa_topk (features kept per q/k row)')
    topk_k = getattr(config, "sfa_topk_k", None) or topk_q
    if dropout:
        raise ValueError(f'attn_implementation "sfa" does not support attention dropout (got {dropout}); use eval() or 0')
    if attention_mask is None:
        # HF passes None for "SDPA's is_causal", which aligns top-left: with more keys than queries (a
        # StaticCache's prefill, whose keys past the prompt are still empty) query i sees keys <= i only.
        # sfa_attention aligns bottom-right, so hand it just the keys the queries can see.
        n_q = query.shape[2]
        if 1 < n_q < key.shape[2]:
            key, value = key[:, :, :n_q], value[:, :, :n_q]
        out = sfa.sfa_attention(
            query, key, value, topk_q=topk_q, topk_k=topk_k, causal=True, scale=scaling,
            backend=getattr(config, "sfa_backend", "auto"),
        )
    else:
        sfa.ops.check_attention_inputs(query, key, value, topk_q=topk_q, topk_k=topk_k, scale=scaling)
        q, k = sfa.topk_mask(query, topk_q), sfa.topk_mask(key, topk_k)
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
        if attention_mask.dtype != torch.bool:  # additive float mask
            attention_mask = attention_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register_sfa_attention() -> None:
    AttentionInterface.register("sfa", sfa_hf_attention)
    AttentionMaskInterface.register("sfa", sdpa_mask)


register_sfa_attention()


# --- configs -------------------------------------------------------------------------------------
def config_from_hf(hf_config) -> GPT2Config | Qwen3Config:
    kind = getattr(hf_config, "model_type", None)
    if kind == "gpt2":
        if hf_config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"from_hf: GPT-2 activation {hf_config.activation_function!r} unsupported (need tanh GELU)")
        if hf_config.scale_attn_by_inverse_layer_idx or not hf_config.scale_attn_weights or hf_config.add_cross_attention:
            raise ValueError("from_hf: only standard GPT-2 attention is supported (scale_attn_weights, no layer-idx scaling, no cross-attention)")
        return GPT2Config(
            vocab_size=hf_config.vocab_size, max_seq_len=hf_config.n_positions, n_layer=hf_config.n_layer,
            n_head=hf_config.n_head, d_model=hf_config.n_embd, mlp_hidden=hf_config.n_inner or 4 * hf_config.n_embd,
            layer_norm_eps=hf_config.layer_norm_epsilon, tie_embeddings=hf_config.tie_word_embeddings,
        )
    if kind == "qwen3":
        rope = hf_config.rope_parameters or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"from_hf: Qwen3 rope_type {rope.get('rope_type')!r} unsupported (only 'default')")
        if getattr(hf_config, "use_sliding_window", False):
            raise ValueError("from_hf: Qwen3 sliding-window attention is not supported")
        if hf_config.hidden_act != "silu":
            raise ValueError(f"from_hf: Qwen3 hidden_act {hf_config.hidden_act!r} unsupported (need silu)")
        return Qwen3Config(
            vocab_size=hf_config.vocab_size, max_seq_len=hf_config.max_position_embeddings,
            n_layer=hf_config.num_hidden_layers, n_head=hf_config.num_attention_heads,
            n_kv_head=hf_config.num_key_value_heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
            d_model=hf_config.hidden_size, intermediate_size=hf_config.intermediate_size,
            rope_theta=float(rope.get("rope_theta", 1e6)), rms_norm_eps=hf_config.rms_norm_eps,
            tie_embeddings=hf_config.tie_word_embeddings, attention_bias=hf_config.attention_bias,
        )
    raise ValueError(f"from_hf: model_type {kind!r} is not supported (gpt2 or qwen3)")


def config_to_hf(model):
    cfg, att = model.config, model.attention
    if att.kind == "short":
        raise ValueError("to_hf: the short-embedding baseline (narrower q/k) has no HF equivalent")
    if att.feature_map:
        raise ValueError("to_hf: attention.feature_map adds weights HF Qwen3 has no place for")
    if att.rope_shared:
        raise ValueError("to_hf: attention.rope_shared=True (one rotary key shared by the KV heads) has no HF Qwen3 "
                         "equivalent (HF keys are per head, rotated on every dim)")
    if att.rope != "full":
        raise ValueError(f"to_hf: attention.rope={att.rope} has no HF Qwen3 equivalent (HF rotates every q/k dim)")
    if att.scale != "sqrt_d":
        raise ValueError(f"to_hf: attention.scale={att.scale} has no HF equivalent (HF scales scores by 1/sqrt(D))")
    if isinstance(cfg, GPT2Config):
        if cfg.n_head * cfg.head_dim != cfg.d_model:
            raise ValueError(f"to_hf: HF GPT-2 needs d_model == n_head * head_dim, got {cfg.d_model} != {cfg.n_head}*{cfg.head_dim}")
        hf_config = transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layer,
            n_head=cfg.n_head, n_inner=cfg.mlp_hidden, activation_function="gelu_new",
            layer_norm_epsilon=cfg.layer_norm_eps, tie_word_embeddings=cfg.tie_embeddings,
            resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=0.0,
        )
    else:
        hf_config = transformers.Qwen3Config(
            vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_seq_len, num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
            hidden_size=cfg.d_model, intermediate_size=cfg.intermediate_size,
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, rms_norm_eps=cfg.rms_norm_eps,
            tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.attention_bias,
        )
    if att.kind == "sfa":
        hf_config.sfa_topk, hf_config.sfa_topk_k, hf_config.sfa_backend = att.topk_q, att.topk_k, att.backend
        # A plain attribute is saved in config.json, and transformers reads that key back as the attention
        # implementation (its own `_attn_implementation` is never saved): the export cannot reload as dense.
        hf_config.attn_implementation = "sfa"
    return hf_config


# --- weights -------------------------------------------------------------------------------------
def _load_hf_model(path_or_model):
    if isinstance(path_or_model, transformers.PreTrainedModel):
        return path_or_model
    if isinstance(path_or_model, (str, os.PathLike)):
        path = Path(path_or_model)
        if path.exists() and not (path / "config.json").is_file():
            raise FileNotFoundError(f"from_hf: {path} has no config.json (expected a save_pretrained directory)")
        if not path.exists() and (str(path_or_model).startswith((".", "/", "~")) or str(path_or_model).count("/") > 1):
            raise FileNotFoundError(f"from_hf: checkpoint directory {path} does not exist")
        # Anything else is a hub name; transformers honours HF_HUB_OFFLINE.
        return transformers.AutoModelForCausalLM.from_pretrained(path_or_model)
    raise TypeError(f"from_hf: expected a directory path or a transformers model, got {type(path_or_model).__name__}")


def attention_of_hf(hf_config) -> AttentionConfig:
    """The attention an HF model runs: SFA with its config's k when its implementation is "sfa", else dense."""
    if getattr(hf_config, "_attn_implementation", None) != "sfa":
        return AttentionConfig()
    topk_q = getattr(hf_config, "sfa_topk", None)
    return AttentionConfig(kind="sfa", topk_q=topk_q, topk_k=getattr(hf_config, "sfa_topk_k", None) or topk_q,
                           backend=getattr(hf_config, "sfa_backend", None) or "auto")


def from_hf(path_or_model, attention: AttentionConfig | dict | str | None = None):
    """Our GPT2 / Qwen3 with the weights of an HF GPT2LMHeadModel / Qwen3ForCausalLM (a model object or
    a save_pretrained directory), running `attention` (default: what the HF model runs, i.e. SFA for
    one exported by to_hf from an SFA model, else dense). The result has the HF weights' dtype. SFA
    needs no new weights; an SFA feature map starts at the identity."""
    hf_model = _load_hf_model(path_or_model)
    config = config_from_hf(hf_model.config)
    attention = attention_of_hf(hf_model.config) if attention is None else AttentionConfig.coerce(attention)
    if attention.kind == "short":
        raise ValueError("from_hf: the short-embedding baseline has narrower q/k projections than any HF checkpoint")
    if attention.rope_shared:
        raise ValueError("from_hf: attention.rope_shared=True needs a shared rotary key projection that no HF "
                         "checkpoint has. Load with attention.rope=full")
    if attention.rope != "full":
        raise ValueError(
            f"from_hf: HF weights were trained with RoPE on every q/k dim; attention.rope={attention.rope} would "
            "compute another function with them. Load with attention.rope=full"
        )
    model = (GPT2 if isinstance(config, GPT2Config) else Qwen3)(config, attention)
    hf_state = hf_model.state_dict()
    state = {}
    for name, param in model.state_dict().items():
        if name.endswith(("feature_map.weight", "logit_scale.log_gain")):
            state[name] = param  # ours only: keep the identity / unit-temperature start
            continue
        if name not in hf_state:
            raise KeyError(f"from_hf: HF checkpoint lacks {name!r}")
        tensor = hf_state[name]
        if isinstance(config, GPT2Config) and name.endswith(GPT2_CONV1D_SUFFIXES):
            tensor = tensor.t()
        if tensor.shape != param.shape:
            raise ValueError(f"from_hf: {name} has shape {tuple(tensor.shape)} in HF, {tuple(param.shape)} here")
        state[name] = tensor
    model.load_state_dict(state, strict=True)
    return model.to(next(hf_model.parameters()).dtype)


def to_hf(model):
    """An HF GPT2LMHeadModel / Qwen3ForCausalLM with this model's weights. An SFA model exports with
    attn_implementation "sfa" and its k in config.sfa_topk, so HF runs the same attention; save it
    with save_pretrained (reload with attn_implementation="sfa" after importing models.hf)."""
    hf_config = config_to_hf(model)
    cls = transformers.GPT2LMHeadModel if isinstance(model.config, GPT2Config) else transformers.Qwen3ForCausalLM
    hf_model = cls(hf_config)
    if model.attention.kind == "sfa":
        hf_model.set_attn_implementation("sfa")
    hf_state = hf_model.state_dict()
    state = {}
    for name, param in model.state_dict().items():
        tensor = param.detach()
        if isinstance(model.config, GPT2Config) and name.endswith(GPT2_CONV1D_SUFFIXES):
            tensor = tensor.t()
        state[name] = tensor.contiguous()
    missing = sorted(set(hf_state) - set(state))
    if missing:
        raise KeyError(f"to_hf: no weights for HF parameters {missing[:5]}")
    hf_model.load_state_dict(state, strict=False)
    param = next(model.parameters())
    return hf_model.to(dtype=param.dtype, device=param.device).eval()
