"""Small configurations of the transformers-5 MoE families (Chapter 1).

``tiny_config(family)`` gives a configuration of a few hundred thousand parameters
with the family's real structure (shared experts, dense first layers, sigmoid
routers, ...). The tiny model zoo (:mod:`uoe_nb.zoo`) and the test suite build their
models from these; the same function with real sizes gives randomly initialised
models of a real architecture for benchmarks.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

__all__ = ["FAMILIES", "random_model", "tiny_config"]


def _common(vocab_size: int, hidden: int, layers: int, heads: int) -> dict[str, Any]:
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _qwen2_moe(c, experts, top_k, inter):
    return dict(
        c,
        model_type="qwen2_moe",
        intermediate_size=inter * 2,
        moe_intermediate_size=inter,
        shared_expert_intermediate_size=inter * 2,
        num_experts=experts,
        num_experts_per_tok=top_k,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=False,
    )


def _qwen3_moe(c, experts, top_k, inter):
    return dict(
        c,
        model_type="qwen3_moe",
        intermediate_size=inter * 2,
        moe_intermediate_size=inter,
        num_experts=experts,
        num_experts_per_tok=top_k,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        head_dim=c["hidden_size"] // c["num_attention_heads"],
    )


def _deepseek_v2(c, experts, top_k, inter):
    head = c["hidden_size"] // c["num_attention_heads"]
    return dict(
        c,
        model_type="deepseek_v2",
        intermediate_size=inter * 4,
        moe_intermediate_size=inter,
        n_routed_experts=experts,
        num_experts_per_tok=top_k,
        n_shared_experts=2,
        first_k_dense_replace=1,
        kv_lora_rank=max(16, head),
        q_lora_rank=None,
        qk_nope_head_dim=head,
        qk_rope_head_dim=max(8, head // 2),
        v_head_dim=head,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
    )


def _deepseek_v3(c, experts, top_k, inter):
    d = _deepseek_v2(c, experts, top_k, inter)
    d.update(model_type="deepseek_v3", n_shared_experts=1, n_group=2, topk_group=1, norm_topk_prob=True)
    d.pop("topk_method")
    return d


def _mixtral(c, experts, top_k, inter):
    return dict(c, model_type="mixtral", intermediate_size=inter, num_local_experts=experts, num_experts_per_tok=top_k)


def _olmoe(c, experts, top_k, inter):
    return dict(c, model_type="olmoe", intermediate_size=inter, num_experts=experts, num_experts_per_tok=top_k)


def _granitemoe(c, experts, top_k, inter):
    return dict(
        c, model_type="granitemoe", intermediate_size=inter, num_local_experts=experts, num_experts_per_tok=top_k
    )


def _phimoe(c, experts, top_k, inter):
    return dict(c, model_type="phimoe", intermediate_size=inter, num_local_experts=experts, num_experts_per_tok=2)


def _gpt_oss(c, experts, top_k, inter):
    return dict(
        c,
        model_type="gpt_oss",
        intermediate_size=inter,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        head_dim=c["hidden_size"] // c["num_attention_heads"],
        sliding_window=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        layer_types=["sliding_attention", "full_attention"] * (c["num_hidden_layers"] // 2)
        + ["sliding_attention"] * (c["num_hidden_layers"] % 2),
    )


def _llama4_text(c, experts, top_k, inter):
    return dict(
        c,
        model_type="llama4_text",
        intermediate_size=inter,
        intermediate_size_mlp=inter * 2,
        num_local_experts=experts,
        num_experts_per_tok=1,
        head_dim=c["hidden_size"] // c["num_attention_heads"],
        interleave_moe_layer_step=1,
        no_rope_layers=[1] * c["num_hidden_layers"],
    )


def _dense(c, experts, top_k, inter):
    return dict(c, model_type="qwen2", intermediate_size=inter)


FAMILIES = {
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "deepseek_v2": _deepseek_v2,
    "deepseek_v3": _deepseek_v3,
    "mixtral": _mixtral,
    "olmoe": _olmoe,
    "granitemoe": _granitemoe,
    "phimoe": _phimoe,
    "gpt_oss": _gpt_oss,
    "llama4_text": _llama4_text,
    "dense": _dense,
}


def tiny_config(
    family: str,
    *,
    vocab_size: int = 128,
    hidden: int = 32,
    layers: int = 3,
    heads: int = 4,
    experts: int = 8,
    top_k: int = 2,
    intermediate: int = 32,
    **overrides: Any,
) -> PretrainedConfig:
    """A small configuration of ``family`` (see :data:`FAMILIES`); ``overrides`` win."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(FAMILIES)}")
    kwargs = FAMILIES[family](_common(vocab_size, hidden, layers, heads), experts, top_k, intermediate)
    kwargs.update(overrides)
    model_type = kwargs.pop("model_type")
    return AutoConfig.for_model(model_type, **kwargs)


def random_model(config: PretrainedConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A randomly initialised causal LM of ``config`` (seeded), in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
