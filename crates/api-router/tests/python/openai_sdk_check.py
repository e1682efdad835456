"""Drives the router through the official `openai` Python package.

Usage: openai_sdk_check.py SCENARIO   (env: ROUTER_URL, API_KEY, and per scenario
RATE_LIMITED_KEY, BROKE_KEY, MODEL, BACKEND). Prints "ok <scenario>" and
exits 0 when every check passes; a failed check exits non-zero with the
reason. Checks are explicit (not `assert`, which `python -O` strips).
"""
import json
import os
import sys

import openai

BASE = os.environ["ROUTER_URL"] + "/v1"


def check(ok, what):
    if not ok:
        raise SystemExit(f"check failed: {what}")


def client(key=None):
    return openai.OpenAI(base_url=BASE, api_key=key or os.environ["API_KEY"], max_retries=0, timeout=30)


def chat():
    r = client().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    check(r.choices[0].message.content == "Hello from backend-1.", r)
    check((r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (12, 9, 21), r.usage)
    c = client().completions.create(model="gpt-4o", prompt="hi")
    check(c.choices[0].text == "Hello from backend-1.", c)


def stream():
    chunks = list(
        client().chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check(text == "tok0 tok1 tok2 tok3 tok4 ", repr(text))
    usage = [c.usage for c in chunks if c.usage is not None]
    check(usage and usage[-1].completion_tokens == 5 and usage[-1].prompt_tokens == 12, usage)


def embeddings():
    r = client().embeddings.create(model="gpt-4o", input=["a", "b"])
    check(len(r.data) == 2 and len(r.data[0].embedding) == 8, r)
    check(r.usage.prompt_tokens == 5, r.usage)


def models():
    ids = [m.id for m in client().models.list()]
    check("gpt-4o" in ids, ids)


def errors():
    try:
        client("not-a-key").chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        raise SystemExit("expected AuthenticationError")
    except openai.AuthenticationError as e:
        check(e.status_code == 401 and e.code == "unauthorized", e)
    limited = client(os.environ["RATE_LIMITED_KEY"])
    limited.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    try:
        limited.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        raise SystemExit("expected RateLimitError")
    except openai.RateLimitError as e:
        check(e.status_code == 429 and e.code == "rate_limited", e)
    try:
        client(os.environ["BROKE_KEY"]).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
        raise SystemExit("expected a 402 APIStatusError")
    except openai.APIStatusError as e:
        check(e.status_code == 402 and e.code == "budget_exceeded", e)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]},
    },
}


def responses():
    model, hello = os.environ["MODEL"], f"Hello from {os.environ['BACKEND']}."
    r = client().responses.create(model=model, input="hi")
    check(r.output_text == hello, r)
    check((r.usage.input_tokens, r.usage.output_tokens) == (12, 9), r.usage)
    events = list(client().responses.create(model=model, input="hi", stream=True))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    check(text == "tok0 tok1 tok2 tok3 tok4 ", repr(text))
    done = [e for e in events if e.type == "response.completed"]
    check(len(done) == 1 and done[0].response.usage.output_tokens == 5, done)


def chat_tools():
    """Chat completions with tools, to an Anthropic backend through translation."""
    model, hello = os.environ["MODEL"], f"Hello from {os.environ['BACKEND']}."
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client().chat.completions.create(model=model, messages=ask, tools=[WEATHER])
    choice = r.choices[0]
    check(choice.finish_reason == "tool_calls" and choice.message.tool_calls, r)
    call = choice.message.tool_calls[0]
    check(call.function.name == "get_weather" and json.loads(call.function.arguments) == {"location": "Paris"}, call)
    # Anthropic's usage in OpenAI's shape: 12 prompt tokens, 4 of them cached.
    check((r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.prompt_tokens_details.cached_tokens) == (12, 9, 4), r.usage)
    follow = ask + [
        {"role": "assistant", "content": choice.message.content, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18C and sunny"},
    ]
    done = client().chat.completions.create(model=model, messages=follow, tools=[WEATHER])
    check(done.choices[0].finish_reason == "stop" and done.choices[0].message.content == hello, done)
    # Streamed: the arguments arrive in pieces.
    chunks = list(client().chat.completions.create(
        model=model, messages=ask, tools=[WEATHER], stream=True, stream_options={"include_usage": True}))
    pieces = [tc.function.arguments for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or []) if tc.function.arguments]
    check(len(pieces) >= 2 and json.loads("".join(pieces)) == {"location": "Paris"}, pieces)
    check(any(c.choices and c.choices[0].finish_reason == "tool_calls" for c in chunks), chunks[-3:])
    usage = [c.usage for c in chunks if c.usage is not None]
    check(usage and usage[-1].prompt_tokens == 12, usage)


if __name__ == "__main__":
    scenario = sys.argv[1]
    {
        "chat": chat,
        "stream": stream,
        "embeddings": embeddings,
        "models": models,
        "errors": errors,
        "responses": responses,
        "chat_tools": chat_tools,
    }[scenario]()
    print(f"ok {scenario}")
