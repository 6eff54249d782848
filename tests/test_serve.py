"""`emloc serve`: many memories behind one OpenAI-compatible API — and the library support it rests on: a batch whose
rows each answer from their own memory (`generate(memory=[...])`), exactly as each memory alone."""

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import FAMILIES, ROOT, demos_for, queries_for, text_queries
from memory_emloc import TaskMemory

try:  # the server and its client: the `test` extra (openai, fastapi, uvicorn; httpx2 comes with openai)
    import httpx2 as httpx
    import openai
    import uvicorn  # noqa: F401

    import emloc_serve

    MISSING = None
except ImportError as error:
    MISSING = str(error)
server_test = pytest.mark.skipif(MISSING is not None, reason=f"the serve tests need the `test` extra: {MISSING}")


def _two_memories(model, processor, family, retrieval=False):
    """Two uncompressed memories of different demonstrations and lengths (so a batch of both is padded)."""
    options = dict(method="full", chunk_size=2, calibration_rows=0, retrieval=retrieval)
    first = model.build_memory(demos_for(family, 2), processor=processor, **options)
    second = model.build_memory(demos_for(family, 3, offset=5), processor=processor, **options)
    assert first.tokens_per_layer() != second.tokens_per_layer()
    return first, second


def _forward_logits(model, batch, memory):
    inputs = {key: value for key, value in batch.items() if key != "token_types"}
    return model(**inputs, memory=memory).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_each_row_of_a_mixed_batch_sees_only_its_own_memory(tiny, family):
    model, processor, _ = tiny(family)
    first, second = _two_memories(model, processor, family)
    queries = queries_for(family, 3)
    owners = [first, second, first]
    together = _forward_logits(model, processor(queries), owners)
    for row, (query, memory) in enumerate(zip(queries, owners)):
        alone = _forward_logits(model, processor([query]), memory)
        # left padding: the row's last position predicts the first answer token in both
        torch.testing.assert_close(together[row, -1], alone[0, -1], atol=1e-5, rtol=1e-5)
    # the other memory gives other logits: the rows are not all reading one memory
    assert not torch.allclose(_forward_logits(model, processor(queries[:1]), second)[0, -1], together[0, -1], atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2-vl"])
def test_mixed_batch_greedy_beams_and_return_sequences_equal_each_memory_alone(tiny, family):
    model, processor, _ = tiny(family)
    first, second = _two_memories(model, processor, family)
    queries = queries_for(family, 2)
    batch = processor(queries)
    width = batch["input_ids"].shape[1]
    for options in ({}, {"num_return_sequences": 2, "num_beams": 2}):
        out = model.generate(**batch, memory=[second, first], max_new_tokens=5, processor=processor, **options)
        copies = options.get("num_return_sequences", 1)
        for row, (query, memory) in enumerate(zip(queries, [second, first])):
            single = processor([query])
            alone = model.generate(**single, memory=memory, max_new_tokens=5, processor=processor, **options)
            for copy in range(copies):
                got = out[row * copies + copy, width:]
                expected = alone[copy, single["input_ids"].shape[1]:]
                assert got[: len(expected)].tolist() == expected.tolist(), (options, row, copy)


def test_a_list_of_memories_is_refused_where_one_memory_is_meant(tiny):
    model, processor, _ = tiny("llama")
    first, second = _two_memories(model, processor, "llama")
    batch = processor(queries_for("llama", 2))
    with pytest.raises(ValueError, match="one per row: got 1 for 2 rows"):
        model.generate(**batch, memory=[first], max_new_tokens=2)
    with pytest.raises(ValueError, match="select= and retrieve= take one memory"):
        model.generate(**batch, memory=[first, second], retrieve=1, max_new_tokens=2)
    with pytest.raises(ValueError, match="score_choices takes one memory"):
        model.score_choices(queries_for("llama", 1), memory=[first], processor=processor)
    model.load_memory(second, name="second", activate=False)
    by_name = model.generate(**batch, memory=[first, "second"], max_new_tokens=3)
    assert torch.equal(by_name, model.generate(**batch, memory=[first, second], max_new_tokens=3))


# ---------------------------------------------------------------------------------------------------------------------
# The server, driven by the real `openai` client on 127.0.0.1
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def serving(model, processor, memories: dict, keys=None, **limits):
    """An `emloc serve` application over `model` in this process, on 127.0.0.1 (an ephemeral port), stopped on exit:
    `(base_url, engine)`."""
    settings = emloc_serve.ServeSettings(model="tiny", memories={k: str(v) for k, v in memories.items()}, **limits)
    engine = emloc_serve.Engine(model, processor, settings)
    with emloc_serve.running_server(emloc_serve.create_app(emloc_serve.LocalBackend(engine), settings, keys)) as url:
        yield url, engine
    assert engine._batcher is None or engine._batcher.done(), "the server did not drain"


def client(url, key="unused"):
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


@contextlib.contextmanager
def paused(engine):
    """Holds the engine's worker thread, so that requests wait in its queue until the block ends."""
    release = threading.Event()
    engine._worker.submit(release.wait)
    try:
        yield
    finally:
        release.set()


def wait_for(condition, seconds=30):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def served(tiny, tmp_path_factory):
    """The tiny Llama, two memories on disk ("iris-a", and "iris-b" with a retrieval index), their queries, and a keys
    file: `alice` may use iris-a only, `admin` every memory."""
    model, processor, base_dir = tiny("llama")
    first, second = _two_memories(model, processor, "llama", retrieval=True)
    first.retrieval = None
    root = tmp_path_factory.mktemp("served")
    dirs = {"iris-a": first.save_pretrained(root / "a"), "iris-b": second.save_pretrained(root / "b")}
    keys_file = root / "keys.json"
    keys = {"alice": emloc_serve.add_api_key(keys_file, "alice", ["iris-a"]),
            "admin": emloc_serve.add_api_key(keys_file, "admin", "*")}
    assert all(key not in keys_file.read_text() for key in keys.values())  # only hashes are stored
    return dict(model=model, processor=processor, base_dir=base_dir, dirs=dirs, keys=keys,
                api_keys=emloc_serve.ApiKeys.load(keys_file, set(dirs)), queries=text_queries(3))


def _alone(served, name, query, max_new_tokens, logprobs=False, **options):
    """What `generate` answers for `query` from memory `name` alone (greedy); with `logprobs`, also the log-probability
    of each answer token."""
    model, processor = served["model"], served["processor"]
    inputs = processor([query])
    out = model.generate(**inputs, memory=TaskMemory.from_pretrained(served["dirs"][name]), processor=processor,
                         max_new_tokens=max_new_tokens, return_dict_in_generate=True, output_logits=True, **options)
    new = out.sequences[0, inputs["input_ids"].shape[1]:]
    text = processor.batch_decode(new[None], skip_special_tokens=True)[0]
    if not logprobs:
        return text
    return text, [float(torch.log_softmax(step[0], -1)[token]) for step, token in zip(out.logits, new.tolist())]


@server_test
def test_mixed_memory_requests_answer_as_generate_alone_streamed_or_not(served):
    queries = served["queries"]
    references = {(name, row): _alone(served, name, queries[row], 6, logprobs=True) for name in ("iris-a", "iris-b")
                  for row in range(2)}
    expected = {key: text for key, (text, _) in references.items()}
    # the two memories answer differently (here in their tokens' log-probabilities): a row reading the wrong one is seen
    assert abs(references["iris-a", 0][1][0] - references["iris-b", 0][1][0]) > 1e-3
    logprobs = {}
    with serving(served["model"], served["processor"], served["dirs"], batch_wait_ms=200) as (url, engine):
        api = client(url)
        answers = {}

        def ask(name, row, stream):
            if stream:
                chunks = api.chat.completions.create(model=name, messages=[{"role": "user", "content": queries[row]["question"]}],
                                                     max_tokens=6, temperature=0, stream=True)
                answers[name, row, stream] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                answer = api.completions.create(model=name, prompt=queries[row]["question"], max_tokens=6, temperature=0,
                                                logprobs=0)
                assert answer.usage.completion_tokens == 6 and answer.choices[0].finish_reason == "length"
                answers[name, row, stream] = answer.choices[0].text
                logprobs[name, row] = answer.choices[0].logprobs.token_logprobs

        def sample():  # a sampled row in the same batch: its own temperature and top-p, the greedy rows unchanged
            answer = api.completions.create(model="iris-b", prompt=queries[0]["question"], max_tokens=6, temperature=1.3,
                                            top_p=0.9)
            answers["sampled"] = answer.usage.completion_tokens

        with paused(engine):  # all nine requests wait together, then share one batch
            threads = [threading.Thread(target=ask, args=(name, row, stream)) for name in ("iris-a", "iris-b")
                       for row in range(2) for stream in (False, True)] + [threading.Thread(target=sample)]
            for thread in threads:
                thread.start()
            wait_for(lambda: engine.waiting_rows() == 9)
        for thread in threads:
            thread.join(60)
        assert engine.stats["mixed_batches"] == 1 and engine.stats["largest_batch"] == 9
        assert answers.pop("sampled") >= 1
        for (name, row, stream), text in answers.items():
            assert text == expected[name, row], (name, row, stream)
        assert len(answers) == 8
        for key, served_logprobs in logprobs.items():
            torch.testing.assert_close(torch.tensor(served_logprobs), torch.tensor(references[key][1]), atol=1e-4, rtol=0)

        # n copies, logprobs, a stop string, several prompts
        answer = api.completions.create(model="iris-a", prompt=queries[0]["question"], max_tokens=6, temperature=0, n=2,
                                        logprobs=2)
        assert [c.text for c in answer.choices] == [expected["iris-a", 0]] * 2
        assert len(answer.choices[0].logprobs.tokens) == 6
        assert all(len(top) == 2 for top in answer.choices[0].logprobs.top_logprobs)
        stop = expected["iris-a", 0][3:5]
        cut = api.completions.create(model="iris-a", prompt=queries[0]["question"], max_tokens=6, temperature=0, stop=[stop])
        assert cut.choices[0].text == expected["iris-a", 0][: expected["iris-a", 0].index(stop)]
        assert cut.choices[0].finish_reason == "stop"
        mixed = api.completions.create(model="iris-b", prompt=[queries[1]["question"]] * 2, max_tokens=6, temperature=0)
        assert [c.text for c in mixed.choices] == [expected["iris-b", 1]] * 2


@server_test
def test_keys_unknown_and_forbidden_memories_and_paths(served):
    keys = served["keys"]
    with serving(served["model"], served["processor"], served["dirs"], keys=served["api_keys"]) as (url, engine):
        assert [m.id for m in client(url, keys["alice"]).models.list()] == ["iris-a"]
        assert [m.id for m in client(url, keys["admin"]).models.list()] == ["iris-a", "iris-b"]
        with pytest.raises(openai.AuthenticationError) as error:
            client(url, "sk-wrong").models.list()
        assert error.value.body["code"] == "invalid_api_key"
        for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": keys["admin"]}):  # none, empty, no scheme
            refused = httpx.post(f"{url}/completions", json={"model": "iris-a", "prompt": "x"}, headers=headers)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"

        alice = client(url, keys["alice"])
        bodies = {}
        for name in ("iris-b", "no-such-memory", str(served["dirs"]["iris-b"])):  # forbidden, unknown, a real path
            with pytest.raises(openai.NotFoundError) as error:
                alice.completions.create(model=name, prompt="x", max_tokens=1)
            bodies[name] = json.dumps(error.value.body).replace(name, "NAME")
        assert len(set(bodies.values())) == 1, bodies
        assert engine.memories.loads == {}  # nothing was loaded for a request that was refused
        assert alice.completions.create(model="iris-a", prompt="x", max_tokens=1, temperature=0).choices[0].text is not None


@server_test
@pytest.mark.parametrize("request_body, param", [
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 9}, "n"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"seed": 3}, "seed"),
    ({"prompt": "word " * 300}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"retrieve": 2}, "retrieve"),  # iris-a has no retrieval index
    ({"model": None}, "model"),
])
def test_bad_fields_get_400_naming_the_field(served, request_body, param):
    with serving(served["model"], served["processor"], served["dirs"], max_prompt_tokens=200) as (url, _):
        body = {"model": "iris-a", "prompt": "x", "max_tokens": 2, **request_body}
        answer = httpx.post(f"{url}/completions", json={k: v for k, v in body.items() if v is not None})
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == param and answer.json()["error"]["type"] == "invalid_request_error"


@server_test
def test_bad_bodies_chat_turns_and_size(served):
    with serving(served["model"], served["processor"], served["dirs"], max_body_bytes=2000) as (url, _):
        not_json = httpx.post(f"{url}/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert not_json.status_code == 400 and "JSON" in not_json.json()["error"]["message"]
        big = httpx.post(f"{url}/completions", json={"model": "iris-a", "prompt": "x" * 5000})
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
        body = json.dumps({"model": "iris-a", "prompt": "x" * 5000}).encode()
        chunked = httpx.post(f"{url}/completions", content=iter([body[:1000], body[1000:]]),  # no Content-Length
                             headers={"content-type": "application/json"})
        assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
        small = json.dumps({"model": "iris-a", "prompt": "x", "max_tokens": 1}).encode()
        assert httpx.post(f"{url}/completions", content=iter([small[:10], small[10:]])).status_code == 200
        with pytest.raises(openai.BadRequestError) as error:
            client(url).chat.completions.create(model="iris-a", max_tokens=2, messages=[
                {"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}])
        assert error.value.body["param"] == "messages"


@server_test
def test_a_full_queue_gets_429_with_retry_after(served):
    with serving(served["model"], served["processor"], served["dirs"], max_queue=1, max_batch_size=1) as (url, engine):
        api = client(url)
        done = []

        def ask():
            done.append(api.completions.create(model="iris-a", prompt="x", max_tokens=2, temperature=0).choices[0].text)

        with paused(engine):
            running = threading.Thread(target=ask)
            running.start()
            wait_for(lambda: engine.running_rows == 1)  # the first request is in the (held) worker's batch
            waiting = threading.Thread(target=ask)
            waiting.start()
            wait_for(lambda: engine.waiting_rows() == 1)
            refused = httpx.post(f"{url}/completions", json={"model": "iris-a", "prompt": "x", "max_tokens": 2})
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        for thread in (running, waiting):
            thread.join(60)
        assert len(done) == 2


@server_test
def test_a_client_that_disconnects_mid_stream_frees_its_row(served):
    query = served["queries"][0]["question"]
    with serving(served["model"], served["processor"], served["dirs"], max_tokens=400) as (url, engine):
        with httpx.stream("POST", f"{url}/completions", json={"model": "iris-a", "prompt": query, "max_tokens": 400,
                                                                "temperature": 0, "stream": True}) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
        # the connection is closed: the row stops at its next step rather than running to 400 tokens
        wait_for(lambda: engine.stats["cancelled_rows"] == 1)
        assert engine.stats["cancelled_tokens"] < 400
        answer = client(url).completions.create(model="iris-a", prompt=query, max_tokens=3, temperature=0)
        assert answer.choices[0].finish_reason == "length"


@server_test
def test_one_failing_request_does_not_fail_its_batch(served):
    expected = _alone(served, "iris-a", served["queries"][0], 4)
    with serving(served["model"], served["processor"], served["dirs"], batch_wait_ms=200) as (url, engine):
        api = client(url)
        api.completions.create(model="iris-b", prompt="x", max_tokens=1)  # loaded; now break it in the cache
        memory, processor, size = engine.memories._entries["iris-b"]
        broken = TaskMemory(memory.layers[:-1], memory.next_position, memory.stats)
        engine.memories._entries["iris-b"] = (broken, processor, size)
        results = {}

        def ask(name):
            try:
                answer = api.completions.create(model=name, prompt=served["queries"][0]["question"], max_tokens=4,
                                                temperature=0)
                results[name] = answer.choices[0].text
            except openai.InternalServerError as error:
                results[name] = error

        with paused(engine):
            threads = [threading.Thread(target=ask, args=(name,)) for name in ("iris-a", "iris-b")]
            for thread in threads:
                thread.start()
            wait_for(lambda: engine.waiting_rows() == 2)
        for thread in threads:
            thread.join(60)
        assert results["iris-a"] == expected
        assert isinstance(results["iris-b"], openai.InternalServerError)
        assert engine.stats["retried_batches"] == 1 and engine.stats["failed_jobs"] == 1


@server_test
def test_memories_load_once_on_demand_into_a_cache_bounded_in_bytes(served):
    one = emloc_serve.memory_bytes(TaskMemory.from_pretrained(served["dirs"]["iris-b"]))
    budget_mb = 1.5 * one / 2**20  # room for either memory, not both
    with serving(served["model"], served["processor"], served["dirs"], memory_cache_mb=budget_mb) as (url, engine):
        api = client(url)
        threads = [threading.Thread(target=api.completions.create, kwargs=dict(model="iris-b", prompt="x", max_tokens=1))
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert engine.memories.loads["iris-b"] == 1 and engine.memories.cached() == ["iris-b"]
        api.completions.create(model="iris-a", prompt="x", max_tokens=1)
        assert engine.memories.cached() == ["iris-a"] and engine.memories.used_bytes <= budget_mb * 2**20
        api.completions.create(model="iris-b", prompt="x", max_tokens=1)
        assert engine.memories.loads["iris-b"] == 2 and "serve:iris-a" not in served["model"].memories


@server_test
def test_score_and_retrieve_extensions(served):
    model, processor = served["model"], served["processor"]
    query = served["queries"][1]
    memory = TaskMemory.from_pretrained(served["dirs"]["iris-b"])
    expected_scores = model.score_choices([query], memory=memory, processor=processor)[0]
    retrieved = _alone(served, "iris-b", query, 4, retrieve=1)
    with serving(model, processor, served["dirs"]) as (url, _):
        api = client(url)
        scored = api.post("/score", cast_to=object,  # as the README shows
                          body={"model": "iris-b", "prompt": query["question"], "choices": query["choices"]})
        torch.testing.assert_close(torch.tensor([c["logprob"] for c in scored["choices"]]),
                                   torch.tensor(expected_scores), atol=1e-4, rtol=0)
        assert scored["best"] == query["choices"][max(range(3), key=lambda i: expected_scores[i])]
        answer = api.completions.create(model="iris-b", prompt=query["question"], max_tokens=4, temperature=0,
                                        extra_body={"retrieve": 1})
        assert answer.choices[0].text == retrieved


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@server_test
def test_command_line_server_hub_memory_and_sigterm_drain(served, local_hub, tmp_path):
    """`emloc serve` in its own process: a memory pulled from the (local) Hub, answers as generate; on SIGTERM the
    stream in flight runs to its end, then the process exits and new connections are refused."""
    hub, env = local_hub
    push = subprocess.run([sys.executable, str(ROOT / "emloc_cli.py"), "push", str(served["dirs"]["iris-b"]), "user/iris-b"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert push.returncode == 0, push.stderr
    expected, expected_logprobs = _alone(served, "iris-b", served["queries"][0], 5, logprobs=True)
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([sys.executable, str(ROOT / "emloc_cli.py"), "serve", "--model", str(served["base_dir"]),
                               "--memory", "hub-b=user/iris-b", "--port", str(port), "--threads", "1"],
                              env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_for(lambda: server.poll() is None and _answers(f"{url}/models") or server.poll() is not None, 120)
        assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
        api = client(url)
        answer = api.completions.create(model="hub-b", prompt=served["queries"][0]["question"], max_tokens=5,
                                        temperature=0, logprobs=0)
        assert answer.choices[0].text == expected
        assert answer.choices[0].logprobs.token_logprobs == pytest.approx(expected_logprobs, abs=1e-4)
        stream = api.completions.create(model="hub-b", prompt=served["queries"][0]["question"], max_tokens=60,
                                        temperature=0, stream=True, stream_options={"include_usage": True})
        chunks = iter(stream)
        first = next(chunks)
        server.send_signal(signal.SIGTERM)
        rest = list(chunks)
        assert rest[-1].usage.completion_tokens == 60, "the stream in flight was cut"
        assert [c.choices[0].finish_reason for c in rest if c.choices][-1] == "length"
        # uvicorn ends a process it drained on a signal by that signal, as the convention is
        assert server.wait(60) in (0, -signal.SIGTERM)
        assert "drained: every request in flight was answered" in (tmp_path / "server.log").read_text()
        assert first.choices[0].text is not None and not _answers(f"{url}/models")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        log.close()


def _answers(url):
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False
