"""Tiny randomly initialised models of each family we support, built from configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    Qwen2Config,
)

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2)


def _configs():
    return {
        "llama": LlamaConfig(**COMMON),
        "qwen2": Qwen2Config(**COMMON),
        # sliding window shorter than the test sequences, alternating with global layers, softcapping on
        "gemma2": Gemma2Config(**COMMON, head_dim=8, sliding_window=5,
                               layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
        "gemma3": Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=6,
                                   layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                   final_logit_softcapping=30.0),
        # learned absolute positions, Conv1D projections
        "gpt2": GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=128,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0),
    }


FAMILIES = tuple(_configs())


def tiny_decoder(family: str, attn_implementation: str = "sdpa", seed: int = 0) -> PreTrainedModel:
    config = _configs()[family]
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    # Random init gives near-uniform logits; sharpen them so wrong masks or positions cannot hide.
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(3.0) if param.dim() >= 2 else None
    return model.float().eval()
