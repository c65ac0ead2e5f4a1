"""End to end: one real `vllm serve` (the `vllm` command, our plugin found through its entry point) on a
tiny builder checkpoint, driven with the official openai client.

Answers are checked against three things: the offline `LLM.generate` of an in-process engine on the same
checkpoint, doge_hf's greedy continuation (the reference), and the server's own answer to a request sent
alone. The server boots (about a minute, more with a cold torch.compile cache) while the offline
references are computed.

Also here: classification through vLLM's offline classify API against doge_hf's
DogeForSequenceClassification (vLLM wraps our DogeForCausalLM in its seq-cls adapter).
"""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch


from parity import engine, reference_greedy
from serving import choice_tokens, launch, prompt_tokens, server_log, wait_ready
from tolerances import assert_logprobs_close

MAX_MODEL_LEN = 256
MAX_TOKENS = 16
# Code-like prompts (the builder's tokenizer is trained on Python source); the dense-gqa preset has no
# keep window in reach (keep_window_size 2048 > max_model_len), so repeated tokens cannot tie.
PROMPTS = [
    "def add(a, b):\n    return",
    "import os\nimport sys\n\nclass Path(object):",
    "for i in range(10):\n    print(i",
    "# A short comment about the weather",
]
CHAT = [
    {"role": "system", "content": "You answer in Python."},
    {"role": "user", "content": "Sort a list of numbers."},
]
GREEDY = dict(temperature=0.0, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True, "return_token_ids": True})


def concurrent_prompts(count: int = 32, seed: int = 0) -> list[str]:
    """Distinct short code-ish prompts, each a few words long."""
    rng = random.Random(seed)
    words = ["def", "return", "self", "import", "class", "value", "None", "if", "else", "for", "in", "list", "dict",
             "name", "print", "len", "range", "True", "key", "data", "open", "path", "try", "except", "while"]
    prompts = set()
    while len(prompts) < count:
        prompts.add(" ".join(rng.sample(words, rng.randint(2, 7))))
    return sorted(prompts)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def dense(checkpoints) -> str:
    return checkpoints("dense-gqa")


@pytest.fixture(scope="session")
def tokenizer(dense):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(dense)


@pytest.fixture(scope="session")
def server(dense, request, tmp_path_factory):
    """ONE `vllm serve` subprocess for the whole session, stopped by a finalizer (SIGTERM, then SIGKILL
    of its process group). Not waited for here: see `client`."""
    log = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    return launch(dense, MAX_MODEL_LEN, request.addfinalizer, log)


@pytest.fixture(scope="session")
def offline(server, dense, tokenizer):
    """Offline results, computed while the server boots: the in-process engine's greedy outputs for PROMPTS,
    and doge_hf's greedy continuations of PROMPTS and of the chat template's prompt."""
    from vllm import SamplingParams

    chat_ids = tokenizer(
        tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    ).input_ids
    prompt_ids = [tokenizer(p).input_ids for p in PROMPTS]
    reference = reference_greedy(dense, prompt_ids + [chat_ids], MAX_TOKENS)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5)
    with engine(dense, max_model_len=MAX_MODEL_LEN) as llm:
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    return dict(
        prompt_ids=prompt_ids,
        chat_ids=chat_ids,
        reference=reference[: len(PROMPTS)],
        chat_reference=reference[-1],
        llm=[(list(o.prompt_token_ids), list(o.outputs[0].token_ids), o.outputs[0].text) for o in outputs],
    )


@pytest.fixture(scope="session")
def client(server, offline):  # noqa: ARG001 - `offline` first, so that it overlaps the server's start
    wait_ready(server)
    return openai.OpenAI(base_url=server.base_url, api_key="EMPTY", timeout=120, max_retries=0)


@pytest.fixture(scope="session")
def model_id(client) -> str:
    return client.models.list().data[0].id


def complete(client, model_id, prompt, **kwargs):
    return client.completions.create(model=model_id, prompt=prompt, **{**GREEDY, **kwargs})


@torch.no_grad()
def logits_scale(path: str, prompt: list[int], tokens: list[int]) -> float:
    """max |logit| of doge_hf at the steps that chose `tokens` after `prompt`: the scale of the logprob
    tolerance (tolerances.py)."""
    from doge_hf import DogeForCausalLM

    model = DogeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].abs().max().item()


# ------------------------------------------------------------------------------------------------- tests


def test_models(client, server, dense):
    models = client.models.list().data
    assert [m.id for m in models] == [dense]
    assert (models[0].model_extra or {}).get("max_model_len") == MAX_MODEL_LEN
    # The plugin's entry point made vLLM resolve our class, not the Transformers fallback.
    assert "Resolved architecture: DogeForCausalLM" in server_log(server)


@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_completion_greedy_matches_offline_and_reference(client, model_id, offline, index):
    response = complete(client, model_id, PROMPTS[index])
    (choice,) = response.choices
    got = choice_tokens(choice)
    llm_prompt, llm_tokens, llm_text = offline["llm"][index]
    assert prompt_tokens(choice) == offline["prompt_ids"][index] == llm_prompt
    assert got == llm_tokens, "server and offline LLM.generate disagree"
    assert choice.text == llm_text
    assert got == offline["reference"][index][0], "server and doge_hf disagree"
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == MAX_TOKENS
    assert response.usage.prompt_tokens == len(offline["prompt_ids"][index])


def test_n_with_seed_is_reproducible(client, model_id):
    params = dict(n=4, temperature=2.0, seed=1234, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})
    first = complete(client, model_id, PROMPTS[0], **params)
    second = complete(client, model_id, PROMPTS[0], **params)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert len(texts) == 4
    assert texts == [c.text for c in sorted(second.choices, key=lambda c: c.index)]
    assert len(set(texts)) > 1, "n=4 samples at temperature 2 should differ from each other"
    other = complete(client, model_id, PROMPTS[0], **{**params, "seed": 4321})
    assert [c.text for c in sorted(other.choices, key=lambda c: c.index)] != texts


def test_stop_string(client, model_id, offline):
    full = offline["llm"][0][2]
    # A stop string taken from the middle of the greedy text (no replacement characters: those come
    # from partial UTF-8 sequences the detokenizer may hold back).
    stop = next(
        full[i : i + 2]
        for i in range(len(full) // 2, len(full) - 1)
        if "\ufffd" not in full[i : i + 2] and full[i : i + 2].strip()
    )
    expected = full[: full.index(stop)]
    (choice,) = complete(client, model_id, PROMPTS[0], stop=[stop]).choices
    assert choice.finish_reason == "stop"
    assert choice.text == expected
    assert (choice.model_extra or {}).get("stop_reason") == stop


def test_max_tokens(client, model_id, offline):
    response = complete(client, model_id, PROMPTS[1], max_tokens=3)
    (choice,) = response.choices
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 3
    assert choice_tokens(choice) == offline["llm"][1][1][:3]


def test_logprobs_match_reference(client, model_id, offline, dense):
    # Keys as "token_id:N": distinct tokens that decode to the same string would share a key otherwise.
    extra = {**GREEDY["extra_body"], "return_tokens_as_token_ids": True}
    (choice,) = complete(client, model_id, PROMPTS[2], logprobs=5, extra_body=extra).choices
    tokens, steps = offline["reference"][2]
    # Two fp32 implementations: rule 1 of tolerances.py for logprobs, at the scale of these logits (~40)
    scale = logits_scale(dense, offline["prompt_ids"][2], tokens)
    assert choice_tokens(choice) == tokens
    logprobs = choice.logprobs
    assert logprobs.tokens == [f"token_id:{t}" for t in tokens]
    assert len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == MAX_TOKENS
    for step, (token, ref, chosen, top) in enumerate(zip(tokens, steps, logprobs.token_logprobs, logprobs.top_logprobs)):
        assert_logprobs_close(chosen, ref[token], logits_scale=scale, what=f"step {step}: chosen token vs doge_hf")
        top = {int(key.removeprefix("token_id:")): value for key, value in top.items()}
        ref_top5 = dict(sorted(ref.items(), key=lambda item: -item[1])[:5])
        assert top.keys() == ref_top5.keys(), f"step {step}: top-5 {sorted(top)} vs doge_hf {sorted(ref_top5)}"
        assert_logprobs_close([top[c] for c in ref_top5], list(ref_top5.values()), logits_scale=scale,
                              what=f"step {step}: top-5 vs doge_hf")
        assert max(top, key=top.get) == token  # greedy picks the top one


def test_chat_uses_template_and_matches_reference(client, model_id, offline, tokenizer):
    response = client.chat.completions.create(model=model_id, messages=CHAT, **GREEDY)
    (choice,) = response.choices
    assert prompt_tokens(response) == offline["chat_ids"], "the server rendered the chat template differently"
    got = choice_tokens(choice)
    assert got == offline["chat_reference"][0]
    assert choice.message.role == "assistant"
    assert choice.message.content == tokenizer.decode(got, skip_special_tokens=True)


def test_streaming_completion(client, model_id, offline):
    stream = client.completions.create(
        model=model_id, prompt=PROMPTS[3], stream=True, stream_options={"include_usage": True},
        temperature=0.0, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == offline["llm"][3][2] == complete(client, model_id, PROMPTS[3]).choices[0].text
    assert sum(1 for c in chunks if c.choices) > 1, "expected several deltas"
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None, "final chunk should carry usage only"
    assert last.usage.completion_tokens == MAX_TOKENS
    assert last.usage.prompt_tokens == len(offline["prompt_ids"][3])
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_streaming_chat(client, model_id):
    kwargs = dict(model=model_id, messages=CHAT, temperature=0.0, max_tokens=MAX_TOKENS, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX_TOKENS


def test_concurrent_requests_match_isolated(client, model_id, dense, tokenizer):
    prompts = concurrent_prompts(32)
    isolated = [choice_tokens(complete(client, model_id, p).choices[0]) for p in prompts]  # one at a time
    barrier = threading.Barrier(len(prompts), timeout=120)  # a hang guard

    def send(prompt):
        barrier.wait()  # all 32 in flight together
        return choice_tokens(complete(client, model_id, prompt).choices[0])

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        together = list(pool.map(send, prompts))
    for prompt, alone, batched in zip(prompts, isolated, together):
        assert batched == alone, f"{prompt!r}: concurrent {batched} != isolated {alone}"
    reference = reference_greedy(dense, [tokenizer(p).input_ids for p in prompts], MAX_TOKENS)
    assert together == [tokens for tokens, _ in reference]


def test_prompt_too_long_is_a_400_and_server_keeps_serving(client, model_id, tokenizer, offline):
    long_prompt = "x = 1\n" * 200
    assert len(tokenizer(long_prompt).input_ids) > MAX_MODEL_LEN
    with pytest.raises(openai.BadRequestError) as caught:
        complete(client, model_id, long_prompt)
    assert caught.value.status_code == 400
    message = str(caught.value)
    assert "maximum context length" in message and str(MAX_MODEL_LEN) in message, message
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": long_prompt}], max_tokens=4)
    assert caught.value.status_code == 400
    # Still serving, with the same answers as before.
    (choice,) = complete(client, model_id, PROMPTS[0]).choices
    assert choice_tokens(choice) == offline["llm"][0][1]


# ------------------------------------------------------------------------------------------ classification

CLASSIFY_TEXTS = ["def foo(x):", "import os\nimport sys", "class A(object):\n    pass", "while True: break"]


def test_classify_matches_reference(checkpoints):
    from transformers import AutoTokenizer

    from doge_hf import DogeForSequenceClassification

    path = checkpoints("classifier")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = DogeForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():  # one text at a time: no padding in the reference
        raw = [model(input_ids=torch.tensor([tokenizer(t).input_ids])).logits[0] for t in CLASSIFY_TEXTS]
    expected = [logits.log_softmax(-1) for logits in raw]
    with engine(path, runner="pooling", max_model_len=MAX_MODEL_LEN) as llm:
        pooler = llm.model_config.pooler_config
        assert getattr(pooler, "seq_pooling_type", "LAST") == "LAST"
        outputs = llm.classify(CLASSIFY_TEXTS, use_tqdm=False)
    assert len(outputs) == len(CLASSIFY_TEXTS)
    for text, out, want, logits in zip(CLASSIFY_TEXTS, outputs, expected, raw):
        probs = torch.tensor(out.outputs.probs, dtype=torch.float64)
        assert probs.shape == (3,)
        # Log space (the builder's sharp classifier puts most of the mass on one label): rule 1 of
        # tolerances.py for logprobs. A probability moves by at most p times its logprob's error, so each
        # probability, and their sum (against 1), stay within the same tolerance.
        scale = logits.abs().max().item()
        assert_logprobs_close(probs.log(), want, logits_scale=scale, what=f"{text!r}: class log probs vs doge_hf")
        assert_logprobs_close(probs, want.double().exp(), logits_scale=scale, what=f"{text!r}: class probs")
        assert_logprobs_close(probs.sum(), 1.0, logits_scale=scale, what=f"{text!r}: sum of class probs")
