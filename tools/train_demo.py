"""Train the small demo checkpoint `checkpoints/doge-demo/` on Python standard-library source.

    python -m tools.train_demo [--out DIR] [--steps N] [--minutes M]

A dense Doge (tied embeddings, GQA, 4096-token tokenizer from tools.tokenizer) trained for a fixed
number of steps on the stdlib's top-level modules, with a keep window W = 128 below its 512-token
context: Doge's defining feature binds in serving (`make demo` goes past W) and in training too.
Training sequences are 256 tokens (SEQ_LEN > W), so half of the positions are trained as they are
served past the window: doge_hf's forward (the one trained here) keeps each query's W keys with the
largest bias, the top-k that transformers' Doge applies past `keep_window_size` (ties: the earlier key).

Everything that affects the result is fixed: seeds, file order, batch order, thread count; so the same
machine type reproduces the same weights. `--minutes` is only a safety cap: if it stops training
early, the run says so (and train_info.json records steps < planned_steps): no longer reproducible.

A starts non-zero: with A = 0 the bias exp(A·softplus(dt)) is 1 for every key and dt_proj gets no
gradient, so the dynamic mask would never be learnt.
"""

import argparse
import json
import math
import pathlib
import sys
import time

import torch

from tools.build_checkpoint import write_checkpoint
from tools.tokenizer import BOS_ID, EOS_ID, corpus_files, get_tokenizer, read_text

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "checkpoints" / "doge-demo"

MODEL = dict(
    vocab_size=4096,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=2,
    num_key_value_heads=1,  # GQA with head_dim 64: a scaled-down Doge-20M (2 heads, 1 kv head)
    max_position_embeddings=512,
    keep_window_size=128,  # W < the context: past 128 keys a query keeps its 128 keys with the largest bias
    tie_word_embeddings=True,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=2,
    dtype="float32",
    architectures=["DogeForCausalLM"],
)
# Sized for a shared 2-core CPU: one thread, 2048 tokens a step, ~0.85 s a step measured under load.
# 8 x 256 rather than 4 x 512: measured on this recipe, 4 whole-context sequences a step sat at the unigram
# loss (6.7) for 200 steps and ended at 5.6 after 700; 8 x 256 was at 5.2 by step 200.
SEQ_LEN = 256  # longer than W: the keep window binds for positions 128..255, half of those trained
BATCH = 8
STEPS = 800
PEAK_LR, WARMUP, FINAL_LR_FRACTION = 3e-3, 30, 0.1
SEED = 1234
THREADS = 1  # one thread: on a shared 2-core machine, 2 threads mostly wait on each other
MINUTES_CAP = 40.0  # the safety cap: ~12 min measured on 2 shared cores, so only a stalled machine reaches it
EVAL_EVERY_NTH_FILE = 25  # files held out for an eval loss


def load_tokens(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, eval) token streams: each file's tokens followed by eos, files in sorted order."""
    train, held_out = [], []
    for i, path in enumerate(corpus_files()):
        # the backend encoder: same ids, without transformers' warning about texts longer than 2048
        ids = tokenizer.backend_tokenizer.encode(read_text(path), add_special_tokens=False).ids + [EOS_ID]
        (held_out if i % EVAL_EVERY_NTH_FILE == EVAL_EVERY_NTH_FILE - 1 else train).extend(ids)
    return torch.tensor(train), torch.tensor(held_out)


def batch_at(stream: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Windows of SEQ_LEN - 1 tokens, each after a bos (as a prompt is: bos + text from anywhere)."""
    offsets = starts[:, None] + torch.arange(SEQ_LEN - 1)[None]
    windows = stream[offsets]
    return torch.cat([torch.full((len(starts), 1), BOS_ID), windows], dim=1)


def lr_at(step: int, steps: int) -> float:
    if step < WARMUP:
        return PEAK_LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return PEAK_LR * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def init_model(config, seed: int):
    from doge_hf import DogeForCausalLM

    torch.manual_seed(seed)
    model = DogeForCausalLM(config)  # standard small init (std = initializer_range) for projections
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.A.copy_(torch.rand(attn.A.shape, generator=gen) * 0.4 + 0.4)
            # dt spread from the start, so keys get different biases and the mask has a gradient signal
            fan_in = attn.dt_proj.weight.shape[1]
            attn.dt_proj.weight.copy_(torch.randn(attn.dt_proj.weight.shape, generator=gen) / fan_in**0.5)
    return model


@torch.no_grad()
def eval_loss(model, stream: torch.Tensor, batches: int = 4) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(batches):
        starts = torch.randint(0, len(stream) - SEQ_LEN, (BATCH,), generator=gen)
        ids = batch_at(stream, starts)
        losses.append(model(input_ids=ids, labels=ids).loss.item())
    model.train()
    return sum(losses) / len(losses)


def train(out_dir=DEFAULT_OUT, steps: int = STEPS, minutes: float = MINUTES_CAP) -> pathlib.Path:
    from doge_hf import DogeConfig

    torch.set_num_threads(THREADS)
    torch.use_deterministic_algorithms(True)
    tokenizer = get_tokenizer(MODEL["vocab_size"])
    train_stream, eval_stream = load_tokens(tokenizer)
    print(f"data: {len(train_stream)} train / {len(eval_stream)} eval tokens from {len(corpus_files())} stdlib files")

    config = DogeConfig(**MODEL)
    model = init_model(config, SEED)
    params = sum(p.numel() for p in model.parameters())
    window = config.keep_window_size
    assert window < SEQ_LEN, f"keep_window_size {window} >= SEQ_LEN {SEQ_LEN}: the window would never bind in training"
    assert all(layer.self_attn.keep_window_size == window for layer in model.model.layers)
    print(f"model: {params / 1e6:.2f}M parameters; {steps} steps of {BATCH}x{SEQ_LEN} tokens; "
          f"keep window {window} of {config.max_position_embeddings} (binds past position {window - 1})")

    # No weight decay on norms, residual scales, A and biases (vectors): they are gains, not features.
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}],
        lr=PEAK_LR, betas=(0.9, 0.95), eps=1e-8,
    )
    order = torch.Generator().manual_seed(SEED)
    start, deadline = time.monotonic(), time.monotonic() + minutes * 60
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps)
        starts = torch.randint(0, len(train_stream) - SEQ_LEN, (BATCH,), generator=order)
        ids = batch_at(train_stream, starts)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  lr {lr_at(step, steps):.2e}  {time.monotonic() - start:.0f}s",
                  flush=True)
        if time.monotonic() > deadline:
            print(f"WARNING: stopped at step {step + 1}/{steps} by the {minutes}-minute cap: not reproducible")
            break
    elapsed = time.monotonic() - start
    final_eval = eval_loss(model, eval_stream)
    print(f"trained {step + 1} steps in {elapsed:.0f}s; held-out loss {final_eval:.3f}")

    out = write_checkpoint(model.eval(), tokenizer, out_dir)
    info = dict(  # so the checkpoint says where it came from
        trainer="python -m tools.train_demo", steps=step + 1, planned_steps=steps, batch=BATCH,
        seq_len=SEQ_LEN, keep_window_size=window, seed=SEED, threads=THREADS, seconds=round(elapsed),
        final_train_loss=round(loss.item(), 4),
        held_out_loss=round(final_eval, 4), data="top-level .py files of the Python standard library",
        python=sys.version.split()[0], torch=torch.__version__,
    )
    (out / "train_info.json").write_text(json.dumps(info, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.train_demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--minutes", type=float, default=MINUTES_CAP, help="safety cap on training time (default: %(default)s)")
    args = parser.parse_args(argv)
    train(args.out, args.steps, args.minutes)


if __name__ == "__main__":
    main()
