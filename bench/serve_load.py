"""Load test for an OpenAI-compatible server: aggregate decode tokens/s and time to first token
at several numbers of concurrent streams. Works against `kiln serve` and llama.cpp's
`llama-server` alike (both speak /v1/chat/completions with stream_options.include_usage).

    python bench/serve_load.py --url http://127.0.0.1:8080 --concurrency 1 4 16 --requests 16

Each request is a streamed chat completion, temperature 0, `--max-tokens` tokens (EOS ignored
is not an OpenAI field, so prompts are chosen to run long; the completion token count reported
by the server is what is counted). Prints one line per concurrency level and a JSON summary.
"""

import argparse
import concurrent.futures
import json
import statistics
import time

import openai

PROMPTS = [
    "Write a long story about a potter who builds a kiln in the mountains.",
    "Explain in detail how a bread oven works, step by step.",
    "Describe the history of ceramics from ancient times to today.",
    "List many facts about the moon and explain each one.",
    "Write a detailed recipe for sourdough bread with every step explained.",
    "Tell me everything you know about rivers and how they shape valleys.",
    "Write a long letter to a friend about a trip to the sea.",
    "Explain how computers store numbers, with many examples.",
]

p = argparse.ArgumentParser()
p.add_argument("--url", required=True)
p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
p.add_argument("--requests", type=int, default=16, help="requests per level (at least the concurrency)")
p.add_argument("--max-tokens", type=int, default=64)
p.add_argument("--label", default="server")
args = p.parse_args()

client = openai.OpenAI(base_url=args.url + "/v1", api_key="-", timeout=600, max_retries=0)
model = client.models.list().data[0].id


def one(i):
    start = time.perf_counter()
    first = None
    usage = None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        max_tokens=args.max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            usage = chunk.usage
    return first, usage.completion_tokens, time.perf_counter() - start


one(0)  # warm-up
results = {}
for c in args.concurrency:
    n = max(args.requests, c)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(c) as pool:
        out = list(pool.map(one, range(n)))
    wall = time.perf_counter() - start
    tokens = sum(o[1] for o in out)
    ttft = [o[0] for o in out if o[0] is not None]
    results[c] = {
        "requests": n,
        "completion_tokens": tokens,
        "wall_s": round(wall, 2),
        "tok_per_s": round(tokens / wall, 1),
        "ttft_median_s": round(statistics.median(ttft), 3),
        "ttft_max_s": round(max(ttft), 3),
    }
    r = results[c]
    print(f"{args.label}: {c:>2} streams, {n} requests: {r['tok_per_s']:>6} tok/s aggregate, "
          f"TTFT median {r['ttft_median_s']} s (max {r['ttft_max_s']} s), {tokens} tokens in {r['wall_s']} s",
          flush=True)
print(json.dumps({"label": args.label, "results": results}))
