"""`dca bench --latency`: time to first token with augmentation against the plain prefill, by prompt length.

At inference the coprocessor is called once, at the end of the prompt. What that adds before the first token:

* ``prefill``       -- the frozen decoder over the prompt (``logits_to_keep=1``): the plain time to first token;
* ``decode step``   -- one single-token step of the frozen decoder after that prompt;
* ``augment``       -- `AugmentedLM.augment`: the prompt and the N soft tokens in one pass (a LoRA coprocessor's
  update on the soft tokens only, `Coprocessor.read_after_prompt`), then the N latents, with their logits;
* ``augment, two passes`` -- the straightforward computation (`augment_with_grad` without gradients): prefill,
  coprocessor over a fork of the cache, latents -- what `augment` did before;
* ``generate, frozen`` / ``generate, augmented`` / ``generate, async`` -- transformers' `generate` up to its first
  new token (taken by a streamer), plain, augmented, and with asynchronous augmentation (`augment="async"`: the
  first token straight after the prefill, the coprocessor on a background thread; paper App. A.5).

The target (issue 10): augmented time to first token <= (prefill + 2 decode steps) x 1.05. Times are medians of
interleaved repeats; machines are noisy, ratios taken side by side are what to quote.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from dca.cache import fork_cache
from dca.model import AugmentedLM

WAYS = ("prefill", "decode step", "augment", "augment, two passes", "generate, frozen", "generate, augmented",
        "generate, async")
TARGET_STEPS, TARGET_SLACK = 2, 1.05


def prompt_ids(tokenizer, length: int) -> torch.Tensor:
    """[1, length] token ids of real text (held-out Wikipedia lead sections, joined), not random ids."""
    from dca.resources import load_texts

    ids: list[int] = []
    for text in load_texts("wiki", limit=400)[::-1]:  # from the end: the training run read the start
        ids += tokenizer(text + "\n\n").input_ids
        if len(ids) >= length:
            return torch.tensor([ids[:length]])
    raise RuntimeError(f"the wiki corpus holds fewer than {length} tokens")


class _FirstToken:
    """A streamer that notes when the first new token arrives (its first `put` is the prompt)."""

    def __init__(self):
        self.puts, self.first = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def _time_to_first_token(model: AugmentedLM, ids: torch.Tensor, augment: bool | str) -> float:
    """Seconds until `generate` hands its first new token to a streamer (async keeps working after it)."""
    streamer = _FirstToken()
    start = time.perf_counter()
    model.generate(ids, augment=augment, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                   streamer=streamer)
    return streamer.first - start


def _ways(model: AugmentedLM, ids: torch.Tensor) -> dict:
    """What each way runs; a way that returns a float times itself (generate's first token, by a streamer)."""
    decoder, length = model.decoder, ids.shape[1]
    prefix = decoder(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values
    step_ids, step_pos = ids[:, -1:], torch.tensor([[length]], device=ids.device)
    return {
        "prefill": lambda: decoder(input_ids=ids, use_cache=True, logits_to_keep=1),
        # a fork: the step's keys go to a new tensor, the prompt's cache stays as it is for the next repeat
        "decode step": lambda: decoder(input_ids=step_ids, position_ids=step_pos, past_key_values=fork_cache(prefix),
                                       use_cache=True),
        "augment": lambda: model.augment(ids),
        "augment, two passes": lambda: model.augment_with_grad(ids),
        "generate, frozen": lambda: _time_to_first_token(model, ids, False),
        "generate, augmented": lambda: _time_to_first_token(model, ids, True),
        "generate, async": lambda: _time_to_first_token(model, ids, "async"),
    }


def measure_latency(model: AugmentedLM, tokenizer, lengths: list[int], repeats: int) -> list[dict]:
    rows = []
    with torch.no_grad():
        for length in lengths:
            ids = prompt_ids(tokenizer, length).to(model.device)
            ways = _ways(model, ids)
            for fn in ways.values():  # warm-up
                fn()
            times: dict[str, list[float]] = {way: [] for way in ways}
            cpu: dict[str, list[float]] = {way: [] for way in ways}
            for _ in range(repeats):  # interleaved: drift in machine speed hits every way alike
                for way, fn in ways.items():
                    if model.device.type == "cuda":
                        torch.cuda.synchronize()
                    start, start_cpu = time.perf_counter(), time.process_time()
                    own = fn()
                    if model.device.type == "cuda":
                        torch.cuda.synchronize()
                    times[way].append(own if isinstance(own, float) else time.perf_counter() - start)
                    cpu[way].append(time.process_time() - start_cpu)
            med = {way: statistics.median(t) for way, t in times.items()}
            # CPU time of this process: on a machine shared with other jobs it counts the work done, not the
            # waiting for a core (with several threads it also counts their spinning)
            med_cpu = {way: statistics.median(t) for way, t in cpu.items()}
            target_cpu = (med_cpu["prefill"] + TARGET_STEPS * med_cpu["decode step"]) * TARGET_SLACK
            target = (med["prefill"] + TARGET_STEPS * med["decode step"]) * TARGET_SLACK
            rows.append({"prompt_tokens": length, "median_s": med, "times_s": times, "target_s": target,
                         "ratio": med["augment"] / med["prefill"], "target_ratio": target / med["prefill"],
                         "ratio_two_passes": med["augment, two passes"] / med["prefill"],
                         "ratio_generate": med["generate, augmented"] / med["generate, frozen"],
                         "ratio_async": med["generate, async"] / med["generate, frozen"],
                         "met": med["augment"] <= target, "median_cpu_s": med_cpu, "cpu_s": cpu,
                         "ratio_cpu": med_cpu["augment"] / med_cpu["prefill"],
                         "target_ratio_cpu": target_cpu / med_cpu["prefill"],
                         "met_cpu": med_cpu["augment"] <= target_cpu})
            print(f"[bench latency] {length} tokens: " + ", ".join(f"{w} {s:.4f} s" for w, s in med.items()),
                  file=sys.stderr, flush=True)
    return rows


def format_latency(result: dict) -> str:
    lines = [f"time to first token: {result['model']} + {result['coprocessor']} (N = {result['num_latents']}), "
             f"{result['device']}, {result['threads']} threads, median of {result['repeats']}", "",
             "| prompt tokens | prefill s | decode step s | augment s | × prefill | target × (prefill + 2 steps + 5 %) "
             "| met | two passes (before) × | first token of generate: frozen s | augmented s | × | async s | × "
             "| by CPU time: × (target) |",
             "|" + "---|" * 14]
    for row in result["latency"]:
        m = row["median_s"]
        lines.append(f"| {row['prompt_tokens']} | {m['prefill']:.3f} | {m['decode step']:.4f} | {m['augment']:.3f} "
                     f"| {row['ratio']:.2f}x | {row['target_ratio']:.2f}x | {'yes' if row['met'] else 'no'} "
                     f"| {row['ratio_two_passes']:.2f}x | {m['generate, frozen']:.3f} | {m['generate, augmented']:.3f} "
                     f"| {row['ratio_generate']:.2f}x | {m['generate, async']:.3f} | {row['ratio_async']:.2f}x "
                     f"| {row['ratio_cpu']:.2f}x ({row['target_ratio_cpu']:.2f}x) |")
    return "\n".join(lines)


# (label, benchmark, augment): the augmented model answering directly, beside the frozen model thinking step by
# step (the paper's Table 4 compares the two) and the frozen model answering directly
ANSWER_WAYS = (("augmented, 8-shot", "gsm8k", True), ("frozen, 8-shot", "gsm8k", False),
               ("frozen, zero-shot chain of thought", "gsm8k_cot0", False))


def answer_latency(model: AugmentedLM, tokenizer, limit: int, max_new_tokens: int = 256) -> list[dict]:
    """Seconds per GSM8K answer (one prompt at a time, greedy, to the benchmark's stop strings) beside accuracy."""
    from dca.eval.benchmarks import BENCHMARKS, extract_gsm8k_answer, gsm8k_correct
    from dca.eval.scoring import generate_texts

    rows = []
    for label, name, augment in ANSWER_WAYS:
        bench = BENCHMARKS[name]
        seconds, tokens, correct = [], [], []
        for item in bench.load(limit, seed=0):
            prompt = tokenizer(item.prompt).input_ids
            start = time.perf_counter()
            [text] = generate_texts(model, tokenizer, [prompt], augment=augment, max_new_tokens=max_new_tokens,
                                    stop=bench.stop)
            seconds.append(time.perf_counter() - start)
            tokens.append(len(tokenizer(text, add_special_tokens=False).input_ids))
            correct.append(gsm8k_correct(extract_gsm8k_answer(text), item.answer))
        rows.append({"way": label, "benchmark": name, "augment": augment, "items": len(seconds),
                     "accuracy": sum(correct) / len(correct), "mean_s_per_answer": statistics.mean(seconds),
                     "median_s_per_answer": statistics.median(seconds), "mean_answer_tokens": statistics.mean(tokens),
                     "seconds": seconds})
        print(f"[bench latency] {label}: {statistics.mean(seconds):.2f} s per answer, accuracy "
              f"{sum(correct)}/{len(correct)}", file=sys.stderr, flush=True)
    return rows


def format_answers(rows: list[dict]) -> str:
    lines = ["| GSM8K answers | items | accuracy | s per answer (mean) | median | answer tokens (mean) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['way']} | {r['items']} | {r['accuracy']:.0%} | {r['mean_s_per_answer']:.2f} "
                     f"| {r['median_s_per_answer']:.2f} | {r['mean_answer_tokens']:.0f} |")
    return "\n".join(lines)


def run_latency(args) -> dict:
    """`dca bench --latency`: the table above for `args.model` + `args.coprocessor`, written to `args.out`."""
    from dca.atomic import write_file
    from dca.checks import check_coprocessor, check_writable_file
    from dca.serve.loading import load_served

    out = check_writable_file("out", args.out)
    model, tokenizer = load_served(args.model, str(check_coprocessor("coprocessor", args.coprocessor)), args.device)
    rows = measure_latency(model, tokenizer, list(args.prompt_lengths), args.repeats) if args.prompt_lengths else []
    result = {"model": args.model, "coprocessor": args.coprocessor, "num_latents": model.coprocessor.config.num_latents,
              "device": str(model.device) if model.device.type != "cuda" else torch.cuda.get_device_name(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": args.repeats,
              "target": f"augment <= (prefill + {TARGET_STEPS} decode steps) x {TARGET_SLACK}", "latency": rows}
    write_file(out, json.dumps(result, indent=2).encode())  # the table first: answers take long
    if args.answers:
        result["answers"] = answer_latency(model, tokenizer, args.answers)
        write_file(out, json.dumps(result, indent=2).encode())
    if rows:
        print(format_latency(result))
    if args.answers:
        print("\n" + format_answers(result["answers"]))
    print(f"\nwritten to {out}")
    return result
