"""S3 structure searches on a tiny BERT, run alone or under `accelerate launch`; used by test_accelerate.py.

    python tests/_accelerate_search.py OUTPUT_JSON
    accelerate launch --multi_gpu --num_processes 2 tests/_accelerate_search.py OUTPUT_JSON

Every run uses the same global batch (GLOBAL_BATCH_SIZE, split evenly over the processes), seed and data, so a
data-parallel search should reproduce the single-process one. For each bi-level mode, the main process writes the
searched alphas, the gate probabilities and the resolved structure to OUTPUT_JSON.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from test_trainer import MarkerTask, alpha_of, arguments, search_model

import peft_s3
from peft_s3.trainer import BILEVEL_MODES

GLOBAL_BATCH_SIZE = 8
NUM_STEPS = 6


def search(bilevel: str, output_dir: str) -> tuple[peft_s3.S3SearchTrainer, dict[str, Any]]:
    args = arguments(
        Path(output_dir),
        max_steps=NUM_STEPS,
        ddp_find_unused_parameters=False,
        # transformers multiplies the training loss by the number of processes when the model's forward takes
        # **kwargs, assuming it normalised the loss by the global token count, which a classification head does not;
        # the delta gradients would then grow with the number of processes.
        average_tokens_across_devices=False,
    )
    if GLOBAL_BATCH_SIZE % args.world_size:
        raise ValueError(f"{args.world_size} processes cannot split a global batch of {GLOBAL_BATCH_SIZE} evenly.")
    args.per_device_train_batch_size = GLOBAL_BATCH_SIZE // args.world_size
    model = search_model(init_weights=False)
    trainer = peft_s3.S3SearchTrainer(model=model, args=args, train_dataset=MarkerTask(96), bilevel=bilevel)
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
    }
    return trainer, result


def main(output_file: str) -> None:
    torch.set_num_threads(1)
    results = {}
    for bilevel in BILEVEL_MODES:
        with tempfile.TemporaryDirectory() as output_dir:
            trainer, results[bilevel] = search(bilevel, output_dir)
    if trainer.is_world_process_zero():
        Path(output_file).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
