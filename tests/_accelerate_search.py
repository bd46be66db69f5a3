"""S3 structure searches on a tiny BERT, run alone, under `accelerate launch` (DDP) or sharded with FSDP2 (torchrun);
used by test_accelerate.py.

    python tests/_accelerate_search.py OUTPUT_JSON
    accelerate launch --multi_gpu --num_processes 2 tests/_accelerate_search.py OUTPUT_JSON
    torchrun --nproc_per_node 2 tests/_accelerate_search.py OUTPUT_JSON --fsdp2
    torchrun --nproc_per_node 2 tests/_accelerate_search.py OUTPUT_JSON --accelerate-fsdp2

Every run uses the same global batch (GLOBAL_BATCH_SIZE, split evenly over the processes), seed and data, so a
data-parallel search should reproduce the single-process one. For each search in SEARCHES, the main process writes the
searched alphas, the gate probabilities and the resolved structure to OUTPUT_JSON, whether the saved adapter reloads
exactly, and the losses of a few plain-`Trainer` steps retraining the resolved structure. With --fsdp2 both models
are sharded with `peft_s3.distributed.shard_model`, and the file also holds every process's share of the base
weights and the errors of the FSDP setups the search refuses. With --accelerate-fsdp2 accelerate shards them
(TrainingArguments(fsdp=True, fsdp_config={"version": 2})), its GPU-only path opened to the CPU.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import peft
import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType
from conftest import TINY_MODELS
from test_trainer import MarkerTask, alpha_of, arguments, search_model
from torch import distributed
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import Trainer, TrainingArguments

import peft_s3
from peft_s3.distributed import shard_model

# (name, S3SearchTrainer keyword arguments): first order and both finite differences of second order.
SEARCHES = (
    ("first_order", {"bilevel": "first_order"}),
    ("second_order", {"bilevel": "second_order", "finite_difference": "central"}),
    ("second_order_forward", {"bilevel": "second_order", "finite_difference": "forward"}),
)
GLOBAL_BATCH_SIZE = 8
NUM_STEPS = 6
NUM_RETRAIN_STEPS = 3


def _arguments(output_dir: str, max_steps: int, sharding: str) -> TrainingArguments:
    accelerate_fsdp2 = {"fsdp": True, "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]}}
    args = arguments(
        Path(output_dir),
        max_steps=max_steps,
        **(accelerate_fsdp2 if sharding == "accelerate-fsdp2" else {}),
        ddp_find_unused_parameters=False,
        # transformers multiplies the training loss by the number of processes when the model's forward takes
        # **kwargs, assuming it normalised the loss by the global token count, which a classification head does not;
        # the delta gradients would then grow with the number of processes.
        average_tokens_across_devices=False,
    )
    if GLOBAL_BATCH_SIZE % args.world_size:
        raise ValueError(f"{args.world_size} processes cannot split a global batch of {GLOBAL_BATCH_SIZE} evenly.")
    args.per_device_train_batch_size = GLOBAL_BATCH_SIZE // args.world_size
    if sharding == "accelerate-fsdp2":
        # accelerate enables FSDP only on accelerators (GPUs): claiming one here lets its real FSDP2 preparation
        # (fully_shard with the plugin's ignored_modules) run on the CPU with gloo.
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    return args


def _base_weight_shares(model: torch.nn.Module) -> list[list[int]]:
    """Per process: the elements of the frozen base weights it holds, and of all of them (DTensor shards count
    locally)."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in frozen)
    share = [local, sum(p.numel() for p in frozen)]
    if not distributed.is_initialized():
        return [share]
    shares = [None] * distributed.get_world_size()
    distributed.all_gather_object(shares, share)
    return shares


def _reloads_exactly(model: torch.nn.Module, adapter_dir: str) -> bool:
    """Whether the adapter saved to `adapter_dir`, loaded on a fresh base, holds the trained deltas and alphas."""
    trained = {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach()
        for name, p in model.named_parameters()
        if p.requires_grad
    }
    loaded = dict(peft.PeftModel.from_pretrained(TINY_MODELS["bert"](), adapter_dir).named_parameters())
    return trained.keys() <= loaded.keys() and all(torch.equal(loaded[name], p) for name, p in trained.items())


def search(
    search_kwargs: dict[str, str], output_dir: str, sharding: str
) -> tuple[peft_s3.S3SearchTrainer, dict[str, Any]]:
    args = _arguments(output_dir, NUM_STEPS, sharding)  # sets up the process group under torchrun
    model = search_model(init_weights=False)
    if sharding == "fsdp2":
        shard_model(model)
    trainer = peft_s3.S3SearchTrainer(model=model, args=args, train_dataset=MarkerTask(96), **search_kwargs)
    trainer.train()
    structure = peft_s3.resolve(model)
    result = {
        "world_size": args.world_size,
        "wrapper": type(trainer.model_wrapped).__name__,
        "alpha": alpha_of(model).detach().tolist(),
        "p": model.base_model.gate_probabilities().tolist(),
        "structure": structure.structure,
        "selected": [candidate.selected for candidate in structure.search_space],
        "resolved_p": [candidate.p for candidate in structure.search_space],
        "alpha_losses": [entry["s3/alpha_loss"] for entry in trainer.state.log_history if "s3/alpha_loss" in entry],
        "base_weight_shares": _base_weight_shares(model),
    }
    # Saving a sharded model gathers the adapter on every process, and the main one writes it.
    trainer.save_model(output_dir)
    trainer.accelerator.wait_for_everyone()
    result["reloads_exactly"] = _reloads_exactly(model, output_dir)
    return trainer, result


def retrain(structure: peft_s3.SearchedStructure, output_dir: str, sharding: str) -> list[float]:
    """Training losses of a few plain-Trainer steps on `structure` applied to a fresh base."""
    model = peft_s3.apply_structure(TINY_MODELS["bert"](), structure)
    if sharding == "fsdp2":
        shard_model(model)
    trainer = Trainer(
        model=model, args=_arguments(output_dir, NUM_RETRAIN_STEPS, sharding), train_dataset=MarkerTask(96)
    )
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def refusals(output_dir: str) -> dict[str, str]:
    """The errors of FSDP setups that the search refuses, by setup."""
    alpha_sharded = search_model()
    fully_shard(alpha_sharded)
    blocks_only = search_model()
    for block in blocks_only.base_model.model.bert.encoder.layer:
        fully_shard(block, ignored_params=set(blocks_only.base_model.s3_alpha.parameters()))
    setups = {
        "fsdp_on_cpu": (search_model(), {"fsdp": True, "fsdp_config": {"version": 2}}),
        "alpha_sharded": (alpha_sharded, {}),
        "root_not_sharded": (blocks_only, {}),
    }
    errors = {}
    for name, (model, kwargs) in setups.items():
        try:
            peft_s3.S3SearchTrainer(
                model=model, args=arguments(Path(output_dir), **kwargs), train_dataset=MarkerTask(16)
            )
        except ValueError as error:
            errors[name] = str(error)
    return errors


def main(output_file: str, sharding: str) -> None:
    torch.set_num_threads(1)
    results = {"searches": {}}
    # Output directories beside OUTPUT_JSON, the same on every process: the main one writes the adapter they load.
    output_dir = Path(output_file).with_suffix("")
    for name, search_kwargs in SEARCHES:
        trainer, results["searches"][name] = search(search_kwargs, str(output_dir / name), sharding)
        results["searches"][name]["retrain_losses"] = retrain(
            peft_s3.resolve(trainer.model), str(output_dir / f"{name}_retrain"), sharding
        )
    if sharding == "fsdp2":
        results["refusals"] = refusals(str(output_dir / "refused"))
    if trainer.is_world_process_zero():
        Path(output_file).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sharding=sys.argv[2].removeprefix("--") if len(sys.argv) > 2 else "none")
