#!/usr/bin/env python3
"""`slm serve` against the official `openai` Python client (run by hand; versions pinned in
tools/requirements-openai.txt): models, chat (whole and streamed), completions, embeddings
(the client asks for base64 by default), structured output through `.parse()` with a Pydantic
model, and the client's exception classes for 400, 401, 404 and 429.

  python3 -m venv /tmp/venv-openai && /tmp/venv-openai/bin/pip install -r tools/requirements-openai.txt
  /tmp/venv-openai/bin/python tools/check_openai_client.py --slm target/release/slm

Exits non-zero on the first check that fails, naming it.
"""
import argparse
import math
import os
import socket
import subprocess
import sys
import threading
import time

import openai
import pydantic
from openai import OpenAI

ASSETS = os.environ.get("SLM_ASSETS", os.path.join(os.path.dirname(__file__), "../../shared/assets"))
SMOL = os.path.join(ASSETS, "models/smollm2-135m-instruct-q4_1/SmolLM2-135M-Instruct.Q4_1.gguf")
MINILM = os.path.join(ASSETS, "models/all-MiniLM-L6-v2")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(slm, *args):
    port = free_port()
    p = subprocess.Popen([slm, "serve", "--port", str(port), *args],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = p.stderr.readline()
    if "listening" not in line:
        raise SystemExit(f"slm serve did not start: {line}{p.stderr.read()}")
    threading.Thread(target=p.stderr.read, daemon=True).start()
    return p, f"http://127.0.0.1:{port}/v1"


def check(name, cond, detail=""):
    if not cond:
        raise SystemExit(f"FAILED: {name} {detail}")
    print(f"ok   {name}")


class City(pydantic.BaseModel):
    name: str
    country: str
    population: int


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--slm", default="target/release/slm")
    a = ap.parse_args()
    print(f"openai {openai.__version__}, pydantic {pydantic.VERSION}")
    p, base = serve(a.slm, "-m", SMOL, "--alias", "smol", "-m", MINILM, "--alias", "minilm",
                    "--api-key", "sekret")
    try:
        c = OpenAI(base_url=base, api_key="sekret", max_retries=0)
        ids = [m.id for m in c.models.list()]
        check("models.list", ids == ["smol", "minilm"], ids)

        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        r = c.chat.completions.create(model="smol", messages=msgs, max_tokens=24, temperature=0,
                                      extra_body={"cache_prompt": False})
        whole = r.choices[0].message.content
        check("chat.completions.create", isinstance(whole, str) and len(whole) > 0
              and r.usage.completion_tokens > 0 and r.choices[0].finish_reason in ("stop", "length"), r)
        stream = c.chat.completions.create(model="smol", messages=msgs, max_tokens=24, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"cache_prompt": False})
        parts, usage, ids = [], None, set()
        for ch in stream:
            ids.add(ch.id)
            if ch.usage:
                usage = ch.usage
            for choice in ch.choices:
                if choice.delta.content:
                    parts.append(choice.delta.content)
        check("chat stream equals the whole answer", "".join(parts) == whole, (parts, whole))
        check("chat stream: one id, usage at the end", len(ids) == 1 and usage is not None
              and usage.completion_tokens == r.usage.completion_tokens)

        cr = c.completions.create(model="smol", prompt="The three primary colors are", max_tokens=12,
                                  temperature=0)
        check("completions.create", len(cr.choices[0].text) > 0 and cr.usage.completion_tokens > 0, cr)

        texts = ["A man is eating food.", "A cheetah chases its prey."]
        e64 = c.embeddings.create(model="minilm", input=texts)  # the client asks for base64
        ef = c.embeddings.create(model="minilm", input=texts, encoding_format="float")
        same = all(max(abs(x - y) for x, y in zip(a_.embedding, b_.embedding)) < 1e-6
                   for a_, b_ in zip(e64.data, ef.data))
        norm = math.sqrt(sum(x * x for x in ef.data[0].embedding))
        check("embeddings (base64 and float agree)", len(ef.data) == 2 and same
              and len(ef.data[0].embedding) == 384 and abs(norm - 1) < 1e-4, norm)

        try:
            parsed = c.chat.completions.parse(
                model="smol", response_format=City, max_tokens=300, temperature=0,
                messages=[{"role": "user", "content": "Give the name, country and population of Paris as JSON."}])
            city = parsed.choices[0].message.parsed
            check(".parse() with a Pydantic model", isinstance(city, City), parsed)
        except openai.BadRequestError as e:
            check(".parse() with a Pydantic model", False, f"(refused: {e})")

        def raises(name, cls, f):
            try:
                f()
            except cls as e:
                check(name, True)
                return e
            except Exception as e:  # noqa: BLE001
                check(name, False, f"raised {type(e).__name__}: {e}")
            check(name, False, "did not raise")

        raises("400 -> BadRequestError", openai.BadRequestError,
               lambda: c.chat.completions.create(model="smol", messages=msgs, temperature=5))
        raises("404 -> NotFoundError", openai.NotFoundError,
               lambda: c.chat.completions.create(model="gpt-4o", messages=msgs))
        bad = OpenAI(base_url=base, api_key="wrong", max_retries=0)
        raises("401 -> AuthenticationError", openai.AuthenticationError, lambda: bad.models.list())
    finally:
        p.terminate()
        p.wait()

    p, base = serve(a.slm, "-m", SMOL, "--parallel", "1", "--queue", "0")
    try:
        c = OpenAI(base_url=base, api_key="x", max_retries=0)
        held = c.completions.create(model="smol", prompt="Once upon a time", max_tokens=2000,
                                    stream=True, extra_body={"ignore_eos": True})
        next(iter(held))
        raises("429 -> RateLimitError", openai.RateLimitError,
               lambda: c.completions.create(model="smol", prompt="Hi", max_tokens=2))
        held.close()
    finally:
        p.terminate()
        p.wait()
    print("all checks passed")


if __name__ == "__main__":
    main()
