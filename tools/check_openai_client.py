#!/usr/bin/env python3
"""The official `openai` Python client against `switchyard serve` on loopback:
a chat request streamed and not, a completion, and a tool-call round trip
(tools sent, an assistant tool call and its tool result sent back), each checked.

    python3 -m venv /tmp/oai && /tmp/oai/bin/pip install openai
    /tmp/oai/bin/python tools/check_openai_client.py --binary target/debug/switchyard

Starts the server itself (demo model, a free port, an API key), stops it with
SIGTERM at the end and checks that it exits 0. Exits non-zero on any failure.
"""
import argparse
import json
import re
import signal
import subprocess
import sys
import time

from openai import OpenAI

KEY = "check-openai-client"


def start(binary):
    proc = subprocess.Popen(
        [binary, "serve", "--port", "0", "--api-key", KEY],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None:
                sys.exit(f"switchyard serve exited with {proc.returncode} before listening")
            continue
        m = re.search(r"(http://\S+/v1)", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    sys.exit("switchyard serve did not print its address within 120 s")


PASSED = []


def check(cond, what):
    if not cond:
        print(f"openai-client: {len(PASSED)} passed, 1 failed")
        raise SystemExit(f"FAILED: {what}")
    PASSED.append(what)
    print(f"ok: {what}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="target/debug/switchyard")
    args = ap.parse_args()
    proc, base = start(args.binary)
    try:
        client = OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        check(model == "demo", f"models.list names the demo model ({model})")

        messages = [{"role": "user", "content": "Tell me about the forest."}]
        whole = client.chat.completions.create(
            model=model, messages=messages, max_tokens=16, temperature=0
        )
        text = whole.choices[0].message.content
        check(bool(text), f"chat completion has content ({text!r})")
        check(whole.usage.completion_tokens > 0, "chat completion reports usage")

        pieces, usage, finish = [], None, None
        for chunk in client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        ):
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                if choice.finish_reason:
                    finish = choice.finish_reason
        check("".join(pieces) == text, "streamed chat text equals the whole answer")
        check(finish == whole.choices[0].finish_reason, f"stream ends with finish_reason {finish}")
        check(usage is not None and usage.total_tokens == whole.usage.total_tokens, "stream usage chunk")

        comp = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
        check(comp.choices[0].finish_reason in ("stop", "length"), "completion finishes")

        tools = [{
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather of a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }]
        first = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=tools,
            max_tokens=8,
            temperature=0,
        )
        reply = first.choices[0]
        check(reply.finish_reason in ("stop", "length", "tool_calls"), "chat with tools answers")
        # The demo model was not trained to call tools, so the call is written here
        # as the assistant turn a tool-calling model would have produced.
        calls = [c.model_dump() for c in reply.message.tool_calls or []] or [{
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})},
        }]
        call_id = calls[0]["id"]
        second = client.chat.completions.create(
            model=model,
            messages=[
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": call_id, "content": "sunny, 21 C"},
            ],
            tools=tools,
            max_tokens=8,
            temperature=0,
        )
        check(second.choices[0].message.content is not None, "tool result round trip answers")

        try:
            client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)
            check(False, "an unknown model is refused")
        except Exception as e:  # openai.NotFoundError
            check(getattr(e, "status_code", None) == 404, f"an unknown model is refused with 404")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = None
    check(code == 0, f"SIGTERM shuts the server down with exit code 0 (got {code})")
    print(f"openai-client: {len(PASSED)} passed, 0 failed")


if __name__ == "__main__":
    main()
