"""Time to first token with asynchronous augmentation, beside the plain model and synchronous augmentation.

    python -m dca.studies.async_latency --out results/delay/ttft.json

For each prompt length, the three ways of `AugmentedLM.generate` run interleaved, `repeats` times each, greedy,
`new_tokens` new tokens: ``plain`` (augment=False), ``sync`` (augment=True: prefill, coprocessor, latents, then
the first token) and ``async`` (augment="async": the first token straight after the prefill, the coprocessor on
a background thread). Time to first token is taken when the streamer receives the first new token; the report
holds medians, the async/plain ratio and after how many tokens the asynchronous latents arrived. Speed is
measured here, never in the unit tests.
"""

from __future__ import annotations

import json
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from dca.atomic import write_file
from dca.checks import check_device, check_int, check_writable_file, resolve_device
from dca.config import help_meta
from dca.errors import DCAError
from dca.model import AugmentedLM
from dca.resources import load_model
from dca.serve.asynchronous import generate_async
from dca.studies.demo import SHIPPED, resolve_coprocessor

MODES = ("plain", "sync", "async")


@dataclass
class AsyncLatencyArgs:
    model: str = field(default="smollm2-135m", metadata=help_meta("the frozen decoder"))
    coprocessor: str = field(default=str(SHIPPED), metadata=help_meta("a saved coprocessor for it"))
    prompt_lengths: list[int] = field(default_factory=lambda: [128, 512], metadata=help_meta("prompt tokens"))
    new_tokens: int = field(default=16, metadata=help_meta("tokens generated per call"))
    repeats: int = field(default=7, metadata=help_meta("calls per mode and length (medians are reported)"))
    device: str = field(default="cpu", metadata=help_meta("cpu, cuda, ..."))
    out: str = field(default="results/delay/ttft.json", metadata=help_meta("JSON report"))

    def __post_init__(self) -> None:
        for name in ("new_tokens", "repeats"):
            check_int(name, getattr(self, name))
        for length in self.prompt_lengths:
            check_int("prompt_lengths", length)
        check_device("device", self.device)
        check_writable_file("out", self.out)


class _FirstToken:
    """A streamer that notes when the first new token arrives (the first `put` is the prompt)."""

    def __init__(self):
        self.puts, self.first = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def _call(model: AugmentedLM, mode: str, prompt: torch.Tensor, new_tokens: int) -> dict:
    streamer = _FirstToken()
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=streamer)
    start = time.perf_counter()
    delay = None
    if mode == "async":
        delay = generate_async(model, prompt, **kwargs).latent_delay
    else:
        model.generate(prompt, augment=mode == "sync", **kwargs)
    end = time.perf_counter()
    if mode == "async" and model.device.type == "cuda":
        torch.cuda.synchronize()
    return {"ttft_s": streamer.first - start, "total_s": end - start, "latent_delay": delay}


def run_async_latency(args: AsyncLatencyArgs) -> dict:
    device = resolve_device("device", args.device)
    decoder, _ = load_model(args.model, device=device)
    model = AugmentedLM.from_pretrained(resolve_coprocessor(args.coprocessor), decoder).eval()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length in args.prompt_lengths:
        prompt = torch.randint(0, model._vocab_size, (1, length), generator=generator).to(device)
        for mode in MODES:  # warm-up
            _call(model, mode, prompt, args.new_tokens)
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode in MODES:  # interleaved: the machine's load falls on every mode alike
                runs[mode].append(_call(model, mode, prompt, args.new_tokens))
        row = {"prompt_tokens": length}
        for mode in MODES:
            row[f"{mode}_ttft_s"] = statistics.median(r["ttft_s"] for r in runs[mode])
            row[f"{mode}_total_s"] = statistics.median(r["total_s"] for r in runs[mode])
        delays = [r["latent_delay"] for r in runs["async"]]
        row["async_latent_delays"] = delays
        row["async_over_plain_ttft"] = row["async_ttft_s"] / row["plain_ttft_s"]
        row["sync_over_plain_ttft"] = row["sync_ttft_s"] / row["plain_ttft_s"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    command = "python -m dca.studies.async_latency " + shlex.join(sys.argv[1:])
    report = {"command": command, "args": asdict(args), "device": str(device),
              "torch_threads": torch.get_num_threads(), "num_latents": model.coprocessor.config.num_latents,
              "rows": rows}
    write_file(args.out, json.dumps(report, indent=2).encode())
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse

    from dca.cli import add_dataclass_arguments, dataclass_from_namespace

    parser = argparse.ArgumentParser(prog="python -m dca.studies.async_latency", description=__doc__.split("\n")[0])
    add_dataclass_arguments(parser, AsyncLatencyArgs)
    try:
        run_async_latency(dataclass_from_namespace(AsyncLatencyArgs, parser.parse_args(argv)))
    except DCAError as err:
        print(f"async_latency: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
