"""`make demo`: serve the demo checkpoint with the `vllm` command and talk to it with the openai client.

    python -m tools.serve_demo [--model DIR] [--port N] [--max-model-len N] [--timeout S] [-- VLLM SERVE ARGS]

It starts `vllm serve checkpoints/doge-demo` in a subprocess on a free loopback port (the plugin is
picked up through its `vllm.general_plugins` entry point: nothing Doge-specific is passed), waits for
`/health` while showing progress, sends a chat completion and a streamed completion, prints them, and
always stops the server: SIGTERM, then SIGKILL to the server's whole process group after a grace
period; on Ctrl-C too.

`VllmServer` is also what tests/serving.py uses to run the end-to-end tests against a real server.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = REPO_ROOT / "checkpoints" / "doge-demo"

CHAT_PROMPT = "Write a Python function that returns the larger of two numbers."
COMPLETION_PROMPT = "import os\n\n\ndef list_python_files(directory):\n"


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


def _talk(server: VllmServer) -> None:
    """The demo's requests, with the official openai client."""
    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key="EMPTY", timeout=120, max_retries=0)
    (served,) = [m.id for m in client.models.list().data]
    print(f">> /v1/models: {served}")

    start = time.monotonic()
    chat = client.chat.completions.create(
        model=served, messages=[{"role": "user", "content": CHAT_PROMPT}], max_tokens=64, temperature=0.7, seed=0
    )
    seconds = time.monotonic() - start
    print(f"\n=== chat completion (temperature 0.7, seed 0; {chat.usage.completion_tokens} tokens in {seconds:.1f} s) ===")
    print(f"user: {CHAT_PROMPT}\nassistant: {chat.choices[0].message.content}")

    print(f"\n=== streamed completion (temperature 0.7, seed 0) ===\n{COMPLETION_PROMPT}", end="", flush=True)
    start = time.monotonic()
    usage = None
    stream = client.completions.create(
        model=served, prompt=COMPLETION_PROMPT, max_tokens=96, temperature=0.7, seed=0, stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].text, end="", flush=True)
        if chunk.usage is not None:
            usage = chunk.usage
    seconds = time.monotonic() - start
    tokens = usage.completion_tokens if usage else 0
    print(f"\n=== {tokens} tokens streamed in {seconds:.1f} s ({tokens / max(seconds, 1e-9):.0f} tok/s) ===")


def run_demo(model: pathlib.Path, port: int | None, max_model_len: int, timeout: float, serve_args: list[str]) -> int:
    import openai

    args = ["--served-model-name", model.name, "--gpu-memory-utilization", "0.5", *serve_args]
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
        _talk(server)
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
