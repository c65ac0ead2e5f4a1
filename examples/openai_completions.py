"""Text completions from a running `vllm serve` through the official openai client.

    vllm serve checkpoints/doge-demo --max-model-len 512        # in another terminal
    python examples/openai_completions.py [--base-url URL] [--model NAME] [--prompt TEXT]

Shows a greedy completion with per-token logprobs, n samples with a seed (reproducible), stop
strings, and a streamed completion. --model defaults to the first model the server lists.
"""

import argparse

import openai


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default=None, help="default: the first model in /v1/models")
    parser.add_argument("--prompt", default="def is_prime(n):\n")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key="EMPTY")  # vLLM needs no key unless --api-key
    model = args.model or client.models.list().data[0].id
    print(f"model: {model}\nprompt: {args.prompt!r}")

    print("\n--- greedy, with the top-3 logprobs of the first 5 tokens")
    response = client.completions.create(
        model=model, prompt=args.prompt, max_tokens=args.max_tokens, temperature=0.0, logprobs=3
    )
    choice = response.choices[0]
    print(args.prompt + choice.text)
    for token, logprob, top in list(zip(choice.logprobs.tokens, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs))[:5]:
        alternatives = ", ".join(f"{t!r} {lp:.2f}" for t, lp in sorted(top.items(), key=lambda item: -item[1]))
        print(f"  {token!r:>14} {logprob:7.3f}   top: {alternatives}")

    print("\n--- n=3 samples, temperature 0.8, seed 7 (the same seed gives the same samples)")
    samples = client.completions.create(
        model=model, prompt=args.prompt, max_tokens=24, temperature=0.8, n=3, seed=7
    )
    for sample in sorted(samples.choices, key=lambda c: c.index):
        print(f"[{sample.index}] {sample.text!r}")

    print("\n--- sampled (seed 7) until the first '(' or blank line: stop strings")
    stopped = client.completions.create(
        model=model, prompt=args.prompt, max_tokens=args.max_tokens, temperature=0.8, seed=7, stop=["(", "\n\n"]
    )
    choice = stopped.choices[0]
    stop_reason = (choice.model_extra or {}).get("stop_reason")  # vLLM's extension: which stop string matched
    print(f"{choice.text!r} (finish reason: {choice.finish_reason}, stop string: {stop_reason!r})")

    print("\n--- streamed")
    print(args.prompt, end="")
    for chunk in client.completions.create(
        model=model, prompt=args.prompt, max_tokens=args.max_tokens, temperature=0.0, stream=True
    ):
        print(chunk.choices[0].text, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
