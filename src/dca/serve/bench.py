"""`dca bench-serve`: latency and throughput of `dca serve` under concurrent load, on loopback.

The server runs in this process (a uvicorn thread) and clients are threads posting greedy /v1/completions
requests with the standard library, `requests` at a time per level of concurrency, with and without
augmentation. Every answer's HTTP status is counted: 200, or a documented error (503 when the queue is full).
Writes bench.json and bench.md into `--out`, with the exact command.
"""

from __future__ import annotations

import json
import platform
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from dca.atomic import write_file
from dca.checks import check_device, check_int, check_writable_dir
from dca.cli import invoked_command
from dca.config import help_meta
from dca.errors import ArgumentError
from dca.serve.server import ServeArgs, create_app, engine_for, start_in_thread
from dca.studies.demo import SHIPPED

PROMPTS = [
    "The Eiffel Tower is a wrought-iron lattice tower in Paris. It was designed by",
    "Photosynthesis is the process by which plants",
    "The Roman Empire was the post-Republican period of ancient Rome. At its height it",
    "A river is a natural flowing watercourse, usually freshwater, flowing towards",
    "Mount Everest is Earth's highest mountain above sea level, located in",
    "The piano is a keyboard instrument that produces sound when",
    "Jupiter is the fifth planet from the Sun and the largest in the Solar System. It is",
    "The French Revolution was a period of political and societal change in France that began",
]


@dataclass
class BenchServeArgs:
    """Arguments of `dca bench-serve`."""

    model: str = field(default="smollm2-135m", metadata=help_meta("the frozen decoder"))
    coprocessor: str = field(default=str(SHIPPED), metadata=help_meta("a saved coprocessor for it"))
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16],
                                   metadata=help_meta("numbers of clients posting at once"))
    requests: int = field(default=16, metadata=help_meta("requests per level of concurrency (and augment setting)"))
    max_tokens: int = field(default=16, metadata=help_meta("new tokens per request (greedy)"))
    max_batch: int = field(default=16, metadata=help_meta("the server's --max-batch"))
    max_wait_ms: float = field(default=10.0, metadata=help_meta("the server's --max-wait-ms"))
    max_queue: int = field(default=64, metadata=help_meta("the server's --max-queue"))
    device: str = field(default="cpu", metadata=help_meta("auto, cpu, cuda, ..."))
    out: str = field(default="results/serve", metadata=help_meta("report folder"))

    def __post_init__(self) -> None:
        for name in ("requests", "max_tokens", "max_batch", "max_queue"):
            check_int(name, getattr(self, name))
        if not self.concurrency or any(isinstance(c, bool) or not isinstance(c, int) or c < 1
                                       for c in self.concurrency):
            raise ArgumentError("concurrency", f"must be positive integers, got {self.concurrency!r}")
        check_device("device", self.device)


def _post(url: str, body: dict, timeout: float = 600.0) -> tuple[int, float, int]:
    """(HTTP status, seconds, completion tokens) of one request."""
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            payload = json.loads(answer.read())
            return answer.status, time.perf_counter() - start, payload["usage"]["completion_tokens"]
    except urllib.error.HTTPError as err:
        return err.code, time.perf_counter() - start, 0


def measure(url: str, concurrency: int, requests: int, max_tokens: int, augment: bool) -> dict:
    """`requests` greedy completions from `concurrency` client threads: latency percentiles and throughput."""
    bodies = [{"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0, "augment": augment}
              for i in range(requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(lambda body: _post(url, body), bodies))
    wall = time.perf_counter() - start
    ok = [a for a in answers if a[0] == 200]
    latencies = np.array([a[1] for a in ok]) if ok else np.array([np.nan])
    statuses: dict[str, int] = {}
    for status, _, _ in answers:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    tokens = sum(a[2] for a in ok)
    return {"augment": augment, "concurrency": concurrency, "requests": requests, "statuses": statuses,
            "p50_s": float(np.percentile(latencies, 50)), "p95_s": float(np.percentile(latencies, 95)),
            "requests_per_s": len(ok) / wall, "tokens_per_s": tokens / wall, "completion_tokens": tokens,
            "wall_s": wall}


def markdown(result: dict) -> str:
    lines = [f"# dca bench-serve: {result['model']} + {result['coprocessor']}", "",
             f"Reproduce: `{result['command']}`", "",
             f"{result['device']}, torch {result['torch']}, {result['threads']} thread(s), {result['machine']}; "
             f"{result['args']['requests']} greedy requests of {result['args']['max_tokens']} new tokens per row, "
             f"server max batch {result['args']['max_batch']}, max wait {result['args']['max_wait_ms']} ms.", "",
             "| augment | concurrency | p50 latency (s) | p95 latency (s) | requests/s | tokens/s | statuses |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for row in result["rows"]:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(row["statuses"].items()))
        lines.append(f"| {'yes' if row['augment'] else 'no'} | {row['concurrency']} | {row['p50_s']:.2f} | "
                     f"{row['p95_s']:.2f} | {row['requests_per_s']:.2f} | {row['tokens_per_s']:.1f} | {statuses} |")
    return "\n".join(lines) + "\n"


def run_bench_serve(args: BenchServeArgs) -> dict:
    out = check_writable_dir("out", args.out)
    command = invoked_command("bench-serve", args)
    serve_args = ServeArgs(model=args.model, coprocessor=args.coprocessor, max_batch=args.max_batch,
                           max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, device=args.device)
    engine, name = engine_for(serve_args)
    server, thread, port = start_in_thread(create_app(engine, name))
    url = f"http://127.0.0.1:{port}/v1/completions"
    rows = []
    try:
        _post(url, {"prompt": PROMPTS[0], "max_tokens": 2, "temperature": 0})  # warm-up
        for augment in (False, True):
            for concurrency in args.concurrency:
                row = measure(url, concurrency, args.requests, args.max_tokens, augment)
                print(f"augment={augment!s:5} concurrency={concurrency:3}: p50 {row['p50_s']:.2f} s, p95 "
                      f"{row['p95_s']:.2f} s, {row['requests_per_s']:.2f} req/s, {row['tokens_per_s']:.1f} tok/s, "
                      f"statuses {row['statuses']}", flush=True)
                rows.append(row)
    finally:
        server.should_exit = True
        thread.join()
    result = {"command": command, "args": asdict(args), "model": args.model, "coprocessor": args.coprocessor,
              "device": str(engine.model.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}", "server_stats": engine.stats,
              "rows": rows}
    write_file(Path(out) / "bench.json", json.dumps(result, indent=2))
    write_file(Path(out) / "bench.md", markdown(result))
    print(f"report: {out}/bench.md, bench.json")
    return result
