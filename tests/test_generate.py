"""`AugmentedLM.generate` takes every argument of transformers' `generate` to mean what it means there."""

import warnings

import pytest
import torch
from tiny_models import VOCAB, tiny_decoder
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from dca import AugmentedLM, CoprocessorConfig

EOS = 5
CONFIGS = {
    "default": {},  # replay anchor and positions, gate 0
    "after": {"latent_positions": "after", "gate_init": 0.5},
    "pre_norm": {"latent_source": "pre_norm", "gate_init": 0.5, "latent_anchor": "none"},
}


def make_model(family="llama", **config):
    config = {"num_latents": 3, "num_ahead": 2, **config}
    return AugmentedLM.from_decoder(tiny_decoder(family, "eager"), CoprocessorConfig(**config)).eval()


def left_padded(lengths, seed=0):
    torch.manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, n in enumerate(lengths):
        input_ids[i, width - n:] = torch.randint(6, VOCAB, (n,))
        mask[i, width - n:] = 1
    return input_ids, mask


class PreferEos(LogitsProcessor):
    """EOS wins wherever it is allowed: the minimum length alone then sets a sequence's length."""

    def __call__(self, input_ids, scores):
        return scores + 1e4 * (torch.arange(scores.shape[-1]) == EOS)


LENGTHS = {  # arguments, and the length of every returned sequence (prompts of 7)
    "max_new_tokens": (dict(max_new_tokens=5), 12),
    "max_length": (dict(max_length=12), 12),
    # EOS wins as soon as the minimum allows it: it is the token after the minimum length
    "min_length": (dict(min_length=11, max_length=16, eos_token_id=EOS), 12),
    "min_new_tokens": (dict(min_new_tokens=3, max_new_tokens=9, eos_token_id=EOS), 11),
    "config_max_length": (dict(generation_config=GenerationConfig(max_length=11)), 11),
    "config_min_length": (dict(generation_config=GenerationConfig(min_length=10, max_length=14, eos_token_id=EOS)), 11),
    "config_new_tokens": (dict(generation_config=GenerationConfig(max_new_tokens=4, min_new_tokens=2)), 11),
    "no_length": ({}, 27),  # transformers' model-agnostic default: 20 new tokens
}


def both(model, input_ids, mask, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' advice on max_length defaults
        augmented = model.generate(input_ids, mask, **kwargs)
        plain = model.decoder.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
    return augmented, plain


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("lengths", list(LENGTHS))
def test_lengths_count_the_prompt_and_new_tokens_only(family, config, lengths):
    model = make_model(family, **CONFIGS[config])
    input_ids, mask = left_padded([7, 5])
    kwargs, expected = LENGTHS[lengths]
    if lengths in ("min_length", "min_new_tokens", "config_min_length"):
        kwargs = {**kwargs, "logits_processor": LogitsProcessorList([PreferEos()])}
    else:
        kwargs = {**kwargs, "eos_token_id": None}  # the tiny models' own EOS would end rows at random
    augmented, plain = both(model, input_ids, mask, pad_token_id=0, **kwargs)
    assert augmented.shape == plain.shape == (2, expected)
    assert torch.equal(augmented[:, :7], input_ids)


def test_the_decoders_generation_config_lengths_count_the_same():
    model = make_model("qwen2")
    model.decoder.generation_config.max_length = 13
    input_ids, mask = left_padded([6, 6])
    augmented, plain = both(model, input_ids, mask, pad_token_id=0)
    assert augmented.shape == plain.shape == (2, 13)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_beam_search_on_a_batch_equals_each_row_alone_and_scores_the_augmented_model(family):
    model = make_model(family, latent_positions="after", gate_init=0.5)
    input_ids, mask = left_padded([8, 5, 7], seed=1)
    kwargs = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, length_penalty=0.0, pad_token_id=0,
                  eos_token_id=None, return_dict_in_generate=True, output_scores=True)
    batched = model.generate(input_ids, mask, **kwargs)
    assert batched.sequences.shape == (6, 12)
    plain = model.decoder.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
    assert plain.sequences.shape == batched.sequences.shape
    # the latents matter here: the augmented beams are not the plain decoder's
    assert not torch.allclose(batched.sequences_scores, plain.sequences_scores, atol=1e-3)
    for i in range(3):
        row = input_ids[i][mask[i].bool()][None]
        alone = model.generate(row, **kwargs)
        assert torch.equal(alone.sequences[:, -4:], batched.sequences[2 * i: 2 * i + 2, -4:])
        torch.testing.assert_close(alone.sequences_scores, batched.sequences_scores[2 * i: 2 * i + 2],
                                   rtol=1e-4, atol=1e-4)
        # length_penalty 0: a beam's score is the augmented model's log-probability of its new tokens
        for beam, score in zip(alone.sequences[:, -4:], alone.sequences_scores, strict=True):
            torch.testing.assert_close(augmented_log_prob(model, row, beam), score, rtol=1e-4, atol=1e-4)


def augmented_log_prob(model, prompt, new_tokens):
    out = model.augment(prompt)
    start = int(out.next_position_ids)
    with torch.no_grad():
        rest = model.decoder(new_tokens[None, :-1], past_key_values=out.past_key_values,
                             position_ids=torch.arange(start, start + len(new_tokens) - 1)[None],
                             attention_mask=torch.ones(1, out.attention_mask.shape[1] + len(new_tokens) - 1,
                                                       dtype=torch.long)).logits[0]
    logits = torch.cat([out.logits, rest])
    return logits.float().log_softmax(-1).gather(1, new_tokens[:, None]).sum()


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("returns", [2, 3])
def test_several_return_sequences_each_continue_their_own_prompt(config, returns):
    model = make_model("llama", **CONFIGS[config])
    input_ids, mask = left_padded([7, 4, 6], seed=2)
    greedy = model.generate(input_ids, mask, max_new_tokens=5, pad_token_id=0, eos_token_id=None)
    # top_k=1 sampling is greedy: every returned sequence must be its own prompt's greedy continuation
    sampled = model.generate(input_ids, mask, max_new_tokens=5, do_sample=True, top_k=1, num_return_sequences=returns,
                             pad_token_id=0, eos_token_id=None)
    assert sampled.shape == (input_ids.shape[0] * returns, greedy.shape[1])
    assert torch.equal(sampled, greedy.repeat_interleave(returns, dim=0))


class Recorder(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended = True


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_streamers_see_the_prompt_then_the_new_tokens(family):
    model = make_model(family, latent_positions="after", gate_init=0.5)
    prompt = left_padded([6])[0]
    runs = {}
    for augment in (True, False):
        streamer = Recorder()
        out = model.generate(prompt, max_new_tokens=5, pad_token_id=0, eos_token_id=None, streamer=streamer,
                             augment=augment)
        assert streamer.ended and torch.equal(streamer.puts[0], prompt)
        assert torch.equal(torch.cat([p.flatten() for p in streamer.puts[1:]]), out[0, 6:])
        runs[augment] = [tuple(p.shape) for p in streamer.puts]
    assert runs[True] == runs[False]


class StopAt(StoppingCriteria):
    """Records what a user's stopping criterion sees; stops every row at `length` tokens."""

    def __init__(self, length):
        self.length, self.seen = length, []

    def __call__(self, input_ids, scores, **kwargs):
        self.seen.append(input_ids.clone())
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


class Look(LogitsProcessor):
    """Records what a user's logits processor sees."""

    def __init__(self):
        self.seen = []

    def __call__(self, input_ids, scores):
        self.seen.append(input_ids.clone())
        return scores


@pytest.mark.parametrize("config", list(CONFIGS))
def test_stopping_criteria_and_logits_processors_see_no_placeholders(config):
    model = make_model("gemma2", **CONFIGS[config])
    input_ids, mask = left_padded([7, 5], seed=3)
    seen = {}
    for augment in (True, False):
        stop, processor = StopAt(10), Look()
        out = model.generate(input_ids, mask, max_new_tokens=8, pad_token_id=0, eos_token_id=None, augment=augment,
                             stopping_criteria=[stop], logits_processor=LogitsProcessorList([processor]))
        assert out.shape == (2, 10)
        for ids in stop.seen + processor.seen:
            assert torch.equal(ids[:, :7], input_ids) and torch.equal(ids, out[:, : ids.shape[1]])
        seen[augment] = [ids.shape for ids in stop.seen], [ids.shape for ids in processor.seen]
    assert seen[True] == seen[False]


def test_return_dict_in_generate_gives_the_sequences_without_placeholders():
    model = make_model("llama", latent_positions="after", gate_init=0.5)
    input_ids, mask = left_padded([6, 3], seed=4)
    kwargs = dict(max_new_tokens=4, pad_token_id=0, eos_token_id=None)
    sequences = model.generate(input_ids, mask, **kwargs)
    out = model.generate(input_ids, mask, return_dict_in_generate=True, output_scores=True, **kwargs)
    assert torch.equal(out.sequences, sequences) and len(out.scores) == 4
    assert not torch.equal(sequences, model.decoder.generate(input_ids=input_ids, attention_mask=mask, **kwargs))


@pytest.mark.parametrize("kwargs", [
    dict(num_beams=2, num_return_sequences=2, max_new_tokens=3),
    dict(generation_config=GenerationConfig(max_length=9, do_sample=True, top_k=1)),
    dict(max_length=10, min_length=9),
])
def test_without_augmentation_it_is_the_decoders_generate(kwargs):
    model = make_model("llama", gate_init=0.5)
    input_ids, mask = left_padded([5, 4], seed=5)
    expected = model.decoder.generate(input_ids=input_ids, attention_mask=mask, pad_token_id=0, **kwargs)
    assert torch.equal(model.generate(input_ids, mask, augment=False, pad_token_id=0, **kwargs), expected)


def test_without_augmentation_the_mask_given_is_the_mask_used():
    """A real token equal to the pad id: generate would guess it is padding if the mask were not passed on."""
    model = make_model("llama", gate_init=0.5)
    input_ids, mask = left_padded([5, 4], seed=5)
    input_ids[0, 1:4] = 0  # real, yet equal to pad_token_id
    kwargs = dict(pad_token_id=0, max_new_tokens=6, do_sample=False)
    expected = model.decoder.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
    assert torch.equal(model.generate(input_ids, mask, augment=False, **kwargs), expected)
    assert not torch.equal(model.decoder.generate(input_ids=input_ids, **kwargs), expected)  # the guess differs


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(prompt_lookup_num_tokens=2), "not assisted_generation"),
    (dict(penalty_alpha=0.6, top_k=4), "not contrastive_search"),
    (dict(cache_implementation="static"), "unset cache_implementation"),
    (dict(position_ids=torch.zeros(1, 4, dtype=torch.long)), "builds the cache itself"),
])
def test_generate_refuses_what_cannot_work_on_an_augmented_cache(kwargs, message):
    model = make_model()
    with pytest.raises(ValueError, match=message):
        model.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=2, **kwargs)
