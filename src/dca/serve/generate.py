"""`dca generate`: continue prompts with a frozen model and its coprocessor, streamed to the terminal.

Prompts come from `--prompt` (several may follow it), `--file` (one per line) or standard input (one per
line). `--compare` prints the frozen model's continuation and then the augmented one, each labelled, from the
same seed. The sampling flags are those of transformers' `GenerationConfig`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import GenerationConfig, PreTrainedTokenizerBase, TextStreamer, set_seed

from dca.checks import check_device, check_int, check_number
from dca.config import help_meta
from dca.errors import ArgumentError
from dca.model import AugmentedLM
from dca.serve.loading import chat_text, check_sources, load_served


@dataclass
class GenerateArgs:
    """Arguments of `dca generate`."""

    model: str = field(default="smollm2-135m", metadata=help_meta("the frozen decoder (builtin name or folder)"))
    coprocessor: str | None = field(default=None, metadata=help_meta("a saved coprocessor for it (none: frozen)"))
    prompt: list[str] = field(default_factory=list, metadata={**help_meta(
        "prompts (`--prompt A --prompt B` or `--prompt A B`); else --file, else standard input"), "repeatable": True})
    file: str | None = field(default=None, metadata=help_meta("a text file with one prompt per line"))
    augment: bool = field(default=True, metadata=help_meta("augment the cache (--no-augment: the frozen model)"))
    compare: bool = field(default=False, metadata=help_meta("print the frozen and the augmented continuation"))
    chat: bool = field(default=False, metadata=help_meta("wrap each prompt in the tokenizer's chat template"))
    max_new_tokens: int = field(default=64, metadata=help_meta("tokens to generate per prompt"))
    do_sample: bool = field(default=False, metadata=help_meta("sample (else greedy)"))
    temperature: float = field(default=1.0, metadata=help_meta("sampling temperature (with --do-sample)"))
    top_p: float = field(default=1.0, metadata=help_meta("nucleus sampling mass (with --do-sample)"))
    top_k: int = field(default=0, metadata=help_meta("sample among the k likeliest tokens, 0: all (with --do-sample)"))
    repetition_penalty: float = field(default=1.0, metadata=help_meta("transformers' repetition penalty"))
    num_beams: int = field(default=1, metadata=help_meta("beam search width"))
    seed: int = field(default=0, metadata=help_meta("random seed, set before every continuation"))
    stream: bool = field(default=True, metadata=help_meta("print tokens as they come"))
    device: str = field(default="auto", metadata=help_meta("auto, cpu, cuda, ..."))
    store: str | None = field(default=None, metadata=help_meta(
        "a store of augmented contexts (`dca cache build`): prompts that start with a stored document reuse it"))

    def __post_init__(self) -> None:
        check_int("max_new_tokens", self.max_new_tokens)
        check_int("num_beams", self.num_beams)
        check_int("top_k", self.top_k, minimum=0)
        check_int("seed", self.seed, minimum=0)
        check_number("temperature", self.temperature, low=0.0, low_open=True)
        check_number("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        check_number("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        check_device("device", self.device)
        if not self.do_sample and (self.temperature != 1.0 or self.top_p != 1.0 or self.top_k != 0):
            raise ArgumentError("do_sample", "is off: --temperature, --top-p and --top-k only apply with --do-sample")
        if self.compare and not self.coprocessor:
            raise ArgumentError("compare", "needs --coprocessor (it compares the frozen and the augmented model)")
        if self.prompt and self.file:
            raise ArgumentError("file", "and --prompt both give prompts: use one of them")
        if self.store is not None and not Path(self.store).expanduser().is_dir():
            raise ArgumentError("store", f"no such store folder: {self.store} (build one with `dca cache build`)")
        if self.stream and self.num_beams > 1:
            raise ArgumentError("num_beams", "> 1 cannot stream (beam search settles its tokens at the end): "
                                             "add --no-stream")

    def generation_config(self, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
        sampling = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or None) \
            if self.do_sample else {}
        return GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, num_beams=self.num_beams,
                                repetition_penalty=self.repetition_penalty, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=tokenizer.eos_token_id, **sampling)


def read_prompts(args: GenerateArgs) -> list[str]:
    if args.prompt:
        prompts = list(args.prompt)
    elif args.file:
        path = Path(args.file).expanduser()
        if not path.is_file():
            raise ArgumentError("file", f"no such file: {args.file}")
        prompts = [line for line in path.read_text().splitlines() if line.strip()]
    else:
        prompts = [line for line in sys.stdin.read().splitlines() if line.strip()]
    if not prompts or any(not p.strip() for p in prompts):
        raise ArgumentError("prompt" if args.prompt else "file" if args.file else "prompt",
                            "gives no prompt (empty text): pass --prompt TEXT, --file FILE or text on standard input")
    return prompts


def continue_prompt(model: AugmentedLM, tokenizer: PreTrainedTokenizerBase, text: str, augment: bool,
                    config: GenerationConfig, seed: int, stream: bool, templated: bool = False,
                    store: str | None = None) -> str:
    """One continuation of `text` (already templated), printed as it comes if `stream`; returns its text."""
    # a chat template writes the special tokens itself
    encoded = tokenizer(text, return_tensors="pt", add_special_tokens=not templated)
    ids = encoded["input_ids"].to(model.device)
    set_seed(seed)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    out = model.generate(ids, encoded["attention_mask"].to(model.device), augment=augment,
                         generation_config=config, streamer=streamer, store=store if augment else None)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    if not stream:
        print(answer, flush=True)
    return answer


def run_generate(args: GenerateArgs) -> list[dict[str, str]]:
    """Continue every prompt; returns [{prompt, frozen?, augmented?}] as printed."""
    check_sources(args.model, args.coprocessor)
    prompts = read_prompts(args)
    model, tokenizer = load_served(args.model, args.coprocessor, args.device)
    config = args.generation_config(tokenizer)
    runs = [("frozen", False), ("augmented", True)] if args.compare else \
        [("augmented" if args.augment and model.coprocessor is not None else "frozen", args.augment)]
    results = []
    for i, prompt in enumerate(prompts):
        text = chat_text(tokenizer, [{"role": "user", "content": prompt}]) if args.chat else prompt
        print(f"=== prompt {i + 1}/{len(prompts)}: {prompt}", flush=True)
        result = {"prompt": prompt}
        for label, augment in runs:
            print(f"--- {label}:", flush=True)
            result[label] = continue_prompt(model, tokenizer, text, augment, config, args.seed, args.stream,
                                            templated=args.chat, store=args.store)
        results.append(result)
    return results
