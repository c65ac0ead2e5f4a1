"""Reliability: bad and hostile checkpoints, a real server under concurrent load with clients that hang
up mid-stream, and run-to-run determinism.

- Bad checkpoints not covered by test_load_errors.py are refused at engine start with an error naming the
  field or file and what was expected (in-process `vllm.LLM`, and once through a real `vllm serve`).
- Code shipped inside a checkpoint never runs: an `auto_map` pointing at a `modeling_evil.py`, and a pickle
  `pytorch_model.bin`, both of which would write a marker file, are ignored (safetensors beside) or refused
  (the pickle alone: vLLM's torch.load runs with weights_only=True).
- One `vllm serve` of such a hostile checkpoint copy takes two waves of 64 concurrent greedy streams, a
  quarter of which disconnect after a few chunks: every finished stream equals the same request sent
  alone, nothing is left running, /health answers, and the second wave does not grow the server's memory.
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

from parity import engine, reference_greedy
from serving import choice_tokens, launch, server_log, wait_ready
from test_load_errors import broken_copy
from test_vllm_parity import make_prompts
from vllm_doge.serve_demo import ServerError, VllmServer

# ----------------------------------------------------------------------------------------------- helpers


def error_chain(error: BaseException) -> list[str]:
    """`type: message` of an exception and of everything it was raised from (the engine wraps errors)."""
    chain = []
    while error is not None:
        chain.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return chain


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
    with pytest.raises(ServerError, match=r"vllm serve exited with code [1-9]"):
        server.wait_until_ready(timeout=300)
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


def hostile_copy(source: str, dst, marker, *, safetensors: bool = True) -> str:
    """A checkpoint copy that carries code: config.json's `auto_map` points every Auto class at
    modeling_evil.py, whose import appends to `marker`, and pytorch_model.bin is a pickle that does the
    same when loaded. With `safetensors=False` the pickle is the only weights file."""
    shutil.copytree(source, dst)
    (dst / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'a').write('modeling_evil imported\\n')\n"
        + "".join(f"class {name}:\n    pass\n" for name in EVIL_CLASSES.values())
    )
    fields = json.loads((dst / "config.json").read_text())
    fields["auto_map"] = {auto: f"modeling_evil.{name}" for auto, name in EVIL_CLASSES.items()}
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

SERVE_LEN = 256
CLIENTS = 64
MAX_TOKENS = 24
HANG_UP_AFTER = 2  # chunks a disconnecting client reads before closing its stream
# A disconnecting client asks for far more tokens than the others, so that the engine cannot run its
# request to the end before the server notices the hang-up, however fast the machine.
HANG_UP_MAX_TOKENS = 200
WAVE_TIMEOUT_S = 300.0
SETTLE_TIMEOUT_S = 60.0
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


def metrics(server: VllmServer) -> dict[str, float]:
    """Prometheus samples of /metrics, summed over labels, by name."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            base = name.split("{")[0]
            values[base] = values.get(base, 0.0) + float(value)
            if 'finished_reason="abort"' in name:
                values[base + ":abort"] = values.get(base + ":abort", 0.0) + float(value)
    return values


def settle(server: VllmServer) -> dict[str, float]:
    """Wait until the engine has nothing running or waiting (aborted requests included)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        values = metrics(server)
        busy = values.get("vllm:num_requests_running", 0) + values.get("vllm:num_requests_waiting", 0)
        if busy == 0:
            return values
        assert time.monotonic() < deadline, f"{busy} requests still in the engine {SETTLE_TIMEOUT_S:.0f} s after the wave"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def hostile_server(checkpoints, tmp_path_factory, request):
    """ONE `vllm serve` for the module, of a dense-gqa copy that carries code (see hostile_copy)."""
    root = tmp_path_factory.mktemp("served")
    marker = root / "MARKER"
    path = hostile_copy(checkpoints("dense-gqa"), root / "hostile", marker)
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

    def client(index):
        barrier.wait()
        stream = served["client"].completions.create(
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

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
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
    """One wave, then: the engine drains, /health answers, every stream is right, and the requests of
    clients that hung up were aborted in the engine rather than run to their end."""
    server = served["server"]
    before = metrics(server)
    started = time.monotonic()
    results = wave(served, prompts)
    seconds = time.monotonic() - started
    after = settle(server)
    assert server.healthy(), "/health failed after the wave"
    cut = check_wave(results, isolated, prompts)
    assert cut == CLIENTS // 4, f"only {cut} of {CLIENTS // 4} disconnecting clients hung up before the end"
    generated = after.get("vllm:generation_tokens_total", 0) - before.get("vllm:generation_tokens_total", 0)
    completed = after.get("vllm:request_success_total", 0) - before.get("vllm:request_success_total", 0)
    # vLLM counts an aborted request under no finished_reason. Every stream read to its end completed, and
    # the engine aborted the hung-up requests long before their HANG_UP_MAX_TOKENS.
    full = CLIENTS - CLIENTS // 4
    assert completed == full, f"{completed:.0f} requests completed: expected the {full} read to their end"
    ceiling = full * MAX_TOKENS + (CLIENTS - full) * HANG_UP_MAX_TOKENS // 2
    assert generated < ceiling, f"{generated:.0f} tokens generated: hung-up requests were not stopped"
    return dict(seconds=seconds, cut=cut, aborted=CLIENTS - completed, generated=generated, rss=tree_rss(server.process.pid))


@pytest.mark.slow
def test_server_under_load_with_disconnects(served, tokenizer_of):
    prompts = load_prompts()
    isolated = isolated_results(served, prompts)  # one request at a time, on the same server
    # Served by our model with the checkpoint's weights: a few isolated results against doge_hf.
    clean = served["clean"]
    reference = reference_greedy(clean, [tokenizer_of(clean)(p).input_ids for p in prompts[:4]], MAX_TOKENS)
    assert isolated[:4] == [tokens for tokens, _ in reference]

    first = checked_wave(served, prompts, isolated)
    second = checked_wave(served, prompts, isolated)
    mib = 2**20
    print(
        f"\nwaves of {CLIENTS} streams: {first['seconds']:.1f} s and {second['seconds']:.1f} s, "
        f"{first['cut']} and {second['cut']} cut by their client, {first['aborted']:.0f} and {second['aborted']:.0f} "
        f"aborted in the engine, {first['generated']:.0f} and {second['generated']:.0f} tokens "
        f"generated (without the hang-ups: {(CLIENTS - CLIENTS // 4) * MAX_TOKENS + CLIENTS // 4 * HANG_UP_MAX_TOKENS}); server tree RSS {first['rss'] / mib:.0f} MiB after the "
        f"first, {second['rss'] / mib:.0f} MiB after the second"
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
