"""Offline batch generation with `vllm.LLM` on a Doge checkpoint (no server).

    python examples/offline_inference.py [CHECKPOINT] [--max-tokens N] [--temperature T]

CHECKPOINT defaults to checkpoints/doge-demo. The Doge model class comes from the vllm-doge plugin,
which vLLM loads through its `vllm.general_plugins` entry point: nothing to import or register here.
Prompts are plain text; vLLM encodes them with the checkpoint's own tokenizer.
"""

import argparse
import os
import pathlib
import time

DEFAULT_CHECKPOINT = pathlib.Path(__file__).resolve().parent.parent / "checkpoints" / "doge-demo"

PROMPTS = [
    "def fibonacci(n):\n",
    "import json\n\n\ndef load_config(path):\n",
    "class Stack:\n    def __init__(self):\n",
    "# Count the lines of a text file.\n",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", nargs="?", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--max-model-len", type=int, default=512)
    args = parser.parse_args()

    # Local checkpoints only, and a small KV cache (in GiB) so that a CPU engine starts quickly.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.checkpoint, max_model_len=args.max_model_len, gpu_memory_utilization=0.5, seed=0)
    tokenizer = llm.get_tokenizer()  # the checkpoint's own tokenizer, which encodes the prompts
    print(f"the checkpoint's tokenizer ({len(tokenizer)} tokens) splits the first prompt into "
          f"{tokenizer.convert_ids_to_tokens(tokenizer(PROMPTS[0]).input_ids)}")
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=0)

    start = time.monotonic()
    outputs = llm.generate(PROMPTS, params)
    seconds = time.monotonic() - start

    generated = 0
    for output in outputs:
        completion = output.outputs[0]
        generated += len(completion.token_ids)
        print("=" * 72)
        print(f"prompt ({len(output.prompt_token_ids)} tokens) + completion:")
        print(output.prompt + completion.text)
        print(f"-- {len(completion.token_ids)} tokens, finish reason: {completion.finish_reason}")
    print("=" * 72)
    print(f"{len(outputs)} prompts, {generated} tokens in {seconds:.2f} s ({generated / seconds:.0f} tok/s, batched)")


if __name__ == "__main__":  # vLLM may start worker processes that re-import this module
    main()
