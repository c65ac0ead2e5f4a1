"""Reliability: bad and hostile checkpoints, a real server under concurrent load with clients that hang
up mid-stream, and run-to-run determinism.

- Bad checkpoints not covered by test_load_errors.py are refused at engine start with an error naming the
  field or file and what was expected (in-process `vllm.LLM`, and once through a real `vllm serve`).
- Code shipped inside a checkpoint never runs: an `auto_map` pointing at a `modeling_evil.py`, and a pickle
  `pytorch_model.bin`, both of which would write a marker file, are ignored (safetensors beside) or refused
  (the pickle alone: vLLM's torch.load runs with weights_only=True).
- One `vllm serve` of such a hostile checkpoint copy takes two waves of 64 concurrent greedy streams, a
  quarter of which disconnect after a few chunks: every finished stream equals the same request sent
  alone, the engine aborts every request whose client hung up (their generations are ~65k tokens long, so
  none can end by itself first, on any machine), nothing is left running, /health answers, and the
  second wave does not grow the server's memory.
- Greedy decoding and seeded sampling repeat: within an engine, across batch compositions and orders, and
  across engine restarts.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import psutil
import pytest

from parity import engine, error_chain, reference_greedy
from serving import READY_TIMEOUT_S, choice_tokens, launch, server_log, wait_ready
from test_load_errors import broken_copy
from test_model import make_prompts
from tools.serve_demo import ServerError, VllmServer

# ----------------------------------------------------------------------------------------------- helpers


def refusal(path: str) -> list[str]:
    """Start an engine on `path`; it must refuse. Returns the error chain."""
    with pytest.raises(Exception) as failure:
        with engine(path, skip_tokenizer_init=True):
            pass
    return error_chain(failure.value)


def assert_named(chain: list[str], *patterns: str) -> None:
    """Each pattern must match one message of the chain (the same one or different ones)."""
    for pattern in patterns:
        assert any(re.search(pattern, text, re.S) for text in chain), f"no error matches {pattern!r}:\n" + "\n".join(chain)


def truncate_safetensors(path) -> int:
    """Cut model.safetensors in half (an interrupted download or copy); returns its full size."""
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return len(data)


# --------------------------------------------------------------------------------------- bad checkpoints


def test_hidden_size_not_divisible_by_heads(checkpoints, tmp_path):
    """No `head_dim` in config.json, and hidden_size 66 is not a multiple of the 4 heads."""
    source = checkpoints("dense-gqa")
    assert "head_dim" not in json.loads(open(f"{source}/config.json").read())
    path = broken_copy(source, tmp_path / "broken", config=lambda fields: fields.update(hidden_size=66))
    assert_named(refusal(path), r"`hidden_size` = 66; expected a multiple of num_attention_heads \(4\)")


def test_unknown_rope_type(checkpoints, tmp_path):
    def rope(fields):
        fields["rope_parameters"] = {"rope_type": "warp-drive", "rope_theta": 10000.0}

    path = broken_copy(checkpoints("dense-gqa"), tmp_path / "broken", config=rope)
    assert_named(refusal(path), r"`rope_parameters`.*expected rope_type in \(.*'default'.*\), got 'warp-drive'")


def test_config_json_not_json(checkpoints, tmp_path):
    path = broken_copy(checkpoints("dense-gqa"), tmp_path / "broken")
    (tmp_path / "broken" / "config.json").write_text('{"architectures": ["DogeForCausalLM"], "model_type": "doge",,}')
    # The file, the problem, and where in the file it is.
    assert_named(refusal(path), r"config\.json' is not a valid JSON file", r"line 1 column \d+")


def test_truncated_safetensors(checkpoints, tmp_path):
    path = broken_copy(checkpoints("dense-gqa"), tmp_path / "broken")
    full_size = truncate_safetensors(tmp_path / "broken")
    chain = refusal(path)
    # Refused in any case; the message must say which file and how large its header says it is.
    assert_named(chain, r"model\.safetensors", rf"{full_size}\b|{full_size:,}")


@pytest.mark.slow
def test_bad_checkpoint_through_vllm_serve(checkpoints, tmp_path, request):
    """`vllm serve` of a bad checkpoint exits non-zero, and its log names the field (the error is raised
    in the worker process, two processes away from the API server)."""
    path = broken_copy(checkpoints("dense-gqa"), tmp_path / "broken", config=lambda fields: fields.update(hidden_size=66))
    server = launch(path, 256, request.addfinalizer, tmp_path / "serve.log")
    # The verdict is the exit, whenever it comes (~50 s here); the timeout only guards against a hang.
    with pytest.raises(ServerError, match=r"vllm serve exited with code [1-9]"):
        server.wait_until_ready(timeout=READY_TIMEOUT_S)
    assert server.process.returncode not in (0, None)
    assert "Doge config: `hidden_size` = 66; expected a multiple of num_attention_heads (4)" in server_log(server)


# ---------------------------------------------------------------------------- code shipped in a checkpoint

EVIL_CLASSES = {"AutoConfig": "EvilConfig", "AutoModel": "EvilModel", "AutoModelForCausalLM": "EvilForCausalLM",
                "AutoTokenizer": "EvilTokenizer"}


class _PickleBomb:
    """Unpickling this writes to the marker file (what a malicious pytorch_model.bin does)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'a').write('pytorch_model.bin unpickled\\n')",)


def hostile_copy(source: str, dst, marker, *, safetensors: bool = True, config: dict | None = None) -> str:
    """A checkpoint copy that carries code: config.json's `auto_map` points every Auto class at
    modeling_evil.py, whose import appends to `marker`, and pytorch_model.bin is a pickle that does the
    same when loaded. With `safetensors=False` the pickle is the only weights file; `config` updates
    other config.json fields."""
    shutil.copytree(source, dst)
    (dst / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'a').write('modeling_evil imported\\n')\n"
        + "".join(f"class {name}:\n    pass\n" for name in EVIL_CLASSES.values())
    )
    fields = json.loads((dst / "config.json").read_text())
    fields["auto_map"] = {auto: f"modeling_evil.{name}" for auto, name in EVIL_CLASSES.items()}
    fields.update(config or {})
    (dst / "config.json").write_text(json.dumps(fields, indent=2))
    (dst / "pytorch_model.bin").write_bytes(pickle.dumps(_PickleBomb(marker), protocol=2))
    if not safetensors:
        (dst / "model.safetensors").unlink()
    return str(dst)


def test_checkpoint_code_never_runs(checkpoints, tmp_path):
    """Served by our model from the safetensors weights (tokenizer loaded too); the marker never appears."""
    from vllm import SamplingParams

    clean = checkpoints("dense-gqa")
    marker = tmp_path / "MARKER"
    path = hostile_copy(clean, tmp_path / "hostile", marker)
    prompts = make_prompts(seed=7, lengths=(6, 19))
    expected = [tokens for tokens, _ in reference_greedy(clean, prompts, 12)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    with engine(path) as llm:
        names = llm.apply_model(lambda model: type(model).__module__ + "." + type(model).__name__)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        text = llm.generate(["def add(a, b):"], params, use_tqdm=False)[0].outputs[0].text  # the tokenizer works
    assert names == ["vllm_doge.model.DogeForCausalLM"]
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected, "weights did not come from model.safetensors"
    assert text
    assert not marker.exists(), marker.read_text()


def test_pickle_only_checkpoint_refused_without_running_it(checkpoints, tmp_path):
    """Only safetensors weights are loaded: a checkpoint with a pickled pytorch_model.bin alone is refused
    before anything opens the pickle."""
    marker = tmp_path / "MARKER"
    path = hostile_copy(checkpoints("dense-gqa"), tmp_path / "hostile", marker, safetensors=False)
    chain = refusal(path)
    assert_named(chain, r"no \*\.safetensors file \(pytorch_model\.bin\)", r"only safetensors weights are loaded")
    assert not marker.exists(), marker.read_text()


# ------------------------------------------------------------------------------------------ server load

# The served copy's context. Its config.json is raised to it (max_position_embeddings, and keep_window_size
# so that, as with the builder's 2048 at a short context, the keep window stays out of reach: plain RoPE
# and a window that never binds leave every result of these short requests unchanged).
SERVE_LEN = 65536
CLIENTS = 64
HUNG_UP = CLIENTS // 4
MAX_TOKENS = 24
HANG_UP_AFTER = 2  # chunks a disconnecting client reads before closing its stream
# What the product promises: vLLM aborts a request whose streaming client hung up. A request can only be
# aborted while it runs, so a disconnecting client asks for as many tokens as the context holds: running
# to that end takes 65k engine steps, against the two chunks its client reads before hanging up. The 16
# hung-up requests of a wave generated 36..654 tokens together before their abort, idle or with both cores
# busy, and 24225 (~1500 each) once with a load average of 18 on the 2 cores: 40x below their end. At 200
# tokens a loaded machine once let 15 of 16 finish before their hang-up reached the server, and the test
# failed on a race rather than on the product.
HANG_UP_MAX_TOKENS = SERVE_LEN - 64  # prompts are shorter than 64 tokens (checked)
WAVE_TIMEOUT_S = 300.0  # hang guards only: no verdict depends on a duration
SETTLE_TIMEOUT_S = 120.0
RSS_GROWTH = 1.10


def load_prompts(count: int = CLIENTS) -> list[str]:
    """Distinct short code-like prompts (the builder's tokenizer is trained on Python source)."""
    names = ["total", "items", "path", "config", "result", "value", "buffer", "index"]
    calls = ["len", "sorted", "sum", "print", "open", "range", "list", "max"]
    prompts = [f"{name} = {call}({other})\n" for name in names for call in calls for other in ("x", "self")]
    return prompts[:count]


def disconnects(index: int) -> bool:
    return index % 4 == 0  # a quarter of the clients


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (API server, engine core, workers)."""
    root = psutil.Process(pid)
    total = 0
    for process in [root, *root.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metrics(server: VllmServer) -> dict[tuple[str, frozenset], float]:
    """Prometheus samples of /metrics: (name, frozenset of (label, value)) -> value."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=60) as response:  # a hang guard
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            name, labels, value = match.groups()
            samples[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
    return samples


def metric_sum(samples, name: str, **labels) -> float:
    """Sum of a metric over the label sets that match `labels`."""
    wanted = set(labels.items())
    return sum(value for (n, ls), value in samples.items() if n == name and wanted <= ls)


def delta(before, after, name: str, **labels) -> float:
    return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)


FINISHED = "vllm:request_success_total"  # labelled by finished_reason: stop, length, abort, error, repetition
STARTED = "vllm:time_to_first_token_seconds_count"  # one observation per request at its first token


def settle(server: VllmServer):
    """Wait until the engine has nothing running or waiting (a hang guard: with the hung-up requests aborted
    the engine is idle as soon as the wave's last stream ends)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        samples = metrics(server)
        busy = metric_sum(samples, "vllm:num_requests_running") + metric_sum(samples, "vllm:num_requests_waiting")
        if busy == 0:
            return samples
        assert time.monotonic() < deadline, (
            f"{busy:.0f} requests still in the engine {SETTLE_TIMEOUT_S:.0f} s after the wave "
            f"(hung-up requests not aborted?)"
        )
        time.sleep(0.5)


@pytest.fixture(scope="module")
def hostile_server(checkpoints, tmp_path_factory, request):
    """ONE `vllm serve` for the module, of a dense-gqa copy that carries code (see hostile_copy), its context
    raised to SERVE_LEN."""
    root = tmp_path_factory.mktemp("served")
    marker = root / "MARKER"
    long_context = dict(max_position_embeddings=SERVE_LEN, keep_window_size=SERVE_LEN)
    path = hostile_copy(checkpoints("dense-gqa"), root / "hostile", marker, config=long_context)
    server = launch(path, SERVE_LEN, request.addfinalizer, root / "serve.log")
    wait_ready(server)
    return dict(server=server, path=path, marker=marker, clean=checkpoints("dense-gqa"))


@pytest.fixture(scope="module")
def served(hostile_server):
    client = openai.OpenAI(base_url=hostile_server["server"].base_url, api_key="EMPTY", timeout=120, max_retries=0)
    return dict(hostile_server, client=client, model=client.models.list().data[0].id)


GREEDY_BODY = {"ignore_eos": True, "return_token_ids": True}


def isolated_results(served, prompts) -> list[list[int]]:
    """Each prompt's greedy tokens, one request at a time."""
    return [
        choice_tokens(
            served["client"]
            .completions.create(model=served["model"], prompt=p, temperature=0.0, max_tokens=MAX_TOKENS, extra_body=GREEDY_BODY)
            .choices[0]
        )
        for p in prompts
    ]


def wave(served, prompts) -> list[tuple[list[int], str | None]]:
    """All prompts streamed at once from their own threads; disconnecting clients close after
    HANG_UP_AFTER chunks. Returns each stream's (token ids received, finish_reason or None)."""
    barrier = threading.Barrier(len(prompts), timeout=60)
    # A client of its own, so no stream starts on a pooled connection left idle since the previous requests:
    # the server closes idle connections after a few seconds, and a request sent on one just as it closes
    # fails with "Server disconnected" (seen once with both cores busy).
    api = openai.OpenAI(base_url=served["server"].base_url, api_key="EMPTY", timeout=120, max_retries=0)

    def client(index):
        barrier.wait()
        stream = api.completions.create(
            model=served["model"], prompt=prompts[index], stream=True, temperature=0.0,
            max_tokens=HANG_UP_MAX_TOKENS if disconnects(index) else MAX_TOKENS, extra_body=GREEDY_BODY,
        )
        tokens, finish, chunks = [], None, 0
        try:
            for chunk in stream:
                for choice in chunk.choices:
                    tokens += choice_tokens(choice)
                    finish = choice.finish_reason or finish
                chunks += 1
                if disconnects(index) and chunks == HANG_UP_AFTER:
                    break
        finally:
            stream.close()  # for a disconnecting client: hang up mid-stream
        return tokens, finish

    with api, ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        futures = [pool.submit(client, i) for i in range(len(prompts))]
        deadline = time.monotonic() + WAVE_TIMEOUT_S
        return [f.result(timeout=max(1.0, deadline - time.monotonic())) for f in futures]


def check_wave(results, isolated, prompts) -> int:
    """Finished streams equal their isolated result; a disconnected one agrees with it as far as both go
    (it asked for more tokens). Returns the number of streams that were cut before their end."""
    cut = 0
    for index, ((tokens, finish), alone) in enumerate(zip(results, isolated, strict=True)):
        if disconnects(index):
            cut += finish is None
            common = min(len(tokens), len(alone))
            assert tokens[:common] == alone[:common], f"{prompts[index]!r}: cut stream {tokens} disagrees with {alone}"
        else:
            assert finish == "length", f"{prompts[index]!r}: finish_reason {finish}"
            assert tokens == alone, f"{prompts[index]!r}: streamed under load {tokens} != alone {alone}"
    return cut


def checked_wave(served, prompts, isolated) -> dict[str, float]:
    """One wave, then: the engine drains, /health answers, every stream is right, and the engine aborted
    the request of every client that hung up.

    The count comes from the engine's own counters, once it is idle: every request of the wave started
    (a first token), and a request leaves the engine either finished (`vllm:request_success_total`, by
    finished_reason) or aborted. vLLM 0.32 counts a client's disconnect under no finished_reason (the API
    server's abort drops the request before its stats are recorded, so finished_reason="abort" stays 0),
    hence aborted = started - finished; should a later vLLM count it as "abort", the two must agree.
    """
    server = served["server"]
    before = metrics(server)
    started_at = time.monotonic()
    results = wave(served, prompts)
    seconds = time.monotonic() - started_at
    after = settle(server)
    assert server.healthy(), "/health failed after the wave"
    cut = check_wave(results, isolated, prompts)
    assert cut == HUNG_UP, f"only {cut} of {HUNG_UP} disconnecting clients hung up before the end"

    full = CLIENTS - HUNG_UP
    started = delta(before, after, STARTED)
    by_reason = {reason: delta(before, after, FINISHED, finished_reason=reason)
                 for reason in ("stop", "length", "abort", "error", "repetition")}
    finished = sum(by_reason.values()) - by_reason["abort"]
    aborted = started - finished
    assert started == CLIENTS, f"{started:.0f} requests of the wave reached a first token, expected {CLIENTS}"
    assert by_reason["length"] == finished == full, (
        f"requests finished by reason: {by_reason}: expected the {full} streams read to their end, all by "
        f"length; a hung-up request that finished ran {HANG_UP_MAX_TOKENS} tokens instead of being aborted"
    )
    assert aborted == HUNG_UP, f"the engine aborted {aborted:.0f} requests, expected the {HUNG_UP} hung-up ones"
    assert by_reason["abort"] in (0, HUNG_UP), f"finished_reason=abort counted {by_reason['abort']:.0f}"
    # What the finished requests generated is exact; the rest went to the hung-up requests before their abort.
    generated = delta(before, after, "vllm:generation_tokens_total")
    finished_tokens = delta(before, after, "vllm:request_generation_tokens_sum")
    assert finished_tokens == full * MAX_TOKENS, f"finished requests generated {finished_tokens:.0f} tokens"
    spent = generated - finished_tokens  # reported, not judged: how soon an abort lands depends on the machine
    return dict(seconds=seconds, cut=cut, aborted=aborted, abort_label=by_reason["abort"], spent=spent,
                rss=tree_rss(server.process.pid))


@pytest.mark.slow
def test_server_under_load_with_disconnects(served, tokenizer_of):
    prompts = load_prompts()
    tokenizer = tokenizer_of(served["clean"])
    assert max(len(tokenizer(p).input_ids) for p in prompts) + HANG_UP_MAX_TOKENS <= SERVE_LEN
    isolated = isolated_results(served, prompts)  # one request at a time, on the same server
    # Served by our model with the checkpoint's weights: a few isolated results against doge_hf.
    reference = reference_greedy(served["clean"], [tokenizer(p).input_ids for p in prompts[:4]], MAX_TOKENS)
    assert isolated[:4] == [tokens for tokens, _ in reference]

    first = checked_wave(served, prompts, isolated)
    second = checked_wave(served, prompts, isolated)
    mib = 2**20
    print(
        f"\nwaves of {CLIENTS} streams: {first['seconds']:.1f} s and {second['seconds']:.1f} s, "
        f"{first['cut']} and {second['cut']} cut by their client, {first['aborted']:.0f} and {second['aborted']:.0f} "
        f"aborted in the engine (finished_reason=abort counted {first['abort_label']:.0f} and "
        f"{second['abort_label']:.0f}); the hung-up requests generated {first['spent']:.0f} and "
        f"{second['spent']:.0f} tokens before their abort (to their end: {HUNG_UP * HANG_UP_MAX_TOKENS}); "
        f"server tree RSS {first['rss'] / mib:.0f} MiB after the first, {second['rss'] / mib:.0f} MiB after the second"
    )
    assert second["rss"] <= RSS_GROWTH * first["rss"], (
        f"server RSS grew from {first['rss'] / mib:.0f} to {second['rss'] / mib:.0f} MiB over an identical wave"
    )
    assert isolated_results(served, prompts[:1]) == isolated[:1], "a request alone changed its answer after the load"


@pytest.mark.slow  # the server's start (about 2 minutes) is shared with the load test
def test_server_never_runs_checkpoint_code(served):
    """The hostile copy is served by our model, and neither modeling_evil.py nor the pickle ever ran (in
    any of the server's processes: the marker is a file)."""
    server = served["server"]
    response = served["client"].completions.create(
        model=served["model"], prompt="def add(a, b):", temperature=0.0, max_tokens=4, extra_body=GREEDY_BODY
    )
    assert len(choice_tokens(response.choices[0])) == 4
    log = server_log(server)
    assert "Resolved architecture: DogeForCausalLM" in log
    assert "modeling_evil" not in log
    assert not served["marker"].exists(), served["marker"].read_text()


@pytest.fixture(scope="module")
def tokenizer_of():
    from transformers import AutoTokenizer

    cache = {}

    def get(path):
        if path not in cache:
            cache[path] = AutoTokenizer.from_pretrained(path)
        return cache[path]

    return get


# ------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("preset", ["dense-gqa", pytest.param("moe", marks=pytest.mark.slow)])  # moe: 40-70 s
def test_greedy_and_seeded_sampling_repeat(checkpoints, preset):
    """Greedy tokens and seeded samples (temperature 1) repeat within an engine, whatever the batch holds
    and in which order, and after a restart; another seed gives other samples."""
    from vllm import SamplingParams

    path = checkpoints(preset)
    prompts = [{"prompt_token_ids": p} for p in make_prompts(seed=5, lengths=(5, 12, 20, 31))]
    common = dict(max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    greedy = SamplingParams(temperature=0.0, **common)

    def seeded(base):
        return [SamplingParams(temperature=1.0, seed=base + i, **common) for i in range(len(prompts))]

    runs = []
    for _ in range(2):  # two engines, one after the other
        with engine(path, skip_tokenizer_init=True) as llm:

            def tokens(batch, params):
                return [list(o.outputs[0].token_ids) for o in llm.generate(batch, params, use_tqdm=False)]

            run = dict(
                greedy=tokens(prompts, greedy),
                greedy_reversed=tokens(prompts[::-1], greedy)[::-1],  # again, in another batch order
                greedy_alone=tokens(prompts[1:2], greedy),
                sampled=tokens(prompts, seeded(100)),
                sampled_reversed=tokens(prompts[::-1], seeded(100)[::-1])[::-1],
                sampled_alone=tokens(prompts[1:2], seeded(100)[1:2]),
                other_seed=tokens(prompts, seeded(200)),
            )
        runs.append(run)
    for run in runs:
        assert run["greedy_reversed"] == run["greedy"]
        assert run["greedy_alone"] == run["greedy"][1:2]
        assert run["sampled_reversed"] == run["sampled"]
        assert run["sampled_alone"] == run["sampled"][1:2]
        assert run["other_seed"] != run["sampled"], "another seed should sample other tokens"
        assert run["sampled"] != run["greedy"], "temperature 1 should depart from greedy somewhere"
    assert runs[0] == runs[1], "a restarted engine gave other tokens"
