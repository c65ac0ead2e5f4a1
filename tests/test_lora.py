"""Multi-LoRA serving: vLLM with a PEFT adapter against doge_hf with the PEFT-merged weights.

Adapters are made by peft on doge_hf models and saved with `save_pretrained` (lora_adapters.py), with
random A and B (peft's B = 0 would be a no-op). The reference for an adapter is the merged model written
as a plain checkpoint: merging puts the adapter into v_proj's weight, so doge_hf's bias reads the adapted
v, which is what the plugin must reproduce with the adapter applied at run time. Criterion: greedy tokens
equal and chosen-token logprobs within 1e-3 nats (fp32, parity.check_greedy_parity).

Engines: one dense LoRA engine for the module (two adapter slots), one CDMoE engine, one engine with
both faults this module guards against put back (the folded bias, vLLM's CPU slot -1), which must fail,
and one `vllm serve --enable-lora`, started first so that it boots while the offline tests run.
"""

from __future__ import annotations

import json
import pathlib
import random
import shutil

import openai
import pytest
import requests
from safetensors.torch import load_file, save_file

from lora_adapters import DENSE_TARGETS, build_adapter
from parity import check_greedy_parity, engine, error_chain, reference_greedy, vllm_greedy
from serving import choice_tokens, launch, server_log, wait_ready

MAX_TOKENS = 16
RANK = 8
LORA = dict(enable_lora=True, max_lora_rank=RANK, max_loras=2)
STD = 0.1  # A, B ~ N(0, 0.1²): every adapter changes most greedy tokens without making them degenerate


def make_prompts(seed: int = 0, lengths=(5, 17, 30)) -> list[list[int]]:
    rng = random.Random(seed)
    return [rng.sample(range(3, 512), n) for n in lengths]


PROMPTS = make_prompts()


@pytest.fixture(scope="module")
def dense(checkpoints) -> str:
    return checkpoints("dense-gqa")


@pytest.fixture(scope="module")
def adapters(dense, checkpoints, tmp_path_factory) -> dict[str, tuple[str, str]]:
    """name -> (adapter dir, merged reference checkpoint)."""
    root = tmp_path_factory.mktemp("adapters")
    moe = checkpoints("moe")
    return {
        "all": build_adapter(dense, root / "all", DENSE_TARGETS, seed=1, a_std=STD, b_std=STD),
        "qvd": build_adapter(dense, root / "qvd", ["q_proj", "v_proj", "down_proj"], seed=2, rank=4,
                             a_std=STD, b_std=STD),
        # v_proj alone: what the old fold got wrong (the values moved, the bias did not).
        "v": build_adapter(dense, root / "v", ["v_proj"], seed=3, a_std=STD, b_std=STD),
        "moe": build_adapter(moe, root / "moe", DENSE_TARGETS + ["router_gate"], seed=4, a_std=STD, b_std=STD),
        # Refused: dt_proj is read as a tensor by the attention, the expert tables are not linear layers.
        "dt_proj": build_adapter(dense, root / "dt_proj", ["v_proj", "dt_proj"], seed=5),
        "up_embed": build_adapter(moe, root / "up_embed", ["up_embed"], seed=6),
        "rank16": build_adapter(dense, root / "rank16", ["q_proj"], seed=7, rank=16),
    }


@pytest.fixture(scope="module")
def references(dense, checkpoints, adapters) -> dict[str, list]:
    refs = {name: reference_greedy(adapters[name][1], PROMPTS, MAX_TOKENS) for name in ("all", "qvd", "v", "moe")}
    refs["base"] = reference_greedy(dense, PROMPTS, MAX_TOKENS)
    refs["moe-base"] = reference_greedy(checkpoints("moe"), PROMPTS, MAX_TOKENS)
    for name in ("all", "qvd", "v"):  # each adapter must matter, or its parity would prove nothing
        assert [t for t, _ in refs[name]] != [t for t, _ in refs["base"]], f"adapter {name} changes no token"
    return refs


@pytest.fixture(scope="module")
def server(dense, adapters, request, tmp_path_factory):
    """One `vllm serve --enable-lora` for the module: adapter `all` static, others loaded at run time."""
    log = tmp_path_factory.mktemp("vllm-serve-lora") / "server.log"
    args = ["--enable-lora", "--lora-modules", f"all={adapters['all'][0]}", "--max-lora-rank", str(RANK),
            "--max-loras", "2"]
    return launch(dense, 256, request.addfinalizer, log, args=args,
                  env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"})


@pytest.fixture(scope="module")
def llm(server, dense, references):  # noqa: ARG001 - the server boots while this engine works
    with engine(dense, **LORA) as llm:
        yield llm


def lora(name: str, adapters, int_id: int):
    from vllm.lora.request import LoRARequest

    return LoRARequest(name, int_id, adapters[name][0])


IDS = {"all": 1, "qvd": 2, "v": 3, "moe": 4}


# ------------------------------------------------------------------------------------------ offline


@pytest.mark.parametrize("name", ["all", "qvd", "v"])
def test_adapter_parity(llm, adapters, references, name):
    got = vllm_greedy(llm, PROMPTS, MAX_TOKENS, lora_request=lora(name, adapters, IDS[name]))
    check_greedy_parity(references[name], got, name=name)


def test_two_adapters_and_base_in_one_batch(llm, adapters, references):
    """`all` and `qvd` fill both slots (the last one included) and base requests share their batch: vLLM
    0.32's CPU ops would give the base rows the last slot's adapter (vllm_doge/lora.py)."""
    names = ["all", "qvd", "base"] * len(PROMPTS)
    prompts = [p for p in PROMPTS for _ in range(3)]
    requests_ = [None if n == "base" else lora(n, adapters, IDS[n]) for n in names]
    got = vllm_greedy(llm, prompts, MAX_TOKENS, lora_request=requests_)
    for i, name in enumerate(names):
        check_greedy_parity([references[name][i // 3]], [got[i]], name=f"{name} in a mixed batch")


def test_base_model_with_lora_enabled(llm, references):
    check_greedy_parity(references["base"], vllm_greedy(llm, PROMPTS, MAX_TOKENS), name="base")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("dt_proj", "but received ['model.layers.0.self_attn.dt_proj'"),
        ("rank16", "LoRA rank 16 is greater than max_lora_rank 8"),
        ("missing-file", "doesn't contain tensors"),
        ("missing-dir", "Loading lora missing-dir failed: No adapter found for"),
        ("rank-mismatch", "lora_A has shape (8, "),
        ("narrow", "model.layers.0.self_attn.v_proj.lora_B has shape (16, 4), expected (32, 4)"),
    ],
)
def test_bad_adapter_refused_and_engine_keeps_serving(llm, adapters, references, tmp_path, name, expected):
    from vllm.lora.request import LoRARequest

    if name == "missing-file":
        path = tmp_path / "adapter"
        path.mkdir()
        shutil.copy(pathlib.Path(adapters["all"][0]) / "adapter_config.json", path)
    elif name == "missing-dir":
        path = tmp_path / "nowhere"
    elif name == "rank-mismatch":  # config says r = 4, the tensors have rank 8
        path = edited_adapter(adapters["all"][0], tmp_path / "adapter", config={"r": 4})
    elif name == "narrow":  # v_proj's lora_B covers half of the layer's outputs
        key = next(k for k in load_file(pathlib.Path(adapters["qvd"][0]) / "adapter_model.safetensors")
                   if "layers.0.self_attn.v_proj.lora_B" in k)
        path = edited_adapter(adapters["qvd"][0], tmp_path / "adapter", tensors={key: lambda t: t[: t.shape[0] // 2]})
    else:
        path = adapters[name][0]
    with pytest.raises(Exception) as error:
        llm.llm_engine.add_lora(LoRARequest(name, 90, str(path)))
    chain = error_chain(error.value)
    assert any(expected in line for line in chain), chain
    got = vllm_greedy(llm, PROMPTS[:1], MAX_TOKENS, lora_request=lora("all", adapters, IDS["all"]))
    check_greedy_parity(references["all"][:1], got, name="after a refused adapter")


def edited_adapter(src: str, dst: pathlib.Path, config=None, tensors=None) -> pathlib.Path:
    """A copy of a PEFT adapter with adapter_config.json fields replaced and tensors transformed."""
    shutil.copytree(src, dst)
    if config:
        path = dst / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if tensors:
        path = dst / "adapter_model.safetensors"
        state = load_file(path)
        save_file({k: tensors[k](v).contiguous() if k in tensors else v for k, v in state.items()}, path)
    return dst


def test_cdmoe_adapter_parity_with_router(checkpoints, adapters, references):
    """An adapter on the shared MLP, attention and router_gate (the routing reads its adapted output),
    batched with base requests; an adapter on an expert table is refused, naming it."""
    from vllm.lora.request import LoRARequest

    moe_request = lora("moe", adapters, IDS["moe"])
    with engine(checkpoints("moe"), **LORA) as llm:
        got = vllm_greedy(llm, PROMPTS + PROMPTS, MAX_TOKENS, lora_request=[moe_request] * 3 + [None] * 3)
        with pytest.raises(ValueError) as error:
            llm.llm_engine.add_lora(LoRARequest("up_embed", 91, adapters["up_embed"][0]))
    check_greedy_parity(references["moe"], got[:3], name="moe adapter")
    check_greedy_parity(references["moe-base"], got[3:], name="moe base in a mixed batch")
    assert "but received ['model.layers.0.mlp.up_embed'" in str(error.value)


def test_faults_put_back_fail(dense, adapters, references, monkeypatch):
    """The checks above can fail: with dt_proj folded as without LoRA (the bias reads v before the
    adapter) the v_proj adapter's tokens change, and without lora.py's fix a base request batched with
    an adapter in the last slot gets that adapter."""
    import vllm_doge.attention
    import vllm_doge.lora

    real = vllm_doge.attention.get_current_vllm_config

    class WithoutLora:  # what DogeAttention reads of the config, minus LoRA: it folds dt_proj
        def __init__(self, config):
            self.model_config, self.lora_config = config.model_config, None
            self.additional_config = config.additional_config  # the attention path the config hook chose

    monkeypatch.setattr(vllm_doge.attention, "get_current_vllm_config", lambda: WithoutLora(real()))
    monkeypatch.setattr(vllm_doge.lora, "exact_base_rows", lambda manager: None)
    with engine(dense, **LORA) as llm:
        folded = vllm_greedy(llm, PROMPTS, MAX_TOKENS, lora_request=lora("v", adapters, IDS["v"]))
        mixed = vllm_greedy(llm, PROMPTS * 2, MAX_TOKENS, lora_request=[lora("all", adapters, 1)] * 3 + [None] * 3)
    # Tokens, not only logprobs, change (36 of 48 here): the parity checks above would fail on them.
    assert changed_tokens(references["v"], folded) > 0
    assert changed_tokens(references["base"], mixed[3:]) > 0


def changed_tokens(reference, got) -> int:
    return sum(r != g for (ref, _), (tokens, _) in zip(reference, got, strict=True) for r, g in zip(ref, tokens))


def test_keep_window_with_lora_refused(checkpoints):
    with pytest.raises(Exception) as error:
        with engine(checkpoints("keep-window"), max_model_len=64, **LORA):
            pass
    assert any("Doge: LoRA with keep_window_size 16 < max_model_len" in line for line in error_chain(error.value))


# ------------------------------------------------------------------------------------------ serving


@pytest.fixture(scope="module")
def client(server, llm):  # noqa: ARG001 - after the offline engine, which overlaps the server's start
    wait_ready(server)
    return openai.OpenAI(base_url=server.base_url, api_key="EMPTY", timeout=120, max_retries=0)


def served(client, model: str, prompt: list[int]) -> tuple[list[int], list[float]]:
    choice = client.completions.create(
        model=model, prompt=prompt, temperature=0.0, max_tokens=MAX_TOKENS, logprobs=1,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    ).choices[0]
    return choice_tokens(choice), list(choice.logprobs.token_logprobs)


def check_served(client, model: str, reference, name: str) -> None:
    got = []
    for prompt, (ref_tokens, _) in zip(PROMPTS, reference, strict=True):
        tokens, logprobs = served(client, model, prompt)
        got.append((tokens, [{t: lp} for t, lp in zip(tokens, logprobs, strict=True)]))
    check_greedy_parity(reference, got, name=name)


def test_served_adapter_and_base(client, server, dense, references):
    assert {m.id for m in client.models.list().data} == {dense, "all"}
    check_served(client, "all", references["all"], "served adapter")
    check_served(client, dense, references["base"], "served base")
    assert "Resolved architecture: DogeForCausalLM" in server_log(server)


def test_served_runtime_loading(client, server, adapters, references, tmp_path):
    """Bad adapters loaded at run time get an error naming the problem; the server keeps serving."""
    load = f"{server.url}/v1/load_lora_adapter"
    answer = requests.post(load, json={"lora_name": "dt", "lora_path": adapters["dt_proj"][0]}, timeout=60)
    assert answer.status_code >= 400 and "model.layers.0.self_attn.dt_proj" in answer.text, answer.text
    answer = requests.post(load, json={"lora_name": "big", "lora_path": adapters["rank16"][0]}, timeout=60)
    assert answer.status_code >= 400 and "max_lora_rank" in answer.text, answer.text
    answer = requests.post(load, json={"lora_name": "gone", "lora_path": str(tmp_path / "gone")}, timeout=60)
    assert answer.status_code == 404 and "gone" in answer.text, answer.text
    answer = requests.post(load, json={"lora_name": "qvd", "lora_path": adapters["qvd"][0]}, timeout=60)
    assert answer.status_code == 200, answer.text
    check_served(client, "qvd", references["qvd"], "runtime-loaded adapter")
    check_served(client, "all", references["all"], "static adapter after bad loads")


@pytest.mark.slow
def test_tensor_parallel_replicated_kv_head(checkpoints, tmp_path, monkeypatch):
    """TP=2 over ONE kv head (replicated on both ranks): each rank all-gathers the adapted v for dt_proj
    and keeps one copy of the head."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per worker
    path = checkpoints("dense-gqa", num_key_value_heads=1)
    adapter, merged = build_adapter(path, tmp_path, ["q_proj", "v_proj", "o_proj"], seed=8, a_std=STD, b_std=STD)
    reference = reference_greedy(merged, PROMPTS, MAX_TOKENS)
    with engine(path, tensor_parallel_size=2, **LORA) as llm:
        got = vllm_greedy(llm, PROMPTS, MAX_TOKENS, lora_request=lora_at(adapter))
    check_greedy_parity(reference, got, name="tp2 lora")


def lora_at(path: str):
    from vllm.lora.request import LoRARequest

    return LoRARequest("tp", 1, path)
