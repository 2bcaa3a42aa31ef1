#!/usr/bin/env python3
"""Inter-token latency of running streams while a long prompt arrives, against
`edgemoe serve --http` (stdlib only). Starts STREAMS streaming completions, waits until they
decode, sends one prompt of about PROMPT_TOKENS tokens, and reports the p50/p99 gap between
chunks of the running streams while that prompt is in flight, plus how long it took.

    edgemoe serve --http 127.0.0.1:8080 --model target/models/SmolLM2-135M-Instruct.Q4_1.gguf --prefill-chunk 256 &
    python3 tools/itl_under_prefill.py --url http://127.0.0.1:8080 [--streams 4] [--prompt-tokens 4096]
"""
import argparse
import http.client
import json
import threading
import time
import urllib.parse


def post(url, body, on_event=None):
    u = urllib.parse.urlparse(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if on_event is None:
        return json.loads(r.read())
    while True:
        line = r.readline()
        if not line:
            break
        if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
            on_event(time.perf_counter())
    return None


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--decode-tokens", type=int, default=400)
    a = ap.parse_args()
    stamps = [[] for _ in range(a.streams)]
    threads = []
    for i in range(a.streams):
        body = {"prompt": "Once upon a time", "max_tokens": a.decode_tokens, "temperature": 0.8, "seed": i, "stream": True}
        t = threading.Thread(target=post, args=(a.url, body, stamps[i].append))
        t.start()
        threads.append(t)
    while min(len(s) for s in stamps) < 5:
        time.sleep(0.01)
    # ~10 tokens per sentence for byte-level BPE tokenizers like SmolLM2's.
    long_prompt = "The quick brown fox jumps over the lazy dog. " * (a.prompt_tokens // 10)
    t0 = time.perf_counter()
    r = post(a.url, {"prompt": long_prompt, "max_tokens": 1, "temperature": 0})
    t1 = time.perf_counter()
    for t in threads:
        t.join()
    gaps = []
    for s in stamps:
        for x, y in zip(s, s[1:]):
            if y >= t0 and x <= t1:
                gaps.append((y - x) * 1e3)
    before = [(y - x) * 1e3 for s in stamps for x, y in zip(s, s[1:]) if y < t0]
    print(f"long prompt: {r['usage']['prompt_tokens']} tokens, answered in {t1 - t0:.2f} s")
    print(f"ITL before it: p50 {pct(before, 50):.1f} ms ({len(before)} gaps)")
    print(f"ITL while it was in flight: p50 {pct(gaps, 50):.1f} ms, p99 {pct(gaps, 99):.1f} ms, max {max(gaps):.1f} ms ({len(gaps)} gaps)")


if __name__ == "__main__":
    main()
