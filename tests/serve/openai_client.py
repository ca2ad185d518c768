"""Drives `kiln serve` with the official `openai` package (run by tests/serve.rs).

Usage: openai_client.py --base-url URL --small-url URL --api-key KEY --kiln BIN --model DIR
                        --translate-url URL --nllb DIR

`--base-url`: a server with --api-key KEY (16 concurrent, queue 64).
`--small-url`: a server without a key, --max-concurrent 1 --queue 0 (overload checks).
`--kiln`/`--model`: `kiln generate` on the same model, the reference for greedy outputs.
`--translate-url`: a server on the NLLB fixture `--nllb` (/v1/translations), checked against
`kiln translate`.
Every call has a timeout; any failure raises, so the exit status is the verdict.
"""

import argparse
import concurrent.futures
import http.client
import json
import subprocess
import time
import urllib.parse

import openai

p = argparse.ArgumentParser()
p.add_argument("--base-url", required=True)
p.add_argument("--small-url", required=True)
p.add_argument("--api-key", required=True)
p.add_argument("--kiln", required=True)
p.add_argument("--model", required=True)
p.add_argument("--translate-url", required=True)
p.add_argument("--nllb", required=True)
args = p.parse_args()

client = openai.OpenAI(base_url=args.base_url + "/v1", api_key=args.api_key, timeout=60, max_retries=0)
MODEL = client.models.list().data[0].id


def kiln_generate(prompt, n, chat):
    cmd = [args.kiln, "generate", "--model", args.model, "--prompt", prompt, "--json", "-n", str(n), "--temperature", "0"]
    if chat:
        cmd.append("--chat")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def chat(message, n, stream=False, **kw):
    messages = [{"role": "user", "content": message}]
    if not stream:
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=n, **kw)
        c = r.choices[0]
        assert c.message.role == "assistant", r
        return c.message.content, c.finish_reason, r.usage
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=n, stream=True,
        stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finishes) == 1, finishes
    assert chunks[-1].choices == [] and chunks[-1].usage is not None, chunks[-1]
    return text, finishes[0], chunks[-1].usage


def complete(prompt, n, stream=False, **kw):
    if not stream:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, **kw)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, stream=True, **kw))
    text = "".join(ch.choices[0].text for ch in chunks)
    return text, chunks[-1].choices[0].finish_reason, None


# 1. Greedy outputs equal `kiln generate`'s, chat and plain, streamed or not.
ref_chat = kiln_generate("What is the capital of France?", 12, chat=True)
text, finish, usage = chat("What is the capital of France?", 12, temperature=0)
assert text == ref_chat["text"], (text, ref_chat)
assert usage.completion_tokens == len(ref_chat["tokens"]), (usage, ref_chat)
assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
assert finish == ("length" if len(ref_chat["tokens"]) == 12 else "stop"), finish
s_text, s_finish, s_usage = chat("What is the capital of France?", 12, stream=True, temperature=0)
assert (s_text, s_finish, s_usage.completion_tokens) == (text, finish, usage.completion_tokens)

ref = kiln_generate("Once upon a time there was", 16, chat=False)
text, finish, usage = complete("Once upon a time there was", 16, temperature=0)
assert text == ref["text"] and usage.completion_tokens == len(ref["tokens"]), (text, ref)
assert usage.prompt_tokens == len(ref["prompt_tokens"]), (usage, ref)
assert complete("Once upon a time there was", 16, stream=True, temperature=0)[:2] == (text, finish)
print("greedy outputs equal kiln generate's: ok")

# 2. Stop strings: the text ends before the first occurrence; streamed text agrees.
long_text = complete("The library opened", 24, temperature=0)[0]
stop = next(long_text[i:i + 2] for i in range(len(long_text) // 2, len(long_text) - 1)
            if long_text[i:i + 2].strip() == long_text[i:i + 2])
expected = long_text[:long_text.index(stop)]
for stream in (False, True):
    t, f, _ = complete("The library opened", 24, stream=stream, temperature=0, stop=[stop, "\x00never"])
    assert (t, f) == (expected, "stop"), (stream, t, f, expected, stop)
print(f"stop string {stop!r}: ok")

def connect(base):
    u = urllib.parse.urlparse(base)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=30)


def request(base, method, path, body=None, headers=None):
    """(status, lower-cased headers, parsed JSON body) of one plain HTTP request."""
    c = connect(base)
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    c.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(data) if data else None


# 3. 16 concurrent clients, greedy and seeded sampling, streamed and not: each equals its
#    one-at-a-time output.
jobs = []
for i in range(16):
    kind = complete if i % 2 else chat
    sampling = {"temperature": 0} if i % 4 < 2 else {"temperature": 0.9, "top_p": 0.95, "seed": 100 + i}
    prompt = f"Request {i}: tell me about " + ["kilns", "rivers", "the moon", "bread"][i % 4] * (1 + i % 3)
    jobs.append((kind, prompt, 6 + (i * 5) % 23, i % 3 == 0, sampling))
alone = [kind(prompt, n, stream=st, **kw)[:2] for kind, prompt, n, st, kw in jobs]
with concurrent.futures.ThreadPoolExecutor(16) as pool:
    together = list(pool.map(lambda j: j[0](j[1], j[2], stream=j[3], **j[4])[:2], jobs))
for i, (a, b) in enumerate(zip(alone, together)):
    assert a == b, (i, jobs[i], a, b)
peak = request(args.base_url, "GET", "/health")[2]["peak_running"]
assert peak >= 4, f"at most {peak} requests decoded together"
print("16 concurrent clients equal their one-at-a-time outputs: ok")

# 4. Bad requests: a 400 with an OpenAI error body, and the server keeps serving.
AUTH = {"Authorization": f"Bearer {args.api_key}"}


def expect_400(path, body, param=None, code=None):
    status, _, reply = request(args.base_url, "POST", path, body, AUTH)
    assert status == 400, (body, status, reply)
    err = reply["error"]
    assert err["type"] == "invalid_request_error" and err["message"], err
    if param is not None:
        assert err["param"] == param, (param, err)
    if code is not None:
        assert err["code"] == code, (code, err)


expect_400("/v1/chat/completions", b"{not json", "body")
expect_400("/v1/chat/completions", b"[1, 2]", "body")
expect_400("/v1/completions", {"prompt": "x", "max_tokens": "many"}, "max_tokens")
expect_400("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature")
expect_400("/v1/chat/completions", {"messages": "hello"}, "messages")
expect_400("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]})
expect_400("/v1/chat/completions", {"messages": []}, "messages")
expect_400("/v1/completions", {"prompt": "x", "n": 2}, "n")
expect_400("/v1/completions", {"prompt": "x", "logprobs": 3}, "logprobs")
expect_400("/v1/completions", {"prompt": "x", "temperature": 3}, "temperature")
expect_400("/v1/completions", {"prompt": "x", "stop": ""}, "stop")
expect_400("/v1/completions", {"prompt": "word " * 400}, code="context_length_exceeded")
expect_400("/v1/completions", {"prompt": "x", "max_tokens": 100000}, "max_tokens", "context_length_exceeded")
try:
    client.completions.create(model=MODEL, prompt="x", max_tokens=100000)
    raise AssertionError("max_tokens past the context was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400
assert request(args.base_url, "GET", "/health")[2]["status"] == "ok"
assert complete("Once upon a time there was", 16, temperature=0)[0] == ref["text"]
print("bad requests get a 400 and the server keeps serving: ok")

# 5. The API key: required everywhere but /health.
for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": args.api_key}):
    status, _, reply = request(args.base_url, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 1}, headers)
    assert status == 401 and reply["error"]["code"] == "invalid_api_key", (headers, status, reply)
assert request(args.base_url, "GET", "/v1/models")[0] == 401
assert request(args.base_url, "GET", "/health")[0] == 200
try:
    openai.OpenAI(base_url=args.base_url + "/v1", api_key="wrong", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError:
    pass
print("API key: ok")

# 6. The bound: with one running place and no queue, a second request is a 503 while a stream
#    is open; closing that stream (a client that disconnects) frees the place.
held = connect(args.small_url)
held.request("POST", "/v1/completions", body=json.dumps({"prompt": "Once", "max_tokens": 64, "stream": True}),
             headers={"Content-Type": "application/json"})
stream = held.getresponse()
assert stream.status == 200, stream.status
first = stream.readline().decode()
assert first.startswith("data: "), first
status, headers, reply = request(args.small_url, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 1})
assert status == 503, (status, reply)
assert reply["error"]["code"] == "server_overloaded" and headers.get("retry-after"), (headers, reply)
held.sock.shutdown(2)
held.close()
deadline = time.time() + 10
while True:
    status, _, reply = request(args.small_url, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 1})
    if status == 200:
        break
    assert time.time() < deadline, f"the slot of a closed stream was not freed: {status} {reply}"
    time.sleep(0.05)
print("503 beyond the bound, slot freed on disconnect: ok")

# 7. /v1/translations on an NLLB model equals `kiln translate`, greedy and with beams; a bad
#    language code is a 400 naming it; each server refuses the other kind's endpoints.
for beams in (1, 2):
    cmd = [args.kiln, "translate", "--model", args.nllb, "--src", "eng_Latn", "--tgt", "fra_Latn",
           "--json", "-n", "8", "--num-beams", str(beams), "The kiln is hot."]
    ref = json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout)
    status, _, reply = request(args.translate_url, "POST", "/v1/translations", {
        "text": "The kiln is hot.", "source_lang": "eng_Latn", "target_lang": "fra_Latn",
        "max_tokens": 8, "num_beams": beams})
    assert status == 200, (status, reply)
    assert reply["object"] == "translation" and reply["text"] == ref["text"], (reply, ref)
    assert reply["usage"]["completion_tokens"] == len(ref["tokens"]), (reply, ref)
    assert reply["finish_reason"] == ("length" if ref["finish_reason"] == "length" else "stop"), reply
status, _, reply = request(args.translate_url, "POST", "/v1/translations",
                           {"text": "x", "source_lang": "eng_Latn", "target_lang": "xx_Latn"})
assert status == 400 and "xx_Latn" in reply["error"]["message"], (status, reply)
status, _, reply = request(args.translate_url, "POST", "/v1/translations", {"text": "x", "source_lang": "eng_Latn"})
assert status == 400, (status, reply)
status, _, reply = request(args.translate_url, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
assert status == 400 and "/v1/translations" in reply["error"]["message"], (status, reply)
status, _, reply = request(args.base_url, "POST", "/v1/translations", {"text": "x"}, AUTH)
assert status == 400, (status, reply)
print("translations equal kiln translate: ok")
print("ALL OK")
