"""Helpers for the end-to-end serving tests: one real `vllm serve` subprocess, driven by the openai client.

The server itself is tools.serve_demo.VllmServer (the same launcher `make demo` uses): the `vllm`
command of this environment, a free loopback port, its log in a temporary file, stopped with SIGTERM
then SIGKILL of its process group (a watchdog process does the same if pytest itself is killed).
"""

from __future__ import annotations

import pytest

from tools.serve_demo import ServerError, VllmServer

# The only flags the tests pass: everything else (the Doge model class included) must come from the
# checkpoint and the plugin's entry point, as for a user's `vllm serve DIR`.
SERVE_FLAGS = ["--gpu-memory-utilization", "0.3", "--dtype", "float32"]
READY_TIMEOUT_S = 420.0  # a cold torch.compile on 2 busy cores can take minutes


def launch(model: str, max_model_len: int, finalizer, log_path, args=(), env=None) -> VllmServer:
    """Start `vllm serve model` (non-blocking), its output in `log_path` (under pytest's tmp dir, which
    pytest prunes); `finalizer(server.stop)` is registered before the start, so the server is stopped
    whatever happens next. `args` and `env` add flags and environment variables (e.g. for LoRA)."""
    server = VllmServer(model, max_model_len=max_model_len, args=[*SERVE_FLAGS, *args], env=env, log_path=log_path)
    finalizer(server.stop)
    server.start()
    return server


def wait_ready(server: VllmServer) -> None:
    """Block until /health answers; on failure stop the server and fail with its log tail."""
    try:
        server.wait_until_ready(timeout=READY_TIMEOUT_S)
    except ServerError as error:
        server.stop()
        pytest.fail(str(error), pytrace=False)


def server_log(server: VllmServer) -> str:
    return server.log_path.read_text(encoding="utf-8", errors="replace")


def _token_ids(obj, field: str, what: str) -> list[int]:
    """vLLM's extra `field` of an openai object: an attribute, or in `model_extra` (client versions differ)."""
    ids = getattr(obj, field, None)
    if ids is None:
        ids = (obj.model_extra or {}).get(field)
    assert ids is not None, f"the server did not return {what}"
    return list(ids)


def choice_tokens(choice) -> list[int]:
    """Generated token ids of a completion/chat choice requested with `return_token_ids`."""
    return _token_ids(choice, "token_ids", "token ids (extra_body={'return_token_ids': True})")


def prompt_tokens(response_or_choice) -> list[int]:
    """Prompt token ids the server used (completions: on the choice; chat: on the response)."""
    return _token_ids(response_or_choice, "prompt_token_ids", "prompt token ids")
