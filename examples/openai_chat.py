"""Chat with a running `vllm serve` through the official openai client.

    vllm serve checkpoints/doge-demo --max-model-len 512        # in another terminal
    python examples/openai_chat.py [--base-url URL] [--model NAME] [--stream] [MESSAGE ...]

The server renders the messages with the checkpoint's chat template (a Llama-3.1-style template for the
Doge tokenizer). --model defaults to the first model the server lists.
"""

import argparse

import openai


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("message", nargs="*", default=["Write a Python function that reverses a string."])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default=None, help="default: the first model in /v1/models")
    parser.add_argument("--system", default="You are a helpful assistant that writes Python.")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    args = parser.parse_args()

    client = openai.OpenAI(base_url=args.base_url, api_key="EMPTY")  # vLLM needs no key unless --api-key
    model = args.model or client.models.list().data[0].id
    messages = [{"role": "system", "content": args.system}, {"role": "user", "content": " ".join(args.message)}]
    print(f"model: {model}\nuser: {messages[-1]['content']}\nassistant: ", end="", flush=True)

    if args.stream:
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=args.max_tokens, temperature=args.temperature,
            stream=True, stream_options={"include_usage": True},
        )
        usage = None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
            usage = chunk.usage or usage
        print()
    else:
        response = client.chat.completions.create(
            model=model, messages=messages, max_tokens=args.max_tokens, temperature=args.temperature
        )
        print(response.choices[0].message.content)
        print(f"(finish reason: {response.choices[0].finish_reason})")
        usage = response.usage
    if usage is not None:
        print(f"(usage: {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens)")


if __name__ == "__main__":
    main()
