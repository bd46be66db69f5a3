"""How `apply_structure` initialises a searched structure for retraining, besides the paper's fresh start.

- "eva" (data-driven, the idea of EVA, "Explained Variance Adaptation"): every LoRA A of a module starts as the top
  principal directions of that module's input activations over a few batches, at the rank the structure gives the
  module; a low-rank adapter's down-projection likewise from the module's output, which is what it reads. B and the
  adapter's up-projection stay zero, so the first forward pass is the base model's.
- "inherit" (weight inheritance): every selected candidate starts from the weights the search trained for it.

The fresh initialisation lives in the layers (`peft_s3.tuner.layer`); both functions here overwrite it on a model that
`apply_structure` has just built.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from itertools import chain, islice
from typing import TYPE_CHECKING, Any, Optional

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from peft.utils.incremental_pca import IncrementalPCA
from torch import nn

from .tuner.layer import S3Experts, S3Layer
from .tuner.model import S3Model
from .tuner.search_space import expert_parameter_owners

if TYPE_CHECKING:
    from .structure import SearchedStructure


@dataclass
class EvaInitConfig:
    """Options of `apply_structure(..., init="eva")`: which activations its principal directions come from.

    The fields are those of peft's `EvaConfig` that apply when the structure fixes every rank (peft's `rho` and
    `adjust_scaling_factors` redistribute ranks), with a fixed number of batches instead of peft's convergence test.
    """

    num_batches: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "Batches of init_dataloader whose activations are collected (the first ones); None takes every batch "
                "of one pass. A few batches of a few thousand tokens usually suffice."
            )
        },
    )
    use_label_mask: bool = field(
        default=True,
        metadata={
            "help": (
                "As in peft: leave out the positions whose per-token labels equal label_mask_value (prompt and "
                "padding tokens of causal LM batches). Labels of another shape than input_ids (one per sequence) are "
                "ignored."
            )
        },
    )
    label_mask_value: int = field(default=-100, metadata={"help": "The label of positions to leave out."})
    whiten: bool = field(
        default=False,
        metadata={"help": "As in peft: divide each direction by the square root of its singular value."},
    )

    def __post_init__(self) -> None:
        if self.num_batches is not None and (
            isinstance(self.num_batches, bool) or not isinstance(self.num_batches, int) or self.num_batches < 1
        ):
            raise ValueError(f"num_batches={self.num_batches!r} is not allowed: it must be None or an int >= 1.")


# --------------------------------------------------------------------------------------------------- data-driven


# Directions an incremental PCA keeps beyond the rank it is asked for (see _Collector.group).
PCA_OVERSAMPLING = 8


@dataclass
class _Stream:
    """Activations of an adapter layer's base module whose top `rank` principal directions start a down-projection."""

    path: str
    layer: BaseTunerLayer
    side: str
    """'input' (LoRA A reads the module's input) or 'output' (the adapter reads the module's output)."""
    rank: int
    width: int


def check_eva_applies(base_model: nn.Module, structure: SearchedStructure) -> None:
    """Refuse init='eva' for LoRA slices on fused expert weights, before the base is wrapped."""
    owners = expert_parameter_owners(base_model)
    experts = sorted({c.module for c in structure.candidates if c.kind == "lora" and c.module in owners})
    if experts:
        raise ValueError(
            f"init='eva' cannot initialise the LoRA slices on fused expert weights {experts[:3]}: each expert reads "
            "only the tokens routed to it, so there is no single input whose directions would start them. Use "
            "init='fresh' or init='inherit', or a structure without them."
        )


def _s3_targets(tuner: S3Model, adapter_name: str) -> list[tuple[_Stream, nn.Parameter]]:
    """The down-projections of `adapter_name` that EVA initialises (LoRA A, adapter down), with their streams."""
    targets = []
    for path, layer in tuner.model.named_modules():
        if not isinstance(layer, S3Layer):
            continue
        for side, parameters in (("input", layer.s3_lora_A), ("output", layer.s3_adapter_down)):
            if adapter_name in parameters:
                parameter = parameters[adapter_name]
                targets.append((_Stream(path, layer, side, *parameter.shape), parameter))
    return targets


def _first_tensor(value: Any) -> Optional[torch.Tensor]:
    # A module's input is a tuple of arguments; a block's output may be (hidden_states, attention_weights, ...).
    if isinstance(value, (tuple, list)):
        value = value[0] if value else None
    return value if isinstance(value, torch.Tensor) else None


def _token_mask(batch: Mapping[str, Any], config: EvaInitConfig) -> Optional[torch.Tensor]:
    """The (batch, sequence) positions to learn from, as peft's `prepare_model_inputs_fn_language_modeling`."""
    ids, attention = batch.get("input_ids"), batch.get("attention_mask")
    reference = attention if isinstance(attention, torch.Tensor) else ids
    if not isinstance(reference, torch.Tensor) or reference.dim() != 2:
        return None
    mask = attention.bool() if isinstance(attention, torch.Tensor) else torch.ones_like(ids, dtype=torch.bool)
    labels = batch.get("labels")
    if config.use_label_mask and isinstance(labels, torch.Tensor) and labels.shape == mask.shape:
        mask = mask & (labels != config.label_mask_value)
    return mask


def _rows(activation: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    # Only activations laid out as (batch, sequence, features) can be masked by position; others (an encoder-decoder's
    # decoder of another length, flattened tokens) contribute every row.
    if mask is not None and activation.shape[:-1] == mask.shape:
        return activation[mask]
    return activation.reshape(-1, activation.shape[-1])


def _on_device(batch: Any, device: torch.device) -> dict[str, Any]:
    if not isinstance(batch, Mapping):
        raise ValueError(
            "EVA needs dataloader batches that are mappings of model inputs (model(**batch)), such as a DataLoader "
            f"with a data collator yields; got a {type(batch).__name__}."
        )
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


class _Collector:
    """Forward hooks that feed the activations of every stream into an incremental PCA, one per distinct tensor.

    Modules that read the very same tensor (query, key and value read one hidden state) share one PCA at the largest
    of their ranks, as peft's EVA does for equal inputs; `group` finds them on a first forward pass.
    """

    def __init__(self, streams: list[_Stream]) -> None:
        self.streams = streams
        self.owner: dict[int, int] = {}
        self.pca: dict[int, IncrementalPCA] = {}

    def _hooks(self, record: Any) -> list[torch.utils.hooks.RemovableHandle]:
        handles = []
        for index, stream in enumerate(self.streams):

            def hook(module: nn.Module, args: Any, output: Any, index: int = index, side: str = stream.side) -> None:
                activation = _first_tensor(args if side == "input" else output)
                if activation is not None:
                    record(index, activation)

            handles.append(stream.layer.get_base_layer().register_forward_hook(hook))
        return handles

    def group(self, run: Any) -> None:
        """Map each stream to the first stream that received the same tensor object during `run()`."""
        first: dict[int, tuple[weakref.ref, int]] = {}

        def record(index: int, activation: torch.Tensor) -> None:
            seen = first.get(id(activation))
            # The weak reference tells a tensor still alive from a new one that reuses a freed tensor's id.
            if seen is not None and seen[0]() is activation:
                self.owner[index] = seen[1]
            else:
                first[id(activation)] = (weakref.ref(activation), index)
                self.owner[index] = index

        self._run(record, run)
        for index in range(len(self.streams)):
            self.owner.setdefault(index, index)
        for owner in sorted(set(self.owner.values())):
            rank = max(stream.rank for i, stream in enumerate(self.streams) if self.owner[i] == owner)
            width = self.streams[owner].width
            # peft's EVA settings (randomised SVD with a fixed seed, in a forked RNG, on float32 activations), but
            # keeping more directions than the rank between batches: an incremental PCA truncated at the rank itself
            # drifts from the top directions when the leading singular values are close.
            self.pca[owner] = IncrementalPCA(
                n_components=min(width, rank + PCA_OVERSAMPLING), copy=True, lowrank=True, lowrank_seed=42
            )

    def fit(self, run: Any, mask: Optional[torch.Tensor]) -> None:
        """Update each stream's PCA with the positions `mask` selects of what it receives during `run()`."""

        def record(index: int, activation: torch.Tensor) -> None:
            if index not in self.pca:
                return
            rows = _rows(activation.detach(), mask).to(torch.float32)
            # As peft: a batch with fewer rows than components cannot update the PCA and is skipped.
            if rows.shape[0] >= self.pca[index].n_components:
                self.pca[index].partial_fit(rows)

        self._run(record, run)

    def _run(self, record: Any, run: Any) -> None:
        handles = self._hooks(record)
        try:
            run()
        finally:
            for handle in handles:
                handle.remove()


@torch.no_grad()
def _principal_directions(
    model: PeftModel, streams: list[_Stream], dataloader: Iterable, config: EvaInitConfig
) -> list[torch.Tensor]:
    """Per stream, its top `rank` principal directions (rows) over the first `config.num_batches` batches of
    `dataloader`, as the base model computes them (adapters disabled, eval mode)."""
    if not streams:
        return []
    collector = _Collector(streams)
    device = next(model.parameters()).device
    # One pass over the batches, each on the device only while it runs; the first also finds the shared inputs.
    batches = islice(dataloader, config.num_batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("EVA got an empty dataloader: it needs at least one batch of model inputs.")
    first = _on_device(first, device)
    seen = 0
    training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            collector.group(partial(model, **first))
            for batch in chain([first], batches):
                batch = _on_device(batch, device)
                collector.fit(partial(model, **batch), _token_mask(batch, config))
                seen += 1
    finally:
        model.train(training)
    directions = []
    for index, stream in enumerate(streams):
        pca = collector.pca[collector.owner[index]]
        if not hasattr(pca, "components_"):
            raise ValueError(
                f"EVA: the {stream.side} of {stream.path} got no batch with at least {pca.n_components} usable token "
                f"positions (its rank {stream.rank} plus up to {PCA_OVERSAMPLING} directions kept for accuracy) in "
                f"{seen} batches, or the module never ran. Pass longer batches."
            )
        values = pca.components_[: stream.rank]
        if config.whiten:
            values = values / pca.singular_values_[: stream.rank].sqrt().reshape(-1, 1)
        directions.append(values)
    return directions


@torch.no_grad()
def eva_initialise(model: PeftModel, adapter_name: str, dataloader: Iterable, config: EvaInitConfig) -> None:
    """Set every LoRA A and adapter down-projection of the S3 adapter `adapter_name` to the top principal directions
    of what it reads. BitFit and LNFit deltas, LoRA B and adapter up-projections keep their fresh (zero) start."""
    targets = _s3_targets(model.base_model, adapter_name)
    directions = _principal_directions(model, [stream for stream, _ in targets], dataloader, config)
    for (_, parameter), values in zip(targets, directions, strict=True):
        parameter.copy_(values.to(parameter.dtype))


def lora_eva_state_dict(
    model: PeftModel, dataloader: Iterable, config: Optional[EvaInitConfig] = None, adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """EVA's A for every LoRA layer of a peft LoRA model at the layer's own rank, computed as `apply_structure`'s
    init='eva' does, for `peft.tuners.lora.initialize_lora_eva_weights(model, eva_state_dict=...)`.

    For a structure converted with `to_lora_config(init_lora_weights="eva")`: peft's own computation, even at
    rho=1, gives modules that read the same input (query, key and value) the largest rank among them and takes
    that rank from other modules, so the structure's ranks change; with this state dict they stay.
    """
    streams = [
        _Stream(name, module, "input", module.r[adapter_name], module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A
    ]
    directions = _principal_directions(model, streams, dataloader, config or EvaInitConfig())
    return {stream.path: values for stream, values in zip(streams, directions, strict=True)}


# --------------------------------------------------------------------------------------------------- inheritance


def _search_tuner(search_model: Any) -> tuple[S3Model, str]:
    tuner = search_model.base_model if isinstance(search_model, PeftModel) else search_model
    if not isinstance(tuner, S3Model):
        raise ValueError(
            f"init='inherit' needs init_from= the PeftModel (or S3Model) of the S3 search the structure was resolved "
            f"from; got a {type(search_model).__name__}."
        )
    return tuner, tuner.active_adapters[0]


def _layer_path(module: str, owners: dict[str, str]) -> str:
    return owners.get(module, module)


def check_inheritable(base_model: nn.Module, structure: SearchedStructure, search_model: Any) -> None:
    """Refuse init='inherit' before the base is wrapped: the search must hold every selected candidate, trained on
    the same base weights as `base_model`'s."""
    tuner, search_adapter = _search_tuner(search_model)
    signature = tuner.peft_config[search_adapter].search_space_signature
    if structure.search_space_signature is not None and signature != structure.search_space_signature:
        raise ValueError(
            f"init_from's adapter {search_adapter!r} has the search space {signature}, but the structure was resolved "
            f"from the search space {structure.search_space_signature}: pass the search model it was resolved from."
        )
    held = {(c.module, c.kind, c.slot): c.num_params for c in tuner.candidates(search_adapter)}
    missing = [c.name for c in structure.candidates if held.get((c.module, c.kind, c.slot)) != c.num_params]
    if missing:
        raise ValueError(
            f"init_from's adapter {search_adapter!r} does not hold {len(missing)} selected candidates of the "
            f"structure (with their sizes), e.g. {missing[:3]}: pass the search model the structure was resolved from."
        )
    owners = expert_parameter_owners(base_model)
    for path in sorted({_layer_path(c.module, owners) for c in structure.candidates}):
        searched = tuner.model.get_submodule(path).get_base_layer().state_dict()
        try:
            fresh = base_model.get_submodule(path).state_dict()
        except AttributeError:
            fresh = {}
        differing = [
            name
            for name, value in fresh.items()
            if value.is_floating_point()
            and (name not in searched or not torch.equal(searched[name].to(value.device, value.dtype), value))
        ]
        if set(fresh) != set(searched) or differing:
            raise ValueError(
                f"The base model differs from the search's at {path!r} ({differing[:2] or 'other parameters'}): "
                "inherited deltas were trained for the search's base weights. Pass the base the search ran on (the "
                "same checkpoint, loaded afresh)."
            )


def _candidate_tensors(
    layer: S3Layer, adapter: str, module: str, kind: str
) -> list[tuple[torch.Tensor, Optional[int]]]:
    """The tensors holding `layer`'s candidates of `kind` on `module`, each with the dimension indexed by LoRA slot
    (None for the kinds that have one candidate per module)."""
    if kind == "lora" and isinstance(layer, S3Experts) and adapter in layer.s3_expert_A:
        parameter = module.rpartition(".")[2]
        if parameter in layer.s3_expert_A[adapter]:
            return [(layer.s3_expert_A[adapter][parameter], 1), (layer.s3_expert_B[adapter][parameter], 2)]
    if kind == "lora":
        return [(layer.s3_lora_A[adapter], 0), (layer.s3_lora_B[adapter], 1)]
    if kind == "adapter":
        return [(layer.s3_adapter_down[adapter], None), (layer.s3_adapter_up[adapter], None)]
    return [(layer.s3_bias[adapter] if kind == "bitfit" else layer.s3_scale[adapter], None)]


@torch.no_grad()
def inherit_weights(model: PeftModel, adapter_name: str, structure: SearchedStructure, search_model: Any) -> None:
    """Copy the search's trained weights of every selected candidate into `adapter_name`, and the search's trained
    copies of modules_to_save (a classification head) where the search has them.

    A module's LoRA slots keep their order: the structure's slot j on a module is the j-th selected search slot.
    """
    tuner, search_adapter = _search_tuner(search_model)
    owners = expert_parameter_owners(tuner.model)
    slots: dict[tuple[str, str], list[int]] = {}
    for candidate in structure.candidates:
        slots.setdefault((candidate.module, candidate.kind), []).append(candidate.slot)
    for (module, kind), chosen in slots.items():
        path = _layer_path(module, owners)
        targets = _candidate_tensors(model.base_model.model.get_submodule(path), adapter_name, module, kind)
        sources = _candidate_tensors(tuner.model.get_submodule(path), search_adapter, module, kind)
        for (target, dim), (source, _) in zip(targets, sources, strict=True):
            if dim is not None:
                source = source.index_select(dim, torch.tensor(sorted(chosen), device=source.device))
            target.copy_(source.to(target.device, target.dtype))
    for path, wrapper in model.base_model.model.named_modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        searched = tuner.model.get_submodule(path)
        if isinstance(searched, ModulesToSaveWrapper) and search_adapter in searched.modules_to_save:
            wrapper.modules_to_save[adapter_name].load_state_dict(
                searched.modules_to_save[search_adapter].state_dict()
            )
