"""`make demo`: serve the demo checkpoint with the `vllm` command and talk to it with the openai client.

    python -m tools.serve_demo [--model DIR] [--port N] [--max-model-len N] [--timeout S] [-- VLLM SERVE ARGS]

It starts `vllm serve checkpoints/doge-demo` in a subprocess on a free loopback port (the plugin is
picked up through its `vllm.general_plugins` entry point: nothing Doge-specific is passed), waits for
`/health` while showing progress, sends three requests and prints them, and always stops the server:
SIGTERM, then SIGKILL to the server's whole process group after a grace period; on Ctrl-C too.

The demo checkpoint's keep window (W = 128 keys) is smaller than its context (512), so the requests go
through Doge's sparse path: a short chat answer (inside the window), a streamed completion that
generates past W, and a prompt of ~240 tokens from a standard-library file the model was not trained on
(past W before the first generated token). For each answer the demo prints how many of its tokens lay
past the window (prompt + generated - W), its tokens/s, and the most KV-cache blocks seen held while it
decoded, sampled by a helper process from the server's /metrics (`vllm:kv_cache_usage_perc` x the
blocks of `vllm:cache_config_info`), next to the bound the window sets: the plugin declares each layer
sliding-window W + 1, so a request holds at most ceil((W + 1) / block) + 1 blocks however long it gets.
The server runs with `--block-size 32` (the CPU default, 128, would make that bound 3 blocks against 4).

`VllmServer` is also what tests/serving.py uses to run the end-to-end tests against a real server.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = REPO_ROOT / "checkpoints" / "doge-demo"

CHAT_PROMPT = "Write a Python function that returns the larger of two numbers."
COMPLETION_PROMPT = "import os\n\n\ndef list_python_files(directory):\n"
COMPLETION_TOKENS = 256  # the prompt is ~15 tokens: generation goes past a window of 128
# The long prompt: the head of a standard-library file that tools.train_demo holds out of training (every
# 25th file in sorted order; base64.py is the first), up to LONG_PROMPT_TOKENS tokens cut at a line end:
# past W already, and within the 256 positions the model was trained on.
LONG_PROMPT_FILE = "base64.py"
LONG_PROMPT_TOKENS = 240
LONG_TOKENS = 96
BLOCK_SIZE = 32  # --block-size of the demo server, unless given after `--`


class ServerError(RuntimeError):
    """The server exited, or did not become healthy in time; the message carries its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def vllm_executable() -> str:
    """The `vllm` command of this environment: next to the running interpreter first, else on PATH."""
    beside = pathlib.Path(sys.executable).parent / "vllm"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("vllm")
    if found is None:
        raise ServerError("the `vllm` command was not found; install the project first (`make setup`)")
    return found


# The watchdog: a tiny process that blocks reading a pipe whose write end only the launcher holds. The
# read returns when the launcher closes it (stop()) or dies in any way (SIGKILL included); then, if the
# server's process group still exists, it gets SIGTERM and, after the grace period, SIGKILL. vLLM ignores
# signals during parts of its start-up and leaves its engine process behind when the API server is
# killed alone, so the whole group is what gets signalled.
_WATCHDOG = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
pgid, grace = int(sys.argv[1]), float(sys.argv[2])
sys.stdin.buffer.read()
def signal_group(sig):
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
if signal_group(signal.SIGTERM):
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and signal_group(0):
        time.sleep(0.2)
    signal_group(signal.SIGKILL)
"""


class VllmServer:
    """One `vllm serve` subprocess on a loopback port, its output in a log file.

    with VllmServer(path, max_model_len=512) as server:   # starts it
        server.wait_until_ready(timeout=300)
        client = openai.OpenAI(base_url=server.base_url, api_key="EMPTY")
    # stopped here, whatever happened
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        max_model_len: int | None = 512,
        args: list[str] | tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        log_path: str | os.PathLike | None = None,
        grace: float = 10.0,
    ) -> None:
        self.model = str(model)
        self.host = host
        self.port = port or free_port(host)
        self.max_model_len = max_model_len
        self.args = list(args)
        self.extra_env = dict(env or {})
        self._own_log = log_path is None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")
            os.close(fd)
        self.log_path = pathlib.Path(log_path)
        self.grace = grace
        self.process: subprocess.Popen | None = None
        self.started_at: float | None = None
        self._watchdog: subprocess.Popen | None = None
        self._watchdog_pipe: int | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible API root, for `openai.OpenAI(base_url=...)`."""
        return self.url + "/v1"

    def command(self) -> list[str]:
        cmd = [vllm_executable(), "serve", self.model, "--host", self.host, "--port", str(self.port)]
        if self.max_model_len is not None:
            cmd += ["--max-model-len", str(self.max_model_len)]
        return cmd + self.args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on the CPU backend: starts faster
        env["HF_HUB_OFFLINE"] = "1"  # local checkpoints only: never wait on the model hub
        # A server runs its engine in a separate process, as users run it (the tests set 0 for speed).
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.update(self.extra_env)
        return env

    def start(self) -> VllmServer:
        if self.process is not None:
            raise ServerError("server already started")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                # Its own process group: Ctrl-C in a terminal reaches only us, and stop() can kill the
                # server together with the engine and worker processes it spawned.
                start_new_session=True,
            )
        self.started_at = time.monotonic()
        self._start_watchdog()
        return self

    def _start_watchdog(self) -> None:
        """Stop the server even if this process dies without running stop() (see _WATCHDOG)."""
        read_end, self._watchdog_pipe = os.pipe()  # both non-inheritable: the server gets neither
        try:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-c", _WATCHDOG, str(self.process.pid), str(self.grace)],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # out of the terminal's reach: a Ctrl-C must not kill it first
            )
        finally:
            os.close(read_end)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                return "".join(collections.deque(log, maxlen=lines))
        except OSError:
            return "(no server log)"

    def _failure(self, what: str) -> ServerError:
        tail = self.log_tail()
        hint = ""
        if "No package metadata was found for vllm" in tail:
            hint = (
                "\nhint: the `vllm` command needs the distribution record from shims/vllm-metadata "
                "(installed by `make setup`): pip install --no-deps ./shims/vllm-metadata"
            )
        return ServerError(
            f"{what}\ncommand: {' '.join(self.command())}\nlog: {self.log_path}\n"
            f"--- last lines of the server log ---\n{tail.rstrip()}\n---{hint}"
        )

    def wait_until_ready(self, timeout: float = 300.0, progress=None, poll: float = 0.5) -> float:
        """Block until `/health` answers 200; returns the seconds since start.

        `progress(elapsed_seconds)` is called about once a second while waiting. Raises ServerError
        (with the server's log tail) if the server exits or `timeout` seconds pass.
        """
        if self.process is None:
            raise ServerError("server not started")
        deadline = self.started_at + timeout
        last_report = -1
        while True:
            elapsed = time.monotonic() - self.started_at
            if not self.alive():
                raise self._failure(f"vllm serve exited with code {self.process.returncode} after {elapsed:.0f} s")
            if self.healthy():
                return elapsed
            if time.monotonic() > deadline:
                raise self._failure(f"vllm serve did not become healthy within {timeout:.0f} s")
            if progress is not None and int(elapsed) != last_report:
                last_report = int(elapsed)
                progress(elapsed)
            time.sleep(poll)

    def stop(self, grace: float | None = None) -> int | None:
        """SIGTERM the server (it shuts its engine down), SIGKILL its process group after `grace` seconds
        (default: the constructor's). Idempotent; returns the server's exit code (None if never started)."""
        process = self.process
        if process is None:
            return None
        grace = self.grace if grace is None else grace
        try:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self._kill_group()
                    process.wait(timeout=10)
        finally:
            # Engine/worker processes that outlived the API server (they share its process group).
            self._kill_group()
            self._release_watchdog()
        return process.returncode

    def _release_watchdog(self) -> None:
        if self._watchdog_pipe is not None:
            os.close(self._watchdog_pipe)  # the watchdog wakes up, finds the group gone, exits
            self._watchdog_pipe = None
        if self._watchdog is not None:
            try:
                self._watchdog.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self._watchdog = None

    def kill(self) -> None:
        """SIGKILL the server's whole process group now."""
        if self.process is not None:
            self._kill_group()
            self.process.wait()
            self._release_watchdog()

    def _kill_group(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # the group start_new_session created
        except (ProcessLookupError, PermissionError):
            pass

    def cleanup_log(self) -> None:
        if self._own_log:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Progress:
    """While waiting: a dot a second, the elapsed time every ten seconds, a new line every minute."""

    def __init__(self, stream=sys.stdout) -> None:
        self.stream = stream
        self.open_line = False

    def __call__(self, elapsed: float) -> None:
        second = int(elapsed)
        if not self.open_line:
            self.stream.write("   ")
            self.open_line = True
        if second and second % 60 == 0:
            self.stream.write(f" {second}s\n   ")
        elif second and second % 10 == 0:
            self.stream.write(f" {second}s ")
        else:
            self.stream.write(".")
        self.stream.flush()

    def done(self, message: str) -> None:
        self.stream.write(("\n" if self.open_line else "") + message + "\n")
        self.stream.flush()
        self.open_line = False


def _raise_keyboard_interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def _keep_window(model: pathlib.Path, max_model_len: int) -> int | None:
    """The checkpoint's keep window W if it binds at this context length (some query sees more than W
    keys), else None."""
    config = json.loads((model / "config.json").read_text())
    window = config.get("keep_window_size")
    return window if window is not None and window < max_model_len else None


# The KV-block sampler: a process of its own (a thread of the demo would starve on the GIL while the
# stream is read), polling /metrics until its stdin closes; one line per sample: time running usage.
_SAMPLER = """
import re, select, sys, time, urllib.request
url, interval = sys.argv[1], float(sys.argv[2])
gauge = lambda name, text: re.search("^" + name + r"\\{[^}]*\\} (\\S+)", text, re.MULTILINE)
print("ready", flush=True)
while not select.select([sys.stdin], [], [], interval)[0]:
    try:
        text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    except OSError:
        continue
    running, usage = gauge("vllm:num_requests_running", text), gauge("vllm:kv_cache_usage_perc", text)
    if running and usage:
        print(time.monotonic(), running.group(1), usage.group(1), flush=True)
"""


class KvBlocks:
    """The KV-cache blocks in use on the server, sampled from its Prometheus /metrics while a request
    runs: `vllm:kv_cache_usage_perc` (used / usable blocks) times the usable blocks (`num_gpu_blocks` of
    `vllm:cache_config_info`, less the null block). With one request running, that is the blocks the
    request holds; a sample counts only if `vllm:num_requests_running` says a request was running.

    blocks = KvBlocks(server.url)
    with blocks:                      # a sampler process polls /metrics every `interval` seconds
        ...                           # blocks.decoding() once the request's third token is read
    blocks.peak, blocks.decode_peak   # the most seen before / after that (None: no sample)

    The prefill step allocates blocks for the whole prompt; the sliding-window manager frees those before
    the window at the next step, so the two phases are reported apart. The most seen is a lower bound on
    the true peak (samples are snapshots).
    """

    def __init__(self, url: str, interval: float = 0.04) -> None:
        self.url = url
        self.interval = interval
        self.block_size: int | None = None
        self.total: int | None = None
        self.peak: int | None = None
        self.decode_peak: int | None = None
        self._decoding_at: float | None = None
        self._sampler: subprocess.Popen | None = None

    def _metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as response:
            return response.read().decode()

    def read_config(self) -> bool:
        """block_size and the usable block count, once; False if the server does not export them."""
        if self.total is None:
            info = re.search(r"^vllm:cache_config_info\{(.*)\}", self._metrics(), re.MULTILINE)
            labels = dict(re.findall(r'(\w+)="([^"]*)"', info.group(1))) if info else {}
            if labels.get("num_gpu_blocks", "None").isdigit() and labels.get("block_size", "").isdigit():
                self.block_size, self.total = int(labels["block_size"]), int(labels["num_gpu_blocks"]) - 1
        return self.total is not None

    def decoding(self) -> None:
        if self._decoding_at is None:
            self._decoding_at = time.monotonic()

    def record(self, samples: list[tuple[float, float, float]]) -> None:
        """(time, requests running, usage) samples -> peak and decode_peak."""
        for when, running, usage in samples:
            if running < 1:
                continue
            held = round(usage * self.total)
            if self._decoding_at is not None and when >= self._decoding_at:
                self.decode_peak = max(self.decode_peak or 0, held)
            else:
                self.peak = max(self.peak or 0, held)

    def __enter__(self) -> "KvBlocks":
        self.peak, self.decode_peak, self._decoding_at = None, None, None
        try:
            ready = self.read_config()
        except (urllib.error.URLError, OSError):
            ready = False
        if ready:
            self._sampler = subprocess.Popen(
                [sys.executable, "-c", _SAMPLER, self.url, str(self.interval)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )
            self._sampler.stdout.readline()  # "ready": it polls from now on
        return self

    def __exit__(self, *exc) -> None:
        sampler, self._sampler = self._sampler, None
        if sampler is None:
            return
        time.sleep(2 * self.interval)  # a last sample or two
        out, _ = sampler.communicate(timeout=30)  # closes its stdin: it stops
        samples = []
        for line in out.splitlines():
            try:
                samples.append(tuple(float(x) for x in line.split()))
            except ValueError:
                pass
        self.record(samples)


def _answer_line(usage, seconds: float, window: int | None, blocks: KvBlocks) -> str:
    """One line on an answer: its tokens past the keep window, tokens/s, the KV blocks it held."""
    total = usage.prompt_tokens + usage.completion_tokens
    rate = usage.completion_tokens / max(seconds, 1e-9)
    parts = [f"{usage.prompt_tokens} prompt + {usage.completion_tokens} generated = {total} tokens"]
    if window is None:
        parts.append("the keep window does not bind at this context length")
    else:
        parts.append(f"{max(0, total - window)} past the keep window W = {window}")
    parts.append(f"{usage.completion_tokens} tokens in {seconds:.1f} s ({rate:.0f} tok/s)")
    if blocks.block_size is not None:
        block = blocks.block_size
        seen = blocks.decode_peak
        held = "KV blocks held while decoding (sampled from /metrics): "
        held += "not sampled" if seen is None else f"at most {seen} blocks of {block} tokens"
        if blocks.peak is not None:
            held += f" ({blocks.peak} at the prefill step)"
        if window is not None:
            bound = math.ceil((window + 1) / block) + 1
            held += f"; the window's bound ceil((W+1)/{block})+1 = {bound}, {math.ceil(total / block)} without a window"
        parts.append(held)
    return "=== " + "; ".join(parts) + " ==="


def _stream(create, blocks: KvBlocks, text_of) -> tuple[object, float]:
    """Send a streamed request (`create()`), print the answer as it comes while `blocks` samples the
    server's KV blocks; returns (usage, seconds)."""
    with blocks:
        start = time.monotonic()
        usage, chunks = None, 0
        for chunk in create():
            if chunk.choices:
                print(text_of(chunk.choices[0]) or "", end="", flush=True)
                chunks += 1
                if chunks == 3:  # the prefill step's blocks before the window are freed by now
                    blocks.decoding()
            if chunk.usage is not None:
                usage = chunk.usage
        seconds = time.monotonic() - start
    return usage, seconds


def long_prompt(model: pathlib.Path, budget: int) -> tuple[list[int], str]:
    """At most `budget` token ids from the head of LONG_PROMPT_FILE, cut after a newline (bos first, as
    the server's tokenizer encodes a prompt: the same tokenizer.json), and the text of the last 40, to show."""
    from tokenizers import Tokenizer  # transformers' fast-tokenizer library, loads in milliseconds

    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    text = (pathlib.Path(sysconfig.get_paths()["stdlib"]) / LONG_PROMPT_FILE).read_text(encoding="utf-8")
    tokens = tokenizer.encode(text).ids[:budget]
    end = len(tokens)
    while end > budget // 2 and "\n" not in tokenizer.decode(tokens[end - 1 : end]):
        end -= 1
    tokens = tokens[:end] if end > budget // 2 else tokens
    return tokens, tokenizer.decode(tokens[-40:])


def _talk(server: VllmServer, window: int | None) -> None:
    """The demo's requests, with the official openai client, one at a time (so the server's block count
    is the request's)."""
    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key="EMPTY", timeout=120, max_retries=0)
    (served,) = [m.id for m in client.models.list().data]
    print(f">> /v1/models: {served}")
    if window is None:
        print(f">> the keep window does not bind with --max-model-len {server.max_model_len}: no query sees more keys than it")
    else:
        print(f">> keep window W = {window} keys < --max-model-len {server.max_model_len}: past W tokens, each query "
              f"attends to its {window} keys with the largest dynamic-mask bias")
    blocks = KvBlocks(server.url)
    options = dict(model=served, temperature=0.7, seed=0, stream=True, stream_options={"include_usage": True})

    print("\n=== chat completion (streamed, temperature 0.7, seed 0, 64 tokens) ===")
    print(f"user: {CHAT_PROMPT}\nassistant: ", end="", flush=True)
    messages = [{"role": "user", "content": CHAT_PROMPT}]
    usage, seconds = _stream(lambda: client.chat.completions.create(messages=messages, max_tokens=64, **options),
                             blocks, lambda choice: choice.delta.content)
    print("\n" + _answer_line(usage, seconds, window, blocks))

    print(f"\n=== completion (streamed, temperature 0.7, seed 0, {COMPLETION_TOKENS} tokens) ===\n{COMPLETION_PROMPT}",
          end="", flush=True)
    usage, seconds = _stream(
        lambda: client.completions.create(prompt=COMPLETION_PROMPT, max_tokens=COMPLETION_TOKENS, **options),
        blocks, lambda choice: choice.text,
    )
    print("\n" + _answer_line(usage, seconds, window, blocks))

    budget = min(LONG_PROMPT_TOKENS, (server.max_model_len or 512) - LONG_TOKENS)
    tokens, tail = long_prompt(pathlib.Path(server.model), budget)
    print(f"\n=== a long prompt: the first {len(tokens)} tokens of the standard library's {LONG_PROMPT_FILE} "
          f"(held out of training; streamed, temperature 0.7, seed 0, {LONG_TOKENS} tokens) ===")
    print(f"[... {len(tokens) - 40} tokens ...]{tail}", end="", flush=True)
    usage, seconds = _stream(lambda: client.completions.create(prompt=tokens, max_tokens=LONG_TOKENS, **options),
                             blocks, lambda choice: choice.text)
    print("\n" + _answer_line(usage, seconds, window, blocks))


def run_demo(model: pathlib.Path, port: int | None, max_model_len: int, timeout: float, serve_args: list[str]) -> int:
    import openai

    args = ["--served-model-name", model.name, "--gpu-memory-utilization", "0.5", *serve_args]
    if not any(a == "--block-size" or a.startswith("--block-size=") for a in serve_args):
        args += ["--block-size", str(BLOCK_SIZE)]  # small blocks make the window's O(W) KV state visible
    window = _keep_window(model, max_model_len)
    server = VllmServer(model, port=port, max_model_len=max_model_len, args=args)
    print(f">> starting: {' '.join(server.command())}")
    print(f"   server log: {server.log_path}")
    # Ctrl-C, and SIGTERM (e.g. from a CI runner), unwind as KeyboardInterrupt so that the finally clause
    # stops the server. (SIGINT explicitly: a shell may start background jobs with it ignored.)
    previous = {sig: signal.signal(sig, _raise_keyboard_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    progress = _Progress()
    status = 1
    try:
        server.start()
        print(">> waiting for the server to answer /health (the first start compiles the model: 1-2 min on 2 cores)")
        elapsed = server.wait_until_ready(timeout=timeout, progress=progress)
        progress.done(f">> server ready at {server.url} after {elapsed:.0f} s")
        _talk(server, window)
        status = 0
    except KeyboardInterrupt:
        progress.done(">> interrupted")
        status = 130
    except ServerError as error:
        progress.done("")
        print(f">> error: {error}", file=sys.stderr)
    except openai.APIError as error:
        print(f"\n>> request failed: {error}\n--- last lines of the server log ---\n{server.log_tail()}", file=sys.stderr)
    finally:
        print(">> stopping the server (SIGTERM; SIGKILL after 10 s; Ctrl-C again to kill it now) ...", end=" ", flush=True)
        try:
            code = server.stop(grace=10.0)
        except KeyboardInterrupt:
            server.kill()
            code = "killed"
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print(f"stopped (exit code {code})")
        if status == 0:
            server.cleanup_log()
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.serve_demo", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_CHECKPOINT), help="checkpoint directory (default: %(default)s)")
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the server (default: %(default)s)")
    parser.add_argument("serve_args", nargs="*", help="extra `vllm serve` arguments, after `--`")
    args = parser.parse_args(argv)
    model = pathlib.Path(args.model)
    if not (model / "config.json").is_file():
        print(
            f"no checkpoint at {model} (config.json missing).\n"
            f"The demo checkpoint is trained by `python -m tools.train_demo` (writes {DEFAULT_CHECKPOINT});\n"
            f"any Doge checkpoint directory works with --model DIR.",
            file=sys.stderr,
        )
        return 2
    return run_demo(model.resolve(), args.port, args.max_model_len, args.timeout, args.serve_args)


if __name__ == "__main__":
    sys.exit(main())
