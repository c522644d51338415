"""Serve a model directory with ``mlx_lm.server`` and call it like any OpenAI client would.

mlx-lm's server is the product here, not a server of ours: it renders the chat
template stored in the model directory (fetch_model writes the one training
used) and turns ``<tool_call>`` text into OpenAI ``tool_calls`` with the
``tool_parser_type`` stored beside it. This module only runs it as a child
process on a free loopback port, bounded in time and always stopped, and
asks it with the ``openai`` client. ``constrained=True`` runs
``toolcall.serve.constrained_server`` instead: the same server, with each
request that offers tools decoded under their grammar.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

from toolcall.calls.prompts import tool_specs
from toolcall.model import blas


class ServerError(RuntimeError):
    """The server exited or did not answer in time; the message carries its log's tail."""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model, adapter=None, port=8080, constrained=False):
    program = ["toolcall.serve.constrained_server"] if constrained else ["mlx_lm", "server"]
    cmd = [sys.executable, "-m", *program, "--model", str(model), "--host", "127.0.0.1", "--port", str(port)]
    return cmd + (["--adapter-path", str(adapter)] if adapter else [])


@contextmanager
def mlx_server(model, adapter=None, log_path=None, timeout=60.0, constrained=False):
    """Run ``mlx_lm.server`` (``constrained``: toolcall.serve.constrained_server) on ``model`` (+ ``adapter``);
    yield its OpenAI base URL.

    Output goes to ``log_path`` (a temporary file if None). The server is
    terminated on exit, killed if it does not stop within 10 s.
    """
    import tempfile

    port = free_port()
    env = dict(os.environ)
    if blas.loaded_path:  # mlx_lm's server does not import toolcall: preload OpenBLAS as toolcall/model/blas.py does
        env["LD_PRELOAD"] = ":".join(filter(None, [blas.loaded_path, env.get("LD_PRELOAD")]))
    with (open(log_path, "w") if log_path else tempfile.NamedTemporaryFile("w+")) as log:
        proc = subprocess.Popen(server_command(model, adapter, port, constrained), stdout=log,
                                stderr=subprocess.STDOUT, env=env)
        try:
            _wait_healthy(proc, port, timeout, log)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_healthy(proc, port, timeout, log):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"mlx_lm.server exited with {proc.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except urllib.error.HTTPError as e:
            # 503: the server's generation thread died (e.g. the model did not load); it never recovers.
            raise ServerError(f"mlx_lm.server is up but unhealthy ({e.code}):\n{_tail(log)}") from None
        except OSError:  # not listening yet
            pass
        time.sleep(0.2)
    raise ServerError(f"mlx_lm.server did not answer /health within {timeout:.0f} s:\n{_tail(log)}")


def _tail(log, n=2000):
    log.flush()
    with open(log.name) as f:
        return f.read()[-n:]


def client(base_url, timeout=600.0):
    from openai import OpenAI

    # mlx_lm.server checks no key; the client insists on one.
    return OpenAI(base_url=base_url, api_key="not-needed", timeout=timeout, max_retries=0)


def ask(openai_client, row, max_tokens, logprobs=False):
    """One greedy chat completion for a test row, its functions passed as ``tools=``."""
    return openai_client.chat.completions.create(
        model="default_model",  # the server's name for its --model
        messages=row["messages"],
        tools=tool_specs(row["functions"]),
        temperature=0.0,
        max_tokens=max_tokens,
        logprobs=logprobs,
    )


def response_calls(response):
    """The reply's ``tool_calls`` as ``[{"name", "arguments"}]``, the shape eval parses calls into."""
    calls = response.choices[0].message.tool_calls or []
    return [{"name": c.function.name, "arguments": json.loads(c.function.arguments)} for c in calls]
