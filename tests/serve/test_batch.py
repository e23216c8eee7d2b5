"""Rows of one batched generate call each sample, stop and stream as they would alone."""

import pytest
import torch

from dca.serve.batch import Row, Sampling, generate_rows

PROMPTS = ["the cat sees", "a big red dog chases the small bird and then", "the tree"]


def reference(model, tokenizer, prompt, augment, max_tokens, **sampling):
    """`AugmentedLM.generate` on the prompt alone: its new tokens up to (without) the first end-of-sequence."""
    ids = torch.tensor([tokenizer(prompt).input_ids])
    out = model.generate(ids, augment=augment, max_new_tokens=max_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, **sampling)[0, ids.shape[1]:].tolist()
    return out[: out.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in out else out


@pytest.mark.parametrize("augment", [True, False])
def test_greedy_rows_of_a_left_padded_batch_equal_each_prompt_alone(served, augment):
    model, tokenizer = served
    rows = [Row(tokenizer(p).input_ids, 12, Sampling(temperature=0)) for p in PROMPTS]
    generate_rows(model, tokenizer, rows, augment)
    for prompt, row in zip(PROMPTS, rows, strict=True):
        expected = reference(model, tokenizer, prompt, augment, 12, do_sample=False)
        assert row.tokens == expected
        assert row.finish_reason == ("length" if len(expected) == 12 else "stop")
        assert row.text == tokenizer.decode(expected, skip_special_tokens=True)


def test_augmentation_changes_the_tokens(served):
    # otherwise the tests above could not tell augment=True from False
    model, tokenizer = served
    on = [Row(tokenizer(p).input_ids, 12, Sampling(temperature=0)) for p in PROMPTS]
    off = [Row(tokenizer(p).input_ids, 12, Sampling(temperature=0)) for p in PROMPTS]
    generate_rows(model, tokenizer, on, True)
    generate_rows(model, tokenizer, off, False)
    assert [r.tokens for r in on] != [r.tokens for r in off]


def test_a_seeded_row_samples_what_transformers_samples_from_that_seed(served):
    model, tokenizer = served
    sampling = dict(temperature=0.8, top_k=6, top_p=0.9)
    row = Row(tokenizer(PROMPTS[1]).input_ids, 10, Sampling(seed=123, **sampling))
    generate_rows(model, tokenizer, [row], True)
    torch.manual_seed(123)
    assert row.tokens == reference(model, tokenizer, PROMPTS[1], True, 10, do_sample=True, **sampling)


def test_a_seeded_row_draws_the_same_tokens_in_any_batch(served):
    model, tokenizer = served
    def seeded():
        return Row(tokenizer(PROMPTS[0]).input_ids, 10, Sampling(temperature=1.0, seed=7))
    alone = seeded()
    generate_rows(model, tokenizer, [alone], True)
    batch = [Row(tokenizer(PROMPTS[1]).input_ids, 10, Sampling(temperature=0.5, top_p=0.5)), seeded(),
             Row(tokenizer(PROMPTS[2]).input_ids, 4, Sampling(temperature=0))]
    generate_rows(model, tokenizer, batch, True)
    assert batch[1].tokens == alone.tokens
    other = Row(tokenizer(PROMPTS[0]).input_ids, 10, Sampling(temperature=1.0, seed=8))
    generate_rows(model, tokenizer, [other], True)
    assert other.tokens != alone.tokens  # the seed matters


def test_rows_stop_at_their_own_budget_stop_string_or_cancel_flag(served):
    model, tokenizer = served
    free = Row(tokenizer(PROMPTS[1]).input_ids, 16, Sampling(temperature=0))
    generate_rows(model, tokenizer, [free], True)
    words = free.text.split()
    assert len(words) >= 4, free.text  # the pretrained toy model continues with words
    pieces = []
    stopped = Row(tokenizer(PROMPTS[1]).input_ids, 16, Sampling(temperature=0), stop=(words[3],),
                  on_text=pieces.append)
    short = Row(tokenizer(PROMPTS[1]).input_ids, 2, Sampling(temperature=0))
    seen = []
    cancelled = Row(tokenizer(PROMPTS[1]).input_ids, 16, Sampling(temperature=0),
                    on_text=seen.append, is_cancelled=lambda: len(seen) >= 1)
    generate_rows(model, tokenizer, [stopped, short, cancelled], True)
    assert stopped.finish_reason == "stop" and stopped.text == free.text[: free.text.find(words[3])]
    assert "".join(pieces) == stopped.text  # streamed text is the answer, without the stop string
    assert short.finish_reason == "length" and short.tokens == free.tokens[:2]
    assert cancelled.finish_reason == "cancelled" and cancelled.tokens == free.tokens[: len(cancelled.tokens)]
    assert len(cancelled.tokens) < len(free.tokens)
