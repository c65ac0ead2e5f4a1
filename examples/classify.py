"""Sequence classification with vLLM's offline classify API on a DogeForSequenceClassification checkpoint.

    python examples/classify.py [CHECKPOINT] [TEXT ...]

Without CHECKPOINT, a tiny randomly initialised 3-label classifier is built first with the project's
builder (`python -m tools.build_checkpoint OUT --preset classifier`), so the labels mean nothing: the
point is the path through vLLM. vLLM's pooling runner wraps the plugin's DogeForCausalLM in its sequence-classification
adapter: the last token's hidden state goes through the checkpoint's `score` head, then a softmax.
"""

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

TEXTS = ["def add(a, b):\n    return a + b", "import os\nimport sys", "while True:\n    pass", "# TODO: fix this"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", nargs="?", default=None, help="default: build a tiny classifier")
    parser.add_argument("texts", nargs="*", default=TEXTS)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with tempfile.TemporaryDirectory(prefix="doge-classifier-") as scratch:
        path = args.checkpoint
        if path is None:
            path = os.path.join(scratch, "classifier")
            repo = pathlib.Path(__file__).resolve().parents[1]
            build = [sys.executable, "-m", "tools.build_checkpoint", path, "--preset", "classifier"]
            subprocess.run(build, cwd=repo, check=True, stdout=subprocess.DEVNULL)
            print(f"built a tiny DogeForSequenceClassification checkpoint (3 labels) in {path}")

        from vllm import LLM

        llm = LLM(model=path, runner="pooling", max_model_len=256, gpu_memory_utilization=0.5)
        outputs = llm.classify(args.texts)
        labels = llm.llm_engine.model_config.hf_config.id2label
        for text, output in zip(args.texts, outputs):
            probs = output.outputs.probs
            best = max(range(len(probs)), key=probs.__getitem__)
            shown = "  ".join(f"{labels.get(i, i)}={p:.4f}" for i, p in enumerate(probs))
            print(f"{text!r:40.40} -> {labels.get(best, best)}   [{shown}]")


if __name__ == "__main__":  # vLLM may start worker processes that re-import this module
    main()
