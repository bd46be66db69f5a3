"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for S3 searches and for retraining their structures.

The structural parameters alpha stay outside the sharding: every process holds all of them, their gradient comes from
the passes through the sharded model and is averaged across processes explicitly, as in a DDP search. The candidates'
weights delta and the base weights are sharded; their gradients arrive as DTensor shards that FSDP's reduce-scatter
has already averaged, so quantities over all of delta (norms) are reduced over the shards.

Two ways reach FSDP2:

- On GPUs, accelerate's FSDP2 (`TrainingArguments(fsdp=True, fsdp_config={"version": 2})` or an `accelerate launch`
  FSDP config with `fsdp_version: 2`): `S3SearchTrainer` adds alpha to the plugin's `ignored_modules` before
  accelerate shards the model.
- Anywhere, CPU with gloo included: `shard_model(model)` before the Trainer is created. accelerate runs FSDP only on
  accelerators: on a CPU it ignores both settings above and runs DDP instead, without a warning.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Optional

import torch
from accelerate.utils import reduce
from peft import get_peft_model_state_dict
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from .tuner.search_space import find_blocks

if TYPE_CHECKING:
    from transformers import Trainer

# The attribute behind transformers' `PreTrainedModel.is_distributed_loading_by_transformers`: a model carrying it
# "owns its placement and gradient reduction", so the Trainer neither moves it nor wraps it in DDP.
_SHARDED_BY_USER = "_is_distributed_loading_by_transformers"


def _transformers_model(model: nn.Module) -> nn.Module:
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _alpha_parameters(model: nn.Module) -> set[nn.Parameter]:
    tuner = getattr(model, "base_model", None)
    alphas = getattr(tuner, "s3_alpha", None)
    return set(alphas.parameters()) if alphas is not None else set()


def shard_model(model: nn.Module, mesh: Optional[Any] = None, **fully_shard_kwargs: Any) -> nn.Module:
    """Shard `model` (a PeftModel with S3 adapters, searching or retraining) with FSDP2, alpha left replicated.

    Every transformer block becomes its own FSDP unit and the model the root unit, as accelerate's FSDP2 does; the
    S3 structural parameters are `ignored_params`. The model is also marked as sharded before the Trainer (the flag
    transformers sets on models sharded at load time), so that `Trainer` and `S3SearchTrainer` neither move it nor
    wrap it in DDP. Call it after `torch.distributed.init_process_group` (torchrun sets up the environment) and
    before creating the Trainer; `mesh` and `fully_shard_kwargs` go to `fully_shard` (default: all processes).
    Returns the model, sharded in place.
    """
    if isinstance(model, FSDPModule):
        raise ValueError(f"{type(model).__name__} is already sharded with fully_shard; shard a model once.")
    if "ignored_params" in fully_shard_kwargs:
        raise ValueError(
            "shard_model sets ignored_params itself (the S3 structural parameters); pass the other fully_shard "
            f"arguments only, got ignored_params={fully_shard_kwargs['ignored_params']!r}."
        )
    base = _transformers_model(model)
    kwargs = {"mesh": mesh, "ignored_params": _alpha_parameters(model), **fully_shard_kwargs}
    for path in find_blocks(base):
        fully_shard(base.get_submodule(path), **kwargs)
    fully_shard(model, **kwargs)
    setattr(base, _SHARDED_BY_USER, True)
    return model


def is_fsdp2_sharded(model: nn.Module) -> bool:
    return any(isinstance(module, FSDPModule) for module in model.modules())


def check_sharded_search(trainer: Trainer) -> None:
    """Refuse the distributed setups a search cannot run under, each with its reason; let FSDP2 through.

    Called once the Trainer (and its accelerator) exists.
    """
    if trainer.is_deepspeed_enabled:
        raise ValueError(
            "S3SearchTrainer does not run under DeepSpeed: its engine owns the backward pass and (with ZeRO) "
            "partitions the gradients, while the search backpropagates its alpha passes outside the engine and reads "
            "the .grad of alpha and of every delta. Search with FSDP2 (fsdp_config={'version': 2}) or DDP; the "
            "resolved structure retrains under DeepSpeed like any peft adapter."
        )
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if trainer.is_fsdp_enabled and plugin.fsdp_version != 2:
        raise ValueError(
            f"S3SearchTrainer runs under FSDP2 only, got fsdp_version={plugin.fsdp_version}: FSDP1 flattens the "
            "parameters of each unit into one tensor, alpha included, so alpha could not stay replicated. Set "
            "fsdp_config={'version': 2} (or fsdp_version: 2 in the accelerate config)."
        )
    model = trainer.model
    if model is not None and trainer.args.fsdp and not trainer.is_fsdp_enabled and not is_fsdp2_sharded(model):
        raise ValueError(
            f"fsdp={trainer.args.fsdp!r} was set, but accelerate did not enable FSDP: it shards only on accelerators "
            f"(here {trainer.accelerator.distributed_type}) and would run this search as DDP instead. On a CPU, shard "
            "the model yourself with peft_s3.distributed.shard_model(model) before creating the trainer, and drop "
            "fsdp from the TrainingArguments."
        )
    if model is not None and not trainer.is_fsdp_enabled and is_fsdp2_sharded(model):
        _check_user_sharding(model)
        # Trainer must not wrap a sharded model in DDP; this is transformers' own path for such a model.
        trainer.is_distributed_loading_by_transformers = True


def _check_user_sharding(model: nn.Module) -> None:
    if not isinstance(model, FSDPModule):
        raise ValueError(
            f"Only submodules of this {type(model).__name__} are sharded with fully_shard; the model itself must be "
            "the root FSDP unit too, or the gradients of its unsharded parameters are never averaged. Use "
            "peft_s3.distributed.shard_model(model)."
        )
    alphas = _alpha_parameters(model)
    sharded_alpha = [name for name, p in model.named_parameters() if isinstance(p, DTensor) and p in alphas]
    if sharded_alpha:
        raise ValueError(
            f"The structural parameters {sharded_alpha} are sharded; they must stay replicated. Pass "
            "ignored_params=set(model.base_model.s3_alpha.parameters()) to every fully_shard call, or use "
            "peft_s3.distributed.shard_model(model)."
        )
    replicated = [
        name
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and not isinstance(parameter, DTensor) and parameter not in alphas
    ]
    if replicated:
        raise ValueError(
            f"The trainable parameters {replicated[:3]} ({len(replicated)} in all) are outside the FSDP sharding, so "
            "nothing would average their gradients across processes. Leave only the S3 structural parameters out "
            "of fully_shard (peft_s3.distributed.shard_model does)."
        )


def keep_alpha_out_of_ddp(model: nn.Module, alpha: nn.Parameter) -> list[str]:
    """Makes DDP ignore alpha (its gradient comes from passes outside the DDP wrapper and is averaged explicitly, and
    it takes no part in the delta backward); returns its parameter names."""
    names = [name for name, p in model.named_parameters() if p is alpha]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


def keep_alpha_out_of_accelerate_fsdp(trainer: Trainer, alphas: nn.Module) -> None:
    """Under accelerate's FSDP2, add the structural parameters' module to the modules `fully_shard` ignores.

    Must run before `accelerator.prepare` shards the model (for FSDP2 the Trainer creates the optimizer first).
    """
    if not trainer.is_fsdp_enabled:
        return
    plugin = trainer.accelerator.state.fsdp_plugin
    ignored = plugin.ignored_modules
    if isinstance(ignored, str):
        ignored = [module for name, module in trainer.model.named_modules() if re.fullmatch(ignored, name)]
    ignored = list(ignored or [])
    if not any(module is alphas for module in ignored):
        plugin.ignored_modules = [*ignored, alphas]


def gathered_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` of a PeftModel sharded with `shard_model`, with the tensors peft saves (the adapters')
    gathered whole and the base weights left sharded: pass it to `model.save_pretrained(..., state_dict=...)`.

    A collective: call it on every process (and `save_pretrained` with `is_main_process` set on the main one).
    """
    state = model.state_dict()
    saved = set()
    for adapter_name in model.peft_config:
        selected = get_peft_model_state_dict(model, state_dict=state, adapter_name=adapter_name)
        saved |= {id(tensor) for tensor in selected.values()}
    # The same key order on every process, so the gathers pair up.
    return {
        key: value.full_tensor() if isinstance(value, DTensor) and id(value) in saved else value
        for key, value in state.items()
    }


def mean_across_processes(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients averaged over data-parallel processes: DTensor shards (FSDP's reduce-scatter has averaged them) as
    they are, plain tensors in one collective (a no-op copy in a single process)."""
    plain = [index for index, tensor in enumerate(tensors) if not isinstance(tensor, DTensor)]
    result = list(tensors)
    if plain:
        flat = reduce(torch.cat([tensors[index].reshape(-1) for index in plain]), reduction="mean")
        for index, chunk in zip(plain, flat.split([tensors[index].numel() for index in plain]), strict=True):
            result[index] = chunk.view_as(tensors[index])
    return result


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all `tensors` together, as a plain tensor; a DTensor counts with all its shards."""
    norms = [torch.linalg.vector_norm(tensor) for tensor in tensors if not isinstance(tensor, DTensor)]
    sharded = [tensor for tensor in tensors if isinstance(tensor, DTensor)]
    if sharded:
        # Partial sums of squares on each process add up locally; one collective settles them all.
        squares = sum((tensor.float().pow(2).sum() for tensor in sharded[1:]), sharded[0].float().pow(2).sum())
        norms.append(squares.full_tensor().sqrt())
    return torch.linalg.vector_norm(torch.stack(norms))
