"""Drives the router through the official `anthropic` Python package.

Usage: anthropic_sdk_check.py SCENARIO   (env: ROUTER_URL, API_KEY, MODEL,
BACKEND (the mock's id), SHAPE (`anthropic` when MODEL routes to an
Anthropic backend, `openai` when to an OpenAI-shaped one through
translation), and for `errors` RATE_LIMITED_KEY). Prints "ok <scenario>" and
exits 0 when every check passes; a failed check exits non-zero with the
reason. Checks are explicit (not `assert`, which `python -O` strips).
"""
import os
import sys

import anthropic

MODEL = os.environ["MODEL"]
SHAPE = os.environ["SHAPE"]
HELLO = f"Hello from {os.environ['BACKEND']}."
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
}


def check(ok, what):
    if not ok:
        raise SystemExit(f"check failed: {what}")


def client(key=None, bearer=False):
    key = key or os.environ["API_KEY"]
    if bearer:
        return anthropic.Anthropic(base_url=os.environ["ROUTER_URL"], auth_token=key, api_key=None, max_retries=0, timeout=30)
    return anthropic.Anthropic(base_url=os.environ["ROUTER_URL"], api_key=key, max_retries=0, timeout=30)


def expected_usage(output):
    # The Anthropic mock: 5 uncached, 4 cache reads, 3 cache writes. The
    # OpenAI mock: 12 prompt tokens of which 4 cached (no cache writes).
    return (5, 4, 3, output) if SHAPE == "anthropic" else (8, 4, 0, output)


def usage_of(u):
    return (u.input_tokens, u.cache_read_input_tokens, u.cache_creation_input_tokens, u.output_tokens)


def message():
    for c in [client(), client(bearer=True)]:
        m = c.messages.create(model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "hi"}])
        check(m.content[0].type == "text" and m.content[0].text == HELLO, m)
        check(m.stop_reason == "end_turn", m.stop_reason)
        check(usage_of(m.usage) == expected_usage(9), m.usage)


def stream():
    with client().messages.stream(model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "hi"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    check(text == "tok0 tok1 tok2 tok3 tok4 ", repr(text))
    check(final.stop_reason == "end_turn", final.stop_reason)
    check(usage_of(final.usage) == expected_usage(5), final.usage)


def tools():
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    m = client().messages.create(model=MODEL, max_tokens=100, messages=ask, tools=[WEATHER])
    uses = [b for b in m.content if b.type == "tool_use"]
    check(m.stop_reason == "tool_use" and len(uses) == 1, m)
    check(uses[0].name == "get_weather" and uses[0].input == {"location": "Paris"}, uses[0])
    follow = ask + [
        {"role": "assistant", "content": [b.model_dump() for b in m.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "18C and sunny"}]},
    ]
    done = client().messages.create(model=MODEL, max_tokens=100, messages=follow, tools=[WEATHER])
    check(done.stop_reason == "end_turn" and done.content[0].text == HELLO, done)
    # Streamed: the tool's input arrives in pieces and is put together.
    with client().messages.stream(model=MODEL, max_tokens=100, messages=ask, tools=[WEATHER]) as s:
        final = s.get_final_message()
    uses = [b for b in final.content if b.type == "tool_use"]
    check(final.stop_reason == "tool_use" and uses and uses[0].input == {"location": "Paris"}, final)


def count_tokens():
    r = client().messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "hello there"}])
    check(r.input_tokens > 0, r)


def errors():
    try:
        client("not-a-key").messages.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "x"}])
        raise SystemExit("expected AuthenticationError")
    except anthropic.AuthenticationError as e:
        check(e.status_code == 401 and e.body["error"]["type"] == "authentication_error", e.body)
    limited = client(os.environ["RATE_LIMITED_KEY"])
    limited.messages.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "x"}])
    try:
        limited.messages.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "x"}])
        raise SystemExit("expected RateLimitError")
    except anthropic.RateLimitError as e:
        check(e.status_code == 429 and e.body["error"]["type"] == "rate_limit_error", e.body)
        check(e.response.headers.get("retry-after") is not None, dict(e.response.headers))
    try:
        client().messages.create(model=MODEL, max_tokens=0, messages=[{"role": "user", "content": "x"}])
        raise SystemExit("expected BadRequestError")
    except anthropic.BadRequestError as e:
        check(e.status_code == 400 and "max_tokens" in e.body["error"]["message"], e.body)


if __name__ == "__main__":
    scenario = sys.argv[1]
    {"message": message, "stream": stream, "tools": tools, "count_tokens": count_tokens, "errors": errors}[scenario]()
    print(f"ok {scenario}")
