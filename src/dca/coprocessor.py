"""The coprocessor: reads the decoder's cache with N soft tokens and writes N latent embeddings.

It has the decoder's own architecture (its base model, without the LM head), initialised from the
decoder's weights, from scratch, or as the decoder's weights plus a LoRA adapter. Its input
embedding table is never used (soft tokens enter as embeddings), so it is shared with the frozen
decoder rather than copied; with LoRA every base weight is shared, so the adapter costs only its
low-rank matrices.
"""

from __future__ import annotations

import copy
import types
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import Cache, PreTrainedModel

from dca.config import CoprocessorConfig

FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm")

# Where the final norm's input goes during one `Coprocessor.forward` of this thread (or task). The hook
# that writes it is registered once, at construction: a hook added per call would fire for every
# thread running the same model, and each would read another's hidden states.
_PRE_NORM_CAPTURE: ContextVar[list[torch.Tensor] | None] = ContextVar("dca_pre_norm_capture", default=None)


def _capture_pre_norm(_module: nn.Module, args: tuple) -> None:
    captured = _PRE_NORM_CAPTURE.get()
    if captured is not None:
        captured.append(args[0])


# During `Coprocessor.read_after_prompt` of this thread: the number of trailing rows (the soft tokens) that get the
# LoRA update; the rows before them (the prompt) go through the base weights alone, i.e. through the decoder.
_LORA_ROWS: ContextVar[int | None] = ContextVar("dca_lora_rows", default=None)


def _lora_on_last_rows(self: LoraLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's LoRA forward, restricted to the last `_LORA_ROWS` rows when that is set (bound to each LoRA layer)."""
    rows = _LORA_ROWS.get()
    if rows is None or self.disable_adapters or self.merged:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    tail, out = x[:, -rows:], result[:, -rows:]
    for name in self.active_adapters:  # what peft's vanilla-LoRA branch computes, on the tail rows only
        if name in self.lora_A.keys():
            down, up, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
            t = self._cast_input_dtype(tail, down.weight.dtype)
            if type(dropout) is nn.Identity and down.bias is None and up.bias is None:
                delta = F.linear(F.linear(t, down.weight), up.weight)  # the same ops, without 2 module calls
            else:
                delta = up(down(dropout(t)))
            out = out + delta * self.scaling[name]
    if torch.is_grad_enabled():
        return torch.cat([result[:, :-rows], out.to(result.dtype)], dim=1)
    result[:, -rows:] = out  # inference: no copy of the prompt rows
    return result


def embedding_sample(decoder: PreTrainedModel, max_rows: int = 8192) -> torch.Tensor:
    """Evenly spaced rows of the decoder's input embeddings, as the model itself scales them."""
    embed = decoder.get_input_embeddings()
    ids = torch.linspace(0, embed.num_embeddings - 1, min(max_rows, embed.num_embeddings)).long()
    with torch.no_grad():
        return embed(ids.to(embed.weight.device)).float()


def _final_norm(body: nn.Module) -> nn.Module:
    for name in FINAL_NORM_NAMES:
        module = getattr(body, name, None)
        if isinstance(module, nn.Module):
            return module
    raise NotImplementedError(f"latent_source='pre_norm' needs the final norm of {type(body).__name__}; "
                              f"none of {FINAL_NORM_NAMES} found")


def build_body(decoder: PreTrainedModel, config: CoprocessorConfig) -> nn.Module:
    """The coprocessor's transformer: same architecture as the decoder's base model."""
    base = decoder.base_model
    embedding = decoder.get_input_embeddings()
    if config.init == "scratch":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)
            body = type(base)(base.config)
        body.set_input_embeddings(embedding)
        body.to(device=embedding.weight.device, dtype=embedding.weight.dtype)
    else:
        # Share what is not trained: the embedding table always, every base weight under LoRA.
        shared = list(base.parameters()) if config.uses_lora else [embedding.weight]
        body = copy.deepcopy(base, memo={id(p): p for p in shared})
    for param in body.parameters():
        param.requires_grad_(False)
    if config.uses_lora:
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha or 2 * config.lora_rank,
                          target_modules=config.lora_target_modules)  # peft's default: no dropout
        body = inject_adapter_in_model(lora, body)
        trainable = [p for name, p in body.named_parameters() if "lora_" in name]
        for module in body.modules():
            if isinstance(module, LoraLayer) and not module.lora_variant:  # DoRA & co keep peft's forward
                module.forward = types.MethodType(_lora_on_last_rows, module)
    else:
        trainable = [p for p in body.parameters() if p is not embedding.weight]
    for param in trainable:
        param.requires_grad_(True)
    return body


def init_soft_tokens(decoder: PreTrainedModel, config: CoprocessorConfig) -> torch.Tensor:
    # on the CPU, so that a seed gives the same soft tokens on every device
    table = embedding_sample(decoder, max_rows=decoder.get_input_embeddings().num_embeddings).detach().float().cpu()
    generator = torch.Generator().manual_seed(config.init_seed)
    n, dim = config.num_latents, table.shape[1]
    if config.soft_token_init == "vocab_sample":
        rows = torch.randperm(table.shape[0], generator=generator)[:n]
        return table[rows].clone()
    if config.soft_token_init == "vocab_mean":
        noise = torch.randn(n, dim, generator=generator) * table.std() * 1e-2
        return table.mean(0, keepdim=True) + noise
    return torch.randn(n, dim, generator=generator) * table.std()


class Coprocessor(nn.Module):
    """Soft tokens in, latent embeddings (in the decoder's input-embedding space) out.

    With ``method="pause"`` there is no transformer: the soft tokens are the latents (pause tokens).
    """

    def __init__(self, decoder: PreTrainedModel, config: CoprocessorConfig):
        super().__init__()
        self.config = config
        self.body = build_body(decoder, config) if config.method == "coprocessor" else None
        param = decoder.get_input_embeddings().weight
        self.soft_tokens = nn.Parameter(init_soft_tokens(decoder, config).to(param.device, param.dtype))
        rms = embedding_sample(decoder).pow(2).mean(1).sqrt().mean()  # [rows, hidden] -> the mean row RMS
        self.register_buffer("embed_rms", rms.to(param.device, param.dtype), persistent=False)
        gain_shape = {"learned": (param.shape[1],), "gated": (1,)}.get(config.latent_scale) if self.body else None
        if gain_shape is not None:
            start = 1.0 if config.latent_scale == "learned" else float(config.gate_init)
            self.latent_gain = nn.Parameter(torch.full(gain_shape, start, device=param.device, dtype=param.dtype))
        else:
            self.latent_gain = None
        if self.body is not None and config.latent_source == "pre_norm":
            _final_norm(self.body).register_forward_pre_hook(_capture_pre_norm)
        # "overwrite" with R < N: the N - R latents appended after t replay no token; each gets a trainable offset
        # instead (the input-independent part that pause tokens are), from zero
        appended = config.added_entries if self.body is not None and config.replaced_entries else 0
        self.appended_offset = nn.Parameter(torch.zeros(appended, param.shape[1], device=param.device,
                                                        dtype=param.dtype)) if appended else None

    def forward(
        self,
        cache: Cache,
        attention_mask: torch.Tensor | dict[str, torch.Tensor] | None,
        position_ids: torch.Tensor,
        anchor: torch.Tensor | None = None,
        **attention_kwargs: Any,
    ) -> torch.Tensor:
        """Run the soft tokens of every group (P groups of N, laid out by `position_ids`) over `cache`.

        Returns latents [B, P * N, hidden], plus `anchor` (same shape) if given. `cache` is
        extended in place: pass a fork. `attention_kwargs` reach every attention layer (`dca.attention`).
        """
        batch, q_len = position_ids.shape
        soft = self.pause_tokens(batch, q_len // self.config.num_latents)
        if self.body is None:  # pause tokens: input-independent, written as they are
            return soft
        captured: list[torch.Tensor] = []
        token = _PRE_NORM_CAPTURE.set(captured if self.config.latent_source == "pre_norm" else None)
        try:
            out = self.body(inputs_embeds=soft, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=cache, **attention_kwargs)
        finally:
            _PRE_NORM_CAPTURE.reset(token)
        if self.config.latent_source == "pre_norm" and not captured:
            raise RuntimeError("latent_source='pre_norm' but the final norm did not run: the capture hook is "
                               "registered when the Coprocessor is built with that config")
        hidden = captured[-1] if captured else out.last_hidden_state
        latents = self.to_embedding_space(hidden)
        return latents if anchor is None else latents + anchor.to(latents.dtype)

    @property
    def reads_after_prompt(self) -> bool:
        """Whether `read_after_prompt` can run the prompt and the soft tokens in one pass: the coprocessor is the
        decoder's own weights (LoRA, shared) and its soft tokens attend causally, as the decoder's tokens do."""
        return (self.body is not None and self.config.uses_lora and self.config.soft_token_attention == "causal"
                and all(not m.lora_variant for m in self.body.modules() if isinstance(m, LoraLayer)))

    def read_after_prompt(self, prompt_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                          cache: Cache, anchor: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's prefill and this coprocessor's pass in one: [prompt; N soft tokens] through the body, the
        LoRA update on the soft tokens only. The prompt rows then compute exactly the decoder's prefill (same
        weights) and leave its cache in `cache`; the soft tokens attend to it and causally to each other, as in
        `forward` over a fork of that cache. Returns the latents [B, N, hidden]; `cache` ends with the prompt.

        `attention_mask` [B, L + N] and `position_ids` [B, L + N] cover the prompt and the soft tokens. One pass
        instead of two reads the weights once: at inference that is one decoding step less before the first token.
        """
        if not self.reads_after_prompt:
            raise RuntimeError("read_after_prompt needs a LoRA coprocessor with causal soft-token attention")
        n = self.config.num_latents
        embeds = torch.cat([prompt_embeds, self.pause_tokens(prompt_embeds.shape[0], 1).to(prompt_embeds.dtype)], 1)
        captured: list[torch.Tensor] = []
        pre_norm = _PRE_NORM_CAPTURE.set(captured if self.config.latent_source == "pre_norm" else None)
        rows = _LORA_ROWS.set(n)
        try:
            out = self.body(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=cache)
        finally:
            _LORA_ROWS.reset(rows)
            _PRE_NORM_CAPTURE.reset(pre_norm)
        cache.crop(-n)  # the soft tokens' keys and values belong to the coprocessor, not to the decoder's cache
        hidden = (captured[-1] if captured else out.last_hidden_state)[:, -n:]
        latents = self.to_embedding_space(hidden)
        return latents if anchor is None else latents + anchor.to(latents.dtype)

    def pause_tokens(self, batch: int, groups: int) -> torch.Tensor:
        """[batch, groups * N, hidden]: the soft tokens of every group, as they are."""
        return self.soft_tokens.repeat(groups, 1)[None].expand(batch, -1, -1)

    def to_embedding_space(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, P * N, H] final states -> latents, before any anchor: `latent_scale`, then `appended_offset`."""
        latents = hidden
        if self.config.latent_scale != "none":
            rms = hidden.float().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
            latents = (hidden.float() / rms * self.embed_rms.float()).to(hidden.dtype)
            if self.latent_gain is not None:
                latents = latents * self.latent_gain
        if self.appended_offset is None:
            return latents
        appended = self.config.appended_latents  # [N, H]: zeros on the R anchored latents
        offset = F.pad(self.appended_offset, (0, 0, appended.start, self.config.num_latents - appended.stop))
        return (latents.unflatten(1, (-1, self.config.num_latents)) + offset.to(latents.dtype)).flatten(1, 2)
