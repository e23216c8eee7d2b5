"""`dca cache build` writes the augmented caches of documents into a store; `dca cache bench` times the first token
of prompts that start with those documents, with the store and without it.

A prompt is found in the store by its token ids: a prompt tokenised as a whole must begin with exactly the
document's ids, so end documents where the tokenizer cuts (a newline, a full stop) before text is appended.
"""

from __future__ import annotations

import json
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from dca.atomic import write_file
from dca.checks import (
    check_coprocessor,
    check_data_source,
    check_device,
    check_int,
    check_writable_dir,
    check_writable_file,
)
from dca.config import help_meta
from dca.errors import ArgumentError
from dca.serve.loading import check_sources, load_served
from dca.serve.store import ContextStore

DEFAULT_QUESTION = "\n\nQuestion: What is the text above about?\nAnswer:"


@dataclass
class CacheBuildArgs:
    """Arguments of `dca cache build`."""

    model: str = field(default="smollm2-135m", metadata=help_meta("the frozen decoder (builtin name or folder)"))
    coprocessor: str = field(default="coprocessors/smollm2-135m-wiki", metadata=help_meta("a saved coprocessor"))
    docs: str = field(default="wiki", metadata=help_meta("documents: a builtin corpus, a .txt (blank-line separated) "
                                                         "or .jsonl ({'text': ...}) file or folder"))
    out: str = field(default="runs/store", metadata=help_meta("the store folder (created; entries are added)"))
    limit: int | None = field(default=None, metadata=help_meta("store the first N documents only"))
    max_tokens: int = field(default=1024, metadata=help_meta("keep each document's first N tokens"))
    device: str = field(default="auto", metadata=help_meta("auto, cpu, cuda, ..."))

    def __post_init__(self) -> None:
        check_sources(self.model, self.coprocessor)
        if not self.coprocessor:
            raise ArgumentError("coprocessor", "is needed: the store holds augmented caches")
        check_data_source("docs", self.docs)
        if self.limit is not None:
            check_int("limit", self.limit)
        check_int("max_tokens", self.max_tokens)
        check_device("device", self.device)
        if Path(self.out).expanduser().is_file():
            raise ArgumentError("out", f"{self.out} is a file; give a folder for the store")


def document_tokens(tokenizer, docs: list[str], max_tokens: int) -> list[torch.Tensor]:
    return [torch.tensor(tokenizer(doc).input_ids[:max_tokens], dtype=torch.long) for doc in docs]


def run_cache_build(args: CacheBuildArgs) -> dict:
    from dca.resources import load_texts

    store_path = check_writable_dir("out", args.out)
    docs = load_texts(args.docs, args.limit)
    if not docs:
        raise ArgumentError("docs", f"{args.docs} holds no documents")
    model, tokenizer = load_served(args.model, str(check_coprocessor("coprocessor", args.coprocessor)), args.device)
    store = ContextStore(store_path)
    entries = []
    for i, tokens in enumerate(document_tokens(tokenizer, docs, args.max_tokens)):
        start = time.perf_counter()
        context = store.put(model, tokens)
        seconds = time.perf_counter() - start
        entries.append({"document": i, "tokens": tokens.numel(), "entry": context.path.name, "seconds": seconds})
        print(f"[cache build] document {i}: {tokens.numel()} tokens -> {context.path.name} ({seconds:.2f} s)",
              file=sys.stderr, flush=True)
    print(f"{len(entries)} augmented contexts stored in {store_path}")
    return {"store": str(store_path), "entries": entries}


@dataclass
class CacheBenchArgs:
    """Arguments of `dca cache bench`."""

    model: str = field(default="smollm2-135m", metadata=help_meta("the frozen decoder (builtin name or folder)"))
    coprocessor: str = field(default="coprocessors/smollm2-135m-wiki", metadata=help_meta("a saved coprocessor"))
    docs: str = field(default="wiki", metadata=help_meta("documents (as for `dca cache build`)"))
    limit: int = field(default=8, metadata=help_meta("documents to time"))
    max_tokens: int = field(default=512, metadata=help_meta("keep each document's first N tokens"))
    min_tokens: int = field(default=64, metadata=help_meta("skip documents shorter than this"))
    question: str = field(default=DEFAULT_QUESTION, metadata=help_meta("appended to each document"))
    store: str = field(default="runs/store-bench", metadata=help_meta("the store (entries missing are built)"))
    repeats: int = field(default=3, metadata=help_meta("timed runs per prompt and way (after one warm-up)"))
    out: str = field(default="results/store/ttft.json", metadata=help_meta("where to write the JSON results"))
    device: str = field(default="auto", metadata=help_meta("auto, cpu, cuda, ..."))

    def __post_init__(self) -> None:
        check_sources(self.model, self.coprocessor)
        check_data_source("docs", self.docs)
        for name in ("limit", "max_tokens", "min_tokens", "repeats"):
            check_int(name, getattr(self, name))
        check_device("device", self.device)


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_cache_bench(args: CacheBenchArgs) -> dict:
    from dca.resources import load_texts

    out = check_writable_file("out", args.out)
    store = ContextStore(check_writable_dir("store", args.store))
    model, tokenizer = load_served(args.model, str(check_coprocessor("coprocessor", args.coprocessor)), args.device)
    texts = load_texts(args.docs)
    docs = [t for t in document_tokens(tokenizer, texts[: args.limit * 20], args.max_tokens)
            if t.numel() >= args.min_tokens][: args.limit]
    if not docs:
        raise ArgumentError("docs", f"has no document of at least {args.min_tokens} tokens")
    question = torch.tensor(tokenizer(args.question, add_special_tokens=False).input_ids, dtype=torch.long)
    kwargs = dict(max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    ways = {
        "frozen": lambda ids: model.generate(ids, augment=False, **kwargs),
        "augmented, no store": lambda ids: model.generate(ids, **kwargs),
        "augmented, from the store": lambda ids: model.generate(ids, store=store, **kwargs),
    }
    rows = []
    with torch.no_grad():
        for i, doc in enumerate(docs):
            build = _time(lambda doc=doc: store.put(model, doc))  # what the store costs, once, offline
            ids = torch.cat([doc, question])[None].to(model.device)
            times: dict[str, list[float]] = {way: [] for way in ways}
            for fn in ways.values():  # warm-up
                fn(ids)
            for _ in range(args.repeats):  # interleaved: drift in machine speed hits every way alike
                for way, fn in ways.items():
                    times[way].append(_time(lambda fn=fn, ids=ids: fn(ids)))
            medians = {way: statistics.median(t) for way, t in times.items()}
            rows.append({"document": i, "document_tokens": doc.numel(), "prompt_tokens": ids.shape[1],
                         "build_s": build, "ttft_s": medians, "times_s": times})
            print(f"[cache bench] document {i} ({doc.numel()} + {question.numel()} tokens): "
                  + ", ".join(f"{w} {s:.3f} s" for w, s in medians.items()), file=sys.stderr, flush=True)
    summary = {way: statistics.median(r["ttft_s"][way] for r in rows) for way in ways}
    result = {"args": asdict(args), "device": str(model.device),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "question": args.question,
              "store_hits": store.stats["hits"], "median_ttft_s": summary,
              "speedup_from_store": summary["augmented, no store"] / summary["augmented, from the store"],
              "rows": rows}
    write_file(out, json.dumps(result, indent=2).encode())
    table = format_table(result)
    # what was not the default (read off the fields: building the default arguments would check its corpus)
    defaults = {f.name: f.default for f in fields(CacheBenchArgs)}
    given = {k: v for k, v in asdict(args).items() if v != defaults[k]}
    command = " ".join(["dca cache bench", *(f"--{k.replace('_', '-')} {shlex.quote(str(v))}"
                                             for k, v in given.items())])
    write_file(out.with_suffix(".md"), f"{table}\n\nCommand: `OMP_NUM_THREADS={torch.get_num_threads()} {command}`\n")
    print(table)
    print(f"\nwritten to {out} and {out.with_suffix('.md')}")
    return result


def format_table(result: dict) -> str:
    ways = list(result["median_ttft_s"])
    lines = [f"time to first token, s (median of repeats; device {result['device']}, {result['threads']} threads)", "",
             "| document | tokens (document + question) | build entry s | " + " | ".join(ways) + " |",
             "|" + "---|" * (3 + len(ways))]
    for row in result["rows"]:
        lines.append(f"| {row['document']} | {row['document_tokens']} + {row['prompt_tokens'] - row['document_tokens']}"
                     f" | {row['build_s']:.3f} | " + " | ".join(f"{row['ttft_s'][w]:.3f}" for w in ways) + " |")
    lines.append("| median | | | " + " | ".join(f"**{result['median_ttft_s'][w]:.3f}**" for w in ways) + " |")
    return "\n".join(lines)
