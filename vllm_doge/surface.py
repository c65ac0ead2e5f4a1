"""Every vLLM name and signature vllm-doge relies on, in one list, and two ways to check it.

vLLM has no stable plugin API beyond model registration: the plugin subclasses its layers and attention
backend, passes keyword arguments to its constructors, reads attributes of its configs and metadata, and
on CPU writes into its KV-cache pages. `NEEDS` names each of those pieces once, with the plugin feature
that needs it and where it is needed (everywhere, on CPU only, with LoRA only). It replaces a vLLM
version gate: a vLLM that has every piece is accepted whatever its version number.

- `check_installed(stage)` checks the pieces against the running vLLM (imports, `inspect.signature`,
  class attributes and dataclass fields). `require(stage)` raises an error naming each missing piece and
  the feature that needs it (a warning instead with VLLM_DOGE_ALLOW_UNTESTED_VLLM=1). `register()`
  checks the pieces its own imports load anyway (stage REGISTER), model.py the rest before it imports
  them (MODEL), lora.py the LoRA pieces when LoRA is on (LORA), so a process that never builds the model
  imports nothing more for the check.
- `check_source(root)` checks the same list statically against an unpacked vLLM source tree (the
  directory holding the `vllm/` package), with `ast` only: nothing imported, no GPU needed
  (`python -m tools.vllm_surface ROOT` prints the table).

A name found in a module counts when the module defines it or imports it (followed to its definition);
an attribute of a class when the class or one of its bases defines it in its body (method, class
attribute, dataclass field) or assigns it to an attribute anywhere in its methods (`self.x = …`,
`layer.isa = …`). Parameters: `args` must be the leading positional parameters in that order (the
plugin passes them by position), `kwargs` must be named parameters, `through_kwargs` may also arrive in
a `**kwargs` the callable forwards (vLLM hands extra Attention kwargs to the backend's impl).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path

ALLOW_UNTESTED = "VLLM_DOGE_ALLOW_UNTESTED_VLLM"

# Where a piece is needed.
EVERYWHERE = "all"
CPU = "cpu"  # vLLM's CPU platform (DOGE_ATTN)
LORA = "lora"  # --enable-lora

# When the running vLLM is checked for it (see the module docstring).
REGISTER = "register"
MODEL = "model"


@dataclass(frozen=True)
class Need:
    """One vLLM piece: `name` (dotted inside the module: "Class.method") in `module`, or the module itself
    when `name` is None. `module` may be a tuple of alternatives, newest location first."""

    module: str | tuple[str, ...]
    name: str | None
    feature: str
    where: str = EVERYWHERE
    stage: str = MODEL
    args: tuple[str, ...] = ()
    kwargs: tuple[str, ...] = ()
    through_kwargs: tuple[str, ...] = ()
    attrs: tuple[str, ...] = ()
    required: bool = True  # False: the plugin has a fallback (it degrades, and says so in `feature`)

    @property
    def modules(self) -> tuple[str, ...]:
        return (self.module,) if isinstance(self.module, str) else self.module

    @property
    def label(self) -> str:
        where = "|".join(self.modules)
        return where if self.name is None else f"{where}.{self.name}"


ATTN = "vllm.model_executor.layers.attention"
BACKEND = "vllm.v1.attention.backend"
LINEAR = "vllm.model_executor.layers.linear"
UTILS = "vllm.model_executor.models.utils"

NEEDS: tuple[Need, ...] = (
    # -- registration and the engine-config hook (__init__.py, config.py, backend/__init__.py) --------------
    Need("vllm", None, "the plugin itself", stage=REGISTER),
    Need("vllm", "ModelRegistry", "registering DogeForCausalLM", stage=REGISTER),
    Need("vllm.model_executor.models.registry", "_ModelRegistry.register_model", "registering DogeForCausalLM by its "
         "'module:Class' name", stage=REGISTER, args=("model_arch", "model_cls")),
    Need("vllm.model_executor.models.config", "MODELS_CONFIG_MAP", "the engine-config hook (config.py) for both "
         "Doge architectures", stage=REGISTER),
    Need("vllm.model_executor.models.config", "VerifyAndUpdateConfig", "the engine-config hook: vLLM calls these two "
         "static methods", stage=REGISTER, attrs=("verify_and_update_model_config", "verify_and_update_config")),
    Need("vllm.logger", "init_logger", "the plugin's log messages", stage=REGISTER, args=("name",)),
    Need("vllm.v1.attention.backends.registry", "AttentionBackendEnum", "DOGE_ATTN registration (Attention looks "
         "the backend's name up in it)", stage=REGISTER),
    Need("vllm.v1.attention.backends.registry", "register_backend", "registering the DOGE_ATTN backend by class path",
         stage=REGISTER, args=("backend", "class_path")),
    Need("vllm.platforms", "current_platform", "choosing the attention path and the CDMoE kernel", stage=REGISTER),
    Need("vllm.platforms.interface", "Platform", "choosing the attention path (CPU) and the CDMoE kernel (CUDA)",
         stage=REGISTER, attrs=("is_cpu", "is_cuda_alike")),
    Need("vllm.config", "VllmConfig", "the config hook and the model read these", stage=REGISTER,
         attrs=("model_config", "cache_config", "quant_config", "lora_config", "load_config", "speculative_config",
                "kv_transfer_config", "additional_config")),
    Need("vllm.config", "ModelConfig", "the config hook: the checkpoint, its HF config and the context cap",
         stage=REGISTER, attrs=("hf_config", "model", "revision", "max_model_len")),
    Need("vllm.config", "ModelConfig", "telling an explicit --max-model-len (refused past the cap) from vLLM's "
         "default (capped); without it an explicit length is capped too", stage=REGISTER,
         attrs=("original_max_model_len",), required=False),
    Need("vllm.config", "CacheConfig", "the KV-cache dtype (attention path, head size), prefix caching and offloading "
         "(turned off / refused with a binding keep window)", stage=REGISTER,
         attrs=("cache_dtype", "enable_prefix_caching", "kv_offloading_size")),
    Need("vllm.config", "LoadConfig", "loading safetensors only (never pickled .bin)", stage=REGISTER,
         attrs=("load_format",)),
    Need(f"{ATTN}.attention", "get_attention_context", "DOGE_ATTN's custom op reads the step's "
         "metadata, layer and KV cache", stage=REGISTER, args=("layer_name",)),
    Need("vllm.utils.torch_utils", "direct_register_custom_op", "registering DOGE_ATTN's custom op",
         stage=REGISTER, args=("op_name", "op_func"), kwargs=("mutates_args", "fake_impl", "target_lib")),
    # -- the model (model.py) ---------------------------------------------------------------------------------
    Need("vllm.compilation.decorators", "support_torch_compile", "torch.compile of DogeModel"),
    Need("vllm.config", "get_current_vllm_config", "the attention layers read LoRA and max_model_len from it"),
    Need("vllm.config", "get_layers_from_vllm_config", "DOGE_ATTN's metadata builder reads its layers' keep window",
         args=("vllm_config", "layer_type", "layer_names")),
    Need("vllm.distributed", "get_pp_group", "pipeline parallelism"),
    Need("vllm.distributed.parallel_state", "GroupCoordinator", "pipeline parallelism: first/last rank",
         attrs=("is_first_rank", "is_last_rank")),
    Need("vllm.distributed", "get_tensor_model_parallel_rank", "tensor parallelism: each rank's mask rows"),
    Need("vllm.distributed", "get_tensor_model_parallel_world_size", "tensor parallelism: each rank's heads"),
    Need("vllm.distributed", "tensor_model_parallel_all_gather", "tensor parallelism with LoRA: the adapted v of every "
         "kv head", args=("input_",), kwargs=("dim",)),
    Need("vllm.model_executor.layers.layernorm", "RMSNorm", "layer norms and q/k norms", args=("hidden_size",),
         kwargs=("eps",)),
    Need("vllm.model_executor.layers.logits_processor", "LogitsProcessor", "logits", args=("vocab_size",)),
    Need("vllm.model_executor.layers.quantization", "QuantizationConfig", "passing the quantization config to layers"),
    Need("vllm.model_executor.layers.vocab_parallel_embedding", "VocabParallelEmbedding", "token embeddings",
         args=("num_embeddings", "embedding_dim"), kwargs=("quant_config",)),
    Need("vllm.model_executor.layers.vocab_parallel_embedding", "ParallelLMHead", "the LM head, tied embeddings",
         args=("num_embeddings", "embedding_dim"), kwargs=("quant_config", "prefix"), attrs=("tie_weights",)),
    Need("vllm.model_executor.models.interfaces", "SupportsLoRA", "LoRA: vLLM reads the packed modules",
         attrs=("packed_modules_mapping", "embedding_modules")),
    Need("vllm.model_executor.models.interfaces", "SupportsPP", "pipeline parallelism",
         attrs=("make_empty_intermediate_tensors",)),
    Need("vllm.model_executor.models.interfaces_base", "VllmModelForTextGeneration", "the methods vLLM calls on the "
         "model", attrs=("embed_input_ids", "forward", "compute_logits")),
    Need("vllm.model_executor.models.llama", "LlamaMLP", "the dense MLP and CDMoE's shared MLP (subclassed)",
         args=("hidden_size", "intermediate_size", "hidden_act"), kwargs=("quant_config", "bias", "prefix"),
         attrs=("forward",)),
    Need(UTILS, "AutoWeightsLoader", "weight loading", args=("module",)),
    Need(UTILS, "AutoWeightsLoader.load_weights", "weight loading with stacked q/k/v and gate/up", args=("weights",),
         kwargs=("mapper",)),
    Need(UTILS, "PPMissingLayer", "pipeline parallelism: layers of other ranks"),
    Need(UTILS, "WeightsMapper", "stacked-weight and legacy-format names", kwargs=("orig_to_new_stacked",
         "orig_to_new_substr"), attrs=("apply",)),
    Need(UTILS, "make_empty_intermediate_tensors_factory", "pipeline parallelism", args=("keys", "hidden_size")),
    Need(UTILS, "make_layers", "decoder layers split between pipeline ranks", args=("num_hidden_layers", "layer_fn"),
         kwargs=("prefix",)),
    Need(UTILS, "maybe_prefix", "module prefixes", args=("prefix", "name")),
    Need("vllm.sequence", "IntermediateTensors", "pipeline parallelism"),
    # -- attention (attention.py, backend/) -------------------------------------------------------------------
    Need(ATTN, "Attention", "every attention layer (the fold and DOGE_ATTN)", args=("num_heads", "head_size", "scale"),
         kwargs=("num_kv_heads", "cache_config", "quant_config", "prefix", "per_layer_sliding_window", "attn_backend"),
         through_kwargs=("bias_channels",),
         attrs=("layer_name", "num_heads", "head_size", "num_kv_heads", "impl", "attn_backend", "get_kv_cache_spec")),
    Need(LINEAR, "QKVParallelLinear", "the q/k/v projection", args=("hidden_size", "head_size", "total_num_heads",
         "total_num_kv_heads"), kwargs=("bias", "quant_config", "prefix")),
    Need(LINEAR, "RowParallelLinear", "the output projection", args=("input_size", "output_size"),
         kwargs=("bias", "quant_config", "prefix")),
    Need(LINEAR, "ReplicatedLinear", "CDMoE's router", args=("input_size", "output_size"),
         kwargs=("bias", "quant_config", "prefix")),
    Need("vllm.model_executor.layers.rotary_embedding", "get_rope", "RoPE", args=("head_size",),
         kwargs=("max_position", "rope_parameters")),
    Need("vllm.v1.attention.selector", "get_attn_backend", "the fold: the smallest padded head size the platform's "
         "backend runs", args=("head_size", "dtype", "kv_cache_dtype"), kwargs=("num_heads",)),
    Need(BACKEND, "AttentionBackend", "the DOGE_ATTN backend (subclassed: vLLM reads these) and the fold's head-size "
         "probe", attrs=("forward_includes_kv_cache_update", "supported_dtypes",
         "supported_kv_cache_dtypes", "get_name", "get_impl_cls", "get_builder_cls", "get_supported_kernel_block_sizes",
         "supported_kv_cache_layouts", "get_supported_head_sizes", "supports_sliding_window", "supports_attn_type",
         "supports_head_size")),
    Need(BACKEND, "AttentionImpl", "the DOGE_ATTN impl: vLLM's Attention constructs it with these, by position",
         args=("num_heads", "head_size", "scale", "num_kv_heads", "alibi_slopes", "sliding_window", "kv_cache_dtype",
               "logits_soft_cap", "attn_type", "kv_sharing_target_layer_name"), attrs=("forward",)),
    Need(BACKEND, "AttentionMetadataBuilder", "the DOGE_ATTN metadata builder (subclassed)",
         args=("kv_cache_spec", "layer_names", "vllm_config", "device")),
    Need(BACKEND, "AttentionMetadataBuilder.build", "the DOGE_ATTN metadata builder",
         args=("common_prefix_len", "common_attn_metadata"), kwargs=("fast_build",)),
    Need(BACKEND, "AttentionType", "decoder-only attention", attrs=("DECODER",)),
    Need(BACKEND, "CommonAttentionMetadata", "DOGE_ATTN's per-step metadata", attrs=("query_start_loc", "seq_lens",
         "block_table_tensor", "slot_mapping", "num_actual_tokens", "num_reqs", "causal")),
    Need(BACKEND, "MultipleOf", "DOGE_ATTN's block sizes", args=("base",)),
    Need("vllm.v1.kv_cache_interface", "AttentionSpec", "DOGE_ATTN's page size (dataclasses.replace of the spec)",
         attrs=("state_content_bytes", "head_size", "dtype")),
    Need("vllm.v1.kv_cache_interface", "KVCacheLayout", "DOGE_ATTN's page layout", attrs=("LBHNC",)),
    # -- CDMoE (cdmoe.py) -------------------------------------------------------------------------------------
    Need("vllm.model_executor.model_loader.weight_utils", "default_weight_loader", "CDMoE's expert tables",
         args=("param", "loaded_weight")),
    Need("vllm.model_executor.utils", "set_weight_attrs", "CDMoE's expert tables", args=("weight", "weight_attrs")),
    # -- LoRA (lora.py, model.py's lora_manager) --------------------------------------------------------------
    Need("vllm.lora.model_manager", "LoRAModelManager", "LoRA: the manager attaches itself as model.lora_manager; "
         "adapter shape checks wrap _add_adapter; the CPU fix swaps its punica wrappers' class", where=LORA,
         stage=LORA, attrs=("lora_manager", "_add_adapter", "punica_wrapper_mapping")),
    Need("vllm.lora.lora_model", "LoRAModel", "LoRA: adapter shape checks", where=LORA, stage=LORA,
         attrs=("loras", "rank", "id")),
    Need("vllm.lora.lora_weights", "LoRALayerWeights", "LoRA: adapter shape checks", where=LORA, stage=LORA,
         attrs=("lora_a", "lora_b")),
    Need("vllm.lora.punica_wrapper.punica_cpu", "PunicaWrapperCPU", "LoRA on CPU: exact base-model rows in mixed "
         "batches (subclassed)", where=LORA, stage=LORA, attrs=("token_lora_indices",)),
    Need("vllm.lora.punica_wrapper.punica_cpu", "PunicaWrapperCPU.add_shrink", "LoRA on CPU: exact base-model rows",
         where=LORA, stage=LORA, args=("y", "x", "lora_a_stacked", "scale")),
    Need("vllm.lora.punica_wrapper.punica_cpu", "bgmv_shrink", "LoRA on CPU: probing whether vLLM skips slot -1 itself",
         where=LORA, stage=LORA, args=("inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor")),
)


@dataclass(frozen=True)
class Result:
    need: Need
    status: str  # "ok", "missing" or "changed"
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status != "ok"


def _compare(need: Need, params, members) -> list[str]:
    """What differs from `need`: params = (positional names, named names, has **kwargs) or None when the
    signature cannot be read; members = a predicate on attribute names."""
    problems = []
    if params is not None and (need.args or need.kwargs or need.through_kwargs):
        positional, named, var_kw = params
        if list(positional[: len(need.args)]) != list(need.args):
            problems.append(f"positional parameters {tuple(positional[: len(need.args)])}, expected {need.args}")
        problems += [f"no parameter `{p}`" for p in need.kwargs if p not in named]
        problems += [f"no parameter `{p}` and no **kwargs" for p in need.through_kwargs if p not in named and not var_kw]
    problems += [f"no attribute `{a}`" for a in need.attrs if not members(a)]
    return problems


# ------------------------------------------------------------------------------------------------------------
# The running vLLM
# ------------------------------------------------------------------------------------------------------------


def _runtime_params(obj):
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    kinds = inspect.Parameter
    positional = [p.name for p in signature.parameters.values() if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    named = {p.name for p in signature.parameters.values() if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)}
    var_kw = any(p.kind is kinds.VAR_KEYWORD for p in signature.parameters.values())
    return positional, named, var_kw


@functools.lru_cache(maxsize=1)
def _installed_tree() -> SourceTree:
    import vllm

    return SourceTree(Path(vllm.__file__).resolve().parent.parent)


def _runtime_members(cls):
    """Attribute names of a class: class attributes and fields at runtime; instance attributes, which only
    an instance has, from the class's source (parsed only when asked)."""
    annotated = set()
    for klass in getattr(cls, "__mro__", (cls,)):
        annotated |= set(getattr(klass, "__annotations__", {}))
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()

    source_members = None

    def has(name: str) -> bool:
        nonlocal source_members
        if hasattr(cls, name) or name in annotated or name in fields:
            return True
        if not inspect.isclass(cls):
            return False
        if source_members is None:
            found = _installed_tree().lookup(cls.__module__, cls.__qualname__)
            source_members = _installed_tree().members(found) if found is not None and found.kind == "class" else set()
        return name in source_members

    return has


def _check_one_installed(need: Need) -> Result:
    last_error = ""
    for module_name in need.modules:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            last_error = f"no module {module_name}" if module_name.startswith(e.name or "") else f"importing {module_name}: {e}"
            continue
        except ImportError as e:  # the module exists but imports something its vLLM lacks
            last_error = f"importing {module_name}: {e}"
            continue
        obj, parent, part = module, None, None
        for part in need.name.split(".") if need.name else ():
            if not hasattr(obj, part):
                obj = None
                last_error = f"{module_name} has no `{need.name}`"
                break
            parent, obj = obj, getattr(obj, part)
        if obj is None:
            continue
        params = _runtime_params(obj) if callable(obj) else None
        if params is not None and params[0] and inspect.isclass(parent) and inspect.isfunction(obj):
            if not isinstance(inspect.getattr_static(parent, part), staticmethod):  # a method read off its class
                positional, named, var_kw = params
                params = positional[1:], named - {positional[0]}, var_kw
        problems = _compare(need, params, _runtime_members(obj if inspect.isclass(obj) else type(obj)))
        where = f"in {module_name}" if len(need.modules) > 1 else ""
        if problems:
            return Result(need, "changed", "; ".join(problems))
        return Result(need, "ok", where)
    return Result(need, "missing", last_error)


_checked: dict[Need, Result] = {}


def check_installed(stage: str | None = None, *, platform_is_cpu: bool | None = None) -> list[Result]:
    """Check the running vLLM for the pieces of `stage` (None: every stage). CPU-only pieces are skipped
    off the CPU platform (asked of vLLM when not given)."""
    results = []
    for need in NEEDS:
        if stage is not None and need.stage != stage:
            continue
        if need.where == CPU:
            if platform_is_cpu is None:
                from vllm.platforms import current_platform

                platform_is_cpu = current_platform.is_cpu()
            if not platform_is_cpu:
                continue
        if need not in _checked:
            _checked[need] = _check_one_installed(need)
        results.append(_checked[need])
    return results


def failure_message(failures: list[Result], version: str, outcome: str = "cannot run") -> str:
    lines = [f"vllm-doge {outcome} on the installed vLLM {version}: it lacks what the plugin needs:"]
    for r in failures:
        lines.append(f"  - {r.need.label}: {r.status} ({r.detail}); needed for {r.need.feature}"
                     + ("" if r.need.where == EVERYWHERE else f" [{r.need.where} only]"))
    return "\n".join(lines)


def require(stage: str, *, platform_is_cpu: bool | None = None) -> None:
    """Raise naming every required piece of `stage` the running vLLM lacks; warn for optional ones, and for
    all of them with VLLM_DOGE_ALLOW_UNTESTED_VLLM=1."""
    results = check_installed(stage, platform_is_cpu=platform_is_cpu)
    failures = [r for r in results if r.failed and r.need.required]
    optional = [r for r in results if r.failed and not r.need.required]
    if not failures and not optional:
        return
    import vllm
    from vllm.logger import init_logger

    logger = init_logger(__name__)
    version = getattr(vllm, "__version__", "?")
    if optional:
        logger.warning("%s", failure_message(optional, version, "degrades"))
    if not failures:
        return
    message = failure_message(failures, version)
    if os.environ.get(ALLOW_UNTESTED) != "1":
        raise RuntimeError(f"{message}\nInstall a vLLM that has them, or set {ALLOW_UNTESTED}=1 to try anyway.")
    logger.warning("%s\nTrying anyway (%s=1).", message, ALLOW_UNTESTED)


# ------------------------------------------------------------------------------------------------------------
# A vLLM source tree, statically
# ------------------------------------------------------------------------------------------------------------


@dataclass
class _Module:
    name: str
    is_package: bool
    symbols: dict  # name -> ("class" | "function" | "value", node) | ("import", module, attr) | ("module", name)
    stars: tuple  # modules of `from m import *`
    strings: frozenset  # string constants, for modules that resolve names lazily in __getattr__


@dataclass(frozen=True)
class Found:
    kind: str  # "class", "function", "value", "module", "external" (defined outside vLLM), "lazy"
    module: str
    node: ast.AST | None = None
    method_of: ast.ClassDef | None = None  # for functions found as a class member


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _decorator_names(node) -> set[str]:
    names = set()
    for d in getattr(node, "decorator_list", ()):
        target = d.func if isinstance(d, ast.Call) else d
        names.add(target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", ""))
    return names


class SourceTree:
    """The vLLM package under `root` (the directory holding `vllm/`), read with `ast`."""

    def __init__(self, root) -> None:
        self.root = Path(root)
        self._modules: dict[str, _Module | None] = {}
        self._members: dict[int, set[str]] = {}

    def _path(self, name: str) -> tuple[Path, bool] | None:
        base = self.root.joinpath(*name.split("."))
        if (base / "__init__.py").is_file():
            return base / "__init__.py", True
        if base.with_suffix(".py").is_file():
            return base.with_suffix(".py"), False
        return None

    def module(self, name: str) -> _Module | None:
        if name not in self._modules:
            self._modules[name] = self._parse(name)
        return self._modules[name]

    def _parse(self, name: str) -> _Module | None:
        found = self._path(name)
        if found is None:
            return None
        path, is_package = found
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        package = name if is_package else name.rpartition(".")[0]
        symbols: dict = {}
        stars: list[str] = []

        def absolute(node: ast.ImportFrom) -> str:
            if not node.level:
                return node.module or ""
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            return ".".join(base + ([node.module] if node.module else []))

        def visit(body) -> None:
            for node in body:
                if isinstance(node, ast.ClassDef):
                    symbols[node.name] = ("class", node)
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    if "overload" not in _decorator_names(node):
                        symbols[node.name] = ("function", node)
                elif isinstance(node, ast.Assign):
                    for target in node.targets:
                        for leaf in ast.walk(target):
                            if isinstance(leaf, ast.Name):
                                symbols[leaf.id] = ("value", node)
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    symbols[node.target.id] = ("value", node)
                elif isinstance(node, ast.ImportFrom):
                    source = absolute(node)
                    for alias in node.names:
                        if alias.name == "*":
                            stars.append(source)
                        else:
                            symbols[alias.asname or alias.name] = ("import", source, alias.name)
                elif isinstance(node, ast.Import):
                    for alias in node.names:
                        if alias.asname:
                            symbols[alias.asname] = ("module", alias.name)
                        else:
                            symbols.setdefault(alias.name.split(".")[0], ("module", alias.name.split(".")[0]))
                elif isinstance(node, ast.If):
                    if not _is_type_checking(node.test):
                        visit(node.body)
                    visit(node.orelse)
                elif isinstance(node, ast.Try):
                    visit(node.body)
                    for handler in node.handlers:
                        visit(handler.body)
                    visit(node.orelse)
                    visit(node.finalbody)

        visit(tree.body)
        strings = frozenset()
        if "__getattr__" in symbols:  # only lazy modules need them (a walk of a large module costs ms)
            strings = frozenset(n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str))
        return _Module(name, is_package, symbols, tuple(stars), strings)

    def lookup(self, module: str, dotted: str | None, _depth: int = 0) -> Found | None:
        """Where `dotted` ("name" or "Class.member") of `module` is defined, following imports; None if absent."""
        if self.module(module) is None:
            return None if module.split(".")[0] == "vllm" else Found("external", module)
        if not dotted:
            return Found("module", module)
        head, _, rest = dotted.partition(".")
        found = self._symbol(module, head, _depth)
        if found is None or not rest:
            return found
        if found.kind == "module":
            return self.lookup(found.module, rest, _depth + 1)
        if found.kind == "class" and "." not in rest:
            return self._member_node(found, rest)
        return Found("external", found.module) if found.kind in ("external", "lazy") else None

    def _symbol(self, module: str, name: str, depth: int) -> Found | None:
        if depth > 20:
            return None
        info = self.module(module)
        if info is None:
            return None if module.split(".")[0] == "vllm" else Found("external", module)
        symbol = info.symbols.get(name)
        if symbol is None:
            for source in info.stars:
                if source.split(".")[0] == "vllm" and self.module(source) is not None:
                    found = self._symbol(source, name, depth + 1)
                    if found is not None:
                        return found
            if info.is_package and self.module(f"{module}.{name}") is not None:
                return Found("module", f"{module}.{name}")
            if "__getattr__" in info.symbols and name in info.strings:
                return Found("lazy", module)  # resolved on first access (vllm.ModelRegistry, current_platform)
            return None
        kind = symbol[0]
        if kind == "import":
            _, source, attr = symbol
            if source.split(".")[0] != "vllm":
                return Found("external", source)
            if self.module(source) is None:  # `from pkg import submodule`, pkg a plain directory
                return Found("module", f"{source}.{attr}") if self.module(f"{source}.{attr}") else None
            found = self._symbol(source, attr, depth + 1)
            if found is None and self.module(f"{source}.{attr}") is not None:
                return Found("module", f"{source}.{attr}")
            return found
        if kind == "module":
            target = symbol[1]
            return Found("module", target) if self.module(target) is not None else Found("external", target)
        return Found(kind, module, symbol[1])

    def _bases(self, found: Found) -> list[Found]:
        bases = []
        for base in found.node.bases:
            if isinstance(base, ast.Subscript):  # Generic[T], AttentionMetadataBuilder[M]
                base = base.value
            parts = []
            while isinstance(base, ast.Attribute):
                parts.insert(0, base.attr)
                base = base.value
            if not isinstance(base, ast.Name):
                continue
            target = self.lookup(found.module, ".".join([base.id] + parts))
            if target is not None and target.kind == "class":
                bases.append(target)
        return bases

    def _member_node(self, found: Found, name: str, _seen=None) -> Found | None:
        """A member defined in the body of the class or a base (methods, nested classes, class attributes)."""
        for node in found.node.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
                return Found("function", found.module, node, method_of=found.node)
            if isinstance(node, ast.ClassDef) and node.name == name:
                return Found("class", found.module, node)
        for base in self._bases(found):
            member = self._member_node(base, name)
            if member is not None:
                return member
        if name in self.members(found):
            return Found("value", found.module)
        return None

    def members(self, found: Found) -> set[str]:
        """Attribute names of a class: its body's definitions and every attribute assigned in its methods,
        with those of its in-tree bases."""
        key = id(found.node)
        if key not in self._members:
            self._members[key] = self._collect_members(found)
        return self._members[key]

    def _collect_members(self, found: Found) -> set[str]:
        names: set[str] = set()
        for node in found.node.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
        for node in ast.walk(found.node):
            targets = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                targets = [node.target]
            for target in targets:
                for leaf in ast.walk(target):
                    if isinstance(leaf, ast.Attribute) and isinstance(leaf.ctx, ast.Store):
                        names.add(leaf.attr)
        for base in self._bases(found):
            names |= self.members(base)
        return names

    def params(self, found: Found):
        """(positional names, named names, has **kwargs) of a function or a class's constructor; None when
        it cannot be read from this tree (defined outside vLLM, or a value)."""
        if found.kind == "function":
            node = found.node
            positional = [a.arg for a in node.args.posonlyargs + node.args.args]
            named = {a.arg for a in node.args.args + node.args.kwonlyargs}
            if found.method_of is not None and "staticmethod" not in _decorator_names(node) and positional:
                named.discard(positional[0])
                positional = positional[1:]
            return positional, named, node.args.kwarg is not None
        if found.kind == "class":
            init = self._member_node(found, "__init__")
            if init is not None and init.kind == "function":
                return self.params(init)
            if "dataclass" in _decorator_names(found.node):
                fields = self._dataclass_fields(found)
                return fields, set(fields), False
        return None

    def _dataclass_fields(self, found: Found) -> list[str]:
        fields: list[str] = []
        for base in reversed(self._bases(found)):
            fields += [f for f in self._dataclass_fields(base) if f not in fields]
        for node in found.node.body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if "ClassVar" in ast.unparse(node.annotation):
                    continue
                if isinstance(node.value, ast.Call) and any(
                    k.arg == "init" and isinstance(k.value, ast.Constant) and k.value.value is False for k in node.value.keywords
                ):
                    continue
                if node.target.id not in fields:
                    fields.append(node.target.id)
        return fields


def check_source(root, needs=NEEDS) -> list[Result]:
    """Check `needs` against the vLLM source tree under `root`, statically."""
    tree = SourceTree(root)
    if tree.module("vllm") is None:
        raise FileNotFoundError(f"{root} holds no vllm/ package (give the directory that contains vllm/)")
    results = []
    for need in needs:
        result = None
        for module_name in need.modules:
            if tree.module(module_name) is None:
                result = Result(need, "missing", f"no module {module_name}")
                continue
            found = tree.lookup(module_name, need.name)
            if found is None:
                result = Result(need, "missing", f"{module_name} defines no `{need.name}`")
                continue
            if found.kind in ("external", "lazy", "value", "module"):
                unchecked = [x for x in (need.args, need.kwargs, need.through_kwargs, need.attrs) if x]
                note = {"external": f"defined in {found.module}", "lazy": "resolved lazily"}.get(found.kind, "")
                if unchecked and found.kind != "module":
                    note = ", ".join(filter(None, [note, "signature/attributes not checked statically"]))
                where = f"in {module_name}" if len(need.modules) > 1 else ""
                result = Result(need, "ok", ", ".join(filter(None, [where, note])))
                break
            members = tree.members(found) if found.kind == "class" else set()
            problems = _compare(need, tree.params(found), members.__contains__)
            where = f"in {module_name}" if len(need.modules) > 1 else ""
            result = Result(need, "changed", "; ".join(problems)) if problems else Result(need, "ok", where)
            break
        results.append(result)
    return results
