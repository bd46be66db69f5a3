"""Finds the candidate positions of a model: the paper's "Mix" space, detected from the module structure."""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn.utils.parametrize import ParametrizationList
from transformers.pytorch_utils import Conv1D

from .config import S3SearchConfig, string_pattern_hint

# Token mixers: attentions, and the state-space mixers that stand in for them (Mamba's MambaMixer, Granite-MoE-Hybrid's
# GraniteMoeHybridMambaLayer).
_TOKEN_MIXER_CLASS = re.compile(r"attention|attn|mixer|mamba", re.IGNORECASE)
_ROUTER_NAMES = ("gate", "router")
# peft refuses LoRA on these modules of these model types (peft.tuners.tuners_utils._check_lora_target_modules_mamba):
# their CUDA kernels take the modules' weights directly instead of calling them, so a wrapper acts on CPU only.
_MAMBA_MODEL_TYPES = frozenset({"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"})
_MAMBA_KERNEL_MODULES = frozenset({"out_proj", "conv1d"})


@dataclass(frozen=True)
class Candidate:
    """One gated parameter-efficient module: `kind` on the module `module`, with `num_params` trainable parameters."""

    module: str
    kind: str
    slot: int
    num_params: int
    stack: str | None
    layer: int | None
    position: str

    @property
    def name(self) -> str:
        return f"{self.module}:{self.kind}[{self.slot}]" if self.kind == "lora" else f"{self.module}:{self.kind}"


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an nn.Linear or a GPT-2 style Conv1D (whose weight is stored transposed)."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and look-alikes (T5LayerNorm, LlamaRMSNorm, ...), recognised by structure.

    A normalisation layer here is a leaf module with a 1-d learnable scale `weight` and an epsilon attribute, whose
    class is a torch norm or is named like one. Batch/group norms are left out: they are not transformer norms.
    """
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        return module.weight is not None
    name = type(module).__name__.lower()
    if "norm" not in name or "batch" in name or "group" in name or next(module.children(), None) is not None:
        return False
    weight = getattr(module, "weight", None)
    has_eps = any(hasattr(module, attr) for attr in ("eps", "variance_epsilon", "epsilon"))
    return isinstance(weight, nn.Parameter) and weight.dim() == 1 and has_eps


def fused_expert_parameters(module: nn.Module) -> list[str]:
    """Names of a module's own parameters that stack one weight matrix per expert (transformers' fused MoE experts,
    the parameters peft's `target_parameters` wraps): 3-d (experts, rows, columns), at least two experts, the same
    expert count for all.

    Convolution kernels are 3-d too, (out, in / groups, width), but a convolution is no set of experts: its kernel is
    read by the convolution (or by fused state-space kernels such as Mamba's, which take `conv1d.weight` directly), so
    a per-"expert" delta on it would never act. The same holds for a convolution's parametrized kernel (weight norm's
    `parametrizations.weight`, as in Wav2Vec2's positional convolution), and for matrices with a single row or column
    (a depthwise (C, 1, K) kernel held by a module of another class).
    """
    if is_linear(module) or is_norm(module) or isinstance(module, (nn.modules.conv._ConvNd, ParametrizationList)):
        return []
    stacked = {name: p for name, p in module.named_parameters(recurse=False) if p.dim() == 3 and min(p.shape[1:]) > 1}
    if len({p.shape[0] for p in stacked.values()}) != 1 or next(iter(stacked.values())).shape[0] < 2:
        return []
    return list(stacked)


def expert_parameter_owners(model: nn.Module) -> dict[str, str]:
    """Path of every fused expert parameter (`<experts module>.<name>`) -> path of the module holding it."""
    modules = named_base_modules(model)
    return {f"{path}.{name}": path for path, module in modules for name in fused_expert_parameters(module)}


def _holds_experts(module: nn.Module) -> bool:
    return any(name == "experts" or fused_expert_parameters(child) for name, child in module.named_children())


def _routing_linears(model: nn.Module) -> set[str]:
    """Linear layers that route tokens in a mixture-of-experts block rather than transform hidden states: linear
    routers named gate/router next to the experts (Mixtral's `gate`) and width-1 gates beside them (Qwen2-MoE's
    `shared_expert_gate`). A LoRA slice or adapter there would be a handful of parameters steering the routing, not a
    parameter-efficient module. Width-1 linears elsewhere (value heads, a GPT-2 `Conv1D(1, d)` score) are no routers.
    """
    modules = dict(named_base_modules(model))
    routing = set()
    for path, module in modules.items():
        parent, _, name = path.rpartition(".")
        if not is_linear(module) or parent not in modules or not _holds_experts(modules[parent]):
            continue
        if name in _ROUTER_NAMES or linear_features(module)[1] == 1:
            routing.add(path)
    return routing


def matches(patterns: str | Sequence[str] | None, key: str) -> bool:
    """peft's target-module convention: a regex string fully matches the name; a list matches exactly or by suffix."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, key) is not None
    return any(key == pattern or key.endswith(f".{pattern}") for pattern in patterns)


def named_base_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`model.named_modules()` with every peft tuner layer seen as the module it wraps, its internals hidden.

    A second adapter added to an adapted model must be planned on the same structure as the first one was.
    """
    named = []
    wrapped: tuple[str, ...] = ()
    for path, module in model.named_modules():
        if wrapped and path.startswith(wrapped):
            continue
        if isinstance(module, BaseTunerLayer):
            wrapped += (f"{path}.",)
            module = module.get_base_layer()
        named.append((path, module))
    return named


def find_blocks(model: nn.Module) -> dict[str, tuple[str, int]]:
    """Map of transformer-block paths to (stack path, layer index).

    A stack is a ModuleList of modules of one class containing linear layers (BERT `encoder.layer`, T5
    `encoder.block` and `decoder.block`, GPT-2 `h`, Llama `layers`). Where stacks nest, the innermost ones hold the
    blocks: Swin's `encoder.layers` is a list of stages, each with its own list of `blocks` and a downsampling layer
    after them, and a stage is not one attention and one feed-forward. A ModuleList named `experts` holds the experts
    of a mixture-of-experts block, not blocks.
    """
    stacks: dict[str, int] = {}
    for path, module in named_base_modules(model):
        if not isinstance(module, nn.ModuleList) or len(module) == 0 or path.rpartition(".")[2] == "experts":
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if any(is_linear(sub) for sub in module[0].modules()):
            stacks[path] = len(module)
    blocks: dict[str, tuple[str, int]] = {}
    for path, length in stacks.items():
        inside = f"{path}." if path else ""
        if any(other != path and other.startswith(inside) for other in stacks):
            continue
        for index in range(length):
            blocks[f"{inside}{index}"] = (path, index)
    return blocks


def _enclosing_block(path: str, blocks: dict[str, tuple[str, int]]) -> str | None:
    parts = path.split(".")
    for end in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in blocks:
            return prefix
    return None


def _default_adapter_positions(model: nn.Module, blocks: dict[str, tuple[str, int]]) -> set[str]:
    """The output projection of each attention (or state-space mixer) and each feed-forward sub-block, found by
    structure.

    Within a block, every linear layer under the outermost module whose class is named like an attention or a mixer
    belongs to that token mixer; the last one registered is its output projection. The last linear layer outside any
    token mixer is the feed-forward output (BERT `output.dense`, T5 `wo`, GPT-2 `mlp.c_proj`, Llama `down_proj`).
    Mixture-of-experts feed-forward blocks have no such layer (their output sums routed experts) and get no default
    adapter.
    """
    modules = dict(named_base_modules(model))
    moe = tuple(f"{path}." for path, module in modules.items() if _holds_experts(module))
    last_in_group: dict[tuple[str, str | None], str] = {}
    for path, module in modules.items():
        block = _enclosing_block(path, blocks)
        if block is None or not is_linear(module) or path.startswith(moe):
            continue
        relative = path[len(block) + 1 :].split(".")
        attention = None
        for end in range(1, len(relative)):
            prefix = f"{block}." + ".".join(relative[:end])
            if _TOKEN_MIXER_CLASS.search(type(modules[prefix]).__name__):
                attention = prefix
                break
        last_in_group[(block, attention)] = path
    return set(last_in_group.values())


def _kinds_for(
    path: str, module: nn.Module, config: S3SearchConfig, in_blocks: bool, adapter_positions: set[str]
) -> list[tuple[str, int]]:
    """(kind, parameter count) of every candidate this module carries; LoRA appears once per rank slot."""
    kinds = set(config.candidate_kinds)
    found: list[tuple[str, int]] = []
    if is_linear(module):
        in_features, out_features = linear_features(module)
        targeted = matches(config.target_modules, path) if config.target_modules is not None else in_blocks
        if targeted and "lora" in kinds:
            found += [("lora", in_features + out_features)] * config.max_rank
        if targeted and "bitfit" in kinds:
            found.append(("bitfit", out_features))
    elif is_norm(module):
        width = module.weight.shape[0]
        targeted = matches(config.norm_modules, path) if config.norm_modules is not None else in_blocks
        if targeted and "lnfit" in kinds:
            found.append(("lnfit", width))
        if targeted and "bitfit" in kinds:
            found.append(("bitfit", width))
    if "adapter" in kinds and path in adapter_positions:
        found.append(("adapter", 2 * adapter_width(module) * config.adapter_rank))
    return found


def adapter_width(module: nn.Module) -> int:
    """Hidden size of a module's output: its own out_features, or that of the last linear layer inside it."""
    linears = [sub for sub in module.modules() if is_linear(sub)]
    if not linears:
        raise ValueError(
            f"Cannot put an adapter on {type(module).__name__}: its output width is unknown because it contains no "
            "linear layer. Point `adapter_modules` at a linear layer or at a block that ends in one."
        )
    return linear_features(linears[-1])[1]


def build_search_space(model: nn.Module, config: S3SearchConfig, check_patterns: bool = True) -> list[Candidate]:
    """All candidates of `config` on `model`, in module order, each module's candidates contiguous.

    With `check_patterns`, a `target_modules`, `norm_modules` or `adapter_modules` that matches nothing is an error.
    """
    blocks = find_blocks(model)
    excluded = _excluded(model, config) | _kernel_read_modules(model, config)
    routing = _routing_linears(model)
    named = [(path, module) for path, module in named_base_modules(model) if path and path not in excluded]
    if config.adapter_modules is None:
        adapter_positions = _default_adapter_positions(model, blocks)
    else:
        adapter_positions = {path for path, _ in named if matches(config.adapter_modules, path)}
    if check_patterns:
        experts = [(f"{path}.{name}", module) for path, module in named for name in fused_expert_parameters(module)]
        _check_patterns_match(config, named, experts)

    candidates = []
    left_out = []
    for path, module in named:
        block = _enclosing_block(path, blocks)
        stack, layer = blocks[block] if block is not None else (None, None)
        position = path[len(block) + 1 :] if block is not None else path
        if path in routing and not (matches(config.target_modules, path) or matches(config.adapter_modules, path)):
            left_out.append(path)
            continue
        in_blocks = block is not None
        kinds = [(path, kind, size) for kind, size in _kinds_for(path, module, config, in_blocks, adapter_positions)]
        kinds += _expert_kinds(path, module, config, in_blocks, excluded)
        slots: dict[tuple[str, str], int] = {}
        for target, kind, num_params in kinds:
            slot = slots.get((target, kind), 0)
            slots[(target, kind)] = slot + 1
            target_position = position + target[len(path) :]
            candidates.append(Candidate(target, kind, slot, num_params, stack, layer, target_position))
    if check_patterns:
        _warn_left_out(config, left_out, [path for path, module in named if _holds_experts(module)])
    return candidates


def _warn_left_out(config: S3SearchConfig, routing: list[str], moe_blocks: list[str]) -> None:
    """Name what a mixture-of-experts model leaves out of the search space, so nobody looks for it there."""
    parts = []
    if routing:
        parts.append(
            f"no candidates on {len(routing)} routing or width-1 gating linears (MoE routers and shared-expert "
            f"gates), e.g. {routing[:4]}: they steer the routing, and a LoRA slice there is no parameter-efficient "
            "module (name them in target_modules to search them anyway)"
        )
    if moe_blocks and "adapter" in config.candidate_kinds and config.adapter_modules is None:
        parts.append(
            f"no default adapter on {len(moe_blocks)} mixture-of-experts feed-forward blocks, e.g. {moe_blocks[:2]}: "
            "their output is a routed sum with no output projection to put it on (name them in adapter_modules to "
            "add one); their experts carry LoRA slices instead"
        )
    if parts:
        warnings.warn("S3 search space: " + "; ".join(parts) + ".", stacklevel=4)


def _expert_kinds(
    path: str, module: nn.Module, config: S3SearchConfig, in_blocks: bool, excluded: set[str]
) -> list[tuple[str, str, int]]:
    """(target, kind, parameter count) of the LoRA slices on a module's fused expert parameters.

    A slice is one rank on every expert of the parameter (as peft's `target_parameters` LoRA is), so it costs
    experts x (rows + columns): every expert's share is counted in the budget.
    """
    if "lora" not in config.candidate_kinds:
        return []
    found = []
    for name in fused_expert_parameters(module):
        target = f"{path}.{name}"
        targeted = matches(config.target_modules, target) if config.target_modules is not None else in_blocks
        if targeted and target not in excluded and not matches(config.exclude_modules, target):
            experts, rows, columns = getattr(module, name).shape
            found += [(target, "lora", experts * (rows + columns))] * config.max_rank
    return found


def build_fixed_structure(model: nn.Module, config: S3SearchConfig) -> list[Candidate]:
    """The candidates listed in `config.structure`, validated against the model."""
    full = S3SearchConfig(
        budget=1,
        candidate_kinds=sorted({kind for kinds in config.structure.values() for kind in kinds}),
        target_modules=list(config.structure),
        norm_modules=list(config.structure),
        adapter_modules=[path for path, kinds in config.structure.items() if "adapter" in kinds],
        max_rank=max([kinds.get("lora", 1) for kinds in config.structure.values()] + [1]),
        adapter_rank=config.adapter_rank,
    )
    modules = dict(named_base_modules(model))
    known = set(modules) | set(expert_parameter_owners(model))
    missing = [path for path in config.structure if path not in known]
    if missing:
        raise ValueError(
            f"The structure names modules that this model does not have: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}. Was it searched on another architecture?"
        )
    available = build_search_space(model, full, check_patterns=False)
    chosen = []
    for candidate in available:
        wanted = config.structure.get(candidate.module, {})
        if candidate.kind in wanted and candidate.slot < wanted[candidate.kind]:
            chosen.append(candidate)
    offered = {(c.module, c.kind) for c in available}
    impossible = [
        f"{path}:{kind}" for path, kinds in config.structure.items() for kind in kinds if (path, kind) not in offered
    ]
    if impossible:
        raise ValueError(
            f"The structure asks for candidates these modules cannot carry: {impossible[:5]}. LoRA needs a linear "
            "layer, LNFit a norm layer, BitFit either."
        )
    return chosen


def _excluded(model: nn.Module, config: S3SearchConfig) -> set[str]:
    excluded = set()
    for path, _ in named_base_modules(model):
        in_saved = any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", path) for m in config.modules_to_save or [])
        if in_saved or matches(config.exclude_modules, path):
            excluded.add(path)
    return excluded


def _kernel_read_modules(model: nn.Module, config: S3SearchConfig) -> set[str]:
    """The modules of a Mamba-type model that peft refuses LoRA on: no S3 candidate is offered there either, since
    the kernels would bypass it too, and a structure holding one would convert to a LoraConfig that peft rejects.
    Naming one explicitly is an error, as in peft."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _MAMBA_MODEL_TYPES:
        return set()
    found = {path for path, _ in named_base_modules(model) if path.rpartition(".")[2] in _MAMBA_KERNEL_MODULES}
    for field_name in ("target_modules", "norm_modules", "adapter_modules"):
        named = [path for path in sorted(found) if matches(getattr(config, field_name), path)]
        if named:
            raise ValueError(
                f"{named[:4]} cannot be adapted on a {model_type!r} model: its CUDA kernels read the weights of "
                f"{sorted(_MAMBA_KERNEL_MODULES)} directly, bypassing any adapter layer, and peft refuses LoRA there "
                f"for that reason. Leave them out of {field_name} (or of the structure); in_proj can be adapted."
            )
    return found


def _check_patterns_match(
    config: S3SearchConfig, named: Iterable[tuple[str, nn.Module]], expert_parameters: list[tuple[str, nn.Module]]
) -> None:
    """Each pattern field matches something it can act on; target_modules may also name fused expert parameters."""
    named = list(named)
    checks = (
        ("target_modules", config.target_modules, is_linear, "linear module"),
        ("norm_modules", config.norm_modules, is_norm, "normalisation module"),
        ("adapter_modules", config.adapter_modules, lambda module: True, "module"),
    )
    for field_name, patterns, accepts, what in checks:
        if patterns is None:
            continue
        if any(accepts(module) and matches(patterns, path) for path, module in named):
            continue
        if field_name == "target_modules" and any(matches(patterns, path) for path, _ in expert_parameters):
            continue
        examples = sorted({path.rsplit(".", 1)[-1] for path, module in named if accepts(module)})[:12]
        raise ValueError(
            f"{field_name}={patterns!r} matches no {what} of this model. Names of {what}s here include: {examples}."
            + string_pattern_hint(patterns)
        )


def signature(candidates: Sequence[Candidate]) -> str:
    """Digest of the candidate list; equal digests mean alphas can be loaded one-to-one."""
    digest = hashlib.sha256()
    for candidate in candidates:
        digest.update(f"{candidate.name}={candidate.num_params};".encode())
    return f"{len(candidates)}:{digest.hexdigest()[:16]}"
