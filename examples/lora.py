"""Several LoRA fine-tunes of one Doge checkpoint served at once with `vllm.LLM` (no server).

    python examples/lora.py [CHECKPOINT] [--adapter NAME=DIR ...] [--max-tokens N]

Adapters are directories as PEFT's `save_pretrained` writes them (adapter_config.json and
adapter_model.safetensors), targeting any of q/k/v/o_proj, gate/up/down_proj and (CDMoE) router_gate.
Without --adapter, two demo adapters with random weights are made with peft (`pip install peft`) in a
temporary directory. Every prompt is run once per adapter and once on the base model, all in ONE batch:
vLLM picks each request's adapter by its LoRARequest.

The same with a server:
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 vllm serve CHECKPOINT --enable-lora --lora-modules NAME=DIR
and then `model="NAME"` in the OpenAI API (more adapters: POST /v1/load_lora_adapter).
"""

import argparse
import json
import os
import pathlib
import tempfile

DEFAULT_CHECKPOINT = pathlib.Path(__file__).resolve().parent.parent / "checkpoints" / "doge-demo"
PROMPTS = ["def fibonacci(n):\n", "class Stack:\n    def __init__(self):\n"]


def demo_adapter(checkpoint: str, out: pathlib.Path, seed: int, targets: list[str]) -> str:
    """A rank-8 adapter with random A and B (peft starts B at zero: an adapter that changes nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint), LoraConfig(r=8, target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    model.save_pretrained(out)
    return str(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", nargs="?", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    adapters = dict(a.split("=", 1) for a in args.adapter)
    if not adapters:
        root = pathlib.Path(tempfile.mkdtemp(prefix="doge-lora-"))
        adapters = {
            "attention": demo_adapter(args.checkpoint, root / "attention", 1, ["q_proj", "k_proj", "v_proj", "o_proj"]),
            "mlp": demo_adapter(args.checkpoint, root / "mlp", 2, ["gate_proj", "up_proj", "down_proj"]),
        }
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    ranks = [json.loads((pathlib.Path(d) / "adapter_config.json").read_text())["r"] for d in adapters.values()]
    # LoRA is refused where the keep window binds (README, LoRA limits): the demo's window is 128 keys.
    llm = LLM(model=args.checkpoint, max_model_len=128, gpu_memory_utilization=0.5, seed=0,
              enable_lora=True, max_loras=len(adapters), max_lora_rank=max(8, *ranks))  # fmt: skip
    requests = [None] + [LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(adapters.items())]
    prompts = [p for p in PROMPTS for _ in requests]
    per_prompt = requests * len(PROMPTS)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    for request, output in zip(per_prompt, llm.generate(prompts, params, lora_request=per_prompt)):
        print("=" * 72)
        print(f"[{request.lora_name if request else 'base model'}] {output.prompt + output.outputs[0].text}")


if __name__ == "__main__":  # vLLM may start worker processes that re-import this module
    main()
