"""Rendering a chat template read from a file: Jinja2's immutable sandbox, in a child process
with a time limit (a template is untrusted text; the sandbox bounds what it can reach, the
child bounds how long it can loop), on a short fixed conversation.

The variables are the ones transformers' `apply_chat_template` passes: ``messages``,
``add_generation_prompt``, ``bos_token``, ``eos_token`` and ``raise_exception``.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from apr.tokenizer import TokenizerData

CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "Write fib(n) in Python."},
    {"role": "assistant", "content": "def fib(n):\n    return n if n < 2 else fib(n-1) + fib(n-2)"},
    {"role": "user", "content": "Thanks!"},
]
TIMEOUT_S = 10
MAX_TEMPLATE = 1 << 16          # characters; longer templates are not rendered

_CHILD = textwrap.dedent("""
    import json, sys
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    job = json.loads(sys.stdin.read())
    def raise_exception(message):
        raise ValueError(message)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        out = env.from_string(job["template"]).render(
            messages=job["messages"], add_generation_prompt=True,
            bos_token=job["bos"], eos_token=job["eos"])
    except Exception as e:
        out = "<template error: %s: %s>" % (type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    sys.stdout.write(json.dumps(out))
""")


def render_chat(template: str, td: TokenizerData) -> str:
    """The template's rendering of `CONVERSATION` with this tokenizer's BOS/EOS strings, or
    a bracketed note when it fails, is too long, or runs past the time limit."""
    if len(template) > MAX_TEMPLATE:
        return f"<template not rendered: {len(template)} characters>"
    job = {"template": template, "messages": CONVERSATION,
           "bos": td.vocab[td.bos_token_id] if td.bos_token_id is not None else "",
           "eos": td.vocab[td.eos_token_id] if td.eos_token_id is not None else ""}
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(job),
                              capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"<template not rendered: still running after {TIMEOUT_S} s>"
    try:
        out = json.loads(proc.stdout)
    except ValueError:
        return f"<template not rendered: renderer exit {proc.returncode}>"
    return out if isinstance(out, str) else "<template not rendered>"
