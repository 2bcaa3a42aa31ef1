#!/usr/bin/env python3
"""Drives `edgemoe serve --http` with the official `openai` Python client: a completion, a chat,
both streamed and whole, the models list, and a refused field. Exits non-zero on any mismatch.

    pip install openai
    edgemoe serve --http 127.0.0.1:8080 --model target/models/SmolLM2-135M-Instruct.Q4_1.gguf &
    python3 tools/openai_client.py [--base-url http://127.0.0.1:8080/v1] [--api-key KEY]
"""
import argparse
import sys

import openai


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    ap.add_argument("--api-key", default="none")
    a = ap.parse_args()
    client = openai.OpenAI(base_url=a.base_url, api_key=a.api_key)

    model = client.models.list().data[0].id
    print(f"model: {model}")

    c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=12, temperature=0, seed=1)
    print(f"completion: {c.choices[0].text!r} ({c.choices[0].finish_reason}, {c.usage.completion_tokens} tokens)")
    streamed = "".join(
        ch.choices[0].text
        for ch in client.completions.create(model=model, prompt="The capital of France is", max_tokens=12, temperature=0, seed=1, stream=True)
        if ch.choices
    )
    assert streamed == c.choices[0].text, (streamed, c.choices[0].text)

    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0)
    print(f"chat: {r.choices[0].message.content!r} ({r.choices[0].finish_reason})")
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=40, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    parts, usage = [], None
    for ch in stream:
        if ch.choices and ch.choices[0].delta.content:
            parts.append(ch.choices[0].delta.content)
        usage = ch.usage or usage
    assert "".join(parts) == r.choices[0].message.content
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens

    try:
        client.completions.create(model=model, prompt="x", max_tokens=2, extra_body={"temperatur": 0.5})
        sys.exit("a misspelt field was accepted")
    except openai.BadRequestError as e:
        print(f"refused as expected: {e.body['message'] if isinstance(e.body, dict) else e}")
    print("ok")


if __name__ == "__main__":
    main()
