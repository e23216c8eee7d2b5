"""`dca bench`: what one training step costs, one-pass versus the naive alternatives, side by side.

For each size, three ways to spend one optimiser step on the same batch:

* ``one_pass``   -- `AugmentedLM.training_loss` (three passes for all P positions at once);
* ``sequential`` -- the per-position computation of `dca.reference` (augment, then continue),
  once for each of the B * P insertion points, gradients accumulated;
* ``finetune``   -- plain full fine-tuning of the decoder on the same B x T tokens, for scale.

Times are medians of interleaved repeats in one process (machines are noisy; ratios taken side by
side are what to quote). Peak memory is measured per method in a fresh child process: CUDA's peak
allocation on a GPU, otherwise the growth of the process's peak RSS over its size after setup.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from dca.atomic import write_file
from dca.checks import check_device, check_int, check_writable_file
from dca.config import CoprocessorConfig, help_meta
from dca.errors import ArgumentError
from dca.model import AugmentedLM
from dca.reference import sequential_group_losses

METHODS = ("one_pass", "sequential", "finetune")


@dataclass(frozen=True)
class BenchSize:
    name: str
    hidden: int
    layers: int
    seq_len: int
    batch: int
    positions: int
    latents: int
    ahead: int

    def decoder_config(self) -> LlamaConfig:
        heads = max(2, self.hidden // 64)
        return LlamaConfig(vocab_size=8192, hidden_size=self.hidden, intermediate_size=self.hidden * 3,
                           num_hidden_layers=self.layers, num_attention_heads=heads, num_key_value_heads=heads,
                           max_position_embeddings=4096)


SIZES = {
    "xs": BenchSize("xs", hidden=128, layers=4, seq_len=256, batch=2, positions=8, latents=8, ahead=8),
    "s": BenchSize("s", hidden=256, layers=6, seq_len=512, batch=2, positions=16, latents=8, ahead=16),
    "m": BenchSize("m", hidden=576, layers=12, seq_len=512, batch=1, positions=32, latents=16, ahead=16),
}


@dataclass
class BenchArgs:
    """Arguments of `dca bench`."""

    sizes: list[str] = field(default_factory=lambda: ["xs", "s"], metadata=help_meta(f"from {list(SIZES)}"))
    repeats: int = field(default=3, metadata=help_meta("timed steps per method (after one warm-up)"))
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata=help_meta("cpu or cuda"))
    out: str = field(default="runs/bench.json", metadata=help_meta("where to write the JSON results"))
    memory: bool = field(default=True, metadata=help_meta("also measure peak memory (one child process per method)"))

    def __post_init__(self) -> None:
        unknown = [s for s in self.sizes if s not in SIZES]
        if unknown or not self.sizes:
            raise ArgumentError("sizes", f"has unknown or no names {unknown}; choose from {list(SIZES)}")
        check_int("repeats", self.repeats)
        check_device("device", self.device)


def _setup(size: BenchSize, device: str, seed: int = 0):
    torch.manual_seed(seed)
    decoder = AutoModelForCausalLM.from_config(size.decoder_config()).to(device)
    model = AugmentedLM.from_decoder(decoder, CoprocessorConfig(num_latents=size.latents, num_ahead=size.ahead))
    model.train()
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 8192, (size.batch, size.seq_len), generator=generator).to(device)
    positions = torch.stack([torch.randperm(size.seq_len - 1, generator=generator)[: size.positions].sort().values
                             for _ in range(size.batch)]).to(device)
    finetuned = AutoModelForCausalLM.from_config(size.decoder_config()).to(device).train()
    return model, finetuned, input_ids, positions


def _step_fn(method: str, model: AugmentedLM, finetuned, input_ids: torch.Tensor, positions: torch.Tensor):
    coprocessor_params = [p for p in model.parameters() if p.requires_grad]

    def one_pass():
        model.training_loss(input_ids, positions).loss.backward()

    def sequential():
        total = sum(int(min(model.coprocessor.config.num_ahead, input_ids.shape[1] - 1 - t))
                    for t in positions.flatten().tolist())
        for b in range(input_ids.shape[0]):
            for t in positions[b].tolist():
                (sequential_group_losses(model, input_ids[b : b + 1], t).sum() / total).backward()

    def finetune():
        finetuned(input_ids=input_ids, labels=input_ids).loss.backward()

    step = {"one_pass": one_pass, "sequential": sequential, "finetune": finetune}[method]
    params = list(finetuned.parameters()) if method == "finetune" else coprocessor_params

    def run():
        for p in params:
            p.grad = None
        step()

    return run


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_methods(size: BenchSize, device: str, repeats: int) -> dict[str, list[float]]:
    model, finetuned, input_ids, positions = _setup(size, device)
    steps = {m: _step_fn(m, model, finetuned, input_ids, positions) for m in METHODS}
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(repeats):  # interleaved, so drift in machine speed hits every method alike
        for method, step in steps.items():
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[method].append(time.perf_counter() - start)
    return times


def _rss_mb(field_name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_memory_child(size_name: str, method: str, device: str) -> float:
    """Run in a fresh process: the peak memory one step of `method` adds, in MB."""
    model, finetuned, input_ids, positions = _setup(SIZES[size_name], device)
    step = _step_fn(method, model, finetuned, input_ids, positions)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _rss_mb("VmRSS")
    step()
    return _rss_mb("VmHWM") - base


def measure_memory(size_name: str, method: str, device: str) -> float:
    code = ("import sys, json; from dca.studies.bench import peak_memory_child; "
            f"print(json.dumps(peak_memory_child({size_name!r}, {method!r}, {device!r})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement of {method} at size {size_name} failed:\n{result.stderr[-2000:]}")
    return float(result.stdout.strip().splitlines()[-1])


def run_bench(args: BenchArgs) -> dict:
    check_writable_file("out", args.out)
    rows = []
    for name in args.sizes:
        size = SIZES[name]
        print(f"[bench] size {name}: {asdict(size)}", file=sys.stderr, flush=True)
        times = time_methods(size, args.device, args.repeats)
        medians = {m: statistics.median(times[m]) for m in METHODS}
        memory = {m: measure_memory(name, m, args.device) for m in METHODS} if args.memory else {}
        rows.append({
            "size": asdict(size),
            "median_s": medians,
            "times_s": times,
            "peak_mem_mb": memory,
            "speedup_vs_sequential": medians["sequential"] / medians["one_pass"],
            "one_pass_vs_finetune": medians["one_pass"] / medians["finetune"],
        })
    result = {
        "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file(out, json.dumps(result, indent=2).encode())
    print(format_table(result))
    print(f"\nwritten to {out}")
    return result


def format_table(result: dict) -> str:
    header = ("| size | B x T | P | N | A | one-pass s | sequential s | finetune s | speed-up vs sequential "
              "| one-pass / finetune | peak MB one-pass / sequential / finetune |")
    lines = [f"device: {result['device']}, torch {result['torch']}, {result['threads']} threads", "", header,
             "|" + "---|" * 11]
    for row in result["rows"]:
        s, t, m = row["size"], row["median_s"], row["peak_mem_mb"]
        mem = " / ".join(f"{m[k]:.0f}" for k in METHODS) if m else "-"
        lines.append(f"| {s['name']} (h{s['hidden']}, {s['layers']}L) | {s['batch']} x {s['seq_len']} "
                     f"| {s['positions']} | {s['latents']} | {s['ahead']} | {t['one_pass']:.3f} "
                     f"| {t['sequential']:.3f} | {t['finetune']:.3f} | {row['speedup_vs_sequential']:.1f}x "
                     f"| {row['one_pass_vs_finetune']:.2f}x | {mem} |")
    return "\n".join(lines)
