"""Asynchronous augmentation against its sequential reference: decode d tokens plainly, insert the latents
computed from the prompt (their anchor moved to x[t+d], laid out as latents inserted there), continue greedily."""

import threading

import pytest
import torch
import torch.nn.functional as F
from tiny_models import FAMILIES, VOCAB, tiny_decoder
from transformers import LogitsProcessor, LogitsProcessorList

from dca import AugmentedLM, CoprocessorConfig
from dca.reference import insert_latents, move_anchor
from dca.serve.asynchronous import generate_async

LAYOUTS = ("after", "shared", "replay", "overwrite")
NEW = 7


def make_model(family="llama", **config):
    config = {"num_latents": 3, "num_ahead": 4, "gate_init": 0.5, "latent_anchor": "replay", **config}
    model = AugmentedLM.from_decoder(tiny_decoder(family, "eager"), CoprocessorConfig(**config)).eval()
    model.decoder.generation_config.eos_token_id = None  # every row runs the whole length
    return model


@torch.no_grad()
def sequential_reference(model, prompt, delay, new=NEW):
    """[1, len + new]: d plain greedy tokens, then the prompt's latents after x[t+d] (anchored there), then greedy
    on."""
    text = model.decoder.generate(prompt, max_new_tokens=delay, do_sample=False) if delay else prompt
    out = insert_latents(model, text, move_anchor(model, model.augment(prompt).latents, prompt, text))
    cache, logits, position, mask = out.past_key_values, out.logits, int(out.next_position_ids), out.attention_mask
    tokens = text[0].tolist()
    for _ in range(new - delay):
        tokens.append(int(logits.argmax(-1)))
        mask = F.pad(mask, (0, 1), value=1)  # (latents over a short prompt's padding stay masked)
        logits = model.decoder(torch.tensor([tokens[-1:]]), past_key_values=cache,
                               position_ids=torch.tensor([[position]]), attention_mask=mask).logits[:, -1]
        position += 1
    return torch.tensor([tokens])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_latent_delay_equals_the_sequential_late_insertion(family, layout):
    model = make_model(family, latent_positions=layout, gate_init=2.0)
    torch.manual_seed(1)
    prompt = torch.randint(0, VOCAB, (1, 8))
    outputs = []
    for delay in (0, 1, 3):
        result = generate_async(model, prompt, latent_delay=delay, max_new_tokens=NEW, do_sample=False)
        assert result.latent_delay == delay
        assert result.sequences.tolist() == sequential_reference(model, prompt, delay).tolist(), delay
        outputs.append(result.sequences)
    # d = 0 is synchronous augmentation, and late latents change the decoder's next-token distribution
    assert torch.equal(outputs[0], model.generate(prompt, max_new_tokens=NEW, do_sample=False))
    with torch.no_grad():
        text = outputs[2][:, : 8 + 3]
        late = insert_latents(model, text, move_anchor(model, model.augment(prompt).latents, prompt, text)).logits
        assert not torch.allclose(late, model.decoder(text).logits[:, -1], atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_overwrite_on_a_prompt_shorter_than_n(family):
    """The latents replace 2, 3 and (at s = t + 4) 5 tokens: with fewer than N, one latent per token."""
    model = make_model(family, latent_positions="overwrite", num_latents=5, gate_init=2.0)
    prompt = torch.randint(0, VOCAB, (1, 2), generator=torch.Generator().manual_seed(6))
    for delay in (0, 1, 4):
        result = generate_async(model, prompt, latent_delay=delay, max_new_tokens=NEW, do_sample=False)
        assert result.sequences.tolist() == sequential_reference(model, prompt, delay).tolist(), delay


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("prompt_len", [1, 8])
@pytest.mark.parametrize("appended_at", ["point", "window"])
def test_overwrite_with_appended_latents(family, prompt_len, appended_at):
    """R = 2 of N = 3 latents replace x[s-1 .. s], the third follows (or precedes) them (one prompt shorter than R)."""
    model = make_model(family, latent_positions="overwrite", num_overwritten=2, gate_init=2.0, appended_at=appended_at)
    prompt = torch.randint(0, VOCAB, (1, prompt_len), generator=torch.Generator().manual_seed(7))
    for delay in (0, 1, 3):
        result = generate_async(model, prompt, latent_delay=delay, max_new_tokens=NEW, do_sample=False)
        assert result.sequences.tolist() == sequential_reference(model, prompt, delay).tolist(), delay
    assert torch.equal(result.sequences, generate_async(model, prompt, latent_delay=3, max_new_tokens=NEW,
                                                        do_sample=False).sequences)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_left_padded_batch_equals_each_row_alone(layout):
    model = make_model("gemma3", latent_positions=layout)
    torch.manual_seed(2)
    rows = [torch.randint(0, VOCAB, (n,)) for n in (9, 5, 7)]
    input_ids, mask = torch.zeros(3, 9, dtype=torch.long), torch.zeros(3, 9, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, 9 - len(row):], mask[i, 9 - len(row):] = row, 1
    batched = model.generate(input_ids, mask, augment="async", latent_delay=2, max_new_tokens=NEW, do_sample=False)
    for i, row in enumerate(rows):
        assert batched[i, 9:].tolist() == sequential_reference(model, row[None], 2)[0, len(row):].tolist(), i


def test_decoding_goes_on_while_the_coprocessor_runs_and_equals_its_delay():
    model = make_model("qwen2", latent_positions="replay")
    seen, go, ready = [], threading.Event(), threading.Event()

    class Count(LogitsProcessor):  # called once per new token, in the decoding thread
        def __call__(self, input_ids, scores):
            seen.append(input_ids.shape[1])
            if len(seen) == 3:
                go.set()
            if len(seen) == 8:  # on a loaded machine the latents could miss all 12 tokens: wait for them here
                assert ready.wait(30)
            return scores

    compute = model.prompt_latents

    def slow(*args, **kwargs):  # the latents become ready only once 3 tokens have been chosen without them
        assert go.wait(30)
        latents = compute(*args, **kwargs)
        ready.set()
        return latents

    model.prompt_latents = slow
    prompt = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(3))
    result = generate_async(model, prompt, max_new_tokens=12, do_sample=False,
                            logits_processor=LogitsProcessorList([Count()]))
    model.prompt_latents = compute
    assert 3 <= result.latent_delay < 12
    expected = generate_async(model, prompt, latent_delay=result.latent_delay, max_new_tokens=12, do_sample=False)
    assert torch.equal(result.sequences, expected.sequences)
    assert torch.equal(result.sequences, sequential_reference(model, prompt, result.latent_delay, 12))


def test_sampling_is_seeded_and_top_k_1_is_greedy():
    model = make_model("llama")
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
    kwargs = dict(augment="async", latent_delay=2, max_new_tokens=NEW)
    torch.manual_seed(0)
    a = model.generate(prompt, do_sample=True, temperature=1.5, top_p=0.9, **kwargs)
    torch.manual_seed(0)
    b = model.generate(prompt, do_sample=True, temperature=1.5, top_p=0.9, **kwargs)
    assert torch.equal(a, b) and a.shape == (2, 6 + NEW)
    assert torch.equal(model.generate(prompt, do_sample=True, top_k=1, **kwargs),
                       model.generate(prompt, do_sample=False, **kwargs))


def test_streamer_eos_and_lengths_behave_as_in_generate():
    model = make_model("llama")
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(5))
    full = model.generate(prompt, augment="async", latent_delay=1, max_new_tokens=NEW, do_sample=False)

    class Streamer:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.tolist())

        def end(self):
            self.ended = True

    streamer = Streamer()
    eos = int(full[0, 6 + 3])  # the fourth new token ends the row
    short = model.generate(prompt, augment="async", latent_delay=1, max_length=6 + NEW, do_sample=False,
                           eos_token_id=eos, streamer=streamer)
    first = (full[0, 6:] == eos).nonzero()[0].item()
    assert short[0].tolist() == full[0, : 6 + first + 1].tolist()
    assert streamer.chunks[0] == prompt.tolist() and streamer.ended
    assert sum(streamer.chunks[1:], []) == short[0, 6:].tolist()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"augment": "sync"}, "augment must be True, False or 'async'"),
    ({"augment": True, "latent_delay": 1}, "latent_delay is an option of augment='async'"),
    ({"augment": "async", "latent_delay": -1}, "latent_delay must be a non-negative integer"),
    ({"augment": "async", "num_beams": 2}, "greedy search and sampling"),
    ({"augment": "async", "num_return_sequences": 2, "do_sample": True}, "num_return_sequences=2"),
    ({"augment": "async", "past_key_values": object()}, "do not pass past_key_values"),
    ({"augment": "async", "output_scores": True, "return_dict_in_generate": True}, "unset return_dict_in_generate"),
    ({"augment": "async", "token_type_ids": torch.zeros(1, 5)}, "does not take token_type_ids"),
])
def test_bad_arguments_are_refused_before_any_work(kwargs, message):
    model = make_model()
    with pytest.raises(ValueError, match=message):
        model.generate(torch.randint(0, VOCAB, (1, 5)), max_new_tokens=3, **kwargs)


def test_a_failing_coprocessor_fails_the_call():
    model = make_model()

    def broken(*args, **kwargs):
        raise RuntimeError("coprocessor exploded")

    model.prompt_latents = broken
    with pytest.raises(RuntimeError, match="coprocessor exploded"):
        # a long generation: the error is re-raised once the latents are awaited (at the end at the latest)
        generate_async(model, torch.randint(0, VOCAB, (1, 5)), max_new_tokens=40, do_sample=False)
