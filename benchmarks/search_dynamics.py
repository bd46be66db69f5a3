"""How decided a search ends on real data: the README main command's search under several search settings.

Search only (no retraining): all-MiniLM-L6-v2 on `vader_movies` (1,000 training rows halved into D_delta / D_alpha,
2 epochs = 64 steps of batch 16, delta lr 5e-3, budget 2e-4 of the backbone), as `examples/search_and_retrain.py`
runs it. Per variant it reports the decided mass (share of the budget that the resolved candidates hold, weighted by
their p), the resolved structure's composition and the search's wall seconds.

    HF_HUB_OFFLINE=1 python benchmarks/search_dynamics.py --variant defaults='{}' \\
        --variant paper='{"alpha_learning_rate": 0.1, "bilevel": "first_order", "annealing": null,
                          "config": {"tau": 1.0}}' --output benchmarks/results/search_dynamics.json

A variant is a JSON object of `S3SearchTrainer` keyword arguments, plus `config` (S3SearchConfig fields) and `epochs`
(the search's length, default 2 as in the main command; `examples/search_and_retrain.py --search-epochs`). Every run
is appended to --output (with the command line), so --resume skips (variant, seed) runs already there.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging as transformers_logging

import peft_s3
from peft_s3.data import minilm_path
from peft_s3.recipes import TrainingRecipe, load_classification_task, search_structure


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    name, _, options = text.partition("=")
    if not name or not options:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: use NAME=JSON")
    return name, json.loads(options)


def run_variant(name: str, options: dict[str, Any], seed: int, scratch: Path) -> dict[str, Any]:
    options = dict(options)
    task = load_classification_task("vader_movies", minilm_path(), seed, 1000, 500, 64)
    recipe = TrainingRecipe(options.pop("epochs", 2.0), 16, 5e-3, seed, disable_tqdm=True, logging_steps=16)
    config = peft_s3.S3SearchConfig(budget=2e-4, task_type="SEQ_CLS", **options.pop("config", {}))
    _, structure, stats = search_structure(task, config, recipe, scratch, **options)
    return {
        "variant": name,
        "seed": seed,
        "seconds": stats["search_seconds"],
        "decided_mass": stats["decided_mass"],
        "params": structure.num_trainable_params,
        "budget": structure.budget,
        "composition": dict(Counter(candidate.kind for candidate in structure.candidates)),
        "candidates": [candidate.name for candidate in structure.candidates],
        "p": [round(candidate.p, 3) for candidate in structure.candidates],
    }


def table(runs: list[dict[str, Any]]) -> str:
    lines = ["| variant | seed | decided mass | params / budget | composition | p of the selected | search s |"]
    lines.append("|---|---:|---:|---|---|---|---:|")
    for run in runs:
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(run["composition"].items()))
        p = " ".join(f"{value:.2f}" for value in run["p"])
        lines.append(
            f"| {run['variant']} | {run['seed']} | {run['decided_mass']:.3f} | {run['params']:,} / {run['budget']:,} "
            f"| {kinds} | {p} | {run['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", type=parse_variant, action="append", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/search_dynamics.json"))
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    data = json.loads(args.output.read_text()) if args.output.is_file() else {"commands": [], "runs": []}
    if data["runs"] and not args.resume:
        parser.error(f"{args.output} exists: pass --resume to add runs to it")
    data["commands"].append(shlex.join(["python", *sys.argv]))
    done = {(run["variant"], run["seed"]) for run in data["runs"]}
    transformers_logging.set_verbosity_error()
    torch.set_num_threads(1)
    for seed in args.seeds:
        for name, options in args.variant:
            if (name, seed) in done:
                continue
            with tempfile.TemporaryDirectory() as scratch:
                data["runs"].append(run_variant(name, options, seed, Path(scratch)))
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(data, indent=1))
            print(table(data["runs"][-1:]).splitlines()[-1], flush=True)
    print(table(data["runs"]))


if __name__ == "__main__":
    main()
