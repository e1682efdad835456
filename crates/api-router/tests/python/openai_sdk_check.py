"""Drives the router through the official `openai` Python package.

Usage: openai_sdk_check.py SCENARIO   (env: ROUTER_URL, API_KEY, and per scenario
RATE_LIMITED_KEY, BROKE_KEY). Prints "ok <scenario>" and exits 0 when every
check passes; any failed assertion exits non-zero with the reason.
"""
import os
import sys

import openai

BASE = os.environ["ROUTER_URL"] + "/v1"


def client(key=None):
    return openai.OpenAI(base_url=BASE, api_key=key or os.environ["API_KEY"], max_retries=0, timeout=30)


def chat():
    r = client().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "Hello from backend-1.", r
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (12, 9, 21), r.usage
    c = client().completions.create(model="gpt-4o", prompt="hi")
    assert c.choices[0].text == "Hello from backend-1.", c


def stream():
    chunks = list(
        client().chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 tok3 tok4 ", repr(text)
    usage = [c.usage for c in chunks if c.usage is not None]
    assert usage and usage[-1].completion_tokens == 5 and usage[-1].prompt_tokens == 12, usage


def embeddings():
    r = client().embeddings.create(model="gpt-4o", input=["a", "b"])
    assert len(r.data) == 2 and len(r.data[0].embedding) == 8, r
    assert r.usage.prompt_tokens == 5, r.usage


def models():
    ids = [m.id for m in client().models.list()]
    assert "gpt-4o" in ids, ids


def errors():
    try:
        client("not-a-key").chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("expected AuthenticationError")
    except openai.AuthenticationError as e:
        assert e.status_code == 401 and e.code == "unauthorized", e
    limited = client(os.environ["RATE_LIMITED_KEY"])
    limited.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    try:
        limited.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("expected RateLimitError")
    except openai.RateLimitError as e:
        assert e.status_code == 429 and e.code == "rate_limited", e
    try:
        client(os.environ["BROKE_KEY"]).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("expected a 402 APIStatusError")
    except openai.APIStatusError as e:
        assert e.status_code == 402 and e.code == "budget_exceeded", e


if __name__ == "__main__":
    scenario = sys.argv[1]
    {"chat": chat, "stream": stream, "embeddings": embeddings, "models": models, "errors": errors}[scenario]()
    print(f"ok {scenario}")
