"""`dca bench`: what one training step costs, one-pass versus the naive alternatives, side by side.

For each size, several ways to spend one optimiser step on the same batch:

* ``one_pass``       -- `AugmentedLM.training_loss` (three passes for all P positions at once), with
  grouped attention (`dca.attention`: linear in P);
* ``one_pass_dense`` -- the same with the dense reference mask over all T + P·G keys;
* ``one_pass_flex``  -- the same through flex attention with a block mask (`dca.attention.flex`; CUDA only,
  chosen with ``--methods``);
* ``one_pass_ckpt``  -- grouped, with activation checkpointing of both group passes (`dca.recompute`);
  ``one_pass_flex_ckpt`` likewise through flex attention;
* ``sequential``     -- the per-position computation of `dca.reference` (augment, then continue),
  once for each of the B * P insertion points, gradients accumulated;
* ``finetune``       -- plain full fine-tuning of the decoder on the same B x T tokens, for scale.

Beside each one-pass row stands its arithmetic floor against fine-tuning: the coprocessor's P·N tokens
forward and backward with weight gradients (6 units a token), the P·G group tokens forward and
backward to their inputs (4), the T prefix tokens forward only (2), against 6·T for fine-tuning.

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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from dca.atomic import write_figure, write_file
from dca.checks import check_device, check_int, check_writable_file
from dca.config import CoprocessorConfig, help_meta
from dca.errors import ArgumentError
from dca.model import AugmentedLM
from dca.reference import sequential_group_losses
from dca.studies.tensor_memory import TensorPeak

METHODS = ("one_pass", "one_pass_dense", "one_pass_ckpt", "sequential", "finetune")  # a size's default
ONE_PASS = {"one_pass": ("grouped", False), "one_pass_dense": ("dense", False), "one_pass_ckpt": ("grouped", True),
            "one_pass_flex": ("flex", False), "one_pass_flex_ckpt": ("flex", True)}
ALL_METHODS = (*METHODS, "one_pass_flex", "one_pass_flex_ckpt")


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
    heads: int | None = None  # default: hidden // 64 (at least 2)
    kv_heads: int | None = None  # default: heads
    intermediate: int | None = None  # default: 3 x hidden
    vocab: int = 8192
    tied: bool = False  # input and output embeddings shared (SmolLM2 shares them)
    methods: tuple[str, ...] = METHODS

    def decoder_config(self) -> LlamaConfig:
        heads = self.heads or max(2, self.hidden // 64)
        return LlamaConfig(vocab_size=self.vocab, hidden_size=self.hidden,
                           intermediate_size=self.intermediate or self.hidden * 3, num_hidden_layers=self.layers,
                           num_attention_heads=heads, num_key_value_heads=self.kv_heads or heads,
                           max_position_embeddings=4096, tie_word_embeddings=self.tied)

    @property
    def floor(self) -> float:
        """The one-pass step's arithmetic against fine-tuning the same tokens (module docstring)."""
        group = self.latents + self.ahead - 1
        tokens = 6 * self.positions * self.latents + 4 * self.positions * group + 2 * self.seq_len
        return tokens / (6 * self.seq_len)


# the paper's T, N, A on a 2-layer h64 Llama: how a step grows with P alone
SWEEP = {f"p{p}": BenchSize(f"p{p}", hidden=64, layers=2, seq_len=2048, batch=1, positions=p, latents=64, ahead=16,
                            methods=("one_pass", "one_pass_dense")) for p in (16, 32, 64, 128)}
SIZES = {
    "xs": BenchSize("xs", hidden=128, layers=4, seq_len=256, batch=2, positions=8, latents=8, ahead=8),
    "s": BenchSize("s", hidden=256, layers=6, seq_len=512, batch=2, positions=16, latents=8, ahead=16),
    "m": BenchSize("m", hidden=576, layers=12, seq_len=512, batch=1, positions=32, latents=16, ahead=16),
    # the paper's row on SmolLM2-135M's architecture: only the checkpointed step fits in 24 GB
    "paper": BenchSize("paper", hidden=576, layers=30, seq_len=2048, batch=1, positions=128, latents=64, ahead=16,
                       heads=9, kv_heads=3, intermediate=1536, vocab=49152, tied=True,
                       methods=("one_pass_ckpt", "finetune")),
    **SWEEP,
}
ALIASES = {"sweep": list(SWEEP)}


@dataclass
class BenchArgs:
    """Arguments of `dca bench`."""

    sizes: list[str] = field(default_factory=lambda: ["xs", "s"],
                             metadata=help_meta(f"from {list(SIZES)}, or 'sweep' for {list(SWEEP)}"))
    repeats: int = field(default=3, metadata=help_meta("timed steps per method (after one warm-up)"))
    device: str = field(default="cuda" if torch.cuda.is_available() else "cpu", metadata=help_meta("cpu or cuda"))
    methods: list[str] = field(default_factory=list, metadata=help_meta(
        f"run these at every size instead of each size's own (from {list(ALL_METHODS)}; the flex ones need CUDA)"))
    batch: int = field(default=0, metadata=help_meta("batch size of every size (0: each size's own)"))
    bf16: bool = field(default=False, metadata=help_meta("run each step under bf16 autocast, as `dca train` does on "
                                                         "CUDA"))
    out: str = field(default="runs/bench.json", metadata=help_meta("where to write the JSON results (and the "
                                                                   "P-sweep plot beside it)"))
    memory: bool = field(default=True, metadata=help_meta("also measure peak memory (one child process per method)"))
    latency: bool = field(default=False, metadata=help_meta("time to first token with augmentation against the "
                                                            "plain prefill instead (dca.studies.latency)"))
    prompt_lengths: list[int] = field(default_factory=lambda: [128, 512, 1024],
                                      metadata=help_meta("prompt lengths of --latency"))
    model: str = field(default="smollm2-135m", metadata=help_meta("decoder of --latency"))
    coprocessor: str = field(default="coprocessors/smollm2-135m-wiki", metadata=help_meta("coprocessor of --latency"))
    answers: int = field(default=0, metadata=help_meta("with --latency: also time this many GSM8K answers, augmented "
                                                      "vs zero-shot chain of thought (needs `make eval-data`)"))

    def __post_init__(self) -> None:
        self.sizes = [name for entry in self.sizes for name in ALIASES.get(entry, [entry])]
        unknown = [s for s in self.sizes if s not in SIZES]
        if unknown or not self.sizes:
            raise ArgumentError("sizes", f"has unknown or no names {unknown}; choose from {list(SIZES)} or "
                                         f"{list(ALIASES)}")
        check_int("repeats", self.repeats)
        check_int("batch", self.batch, minimum=0)
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown:
            raise ArgumentError("methods", f"has unknown names {unknown}; choose from {list(ALL_METHODS)}")
        flex = [m for m in self.methods if ONE_PASS.get(m, ("",))[0] == "flex"]
        if flex and not self.device.startswith("cuda"):
            raise ArgumentError("methods", f"{flex} need --device cuda: torch has no flex attention backward on CPU")
        check_device("device", self.device)
        for length in self.prompt_lengths:
            check_int("prompt_lengths", length)
        check_int("answers", self.answers, minimum=0)
        if self.latency and not self.prompt_lengths and not self.answers:
            raise ArgumentError("prompt_lengths", "is empty and --answers 0: --latency would measure nothing")


def _setup(size: BenchSize, device: str, seed: int = 0):
    torch.manual_seed(seed)
    decoder = AutoModelForCausalLM.from_config(size.decoder_config()).to(device)
    model = AugmentedLM.from_decoder(decoder, CoprocessorConfig(num_latents=size.latents, num_ahead=size.ahead))
    model.train()
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, size.vocab, (size.batch, size.seq_len), generator=generator).to(device)
    first = model.coprocessor.config.first_position  # "overwrite" (the default): t >= N-1, all N latents read
    positions = torch.stack([torch.randperm(size.seq_len - 1 - first, generator=generator)[: size.positions].sort()
                             .values + first for _ in range(size.batch)]).to(device)
    finetuned = AutoModelForCausalLM.from_config(size.decoder_config()).to(device).train() \
        if "finetune" in size.methods else None
    return model, finetuned, input_ids, positions


def _sized(name: str, batch: int = 0, methods: tuple[str, ...] = ()) -> BenchSize:
    """The size `name` with the command's batch and methods, where it gives them."""
    size = SIZES[name]
    return replace(size, batch=batch or size.batch, methods=tuple(methods) or size.methods)


def _step_fn(method: str, model: AugmentedLM, finetuned, input_ids: torch.Tensor, positions: torch.Tensor,
             bf16: bool = False):
    coprocessor_params = [p for p in model.parameters() if p.requires_grad]

    def one_pass():
        model.group_attention, model.activation_checkpointing = ONE_PASS[method]
        model.training_loss(input_ids, positions).loss.backward()

    def sequential():
        total = sum(int(min(model.coprocessor.config.num_ahead, input_ids.shape[1] - 1 - t))
                    for t in positions.flatten().tolist())
        for b in range(input_ids.shape[0]):
            for t in positions[b].tolist():
                (sequential_group_losses(model, input_ids[b : b + 1], t).sum() / total).backward()

    def finetune():
        finetuned(input_ids=input_ids, labels=input_ids).loss.backward()

    step = one_pass if method in ONE_PASS else {"sequential": sequential, "finetune": finetune}[method]
    params = list(finetuned.parameters()) if method == "finetune" else coprocessor_params

    def run():
        for p in params:
            p.grad = None
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            step()

    return run


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_methods(size: BenchSize, device: str, repeats: int, bf16: bool = False) -> dict[str, list[float]]:
    model, finetuned, input_ids, positions = _setup(size, device)
    steps = {m: _step_fn(m, model, finetuned, input_ids, positions, bf16) for m in size.methods}
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {m: [] for m in size.methods}
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


def peak_memory_child(size_name: str, method: str, device: str, batch: int = 0,
                      bf16: bool = False) -> tuple[float, float]:
    """Run in a fresh process: the peak memory one step of `method` adds, in MB, as (the process's: peak RSS
    growth on CPU, peak allocation on CUDA; the tensors' alone: the peak of bytes they hold, on CPU a second step
    under `TensorPeak`)."""
    model, finetuned, input_ids, positions = _setup(_sized(size_name, batch, (method,)), device)
    step = _step_fn(method, model, finetuned, input_ids, positions, bf16)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        allocated = (torch.cuda.max_memory_allocated() - base) / 2**20
        return allocated, allocated  # CUDA's caching allocator reports the tensors' peak itself
    base = _rss_mb("VmRSS")
    step()
    rss = _rss_mb("VmHWM") - base
    existing = [*model.parameters(), *model.buffers(), *(finetuned.parameters() if finetuned is not None else ())]
    with TensorPeak(existing) as peak:
        step()  # which starts by dropping the first step's gradients
    return rss, peak.peak_bytes / 2**20


def measure_memory(size_name: str, method: str, device: str, batch: int = 0,
                   bf16: bool = False) -> tuple[float, float]:
    """`peak_memory_child` in a fresh process, so that earlier methods leave nothing behind."""
    code = ("import sys, json; from dca.studies.bench import peak_memory_child; "
            f"print(json.dumps(peak_memory_child({size_name!r}, {method!r}, {device!r}, {batch!r}, {bf16!r})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if result.returncode != 0:
        raise RuntimeError(f"memory measurement of {method} at size {size_name} failed:\n{result.stderr[-2000:]}")
    rss, tensors = json.loads(result.stdout.strip().splitlines()[-1])
    return float(rss), float(tensors)


def run_bench(args: BenchArgs) -> dict:
    if args.latency:
        from dca.studies.latency import run_latency

        return run_latency(args)
    check_writable_file("out", args.out)
    rows = []
    for name in args.sizes:
        size = _sized(name, args.batch, tuple(args.methods))
        print(f"[bench] size {name}: {asdict(size)}", file=sys.stderr, flush=True)
        # memory first, each method in a child process, while this one is still small (the paper row needs
        # about half of a 24 GB machine per process)
        measured = ({m: measure_memory(name, m, args.device, args.batch, args.bf16) for m in size.methods}
                    if args.memory else {})
        memory = {m: rss for m, (rss, _) in measured.items()}
        times = time_methods(size, args.device, args.repeats, args.bf16)
        medians = {m: statistics.median(times[m]) for m in size.methods}
        row = {"size": asdict(size), "median_s": medians, "times_s": times, "peak_mem_mb": memory,
               "tensor_peak_mb": {m: tensors for m, (_, tensors) in measured.items()},
               "floor_vs_finetune": size.floor}
        if "finetune" in medians:
            row["vs_finetune"] = {m: medians[m] / medians["finetune"] for m in medians if m in ONE_PASS}
        if "sequential" in medians:
            row["speedup_vs_sequential"] = {m: medians["sequential"] / medians[m] for m in medians if m in ONE_PASS}
        rows.append(row)
    result = {
        "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "bf16": args.bf16,
        "rows": rows,
    }
    out = Path(args.out)
    write_file(out, json.dumps(result, indent=2).encode())
    print(format_table(result))
    if plot_sweep(result, out.with_suffix(".png")):
        print(f"\nplot of the P sweep: {out.with_suffix('.png')}")
    print(f"\nwritten to {out}")
    return result


def format_table(result: dict) -> str:
    """One line per size and method; ratios are to fine-tuning (with the arithmetic floor) and to sequential."""
    header = ("| size | B x T | P | N | A | method | step s | peak MB | tensors MB | × finetune (floor) "
              "| speed-up vs sequential |")
    autocast = ", bf16 autocast" if result.get("bf16") else ""
    lines = [f"device: {result['device']}, torch {result['torch']}, {result['threads']} threads{autocast}", "", header,
             "|" + "---|" * 11]
    for row in result["rows"]:
        s = row["size"]
        for method, seconds in row["median_s"].items():
            memory = f"{row['peak_mem_mb'][method]:.0f}" if row["peak_mem_mb"] else "-"
            tensors = row.get("tensor_peak_mb", {}).get(method)
            tensors = f"{tensors:.0f}" if tensors is not None else "-"
            ratio = row.get("vs_finetune", {}).get(method)
            ratio = f"{ratio:.2f}x ({row['floor_vs_finetune']:.2f}x)" if ratio is not None else "-"
            speedup = row.get("speedup_vs_sequential", {}).get(method)
            lines.append(f"| {s['name']} (h{s['hidden']}, {s['layers']}L) | {s['batch']} x {s['seq_len']} "
                         f"| {s['positions']} | {s['latents']} | {s['ahead']} | {method} | {seconds:.3f} | {memory} "
                         f"| {tensors} | {ratio} | {f'{speedup:.1f}x' if speedup else '-'} |")
    return "\n".join(lines)


def plot_sweep(result: dict, path: Path) -> bool:
    """Step time and peak memory against P, grouped vs dense (rows of the P sweep only); False if none."""
    rows = [r for r in result["rows"] if r["size"]["name"] in SWEEP]
    if len(rows) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if rows[0]["peak_mem_mb"] else 1, figsize=(9, 3.6), squeeze=False)
    ps = [r["size"]["positions"] for r in rows]
    for method, label in (("one_pass", "grouped (dca.attention)"), ("one_pass_flex", "flex attention"),
                          ("one_pass_dense", "dense mask")):
        if any(method not in r["median_s"] for r in rows):
            continue
        axes[0][0].plot(ps, [r["median_s"][method] for r in rows], "o-", label=label)
        if rows[0]["peak_mem_mb"]:
            line, = axes[0][1].plot(ps, [r["peak_mem_mb"][method] for r in rows], "o-", label=f"{label}, RSS")
            if rows[0].get("tensor_peak_mb"):
                axes[0][1].plot(ps, [r["tensor_peak_mb"][method] for r in rows], "s--", color=line.get_color(),
                                label=f"{label}, tensors")
    s = rows[0]["size"]
    titles = ("one training step (s)", "peak memory (MB)")
    for ax, title in zip(axes[0], titles, strict=False):
        ax.set_xticks(ps, [str(p) for p in ps])  # linear axes: linear growth is a straight line
        ax.set_ylim(bottom=0)
        ax.set_xlabel("insertion points P")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"T = {s['seq_len']}, N = {s['latents']}, A = {s['ahead']}, {s['layers']}-layer h{s['hidden']} "
                 f"Llama, {result['device']}, {result['threads']} thread(s)", fontsize=9)
    fig.tight_layout()
    write_figure(path, fig, dpi=110)
    return True
