"""`dca serve` through the official `openai` client, against a server on 127.0.0.1 in a thread."""

import contextlib
import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")

from dca.serve.engine import Engine  # noqa: E402
from dca.serve.loading import chat_text  # noqa: E402
from dca.serve.server import create_app, start_in_thread  # noqa: E402

NAME = "tiny"
CONTEXT = 64  # the served tiny model's context (conftest.py)
PROMPTS = ["the cat sees", "a big red dog chases the small bird and then", "the tree", "a small house and"]


@contextlib.contextmanager
def running(model, tokenizer, default_augment=True, **engine_kwargs):
    """(openai client, port, engine) of a fresh server; stopped (and drained) on exit."""
    engine = Engine(model, tokenizer, **{"max_batch": 8, "max_wait": 0.01, **engine_kwargs})
    server, thread, port = start_in_thread(create_app(engine, NAME, default_augment))
    try:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0), port, engine
    finally:
        server.should_exit = True
        thread.join(60)


@pytest.fixture(scope="module")
def server(served):
    with running(*served) as running_server:
        yield running_server


@contextlib.contextmanager
def slow_decoder(model, delay: float):
    """Every decoder forward (one per new token) sleeps first, and is counted."""
    calls = []
    forward = model.decoder.forward

    def slow(*args, **kwargs):
        calls.append(1)
        time.sleep(delay)
        return forward(*args, **kwargs)

    model.decoder.forward = slow
    try:
        yield calls
    finally:
        del model.decoder.forward


def post(port, path, body, raw=False):
    """(status, headers, parsed body or raw text) of a POST, without the client's own checks."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, body=body if raw else json.dumps(body), headers={"Content-Type": "application/json"})
    answer = conn.getresponse()
    text = answer.read().decode()
    conn.close()
    return answer.status, dict(answer.getheaders()), text if raw is True and answer.status == 200 else json.loads(text)


def greedy(model, tokenizer, prompt_ids, augment, max_tokens, **kwargs):
    """The reference: AugmentedLM.generate on one prompt, decoded up to its first end-of-sequence."""
    out = model.generate(torch.tensor([prompt_ids]), augment=augment, max_new_tokens=max_tokens, do_sample=False,
                         pad_token_id=1, eos_token_id=1, **kwargs)[0, len(prompt_ids):].tolist()
    return tokenizer.decode(out[: out.index(1)] if 1 in out else out, skip_special_tokens=True)


def test_models_and_health(server):
    client, port, _ = server
    assert [m.id for m in client.models.list().data] == [NAME]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/health")
    health = json.loads(conn.getresponse().read())
    assert health["status"] == "ok" and health["coprocessor_latents"] == 2


@pytest.mark.parametrize("augment", [True, False])
def test_greedy_completion_is_generate(server, served, augment):
    client, _, _ = server
    model, tokenizer = served
    for prompt in PROMPTS[:2]:
        answer = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0,
                                           extra_body={"augment": augment})
        assert answer.choices[0].text == greedy(model, tokenizer, tokenizer(prompt).input_ids, augment, 10)
        assert answer.usage.prompt_tokens == len(tokenizer(prompt).input_ids)
        assert answer.usage.completion_tokens <= 10


def test_an_async_request_is_generate_with_the_latents_some_tokens_late(server, served):
    # when the latents arrive depends on the threads' timing, so the answer must be the one of some latent_delay
    # (or, if generation ended first, the plain model's, which latent_delay = max_tokens also gives)
    client, _, _ = server
    model, tokenizer = served
    ids = tokenizer(PROMPTS[1]).input_ids
    late = [greedy(model, tokenizer, ids, "async", 10, latent_delay=d) for d in range(11)]
    assert late[0] == greedy(model, tokenizer, ids, True, 10) and late[10] == greedy(model, tokenizer, ids, False, 10)
    assert len(set(late)) > 1  # the delay matters for this prompt: the check below can fail
    answer = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=10, temperature=0,
                                       extra_body={"augment": "async"})
    assert answer.choices[0].text in late
    assert answer.usage.completion_tokens <= 10


def test_the_servers_default_augment_applies_to_requests_that_do_not_say(served):
    model, tokenizer = served
    ids = tokenizer(PROMPTS[1]).input_ids
    frozen, augmented = (greedy(model, tokenizer, ids, augment, 10) for augment in (False, True))
    assert frozen != augmented  # this prompt tells them apart
    with running(model, tokenizer, default_augment=False) as (client, _, _):
        assert client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=10,
                                         temperature=0).choices[0].text == frozen
        assert client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=10, temperature=0,
                                         extra_body={"augment": True}).choices[0].text == augmented


def test_streamed_completion_is_the_same_text_and_ends_with_done(server):
    client, port, _ = server
    whole = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert len(chunks) > 2  # it did stream, piece by piece
    status, _, text = post(port, "/v1/completions", json.dumps({"prompt": PROMPTS[1], "max_tokens": 3,
                                                                "stream": True}), raw=True)
    assert status == 200 and text.endswith("data: [DONE]\n\n")


def test_chat_completion_uses_the_chat_template(server, served):
    client, _, _ = server
    model, tokenizer = served
    messages = [{"role": "user", "content": "the dog sees a cat"}]
    answer = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    ids = tokenizer(chat_text(tokenizer, messages), add_special_tokens=False).input_ids
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == greedy(model, tokenizer, ids, True, 8)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer.choices[0].message.content


def test_stop_n_and_seed(server):
    client, _, _ = server
    free = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=12, temperature=0).choices[0].text
    stop = free.split()[2]
    stopped = client.completions.create(model=NAME, prompt=PROMPTS[1], max_tokens=12, temperature=0, stop=[stop])
    assert stopped.choices[0].text == free[: free.find(stop)] and stopped.choices[0].finish_reason == "stop"

    def sample(seed, n=1):
        answer = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=10, temperature=1.0, seed=seed,
                                           n=n)
        return [c.text for c in sorted(answer.choices, key=lambda c: c.index)]

    two = sample(5, n=2)
    assert len(two) == 2 and two[0] == sample(5)[0] and two[1] == sample(6)[0]  # choice j samples with seed + j
    assert len({tuple(sample(s)) for s in range(5, 10)}) > 1  # and the seed matters


def test_concurrent_greedy_requests_are_batched_and_equal_each_alone(served):
    model, tokenizer = served
    with running(model, tokenizer, max_batch=8, max_wait=0.5) as (client, _, engine):
        def ask(prompt):
            return client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0).choices[0].text

        alone = [ask(p) for p in PROMPTS]
        assert engine.stats["largest_batch"] == 1
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            together = list(pool.map(ask, PROMPTS))
        assert engine.stats["largest_batch"] > 1  # they did share a batch, left-padded (the prompts differ in length)
    assert together == alone


def _status_of(err):
    return err.status_code, err.response.headers, err.body


BAD = {  # body, the param the error must name
    "missing prompt": ({"max_tokens": 3}, "prompt"),
    "negative max_tokens": ({"prompt": "the", "max_tokens": -1}, "max_tokens"),
    "max_tokens of a wrong type": ({"prompt": "the", "max_tokens": "ten"}, "max_tokens"),
    "temperature of a wrong type": ({"prompt": "the", "temperature": "hot"}, "temperature"),
    "prompt of a wrong type": ({"prompt": 12}, "prompt"),
    "augment not a choice": ({"prompt": "the", "augment": "maybe"}, "augment"),
    "n too large": ({"prompt": "the", "n": 99}, "n"),
    "stop of a wrong type": ({"prompt": "the", "stop": [1, 2]}, "stop"),
    "prompt past the context with its latents": ({"prompt": " ".join(["the"] * (CONTEXT - 1))}, "prompt"),
    "max_tokens past the context": ({"prompt": "the cat", "max_tokens": CONTEXT - 3}, "max_tokens"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_request_is_a_400_naming_its_parameter(server, case):
    _, port, _ = server
    body, param = BAD[case]
    status, _, answer = post(port, "/v1/completions", body)
    assert status == 400
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"


def test_bad_requests_through_the_client(server):
    client, port, _ = server
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt="the cat", max_tokens=-1)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=NAME, messages=[], max_tokens=3)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="the", max_tokens=3)
    # the prompt fits without latents but not with them: the frozen model may answer it
    prompt = " ".join(["the"] * (CONTEXT - 2))
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt=prompt, max_tokens=1)
    assert client.completions.create(model=NAME, prompt=prompt, max_tokens=1, extra_body={"augment": False})
    assert post(port, "/v1/completions", "{not json", raw=True)[0] == 400


def test_a_full_queue_answers_503_with_retry_after(served):
    model, tokenizer = served
    with slow_decoder(model, 0.02), running(model, tokenizer, max_batch=1, max_queue=1) as (client, _, engine):
        def ask(_):
            try:
                client.completions.create(model=NAME, prompt="the cat", max_tokens=8, temperature=0)
                return 200, None
            except openai.APIStatusError as err:
                return err.status_code, err.response.headers.get("retry-after")

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(6)))
    assert {status for status, _ in answers} == {200, 503}
    assert all(retry == "1" for status, retry in answers if status == 503)
    assert engine.stats["rejected"] == sum(status == 503 for status, _ in answers)


def test_a_client_that_disconnects_cancels_its_work(served):
    model, tokenizer = served
    prompt = " ".join(["the", "cat"] * 3)
    with slow_decoder(model, 0.05) as calls, running(model, tokenizer) as (_, port, engine):
        # streaming: read the first event, then hang up
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps(
            {"prompt": prompt, "max_tokens": 50, "temperature": 0, "stream": True}),
            headers={"Content-Type": "application/json"})
        answer = conn.getresponse()
        assert answer.status == 200 and answer.read(6) == b"data: "
        conn.sock.shutdown(2)
        conn.close()
        # not streaming: give up after a moment
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": prompt, "max_tokens": 50, "temperature": 0}),
                     headers={"Content-Type": "application/json"})
        with pytest.raises(TimeoutError):
            conn.getresponse()
        conn.close()
        deadline = time.monotonic() + 30
        while engine.stats["cancelled"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.stats["cancelled"] == 2 and engine.stats["completed"] == 0
    assert len(calls) < 50  # far fewer decoder steps than the two requests asked for (100 and more)


def test_a_streaming_client_that_hangs_up_while_queued_is_dropped_before_it_runs(served):
    model, tokenizer = served
    prompt = " ".join(["the", "cat"] * 3)
    with slow_decoder(model, 0.1), running(model, tokenizer, max_batch=1) as (_, port, engine):
        first = threading.Thread(target=post, args=(port, "/v1/completions",
                                                   {"prompt": prompt, "max_tokens": 40, "temperature": 0}))
        first.start()  # about 4 s of decoding, one job at a time: the next request waits in the queue
        deadline = time.monotonic() + 30
        while engine.stats["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps(
            {"prompt": prompt, "max_tokens": 40, "temperature": 0, "stream": True}),
            headers={"Content-Type": "application/json"})
        assert conn.getresponse().status == 200 and engine.stats["running"] == 1 and len(engine._pending) == 1
        conn.sock.shutdown(2)
        conn.close()
        first.join(60)
        while engine.stats["cancelled"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        # the queued job was cancelled while the first one ran, so the worker dropped it without a batch
        assert (engine.stats["completed"], engine.stats["cancelled"], engine.stats["batches"]) == (1, 1, 1)


def test_draining_finishes_queued_work(served):
    model, tokenizer = served
    results = []
    with slow_decoder(model, 0.01), running(model, tokenizer, max_batch=1) as (client, _, engine):
        def ask(prompt):
            results.append(client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0))

        threads = [threading.Thread(target=ask, args=(p,)) for p in PROMPTS]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        # every request is in the engine (queued, running or done) before the server stops taking new ones: under
        # load a thread may not have connected yet, and a refused connection is not what this test is about
        while (len(engine._pending) + engine.stats["running"] + engine.stats["completed"] < len(PROMPTS)
               or engine.stats["batches"] == 0) and time.monotonic() < deadline:
            time.sleep(0.01)
    for thread in threads:
        thread.join(30)
    assert len(results) == len(PROMPTS)  # every request answered although the server stopped meanwhile


def test_latents_that_replace_prompt_entries_take_no_room():
    from tiny_models import tiny_decoder

    from dca import AugmentedLM, CoprocessorConfig
    from dca.serve.loading import latent_slots

    decoder = tiny_decoder("llama")
    appended, replacing = (AugmentedLM.from_decoder(decoder, CoprocessorConfig(num_latents=4, latent_positions=layout))
                           for layout in ("replay", "overwrite"))
    assert [latent_slots(appended, n) for n in (1, 9)] == [4, 4]
    assert [latent_slots(replacing, n) for n in (1, 4, 9)] == [3, 0, 0]  # a 1-token prompt is padded to 4 slots
    assert latent_slots(AugmentedLM(decoder), 9) == 0
    for length in (1, 9):  # what augment really leaves in the cache
        out = replacing.augment(torch.randint(0, 50, (1, length)))
        assert out.past_key_values.get_seq_length() == length + latent_slots(replacing, length)
