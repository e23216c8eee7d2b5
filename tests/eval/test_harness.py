"""`dca.eval.harness.DCALM` on hand-built lm-eval requests, against hand computations on tiny models."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from test_benchmarks import hand_loglikelihood, make_model
from tiny_models import greedy_one_by_one, word_tokenizer

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402

from dca.eval.benchmarks import format_hellaswag, format_mmlu, format_winogrande  # noqa: E402
from dca.eval.harness import DCALM  # noqa: E402
from dca.eval.scoring import encode_pair  # noqa: E402

PAIRS = [("the cat sees", " a dog"), ("the cat sees", " home"), ("a bird ", "likes the red tree"),
         ("dog", " runs"), ("", "the cat runs")]


def instances(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def hand(model, tok, pairs, augment):
    return [hand_loglikelihood(model, *encode_pair(tok, c, t), augment) for c, t in pairs]


def test_is_an_lm_eval_model_and_splits_like_lm_eval():
    lm = DCALM(make_model(words=True), word_tokenizer())
    assert isinstance(lm, LM) and lm.augment
    for context, continuation in PAIRS[:4] + [("the cat  ", "runs")]:
        assert lm._encode_pair(context, continuation) == encode_pair(word_tokenizer(), context, continuation)


@pytest.mark.parametrize(("coprocessor", "augment"), [(False, None), (True, None), (True, False)])
def test_loglikelihood_equals_hand_computation(coprocessor, augment):
    model, tok = make_model(coprocessor=coprocessor, words=True), word_tokenizer()
    lm = DCALM(model, tok, augment=augment, batch_size=2)
    results = lm.loglikelihood(instances("loglikelihood", PAIRS))
    # TemplateLM gives an empty context the prefix token, as encode_pair does
    expected = hand(model, tok, PAIRS, augment=lm.augment)
    assert [ll for ll, _ in results] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert lm.augment == (coprocessor and augment is not False)


def test_loglikelihood_is_greedy():
    model, tok = make_model(words=True), word_tokenizer()
    with torch.no_grad():
        best = int(model.augment(torch.tensor([tok("the cat").input_ids])).logits.argmax())
    word = tok.convert_ids_to_tokens(best)
    lm = DCALM(model, tok)
    other = "dog" if word != "dog" else "cat"
    (_, greedy), (_, not_greedy) = lm.loglikelihood(instances("loglikelihood", [("the cat", " " + word),
                                                                                ("the cat", " " + other)]))
    assert greedy and not not_greedy


def test_loglikelihood_truncates_long_contexts_on_the_left():
    model, tok = make_model(words=True, latent_positions="after"), word_tokenizer()
    lm = DCALM(model, tok, max_length=6)  # 6 positions: 3 context tokens + 2 latents + 2 continuation - 1
    (ll, _), = lm.loglikelihood(instances("loglikelihood", [("the big red cat sees a", " small dog")]))
    assert ll == pytest.approx(hand_loglikelihood(model, tok("cat sees a").input_ids, tok("small dog").input_ids,
                                                  True), rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("layout", ["shared", "replay"])
def test_latents_that_take_no_positions_leave_the_context_room(layout):
    model, tok = make_model(words=True, latent_positions=layout, latent_anchor="replay"), word_tokenizer()
    lm = DCALM(model, tok, max_length=6)  # 6 positions: 5 context tokens + 2 continuation - 1; the latents take none
    assert lm.latent_positions == 0 and DCALM(model, tok, augment=False).latent_positions == 0
    (ll, _), = lm.loglikelihood(instances("loglikelihood", [("the big red cat sees a", " small dog")]))
    assert ll == pytest.approx(hand_loglikelihood(model, tok("big red cat sees a").input_ids,
                                                  tok("small dog").input_ids, True), rel=1e-4, abs=1e-4)


@torch.no_grad()
def test_loglikelihood_rolling_is_the_plain_decoder():
    model, tok = make_model(words=True), word_tokenizer()  # has a coprocessor: rolling must not use it
    text = "the cat sees a dog and then runs home ."
    ids = tok(text).input_ids
    prefix = tok.eos_token_id
    logprobs = F.log_softmax(model.decoder(torch.tensor([[prefix] + ids])).logits[0].float(), -1)
    whole = sum(float(logprobs[k, t]) for k, t in enumerate(ids))
    (total,) = DCALM(model, tok).loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]))
    assert total == pytest.approx(whole, rel=1e-4, abs=1e-4)
    # max_length 4: lm-eval's disjoint windows; the last one keeps as much context as fits
    windows = [([prefix], ids[0:4]), (ids[3:4], ids[4:8]), (ids[5:8], ids[8:10])]
    expected = sum(hand_loglikelihood(model, c, t, False) for c, t in windows)
    (total,) = DCALM(model, tok, max_length=4).loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]))
    assert total == pytest.approx(expected, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("augment", [False, True])
def test_generate_until_stops_at_the_until_strings(augment):
    model, tok = make_model(words=True), word_tokenizer()
    prompts = ["the cat sees a", "a big red bird likes the small", "dog"]
    singles = greedy_one_by_one(model, tok, prompts, augment, max_new_tokens=5)
    until = singles[0].split()[1]
    reqs = [(prompts[0], {"until": [until], "max_gen_toks": 5, "do_sample": False}),
            (prompts[1], {"until": ["zzz"], "max_gen_toks": 5}),
            (prompts[2], {"until": "zzz", "max_gen_toks": 2, "temperature": 0})]
    lm = DCALM(model, tok, augment=augment, batch_size=2)
    texts = lm.generate_until(instances("generate_until", reqs))
    assert texts[0] == singles[0][: singles[0].index(until)] and len(texts[0]) < len(singles[0])
    assert texts[1] == singles[1]
    assert texts[2] == " ".join(singles[2].split()[:2])  # its own max_gen_toks


def test_augment_without_coprocessor_is_refused():
    with pytest.raises(ValueError, match="coprocessor"):
        DCALM(make_model(coprocessor=False), word_tokenizer(), augment=True)


# ------------------------------------------------------------------ dca.eval.benchmarks' prompts against lm-eval's own
def _lm_eval_task_file(relative):
    spec = importlib.util.find_spec("lm_eval")
    return next(iter(spec.submodule_search_locations)) + "/tasks/" + relative


def _load_module(relative):
    spec = importlib.util.spec_from_file_location("task_utils", _lm_eval_task_file(relative))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hellaswag_and_winogrande_match_lm_eval_task_code():
    pytest.importorskip("datasets")
    import datasets

    record = {"activity_label": "Baking", "ctx_a": "A woman mixes flour [step] well.", "ctx_b": "she [header] then",
              "endings": [" pours milk [title] Stir well.", "sings  loudly.", "x", "y"], "label": "2"}
    doc = _load_module("hellaswag/utils.py").process_docs(datasets.Dataset.from_list([record]))[0]
    item = format_hellaswag(record, 0)
    assert (item.context, item.choices, item.answer) == (doc["query"], doc["choices"], doc["gold"])
    wino = _load_module("winogrande/preprocess_winogrande.py")
    record = {"sentence": "Ann beat Bo so _ was glad.", "option1": "Ann", "option2": "Bo", "answer": "1"}
    item = format_winogrande(record, 0)
    assert item.contexts == wino.doc_to_choice(record) and item.choices[0] == wino.doc_to_target(record)
    assert item.answer == wino.doc_to_text(record)


def test_mmlu_matches_lm_eval_template():
    yaml = pytest.importorskip("yaml")
    from jinja2 import Template

    template = yaml.safe_load(open(_lm_eval_task_file("mmlu/default/_default_template_yaml")))
    description = yaml.safe_load(open(_lm_eval_task_file("mmlu/default/mmlu_college_biology.yaml")))["description"]

    def record(i):
        return {"question": f" What is {i}? ", "subject": "college_biology", "choices": list("wxyz"), "answer": i % 4}

    def text(r):
        return Template(template["doc_to_text"]).render(**r)

    shots = [record(i) for i in range(5)]
    expected = description + "".join(f"{text(s)} {'ABCD'[s['answer']]}\n\n" for s in shots) + text(record(7))
    assert format_mmlu(record(7), shots, 0).context == expected
