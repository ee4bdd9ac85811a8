"""The HTTP server (engine/surfaces/server.py) driven by the real `ollama` and `openai` packages and
by raw HTTP: both APIs' shapes, errors, API keys, batched answers equal to lone ones, clients that
leave, thinking in its own field, and a graceful SIGTERM."""
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import ollama
import openai
import pytest
import uvicorn

from engine.surfaces import api, server

PARIS = [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "repeat_penalty": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A server in a thread of this process (sharing its compiled kernels) on a free port."""

    def __init__(self, api_key=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = server.ServerState(api_key=api_key)
        config = uvicorn.Config(server.create_app(self.state), host="127.0.0.1", port=self.port, log_level="warning",
                                access_log=False)
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def stop(self):
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def running():
    api.MODELS.clear()
    api.MODELS.parallel = 4
    served = Running()
    yield served
    served.stop()
    api.MODELS.clear()
    api.MODELS.parallel = 1


def test_ollama_client_chat_generate_list_show_ps(running, smollm2):
    client = ollama.Client(host=running.url)
    model = str(smollm2)
    r = client.chat(model=model, messages=PARIS, options={**GREEDY, "num_predict": 12})
    assert r.message.content == "The capital of France is Paris." and r.done and r.done_reason == "stop"
    assert r.eval_count == 7 and r.prompt_eval_count > 0 and r.total_duration > r.eval_duration > 0
    chunks = list(client.chat(model=model, messages=PARIS, options={**GREEDY, "num_predict": 5}, stream=True))
    assert "".join(c.message.content for c in chunks) == "The capital of France is"
    assert [c.done for c in chunks].count(True) == 1 and chunks[-1].done_reason == "length"
    assert chunks[-1].eval_count == 5
    g = client.generate(model=model, prompt="What is the capital of France?", system=PARIS[0]["content"],
                        options={**GREEDY, "num_predict": 12})
    assert g.response == r.message.content
    streamed = list(client.generate(model=model, prompt="Count: 1, 2, 3,", raw=True, stream=True,
                                    options={**GREEDY, "num_predict": 8}))
    assert streamed[-1].done and streamed[-1].eval_count == 8 and "".join(c.response for c in streamed).strip()
    loading = client.generate(model=model, prompt="")   # an empty prompt loads the model
    assert loading.done and loading.done_reason == "load" and loading.response == ""
    assert client.chat(model=model, messages=[]).done_reason == "load"
    running_models = client.ps().models
    assert [m.model for m in running_models] == [model] and running_models[0].expires_at is not None
    shown = client.show(model)
    assert shown.details.family == "llama" and shown.details.quantization_level == "Q4_1"
    assert "completion" in shown.capabilities and shown.modelinfo["llama.block_count"] == 30
    assert any(m.model == "smollm2:135m" for m in client.list().models)


def test_openai_client_chat_completions_and_models(running, smollm2):
    client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused")
    model = str(smollm2)
    r = client.chat.completions.create(model=model, messages=PARIS, max_tokens=12, temperature=0,
                                       frequency_penalty=0, seed=1)
    # (Ollama's default repeat penalty applies: OpenAI's API has no such field)
    assert r.choices[0].message.content.startswith("The capital of France is Paris")
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    assert r.object == "chat.completion" and r.usage.prompt_tokens > 0
    stream = client.chat.completions.create(model=model, messages=PARIS, max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The capital of France is"
    assert chunks[-1].usage.completion_tokens == 5 and not chunks[-1].choices   # the usage chunk
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    stop = client.chat.completions.create(model=model, messages=PARIS, max_tokens=12, temperature=0, stop=["Paris"])
    assert stop.choices[0].message.content == "The capital of France is " and stop.choices[0].finish_reason == "stop"
    completion = client.completions.create(model=model, prompt="Count: 1, 2, 3,", max_tokens=6, temperature=0)
    assert completion.choices[0].text.strip() and completion.usage.completion_tokens == 6
    assert "smollm2:135m" in [m.id for m in client.models.list()]


def test_bad_requests_get_each_apis_error_shape(running, smollm2):
    model = str(smollm2)
    with httpx.Client(base_url=running.url, timeout=60) as http:
        cases = [
            ("/api/chat", b"{not json", 400),
            ("/api/chat", b"[1, 2]", 400),
            ("/api/chat", json.dumps({"model": "no-such-model:1b", "messages": PARIS}).encode(), 404),
            ("/api/generate", json.dumps({"model": model, "prompt": "word " * 5000}).encode(), 400),
            ("/api/chat", json.dumps({"model": model, "messages": PARIS, "options": {"temprature": 1}}).encode(), 400),
            ("/api/chat", json.dumps({"model": model, "messages": PARIS, "options": {"temperature": -1}}).encode(),
             400),
            ("/api/chat", json.dumps({"model": model, "messages": PARIS, "format": "json"}).encode(), 400),
            ("/api/chat", json.dumps({"model": model, "messages": [{"role": "wizard", "content": "x"}]}).encode(),
             400),
            ("/api/generate", json.dumps({"model": model, "prompt": 5}).encode(), 400),
        ]
        for path, body, status in cases:
            r = http.post(path, content=body)
            assert r.status_code == status, (path, body[:80], r.text)
            assert isinstance(r.json()["error"], str) and r.json()["error"]
        openai_cases = [
            (b"{not json", 400),
            (json.dumps({"model": "no-such-model:1b", "messages": PARIS}).encode(), 404),
            (json.dumps({"model": model, "messages": PARIS, "temperature": "hot"}).encode(), 400),
            (json.dumps({"model": model, "messages": PARIS, "n": 2}).encode(), 400),
            (json.dumps({"model": model, "messages": [{"role": "user", "content": "word " * 5000}]}).encode(), 400),
        ]
        for body, status in openai_cases:
            r = http.post("/v1/chat/completions", content=body)
            assert r.status_code == status, (body[:80], r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert http.get("/health").json() == {"status": "ok"}
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=running.url).chat(model="no-such-model:1b", messages=PARIS)
    assert e.value.status_code == 404
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=running.url + "/v1", api_key="x").chat.completions.create(
            model="no-such-model:1b", messages=PARIS)


def test_an_api_key_guards_every_route_but_health(smollm2):
    served = Running(api_key="s3cret")
    try:
        with httpx.Client(base_url=served.url, timeout=60) as http:
            assert http.get("/health").status_code == 200
            for path in ("/api/tags", "/v1/models", "/metrics"):
                assert http.get(path).status_code == 401
                assert http.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert http.get("/v1/models").json()["error"]["code"] == "invalid_api_key"
            assert http.get("/api/tags", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="s3cret")
        assert "smollm2:135m" in [m.id for m in client.models.list()]
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=served.url + "/v1", api_key="nope").models.list()
    finally:
        served.stop()


def test_eight_concurrent_clients_get_what_each_gets_alone(running, smollm2):
    """Batch invariance: at temperature 0 an answer does not depend on what else is decoded with
    it (8 clients, 4 slots: four at a time, the rest queued and prefilled between steps)."""
    model = str(smollm2)
    questions = ["What is the capital of France?", "Name three colors.", "What is 2 + 2?", "Say hello in Spanish.",
                 "Why is the sky blue?", "Name a planet.", "What do bees make?", "Write a word that rhymes with cat."]
    options = {**GREEDY, "num_predict": 24}

    def ask(question):
        chunks = ollama.Client(host=running.url).chat(model=model, messages=[{"role": "user", "content": question}],
                                                       options=options, stream=True)
        return "".join(c.message.content for c in chunks)
    alone = [ask(q) for q in questions]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, questions))
    assert together == alone and all(alone)


def test_a_client_that_leaves_frees_its_slot(running, smollm2):
    model = str(smollm2)
    with httpx.Client(base_url=running.url, timeout=60) as http:
        with http.stream("POST", "/api/chat", json={"model": model, "messages": PARIS,
                                                    "options": {"num_predict": 100000}}) as r:
            lines = r.iter_lines()
            for _ in range(3):
                assert json.loads(next(lines))["done"] is False
        deadline = time.monotonic() + 10
        while "engine_busy_slots 0" not in http.get("/metrics").text:
            assert time.monotonic() < deadline, "the generation went on after its client left"
            time.sleep(0.05)
        metrics = http.get("/metrics").text
        assert 'engine_requests_total{route="/api/chat",status="200"}' in metrics
        assert http.get("/health").status_code == 200
        r = http.post("/api/generate", json={"model": model, "prompt": "Hi", "stream": False,
                                             "options": {"num_predict": 4}})
        assert r.status_code == 200 and r.json()["eval_count"] == 4


def test_thinking_streams_in_its_own_fields(running, opening_template_model):
    """A tiny model with DeepSeek's template that opens the thinking block: until a closing tag
    everything it writes is thinking (random weights never close it), in message.thinking for
    Ollama's client and reasoning_content for OpenAI's; think=false gives content only."""
    options = {"temperature": 0, "num_predict": 16}
    chunks = list(ollama.Client(host=running.url).chat(model=opening_template_model, messages=PARIS[1:],
                                                       options=options, stream=True))
    thinking = "".join(c.message.thinking or "" for c in chunks)
    assert thinking and not "".join(c.message.content for c in chunks)
    http = httpx.Client(base_url=running.url, timeout=60)
    r = http.post("/v1/chat/completions", json={"model": opening_template_model, "messages": PARIS[1:],
                                                "max_tokens": 16, "temperature": 0, "stream": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert r.text.rstrip().endswith("data: [DONE]")
    reasoning = "".join(e["choices"][0]["delta"].get("reasoning_content", "") for e in events if e["choices"])
    assert reasoning == thinking
    r = http.post("/v1/chat/completions", json={"model": opening_template_model, "messages": PARIS[1:],
                                                "max_tokens": 16, "temperature": 0, "reasoning_effort": "none"})
    message = r.json()["choices"][0]["message"]
    assert message["content"] and message.get("reasoning_content") is None
    r = http.post("/api/chat", json={"model": opening_template_model, "messages": PARIS[1:], "stream": False,
                                     "think": True, "options": options})
    assert r.json()["message"]["thinking"] == thinking


def test_sigterm_lets_answers_end_and_the_server_exit(smollm2, tmp_path):
    """A real process: SIGTERM while an answer streams; the answer ends (finished, or cut short
    with an error line), the process exits 0 and nothing hangs."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--port", str(port), "-m", str(smollm2)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "the server did not become ready"
            time.sleep(0.1)
        with httpx.stream("POST", url + "/api/generate", timeout=60,
                          json={"model": str(smollm2), "prompt": "Tell me a long story.",
                                "options": {"num_predict": 100000}}) as r:
            lines = r.iter_lines()
            next(lines)
            process.send_signal(signal.SIGTERM)
            last = [json.loads(line) for line in lines][-1]
        assert last.get("done") is True or "shutting down" in last.get("error", "")
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        output = process.stdout.read()
    assert "Traceback" not in output, output
