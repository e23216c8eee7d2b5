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


def tiny_decoder(family: str, attn_implementation: str = "sdpa", seed: int = 0, **overrides) -> PreTrainedModel:
    """A tiny `family` model; `overrides` set config attributes first (e.g. head_dim=16, which CUDA's flex kernel
    needs at least)."""
    config = _configs()[family]
    for name, value in overrides.items():
        setattr(config, name, value)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    # Random init gives near-uniform logits; sharpen them so wrong masks or positions cannot hide.
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(3.0) if param.dim() >= 2 else None
    return model.float().eval()


WORDS = ["<unk>", "</s>", "the", "a", "cat", "dog", "bird", "sees", "likes", "chases", "red", "big", "small",
         "house", "tree", "and", "then", "runs", "home", "."]


def word_tokenizer():
    """A real (word-level) fast tokenizer built in memory: no download needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="</s>")


def save_tiny_model_dir(path, family: str = "llama", pretrain_on: str | None = None, steps: int = 150) -> str:
    """A tiny model with a word tokenizer saved as a local folder, loadable like any real checkpoint.

    With `pretrain_on` (a text file) the model is first trained briefly as an ordinary LM, so that it
    uses its context the way a real pretrained decoder does.
    """
    from pathlib import Path

    config = _configs()[family]
    config.vocab_size = len(WORDS)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    tokenizer = word_tokenizer()
    if pretrain_on is not None:
        ids = torch.tensor(tokenizer(Path(pretrain_on).read_text().replace("\n\n", " </s> "))["input_ids"])
        seqs = ids[: len(ids) // 32 * 32].view(-1, 32)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model.train()
        for _ in range(steps):
            batch = seqs[torch.randint(0, len(seqs), (16,))]
            optimizer.zero_grad()
            model(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_toy_corpus(path, docs: int = 120, seed: int = 0) -> str:
    """Short documents from a small grammar: structure a coprocessor can learn in a few steps."""
    import random

    rng = random.Random(seed)
    nouns, verbs, adjs = ["cat", "dog", "bird", "house", "tree"], ["sees", "likes", "chases"], ["red", "big", "small"]
    lines = []
    for _ in range(docs):
        sentences = [f"the {rng.choice(adjs)} {rng.choice(nouns)} {rng.choice(verbs)} a {rng.choice(nouns)} "
                     f"and then runs home ." for _ in range(rng.randint(2, 4))]
        lines.append(" ".join(sentences))
    path.write_text("\n\n".join(lines))
    return str(path)


def greedy_one_by_one(model, tokenizer, prompts, augment: bool, max_new_tokens: int) -> list[str]:
    """Unbatched greedy completions: the reference batched scorers must reproduce."""
    texts = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt).input_ids])
        out = model.generate(ids, augment=augment, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=1)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


def toy_model_and_corpus(root, docs: int = 400, pretrain_steps: int = 20) -> tuple[str, str]:
    """A briefly pretrained tiny model folder and the toy corpus it learned from."""
    corpus = write_toy_corpus(root / "corpus.txt", docs=docs)
    return save_tiny_model_dir(root / "model", pretrain_on=corpus, steps=pretrain_steps), corpus


def appended(config: dict) -> dict:
    """`config` with its latents appended at the replayed tokens' positions ("replay", the default before
    "overwrite") where it would otherwise get the default "overwrite": for tests that insert latents at t < N-1."""
    if config.get("method", "coprocessor") == "coprocessor" and config.get("latent_anchor", "replay") == "replay":
        return {"latent_positions": "replay", **config}
    return config


def train_args(assets, out, **overrides):
    """`TrainArgs` of a short, fast run on `assets` (the `train_assets` fixture), with overrides."""
    from dca import CoprocessorConfig
    from dca.training.train import TrainArgs

    model, corpus = assets
    copro = CoprocessorConfig(**{"num_latents": 2, "num_ahead": 3, "gate_init": 0.5,
                                 **overrides.pop("coprocessor", {})})
    base = dict(model=model, data=corpus, out=str(out), coprocessor=copro, positions=4, seq_len=24,
                batch_size=4, steps=6, lr=3e-3, warmup_steps=1, eval_every=3, save_every=2, eval_sequences=4,
                held_out_fraction=0.1, progress=False, device="cpu")
    return TrainArgs(**{**base, **overrides})


def padded_batch(family: str, impl: str, config: dict, **overrides):
    """An AugmentedLM over a tiny decoder (`overrides` go to its config) with moved LoRA weights (B starts at 0:
    moved, its gradient paths are exercised too), and a batch of 3 rows of 20 tokens: one unpadded, one
    left-padded, one right-padded."""
    from dca import AugmentedLM, CoprocessorConfig

    model = AugmentedLM.from_decoder(tiny_decoder(family, impl, **overrides), CoprocessorConfig(
        **appended({"num_latents": 3, "num_ahead": 4, "gate_init": 0.5, **config})))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    input_ids = torch.randint(0, VOCAB, (3, 20))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0  # left padding
    attention_mask[2, 15:] = 0  # right padding
    return model, input_ids, attention_mask
