"""A local stand-in for the Doge tokenizer: byte-level BPE trained on the Python standard library.

There is no model hub here, so the tokenizer is trained with the `tokenizers` library on text every
machine has: the top-level `.py` files of the running Python's standard library (code and docstrings),
read in sorted order so that training is deterministic. Its layout follows the real Doge tokenizer:

    id 0 <|begin_of_text|> (bos)   id 1 <|end_of_text|> (eos)   id 2 <|finetune_right_pad_id|> (pad)
    id 3 <|start_header_id|>       id 4 <|end_header_id|>

and a Llama-3.1-style chat template; encoding a plain text prepends bos (as Llama 3 does).
Trained tokenizers are cached per vocabulary size under $VLLM_DOGE_CACHE (default ~/.cache/vllm-doge).
"""

import hashlib
import json
import os
import pathlib
import shutil
import sysconfig
import tempfile

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"
HEADER_START, HEADER_END = "<|start_header_id|>", "<|end_header_id|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, HEADER_START, HEADER_END]  # ids 0..4, in this order
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2

# Every message: bos, role header, blank line, content, eos. `add_generation_prompt` opens an assistant
# turn. Content may be a string or OpenAI-style parts ([{"type": "text", "text": ...}]).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- else -%}{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}{%- endif -%}"
    "{{- '<|begin_of_text|><|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + content + '<|end_of_text|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|begin_of_text|><|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)

# Bump when the training recipe changes, so stale cached tokenizers are not reused.
RECIPE_VERSION = 2
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the specials


def cache_root() -> pathlib.Path:
    return pathlib.Path(os.environ.get("VLLM_DOGE_CACHE") or pathlib.Path.home() / ".cache" / "vllm-doge")


def corpus_files(limit_bytes: int | None = None) -> list[pathlib.Path]:
    """Top-level stdlib modules in sorted order (subpackages and test suites are left out: smaller, and
    the same list on every install of a given Python version)."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    if limit_bytes is not None:
        kept, total = [], 0
        for path in files:
            if total >= limit_bytes:
                break
            kept.append(path)
            total += path.stat().st_size
        files = kept
    if not files:
        raise RuntimeError(f"no .py files found in the standard library at {stdlib}")
    return files


def read_text(path: pathlib.Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _corpus_digest(files: list[pathlib.Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def train_backend(vocab_size: int, files: list[pathlib.Path] | None = None) -> Tokenizer:
    """Train the raw `tokenizers.Tokenizer` (deterministic for a given file list)."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} specials)")
    files = files if files is not None else corpus_files()
    tok = Tokenizer(models.BPE())
    # GPT-2 style split (use_regex) keeps runs of indentation together; no prefix space, so "def" at
    # the start of a prompt is the same token as after a newline's indentation.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((read_text(p) for p in files), trainer=trainer)
    for i, special in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(special) == i, f"special token {special} did not land at id {i}"
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, BOS_ID)]
            ),
        ]
    )
    return tok


def wrap(backend: Tokenizer):
    """The transformers tokenizer around a trained backend (specials and chat template attached)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )


def get_tokenizer(vocab_size: int = 512):
    """The trained tokenizer for `vocab_size`, from the cache (training it on the first call)."""
    from transformers import AutoTokenizer

    files = corpus_files()
    cached = cache_root() / f"tokenizer-v{RECIPE_VERSION}-bpe{vocab_size}-{_corpus_digest(files)}"
    if not (cached / "tokenizer.json").is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        # Write beside the target, then rename: concurrent test processes never see a partial dir.
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=cached.name + ".tmp", dir=cached.parent))
        save_tokenizer(wrap(train_backend(vocab_size, files)), tmp)
        try:
            tmp.rename(cached)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(cached)


def save_tokenizer(tokenizer, out_dir) -> None:
    """Save with the chat template inside tokenizer_config.json and the generic class name
    `PreTrainedTokenizerFast`, which every transformers version (and vLLM) can load."""
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    config_path = pathlib.Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.setdefault("chat_template", CHAT_TEMPLATE)
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


__all__ = [
    "BOS_ID",
    "CHAT_TEMPLATE",
    "EOS_ID",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "cache_root",
    "corpus_files",
    "get_tokenizer",
    "save_tokenizer",
    "train_backend",
]
