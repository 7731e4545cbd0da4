"""Drives the Quantfleet router with the official OpenAI Python client (crates/quantfleet/tests/fleet.rs runs
it). Prints one JSON object with what it observed; the Rust test asserts on it."""
import json
import sys

import openai

base_url = sys.argv[1]
model = sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="not-needed", max_retries=0)
messages = [{"role": "user", "content": "Write a haiku about the sea."}]
out = {}

# Streaming chat: collect the deltas and the finish reason.
stream = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, stream=True,
                                        stream_options={"include_usage": True})
deltas, finish, usage, roles = [], None, None, []
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage.completion_tokens
    for choice in chunk.choices:
        if choice.delta.role:
            roles.append(choice.delta.role)
        if choice.delta.content:
            deltas.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
out["stream_chunks"] = len(deltas)
out["stream_text"] = "".join(deltas)
out["stream_finish"] = finish
out["stream_usage_completion_tokens"] = usage
out["stream_roles"] = roles

# The same request without streaming must give the same (greedy) text.
whole = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
out["whole_text"] = whole.choices[0].message.content
out["whole_finish"] = whole.choices[0].finish_reason

# Legacy completions, streamed.
comp = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0, stream=True)
out["completion_text"] = "".join(c.choices[0].text for c in comp if c.choices)

# Errors arrive as the client's typed exceptions.
try:
    client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=2)
    out["unknown_model"] = "no error"
except openai.NotFoundError as e:
    out["unknown_model"] = e.status_code
try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=2, temperature=5)
    out["bad_temperature"] = "no error"
except openai.BadRequestError as e:
    out["bad_temperature"] = e.status_code
print(json.dumps(out))
