"""A Doge checkpoint directory: its tensor names and shapes, the legacy format's renames, and checks that
name the file or tensor at fault.

    read_checkpoint(path) -> DogeSpec        config.json + the safetensors headers, validated
    expected_shapes(spec) -> {name: shape}   every tensor (transformers-format names), unsharded
    checked(weights, expected, optional)     the tensors as they stream in, shapes checked

Only safetensors headers and raw bytes are read, so this module needs no torch.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable, Iterator

from .spec import DogeConfigError, DogeSpec, describe


class DogeCheckpointError(ValueError):
    """A checkpoint file or tensor is missing, truncated or of the wrong shape."""


# The legacy SmallDoge format's tensor names (substrings), mapped to the transformers format's.
LEGACY_RENAMES = {
    "model.word_embed.": "model.embed_tokens.",
    "model.final_layernorm.": "model.norm.",
    ".pre_layernorm.": ".input_layernorm.",
    ".post_layernorm.": ".post_attention_layernorm.",
    ".pre_residual.weight": ".input_residual",
    ".post_residual.weight": ".post_attention_residual",
    ".feed_forward.": ".mlp.",
}


def legacy_to_transformers_name(name: str) -> str:
    for old, new in LEGACY_RENAMES.items():
        name = name.replace(old, new)
    return name


def read_config(root: pathlib.Path) -> dict:
    path = pathlib.Path(root) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DogeCheckpointError(f"Doge checkpoint {root}: no config.json") from None
    except json.JSONDecodeError as error:
        raise DogeCheckpointError(f"Doge checkpoint: {path} is not valid JSON ({error})") from None


def read_checkpoint(root, *, legacy: bool | None = None) -> DogeSpec:
    """The spec of a local checkpoint directory, from config.json and its tensor names (`legacy` forces
    the format); the files are checked to be complete first. A legacy checkpoint that stores an lm_head
    while tied (tying is that format's default) must store the embedding again, byte for byte."""
    root = pathlib.Path(root)
    index = check_safetensors_files(root)
    spec = describe(read_config(root), set(index), legacy=legacy)
    if spec.legacy and spec.tie_word_embeddings and "lm_head.weight" in index:
        if _tensor_bytes(index["lm_head.weight"]) != _tensor_bytes(index["model.word_embed.weight"]):
            raise DogeConfigError(
                "legacy Doge config: `tie_word_embeddings` is true (absent means true in this format) but the "
                "checkpoint stores an lm_head.weight different from model.word_embed.weight; set the field explicitly"
            )
    return spec


def expected_shapes(spec: DogeSpec) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor (transformers-format names) with its full, unsharded shape."""
    hidden, inter, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    heads, kv_heads, rows = spec.num_heads, spec.num_kv_heads, spec.mask_rows
    shapes = {"model.embed_tokens.weight": (spec.vocab_size, hidden), "model.norm.weight": (hidden,)}
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, hidden)
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        linears = {
            "self_attn.q_proj": (heads * d, hidden, spec.attention_bias),
            "self_attn.k_proj": (kv_heads * d, hidden, spec.attention_bias),
            "self_attn.v_proj": (kv_heads * d, hidden, spec.attention_bias),
            "self_attn.o_proj": (hidden, heads * d, spec.attention_bias),
            "self_attn.dt_proj": (rows, kv_heads * d, spec.attention_bias),
            "mlp.gate_proj": (inter, hidden, spec.mlp_bias),
            "mlp.up_proj": (inter, hidden, spec.mlp_bias),
            "mlp.down_proj": (hidden, inter, spec.mlp_bias),
        }
        if spec.experts is not None:
            linears["mlp.router_gate"] = (2 * spec.experts.keys, hidden, spec.experts.router_bias)
            shapes[p + "mlp.down_embed.weight"] = (spec.experts.count, hidden)
            shapes[p + "mlp.up_embed.weight"] = (spec.experts.count, hidden)
        for name, (out_size, in_size, bias) in linears.items():
            shapes[f"{p}{name}.weight"] = (out_size, in_size)
            if bias:
                shapes[f"{p}{name}.bias"] = (out_size,)
        shapes[p + "self_attn.A"] = (rows,)
        if spec.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight", "input_residual", "post_attention_residual"):
            shapes[p + name] = (hidden,)
    return shapes


def checked(weights: Iterable, expected: dict[str, tuple[int, ...]], optional: Iterable[str] = ()) -> Iterator:
    """Yield (name, tensor) pairs, raising on a wrong shape and, at the end, on a missing tensor.

    Names not in `expected` pass through (the loader reports them); `optional` names may be absent."""
    seen = set()
    for name, tensor in weights:
        want = expected.get(name)
        if want is not None and tuple(tensor.shape) != want:
            raise DogeCheckpointError(
                f"Doge checkpoint: tensor {name!r} has shape {tuple(tensor.shape)}, expected {want} from config.json"
            )
        seen.add(name)
        yield name, tensor
    missing = sorted(set(expected) - seen - set(optional))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DogeCheckpointError(f"Doge checkpoint: tensor {missing[0]!r}{more} is missing from the safetensors files")


def _header(file: pathlib.Path) -> tuple[int, dict]:
    """(bytes before the data, {tensor name: entry}) of one safetensors file."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        raw = f.read(header_len) if 8 + header_len <= size else b""
    try:
        entries = {k: v for k, v in json.loads(raw).items() if k != "__metadata__"}
        end = max((v["data_offsets"][1] for v in entries.values()), default=0)
    except (ValueError, KeyError, TypeError, IndexError):
        raise DogeCheckpointError(f"Doge checkpoint: {file.name} ({size} bytes) has no valid safetensors header") from None
    if 8 + header_len + end != size:
        raise DogeCheckpointError(
            f"Doge checkpoint: {file.name} is {size} bytes, its header describes {8 + header_len + end} bytes "
            "(truncated or corrupt)"
        )
    return 8 + header_len, entries


def _tensor_bytes(located: tuple[pathlib.Path, int, dict]) -> tuple[str, list[int], bytes]:
    """(dtype, shape, raw bytes) of one tensor of `check_safetensors_files`'s index: enough to tell two
    tensors equal, bit for bit."""
    file, start, entry = located
    begin, end = entry["data_offsets"]
    with open(file, "rb") as f:
        f.seek(start + begin)
        return entry["dtype"], entry["shape"], f.read(end - begin)


def check_safetensors_files(root) -> dict[str, tuple[pathlib.Path, int, dict]]:
    """A local checkpoint must hold safetensors weights (pickled .bin files can run code when loaded), each
    file as long as its header says: a truncated download otherwise fails deep in the loader. Returns
    {tensor name: (file, where its file's data starts, header entry)}, each header read once."""
    root = pathlib.Path(root)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        found = ", ".join(sorted(p.name for p in root.glob("*.bin"))) or "no weights at all"
        raise DogeCheckpointError(f"Doge checkpoint {root}: no *.safetensors file ({found}); only safetensors weights are loaded")
    index = {}
    for file in files:
        start, entries = _header(file)
        index.update({name: (file, start, entry) for name, entry in entries.items()})
    return index
