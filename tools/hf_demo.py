"""`python -m tools.hf_demo`: greedy continuations from the small trained demo checkpoint, with the
reference model (no vLLM).

Loads checkpoints/doge-demo/ (built by `python -m tools.train_demo`) with the reference model
doge_hf.DogeForCausalLM and the tokenizer with AutoTokenizer, then prints what it writes after a few
Python prompts. The model is tiny and was trained for minutes on standard-library source, so expect
Python-looking text, not working programs. Its keep window (W = 128) binds only once a sequence passes
W tokens: `--max-new-tokens 200` goes past it (doge_hf then keeps each query's W keys with the largest
bias, as `make demo`'s server does).
"""

import argparse
import pathlib

import torch
from transformers import AutoTokenizer

from doge_hf import DogeForCausalLM

DEFAULT_DIR = pathlib.Path(__file__).resolve().parent.parent / "checkpoints" / "doge-demo"
# No prompt ends in a space: byte-level BPE attaches a space to the word after it (" os"), so a trailing
# space is a token the model rarely saw in that position.
PROMPTS = ["def main(", "import os", "class Parser:\n    def __init__(self"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.hf_demo", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT_DIR))
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("prompts", nargs="*", default=PROMPTS)
    args = parser.parse_args(argv)

    path = pathlib.Path(args.checkpoint)
    if not (path / "config.json").is_file():
        raise SystemExit(f"no checkpoint at {path}: build it with `python -m tools.train_demo`")
    print(f">> loading {path} with doge_hf.DogeForCausalLM (the reference implementation, fp32, CPU)")
    model = DogeForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = model.config
    print(
        f">> {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters: {config.num_hidden_layers} layers, "
        f"hidden {config.hidden_size}, {config.num_attention_heads} heads / {config.num_key_value_heads} kv heads, "
        f"vocab {config.vocab_size}, keep window {config.keep_window_size} of {config.max_position_embeddings} positions"
    )
    print(f">> greedy decoding, {args.max_new_tokens} new tokens per prompt\n")
    for prompt in args.prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        continuation = tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
        print(f"--- prompt {prompt!r}")
        print(prompt + continuation)
        print()


if __name__ == "__main__":
    main()
