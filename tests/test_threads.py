"""Several threads calling one model get exactly what each call gets alone."""

import sys
import threading
import time

import pytest
import torch
from tiny_models import VOCAB, tiny_decoder

from dca import AugmentedLM, CoprocessorConfig

THREADS, CALLS = 8, 20


@pytest.fixture(autouse=True)
def interleaved_threads():
    # 8 callers each with their own OpenMP team would oversubscribe the cores (and spin): one thread per call;
    # and hand the GIL over often, so that the calls really overlap on tiny models
    threads, interval = torch.get_num_threads(), sys.getswitchinterval()
    torch.set_num_threads(1)
    sys.setswitchinterval(1e-5)
    yield
    torch.set_num_threads(threads)
    sys.setswitchinterval(interval)


def make_model(**config):
    config = {"num_latents": 3, "num_ahead": 2, "gate_init": 0.5, **config}
    model = AugmentedLM.from_decoder(tiny_decoder("llama", "eager"), CoprocessorConfig(**config)).eval()
    # a slow final norm (a busy GPU, a big model) gives other threads time to run while one call is in it
    model.coprocessor.body.norm.register_forward_hook(lambda *_: time.sleep(1e-4))
    return model


def prompts(count, seed):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (count,), generator=generator).tolist()
    return [torch.randint(0, VOCAB, (1, n), generator=generator) for n in lengths]


def run_in_threads(work, inputs):
    """work(input) for each thread's list of inputs, all threads started together; returns their results."""
    results, errors = [None] * len(inputs), []
    start = threading.Barrier(len(inputs))

    def worker(i):
        try:
            start.wait()
            results[i] = [work(x) for x in inputs[i]]
        except Exception as err:  # surfaced below: a failing thread must fail the test
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


@pytest.mark.parametrize("config", [{}, {"latent_source": "pre_norm", "lora_rank": 2}])
def test_concurrent_augment_calls_equal_single_threaded_ones(config):
    model = make_model(**config)
    inputs = [prompts(CALLS, seed) for seed in range(THREADS)]

    def augment(prompt):
        out = model.augment(prompt)
        return out.latents, out.logits

    alone = [[augment(p) for p in thread_inputs] for thread_inputs in inputs]
    together = run_in_threads(augment, inputs)
    for thread_alone, thread_together in zip(alone, together, strict=True):
        for (latents, logits), (latents_t, logits_t) in zip(thread_alone, thread_together, strict=True):
            assert torch.equal(latents, latents_t) and torch.equal(logits, logits_t)


def test_pre_norm_latents_are_the_hidden_states_before_the_final_norm():
    """The capture is per call: what it reads is the input of the coprocessor's final norm, for this call."""
    model = make_model(latent_source="pre_norm", latent_scale="none", latent_anchor="none")
    prompt = prompts(1, 0)[0]
    body = model.coprocessor.body
    seen = []
    handle = body.norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        latents = model.augment(prompt).latents
    finally:
        handle.remove()
    assert len(seen) == 1 and torch.equal(latents, seen[0])
    # and not the final norm's output, which is what latent_source="final_norm" reads
    assert not torch.allclose(latents, body.norm(seen[0]))


def test_concurrent_generate_calls_equal_single_threaded_ones():
    model = make_model(latent_source="pre_norm", latent_positions="after")
    inputs = [prompts(3, 100 + seed) for seed in range(THREADS)]

    def generate(prompt):
        return model.generate(prompt, max_new_tokens=4, pad_token_id=0, eos_token_id=None)

    alone = [[generate(p) for p in thread_inputs] for thread_inputs in inputs]
    together = run_in_threads(generate, inputs)
    assert all(torch.equal(a, t) for a_row, t_row in zip(alone, together, strict=True)
               for a, t in zip(a_row, t_row, strict=True))


def test_training_loss_in_one_thread_and_augment_in_others_equal_single_threaded_results():
    from tiny_models import VOCAB, tiny_decoder

    from dca import AugmentedLM, CoprocessorConfig

    torch.manual_seed(0)
    model = AugmentedLM.from_decoder(tiny_decoder("llama", "eager"), CoprocessorConfig(
        num_latents=2, num_ahead=3, gate_init=0.5))
    batch, positions = torch.randint(0, VOCAB, (2, 16)), torch.tensor([[3, 8, 12], [2, 7, 13]])
    prompts = [torch.randint(0, VOCAB, (1, 5 + i % 4)) for i in range(12)]
    with torch.no_grad():
        loss_alone = model.training_loss(batch, positions).token_losses
        augment_alone = [model.augment(p).logits for p in prompts]
    errors, losses, logits = [], [], {}

    def train_loop():
        try:
            for _ in range(6):
                with torch.no_grad():
                    losses.append(model.training_loss(batch, positions).token_losses)
        except Exception as err:  # noqa: BLE001 -- reported below
            errors.append(err)

    def augment_loop(worker):
        try:
            for i in range(worker, len(prompts), 3):
                with torch.no_grad():
                    logits[i] = model.augment(prompts[i]).logits
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=train_loop)] + [threading.Thread(target=augment_loop, args=(w,))
                                                       for w in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for loss in losses:
        assert torch.equal(loss, loss_alone)
    for i, expected in enumerate(augment_alone):
        assert torch.equal(logits[i], expected), i
