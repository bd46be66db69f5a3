"""Speed benchmark (issues 5 and 12): the cost of S3 structure search next to plain LoRA training, in one process.

Every configuration trains the same backbone on the same batch with the same optimizer step (gradient clipping,
AdamW, learning-rate schedule, as `transformers.Trainer` does), through the code paths a real run takes:

* `lora`: plain peft LoRA, rank `max_rank` on the linear layers the S3 search space has LoRA candidates on (the
  reference; `transformers.Trainer.training_step`).
* `s3_gated`: a gated forward+backward of the S3 search model, i.e. the delta update of an alpha warm-up step
  (`S3SearchTrainer.training_step` with no alpha update).
* `s3_first_order` / `s3_second_order` / `s3_second_order_forward`: a full bi-level optimizer step of
  `S3SearchTrainer` (alpha update on a D_alpha batch, then the delta update); second order with the central finite
  difference of eq. 13 (the default) and with the forward difference.
* `s3_second_order_zero`: second order with a zero correction (`unrolled_learning_rate=0`): second order's step
  order without the virtual step and the Hessian term, so without finite-difference passes.
* `..._k2` / `..._k4` (of `s3_first_order`, `s3_second_order` and `s3_second_order_zero`): alpha updated every 2nd /
  4th step (`alpha_update_interval`), the mean over k consecutive steps.
* `retrain`: training the fixed structure resolved from the search (`peft_s3.apply_structure`).

Besides time, each step configuration reports its model passes per optimizer step, counted with a forward pre-hook
on the backbone over all its steps (a plain LoRA step is one pass; issue 24's target for a default search is 1.5).

After warm-up the configurations are timed interleaved (A B C ... A B C ...), so a change of machine load hits all of
them alike; ratios to `lora` are the median (and quartiles) of the per-round ratios. Peak memory is measured with each
configuration alone in a subprocess: `torch.cuda.max_memory_allocated` on GPU; on CPU the peak resident set size
(VmHWM, reset after the model is built, so construction transients do not count), which is whole-process memory
dominated by the weights, so the growth over the RSS after set-up is reported too. Finally, the budget shift solve
(`solve_zeta`) and `peft_s3.resolve` are timed on search spaces of about 1k, 10k and 100k candidates.

    python benchmarks/speed.py                                        # CPU, all-MiniLM-L6-v2-shaped BERT
    python benchmarks/speed.py --device cuda --model-size large       # Llama-3.2-1B-shaped, bf16
    python benchmarks/speed.py --model-size llama8b_1l --skip zeta llm_spaces   # one Llama-3-8B-wide layer, CPU

Results: benchmarks/results/speed_<device>[_<size>].json and .md. See benchmarks/README.md, section "Speed".
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import peft
import torch
import transformers
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging as transformers_logging

import peft_s3
from peft_s3.structure import SearchedStructure
from peft_s3.tuner.gates import global_probabilities, solve_zeta
from peft_s3.tuner.search_space import build_search_space, signature

# Alpha updated every k-th step (`alpha_update_interval`): a round times k steps, one with alpha.
ALPHA_INTERVALS = {
    f"{name}_k{interval}": interval
    for name in ("s3_first_order", "s3_second_order", "s3_second_order_zero")
    for interval in (2, 4)
}
CONFIGS = (
    "lora",
    "s3_gated",
    "s3_first_order",
    "s3_second_order",
    "s3_second_order_forward",
    "s3_second_order_zero",
    *ALPHA_INTERVALS,
    "retrain",
)
REFERENCE = "lora"
# Issue 12's targets, at every model size.
TIME_TARGETS = {"s3_gated": 1.1, "s3_first_order": 2.1, "s3_second_order": 4.1}
# Issue 24's target for the default search: model passes per optimizer step, per pass of a plain LoRA step.
PASSES_TARGET = 1.5
MEMORY_TARGET = 1.15
MEMORY_TARGET_CONFIGS = ("s3_first_order", "s3_second_order", "s3_second_order_forward")
ZETA_TARGET_MS = 1.0
ZETA_TARGET_CANDIDATES = 10_000
CANDIDATE_COUNTS = (1_000, 10_000, 100_000)
RESULTS_DIR = Path(__file__).parent / "results"


@dataclass(frozen=True)
class ModelSize:
    """A backbone shape: how to build it with random weights, its peft task type, and the default batch shape."""

    description: str
    build: Callable[[int], PreTrainedModel]
    vocab_size: int
    task_type: str
    batch_size: int
    seq_len: int
    dtype: str


def _minilm_bert(vocab_size: int) -> PreTrainedModel:
    # The shape of sentence-transformers/all-MiniLM-L6-v2, with a 2-way classification head.
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def _llama_shaped(
    hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, tied: bool, **config: Any
) -> Callable[[int], PreTrainedModel]:
    def build(vocab_size: int) -> PreTrainedModel:
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab_size,
                hidden_size=hidden,
                intermediate_size=intermediate,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                tie_word_embeddings=tied,
                **config,
            )
        )

    return build


# The cut-down 1B and 8B shapes keep real layer widths but only a few layers, to fit CPU time; their vocabularies are
# cut too, so the LM head (which carries no candidates) keeps about the share of step compute it has in the full
# model (1B: 21 %, 8B: 7 %), instead of dominating a 1- or 4-layer model and flattering the ratios.
MODEL_SIZES = {
    "small": ModelSize(
        "BERT shaped like all-MiniLM-L6-v2 (6 layers, hidden 384)", _minilm_bert, 30522, "SEQ_CLS", 16, 64, "fp32"
    ),
    "smollm2": ModelSize(
        "Llama shaped like SmolLM2-135M (all 30 layers, hidden 576, vocabulary 49,152)",
        _llama_shaped(576, 1536, 30, 9, 3, tied=True),
        49152,
        "CAUSAL_LM",
        4,
        128,
        "fp32",
    ),
    "llama1b_4l": ModelSize(
        "Llama-3.2-1B widths (hidden 2048, MLP 8192, 32/8 heads), 4 of its 16 layers, vocabulary cut to 32,000",
        _llama_shaped(2048, 8192, 4, 32, 8, tied=True),
        32000,
        "CAUSAL_LM",
        2,
        128,
        "fp32",
    ),
    "llama8b_1l": ModelSize(
        "Llama-3-8B widths (hidden 4096, MLP 14336, 32/8 heads), 1 of its 32 layers, vocabulary cut to 4,096",
        _llama_shaped(4096, 14336, 1, 32, 8, tied=False),
        4096,
        "CAUSAL_LM",
        2,
        128,
        "fp32",
    ),
    "large": ModelSize(
        "Llama shaped like Llama-3.2-1B (16 layers, hidden 2048)",
        _llama_shaped(2048, 8192, 16, 32, 8, tied=True, max_position_embeddings=131072, rope_theta=500000.0),
        128256,
        "CAUSAL_LM",
        8,
        512,
        "bf16",
    ),
}


@dataclass(frozen=True)
class Settings:
    model_size: str
    device: str
    dtype: str
    batch_size: int
    seq_len: int
    budget: float
    max_rank: int
    threads: int
    seed: int

    @property
    def size(self) -> ModelSize:
        return MODEL_SIZES[self.model_size]

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "bf16" else torch.float32


# ------------------------------------------------------------------------------------------------ set-up


def build_base(settings: Settings) -> PreTrainedModel:
    """The backbone with random weights, the same on every call, directly on the device in the benchmark dtype."""
    with torch.random.fork_rng(devices=[]), torch.device(settings.device):
        torch.manual_seed(settings.seed)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(settings.torch_dtype)
        try:
            model = settings.size.build(settings.size.vocab_size)
        finally:
            torch.set_default_dtype(default_dtype)
    return model


def make_batch(settings: Settings) -> dict[str, torch.Tensor]:
    """Random tokens (past the special ids) and labels that make the model return its training loss."""
    generator = torch.Generator().manual_seed(settings.seed)
    input_ids = torch.randint(
        1000, settings.size.vocab_size, (settings.batch_size, settings.seq_len), generator=generator
    )
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if settings.size.task_type == "SEQ_CLS":
        batch["labels"] = torch.randint(0, 2, (settings.batch_size,), generator=generator)
    else:
        batch["labels"] = input_ids.clone()
    return batch


class Rows(torch.utils.data.Dataset):
    """The rows of one batch, so that the trainers' own data loaders (D_alpha) serve batches of the same shape."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["input_ids"])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.batch.items()}


def search_config(settings: Settings) -> peft_s3.S3SearchConfig:
    return peft_s3.S3SearchConfig(
        budget=settings.budget, max_rank=settings.max_rank, task_type=settings.size.task_type
    )


def lora_targets(base: nn.Module, settings: Settings) -> list[str]:
    """The modules of the search space that have LoRA candidates: the reference LoRA adapts exactly these."""
    config = peft_s3.S3SearchConfig(budget=settings.budget, candidate_kinds=["lora"])
    return sorted({candidate.module for candidate in build_search_space(base, config)})


def resolved_structure(settings: Settings) -> SearchedStructure:
    """A structure resolved from a search model with random alphas, so that it is spread over the whole model."""
    model = peft.get_peft_model(build_base(settings), search_config(settings))
    alpha = model.base_model.s3_alpha["default"]
    with torch.no_grad():
        alpha.copy_(torch.randn(alpha.shape, generator=torch.Generator().manual_seed(settings.seed)))
    return peft_s3.resolve(model)


def training_arguments(settings: Settings, output_dir: str) -> TrainingArguments:
    return TrainingArguments(
        output_dir,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=1e-4,
        bf16=settings.dtype == "bf16",
        use_cpu=settings.device == "cpu",
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=settings.seed,
    )


def build_trainer(
    name: str, settings: Settings, batch: dict[str, torch.Tensor], output_dir: str, structure: SearchedStructure
) -> Trainer:
    """The model of configuration `name` inside the trainer a real run of it would use."""
    base = build_base(settings)
    args = training_arguments(settings, output_dir)
    rows = Rows(batch)
    if name == "lora":
        config = peft.LoraConfig(
            r=settings.max_rank,
            lora_alpha=8,
            target_modules=lora_targets(base, settings),
            task_type=settings.size.task_type,
        )
        trainer = Trainer(model=peft.get_peft_model(base, config), args=args, train_dataset=rows)
    elif name == "retrain":
        trainer = Trainer(model=peft_s3.apply_structure(base, structure), args=args, train_dataset=rows)
    else:
        trainer = peft_s3.S3SearchTrainer(
            model=peft.get_peft_model(base, search_config(settings)),
            args=args,
            train_dataset=rows,
            search_dataset=rows,
            bilevel="second_order" if name.startswith("s3_second_order") else "first_order",
            finite_difference="forward" if name == "s3_second_order_forward" else "central",
            unrolled_learning_rate=0.0 if name.startswith("s3_second_order_zero") else None,
            # A gated step is the delta update of an alpha warm-up step: no alpha update before the last step.
            alpha_warmup_steps=1_000_000 - 1 if name == "s3_gated" else 0,
            alpha_update_interval=ALPHA_INTERVALS.get(name, 1),
        )
    # Many steps, so that no learning-rate schedule reaches zero while the benchmark runs.
    trainer.create_optimizer_and_scheduler(num_training_steps=1_000_000)
    return trainer


def optimizer_step(trainer: Trainer, batch: dict[str, torch.Tensor]) -> None:
    """One optimizer step as `Trainer`'s training loop runs it, without gradient accumulation."""
    model = trainer.model
    batches, num_items = trainer.get_batch_samples(iter([batch]), 1, trainer.args.device)
    trainer.current_gradient_accumulation_steps = 1
    trainer.training_step(model, batches[0], num_items)
    trainable = [p for p in model.parameters() if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(trainable, trainer.args.max_grad_norm)
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    model.zero_grad(set_to_none=True)
    trainer.state.global_step += 1


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ step time


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def time_steps(
    trainers: dict[str, Trainer], batch: dict[str, torch.Tensor], device: str, warmup: int, rounds: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds per optimizer step of each configuration, measured in interleaved rounds after `warmup` steps, and
    its model passes per optimizer step, counted over the same rounds.

    A round of a configuration that updates alpha every k-th step times k consecutive steps (exactly one of which
    updates alpha) and counts their mean.
    """
    names = list(trainers)
    passes: dict[str, int] = {}
    for name in names:

        def count(module: nn.Module, args: Any, name: str = name) -> None:
            if name in passes:  # from the timed rounds on
                passes[name] += 1

        trainers[name].model.get_base_model().register_forward_pre_hook(count)
    for name in names:
        for _ in range(warmup):
            optimizer_step(trainers[name], batch)
    synchronize(device)
    passes.update(dict.fromkeys(names, 0))
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        # Rotating the order keeps any configuration from always following the same neighbour.
        for name in names[index % len(names) :] + names[: index % len(names)]:
            steps = ALPHA_INTERVALS.get(name, 1)
            start = time.perf_counter()
            for _ in range(steps):
                optimizer_step(trainers[name], batch)
            synchronize(device)
            times[name].append((time.perf_counter() - start) / steps)
    return times, {name: count / (rounds * ALPHA_INTERVALS.get(name, 1)) for name, count in passes.items()}


def step_summary(times: dict[str, list[float]], passes: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Median and quartiles per configuration, its per-round ratio to the reference step, and its counted passes per
    optimizer step."""
    summary = {}
    for name, values in times.items():
        q1, median, q3 = quartiles(values)
        ratios = [value / reference for value, reference in zip(values, times[REFERENCE], strict=True)]
        r1, ratio, r3 = quartiles(ratios)
        summary[name] = {
            "median_ms": 1e3 * median,
            "q1_ms": 1e3 * q1,
            "q3_ms": 1e3 * q3,
            "ratio": ratio,
            "ratio_q1": r1,
            "ratio_q3": r3,
            "ratio_of_medians": median / statistics.median(times[REFERENCE]),
            "passes_per_step": passes[name],
            "passes_ratio": passes[name] / passes[REFERENCE],
            "times_ms": [1e3 * value for value in values],
        }
    return summary


# ------------------------------------------------------------------------------------------------ memory


def _process_memory_kib(field: str) -> int:
    """A memory field of /proc/self/status (Linux), e.g. VmRSS (resident now) or VmHWM (peak resident), in KiB."""
    found = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if found is None:
        raise RuntimeError(f"/proc/self/status has no {field}; the CPU memory probe needs Linux (or --skip memory).")
    return int(found.group(1))


def memory_probe(name: str, settings: Settings, structure_file: str, steps: int) -> dict[str, Any]:
    """Peak memory of `steps` optimizer steps of one configuration, in this (fresh) process."""
    structure = SearchedStructure.load(structure_file)
    with tempfile.TemporaryDirectory() as output_dir:
        batch = make_batch(settings)
        trainer = build_trainer(name, settings, batch, output_dir, structure)
        gc.collect()
        if settings.device == "cuda":
            synchronize("cuda")
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = _process_memory_kib("VmRSS") * 1024
            # Resets the peak (VmHWM) to the current RSS, so model construction transients do not count. Not
            # ru_maxrss: after fork and exec it also holds the parent's peak, i.e. the benchmark's own process.
            Path("/proc/self/clear_refs").write_text("5")
        for _ in range(steps):
            optimizer_step(trainer, batch)
        synchronize(settings.device)
        if settings.device == "cuda":
            peak, measure = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
        else:
            peak, measure = _process_memory_kib("VmHWM") * 1024, "peak RSS (VmHWM), reset after set-up"
    return {
        "peak_mib": peak / 2**20,
        "after_setup_mib": before / 2**20,
        "growth_mib": (peak - before) / 2**20,
        "measure": measure,
    }


def measure_memory(
    names: Sequence[str], settings: Settings, structure: SearchedStructure, steps: int, repeats: int = 1
) -> dict[str, dict[str, Any]]:
    """Runs `memory_probe` for each configuration of `names` (the reference first) in its own subprocess, `repeats`
    times interleaved, and keeps the median peak (a CPU RSS peak varies by up to ~17 % between identical runs)."""
    probes: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as directory:
        structure_file = str(structure.save(Path(directory) / "structure.json"))
        for _ in range(repeats):
            for name in names:
                command = [sys.executable, __file__, *settings_arguments(settings), "--memory-probe", name,
                           "--structure-file", structure_file, "--memory-steps", str(steps)]  # fmt: skip
                completed = subprocess.run(command, capture_output=True, text=True, check=False)
                if completed.returncode != 0:
                    raise RuntimeError(f"Memory probe of {name} failed:\n{completed.stderr[-3000:]}")
                probes[name].append(json.loads(completed.stdout.strip().splitlines()[-1]))
    results = {}
    for name, runs in probes.items():
        runs = sorted(runs, key=lambda run: run["peak_mib"])
        results[name] = {**runs[len(runs) // 2], "peaks_mib": [run["peak_mib"] for run in runs]}
    reference = results[REFERENCE]
    for result in results.values():
        result["peak_ratio"] = result["peak_mib"] / reference["peak_mib"]
        result["growth_ratio"] = result["growth_mib"] / reference["growth_mib"] if reference["growth_mib"] else None
    return results


# ------------------------------------------------------------------------------------------------ zeta and resolve


def candidate_model(num_candidates: int) -> peft.PeftModel:
    """A narrow BERT search model with about `num_candidates` Mix-space candidates (LoRA rank 64 per linear)."""
    rank = 64
    # Per BERT layer: 6 linears with `rank` LoRA slices and a BitFit bias each, 2 LayerNorms with LNFit and BitFit,
    # and 2 adapters.
    per_layer = 6 * rank + 6 + 4 + 2
    layers = max(1, round(num_candidates / per_layer))
    config = BertConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=32,
        num_labels=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = BertForSequenceClassification(config)
    return peft.get_peft_model(base, peft_s3.S3SearchConfig(budget=1e-2, max_rank=rank, task_type="SEQ_CLS"))


def time_call(function: Callable[[], Any], repeats: int, prepare: Optional[Callable[[], Any]] = None) -> dict:
    """Median and quartiles in ms of `repeats` calls of `function`, each after an untimed call of `prepare`."""
    values = []
    for _ in range(repeats):
        if prepare is not None:
            prepare()
        start = time.perf_counter()
        function()
        values.append(time.perf_counter() - start)
    q1, median, q3 = quartiles(values)
    return {"median_ms": 1e3 * median, "q1_ms": 1e3 * q1, "q3_ms": 1e3 * q3}


def time_search_space(model: peft.PeftModel, thread_counts: Sequence[int], repeats: int) -> list[dict[str, Any]]:
    """Shift solve (warm-started after an alpha step, and cold) and `resolve` of one search model, per thread count."""
    bank = model.base_model.gate_bank()
    alpha = bank.alpha
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        alpha.copy_(torch.randn(alpha.shape, generator=generator))
    zeta = [solve_zeta(alpha, bank.sizes, bank.budget, bank.tau)]

    def alpha_step() -> None:
        # AdamW at the paper's alpha learning rate of 0.1 moves each alpha by up to about 0.1 per step.
        with torch.no_grad():
            alpha.add_(torch.randn(alpha.shape, generator=generator), alpha=0.05)

    def warm() -> None:
        zeta[0] = solve_zeta(alpha, bank.sizes, bank.budget, bank.tau, initial=zeta[0])

    rows = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        rows.append(
            {
                "candidates": len(alpha),
                "threads": threads,
                "zeta_warm": time_call(warm, repeats, prepare=alpha_step),
                "zeta_cold": time_call(lambda: solve_zeta(alpha, bank.sizes, bank.budget, bank.tau), repeats),
                "resolve": time_call(lambda: peft_s3.resolve(model), max(3, repeats // 10)),
            }
        )
    return rows


def time_zeta_and_resolve(counts: Sequence[int], thread_counts: Sequence[int], repeats: int) -> list[dict[str, Any]]:
    """`time_search_space` on search spaces of about `counts` candidates."""
    rows = []
    for count in counts:
        rows += time_search_space(candidate_model(count), thread_counts, repeats)
        gc.collect()
    return rows


# The shapes of Llama-3-8B and Llama-3-70B; their search spaces are built on the meta device (no weights needed).
LLM_SHAPES = {
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
}
LLM_SPACE_BUDGET = 1e-4
RESOLVE_TARGET_S = 0.5


def llm_gate_report(shape: str, max_rank: int, seed: int) -> dict[str, Any]:
    """The gate report a search on the `shape`-shaped Llama would write, with random alphas.

    The model is built on the meta device, so its S3 adapter cannot run; the report is filled in from the search space
    instead: exactly the data `peft_s3.resolve` reads from a live model or an s3_gates.json.
    """
    config = LlamaConfig(vocab_size=128256, num_key_value_heads=8, **LLM_SHAPES[shape])
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
    search_config = peft_s3.S3SearchConfig(budget=LLM_SPACE_BUDGET, max_rank=max_rank, task_type="CAUSAL_LM")
    candidates = build_search_space(base, search_config)
    backbone = sum(parameter.numel() for parameter in base.parameters())
    sizes = torch.tensor([candidate.num_params for candidate in candidates], dtype=torch.float32)
    budget = search_config.absolute_budget(backbone)
    alpha = torch.randn(len(candidates), generator=torch.Generator().manual_seed(seed))
    p = global_probabilities(alpha, solve_zeta(alpha, sizes, budget, search_config.tau), search_config.tau)
    modules = dict(base.named_modules())
    return {
        "adapter_name": "default",
        "budget": budget,
        "backbone_num_params": backbone,
        "search_space_signature": signature(candidates),
        "config": search_config.to_dict(),
        "modules": {
            c.module: {"type": "linear" if isinstance(modules[c.module], nn.Linear) else "norm", "bias_params": 0}
            for c in candidates
        },
        "candidates": [
            {
                **{k: getattr(c, k) for k in ("name", "kind", "module", "stack", "layer", "position", "num_params")},
                "alpha": float(a),
                "p": float(q),
            }
            for c, a, q in zip(candidates, alpha, p, strict=True)
        ],  # fmt: skip
    }


def time_llm_space(shape: str, max_rank: int, repeats: int) -> dict[str, Any]:
    """Candidates, shift solve, `resolve` and structure-file size of one LLM-shaped search space (1 thread)."""
    report = llm_gate_report(shape, max_rank, seed=0)
    sizes = torch.tensor([row["num_params"] for row in report["candidates"]], dtype=torch.float32)
    alpha = torch.tensor([row["alpha"] for row in report["candidates"]])
    budget, tau = report["budget"], report["config"]["tau"]
    zeta = solve_zeta(alpha, sizes, budget, tau)
    with tempfile.TemporaryDirectory() as folder:
        structure_bytes = peft_s3.resolve(report).save(folder).stat().st_size
    return {
        "shape": shape,
        "max_rank": max_rank,
        "candidates": len(sizes),
        "backbone_params": report["backbone_num_params"],
        "budget_params": budget,
        "zeta_warm": time_call(lambda: solve_zeta(alpha, sizes, budget, tau, initial=zeta), repeats),
        "zeta_cold": time_call(lambda: solve_zeta(alpha, sizes, budget, tau), repeats),
        "resolve": time_call(lambda: peft_s3.resolve(report), max(3, repeats // 10)),
        "structure_file_bytes": structure_bytes,
    }


# ------------------------------------------------------------------------------------------------ report


def machine_info(settings: Settings) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        cpu = found.group(1).strip() if found else cpu
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "threads": settings.threads,
        "gpu": torch.cuda.get_device_name() if settings.device == "cuda" else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "peft_s3": peft_s3.__version__,
    }
    return info


def target_checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of issue 5 with the measured value and whether it is met."""
    checks = []
    for name, limit in TIME_TARGETS.items():
        if name not in results.get("steps", {}):
            continue
        ratio = results["steps"][name]["ratio"]
        checks.append({"target": f"{name} step <= {limit}x LoRA step", "value": ratio, "met": ratio <= limit})
    if results.get("memory"):
        for name in MEMORY_TARGET_CONFIGS:
            if name not in results["memory"]:
                continue
            ratio = results["memory"][name]["peak_ratio"]
            target = f"{name} peak memory <= {MEMORY_TARGET}x LoRA"
            checks.append({"target": target, "value": ratio, "met": ratio <= MEMORY_TARGET})
    for row in results.get("zeta", []):
        if row["threads"] == 1 and abs(row["candidates"] - ZETA_TARGET_CANDIDATES) <= 0.1 * ZETA_TARGET_CANDIDATES:
            value = row["zeta_warm"]["median_ms"]
            target = f"zeta solve < {ZETA_TARGET_MS} ms at {row['candidates']} candidates (warm, 1 thread)"
            checks.append({"target": target, "value": value, "met": value < ZETA_TARGET_MS})
    for row in results.get("llm_spaces", []):
        zeta, seconds = row["zeta_warm"]["median_ms"], row["resolve"]["median_ms"] / 1e3
        where = f"{row['shape']}, max_rank {row['max_rank']} ({row['candidates']} candidates)"
        checks.append({"target": f"zeta solve < {ZETA_TARGET_MS} ms, {where}", "value": zeta, "met": zeta < 1.0})
        checks.append(
            {"target": f"resolve < {RESOLVE_TARGET_S} s, {where}", "value": seconds, "met": seconds < RESOLVE_TARGET_S}
        )
    return checks


def _timing_cells(row: dict[str, Any]) -> list[str]:
    return [
        f"{row[key]['median_ms']:.3f} ({row[key]['q1_ms']:.3f}-{row[key]['q3_ms']:.3f})"
        for key in ("zeta_warm", "zeta_cold", "resolve")
    ]


def passes_verdict(name: str, passes_ratio: float) -> str:
    """Whether a configuration that searches (updates alpha) meets issue 24's passes target; blank for the others."""
    if not name.startswith("s3_") or name == "s3_gated":
        return ""
    return "yes" if passes_ratio <= PASSES_TARGET else "no"


def markdown(results: dict[str, Any]) -> str:
    settings, machine = results["settings"], results["machine"]
    lines = [
        f"# Speed: {results['model']}",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Machine: {machine['cpu']} ({machine['cpu_cores']} cores, {machine['threads']} torch threads)"
        + (f", GPU {machine['gpu']}" if machine["gpu"] else "")
        + f"; torch {machine['torch']}, transformers {machine['transformers']}, peft {machine['peft']}. "
        + f"Load average at start / end: {results['load_average'][0]} / {results['load_average'][1]}.",
        "",
        f"Batch {settings['batch_size']} x {settings['seq_len']} tokens, {settings['dtype']}, budget "
        f"{settings['budget']}, {results['num_candidates']} candidates (Mix space, max_rank {settings['max_rank']}); "
        f"{settings['rounds']} interleaved rounds after {settings['warmup']} warm-up steps.",
        "",
    ]
    if results.get("steps"):
        lines += [
            "| step | median ms | IQR ms | ratio to LoRA (median of rounds) | IQR of ratio | target | passes per "
            f"optimizer step, counted (LoRA = 1) | <= {PASSES_TARGET} passes |",
            "|---|---:|---:|---:|---:|---|---:|---|",
        ]
    for name, row in results.get("steps", {}).items():
        target = TIME_TARGETS.get(name)
        verdict = "" if target is None else f"<= {target} ({'met' if row['ratio'] <= target else 'missed'})"
        lines.append(
            f"| {name} | {row['median_ms']:.1f} | {row['q1_ms']:.1f}-{row['q3_ms']:.1f} | {row['ratio']:.2f} | "
            f"{row['ratio_q1']:.2f}-{row['ratio_q3']:.2f} | {verdict} | {row['passes_ratio']:.2f} | "
            f"{passes_verdict(name, row['passes_ratio'])} |"
        )
    if results.get("memory"):
        measure = next(iter(results["memory"].values()))["measure"]
        lines += [
            "",
            f"Peak memory, each configuration alone in a subprocess ({measure}); growth = peak minus memory after "
            "set-up (model, trainer), i.e. activations, gradients and optimizer state:",
            "",
            "| step | peak MiB | ratio to LoRA | growth MiB | growth ratio |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, row in results["memory"].items():
            growth_ratio = "-" if row["growth_ratio"] is None else f"{row['growth_ratio']:.2f}"
            lines.append(
                f"| {name} | {row['peak_mib']:.0f} | {row['peak_ratio']:.3f} | {row['growth_mib']:.0f} | "
                f"{growth_ratio} |"
            )
    if results.get("zeta"):
        lines += [
            "",
            "Budget shift solve (`solve_zeta`, warm-started from the previous zeta after an alpha step, and cold) and "
            "`peft_s3.resolve(model)`, median ms (IQR):",
            "",
            "| candidates | threads | zeta warm | zeta cold | resolve |",
            "|---:|---:|---:|---:|---:|",
        ]
        for row in results["zeta"]:
            cells = _timing_cells(row)
            lines.append(f"| {row['candidates']} | {row['threads']} | " + " | ".join(cells) + " |")
    if results.get("llm_spaces"):
        lines += [
            "",
            f"LLM-shaped search spaces (Mix space, built on the meta device; budget {LLM_SPACE_BUDGET} of the "
            "backbone, random alphas; 1 thread), median ms (IQR):",
            "",
            "| shape | max_rank | candidates | budget params | zeta warm | zeta cold | resolve | structure file |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in results["llm_spaces"]:
            cells = _timing_cells(row)
            lines.append(
                f"| {row['shape']} | {row['max_rank']} | {row['candidates']} | {row['budget_params']:,} | "
                + " | ".join(cells)
                + f" | {row['structure_file_bytes'] / 1024:.0f} KiB |"
            )
    lines += ["", "| target | measured | met |", "|---|---:|---|"]
    lines += [f"| {c['target']} | {c['value']:.3g} | {'yes' if c['met'] else 'no'} |" for c in results["targets"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ command line


def settings_arguments(settings: Settings) -> list[str]:
    """The command-line arguments that recreate `settings` (for the memory subprocesses)."""
    return [
        "--model-size", settings.model_size, "--device", settings.device, "--dtype", settings.dtype,
        "--batch-size", str(settings.batch_size), "--seq-len", str(settings.seq_len), "--budget", str(settings.budget),
        "--max-rank", str(settings.max_rank), "--threads", str(settings.threads), "--seed", str(settings.seed),
    ]  # fmt: skip


def parse_arguments(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="small")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: per model size")
    parser.add_argument("--batch-size", type=int, default=None, help="default: per model size")
    parser.add_argument("--seq-len", type=int, default=None, help="default: per model size")
    parser.add_argument("--budget", type=float, default=1e-3, help="fraction of the backbone (retrain structure)")
    parser.add_argument("--max-rank", type=int, default=1, help="LoRA rank per linear, of the space and of LoRA")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration")
    parser.add_argument("--rounds", type=int, default=20, help="timed interleaved rounds")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps per memory probe")
    parser.add_argument("--memory-repeats", type=int, default=1, help="probes per configuration (median kept)")
    parser.add_argument("--zeta-repeats", type=int, default=50)
    parser.add_argument("--zeta-threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--candidates", type=int, nargs="+", default=list(CANDIDATE_COUNTS))
    parser.add_argument(
        "--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS), help=f"what to run ({REFERENCE} always runs)"
    )
    parser.add_argument("--llm-shapes", nargs="+", choices=sorted(LLM_SHAPES), default=sorted(LLM_SHAPES))
    parser.add_argument("--llm-ranks", type=int, nargs="+", default=[1, 8], help="max_rank of the LLM-shaped spaces")
    parser.add_argument("--skip", nargs="*", choices=["steps", "memory", "zeta", "llm_spaces"], default=[])
    parser.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default=None, help="result file stem (default: speed_<device>[_<size>])")
    parser.add_argument("--memory-probe", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--structure-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("batch_size", "seq_len", "rounds", "warmup", "memory_steps", "zeta_repeats", "max_rank"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            parser.error(f"--{name.replace('_', '-')}={value} is not allowed: it must be a positive integer.")
    if not 0 < args.budget < 1:
        parser.error(f"--budget={args.budget} is not allowed: use a fraction of the backbone in (0, 1).")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU, and torch sees none.")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    size = MODEL_SIZES[args.model_size]
    threads = args.threads or (1 if args.device == "cpu" else torch.get_num_threads())
    return Settings(
        model_size=args.model_size,
        device=args.device,
        dtype=args.dtype or size.dtype,
        batch_size=args.batch_size or size.batch_size,
        seq_len=args.seq_len or size.seq_len,
        budget=args.budget,
        max_rank=args.max_rank,
        threads=threads,
        seed=args.seed,
    )


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    args = parse_arguments(argv)
    settings = settings_from(args)
    torch.set_num_threads(settings.threads)
    transformers_logging.set_verbosity_error()
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, settings, args.structure_file, args.memory_steps)))
        return {}

    load_start = os.getloadavg()[0]
    command = shlex.join(["python", "benchmarks/speed.py", *(sys.argv[1:] if argv is None else argv)])
    structure = resolved_structure(settings)
    results: dict[str, Any] = {
        "model": settings.size.description,
        "command": command,
        "machine": machine_info(settings),
        "settings": {**settings.__dict__, "warmup": args.warmup, "rounds": args.rounds},
        "num_candidates": len(structure.search_space),
        "retrain_trainable_params": structure.num_trainable_params,
    }
    batch = make_batch(settings)
    names = [REFERENCE] + [name for name in args.configs if name != REFERENCE]
    if "steps" not in args.skip:
        with tempfile.TemporaryDirectory() as output_dir:
            trainers = {name: build_trainer(name, settings, batch, output_dir, structure) for name in names}
            results["steps"] = step_summary(*time_steps(trainers, batch, settings.device, args.warmup, args.rounds))
        del trainers
        gc.collect()
    if "memory" not in args.skip:
        results["memory"] = measure_memory(names, settings, structure, args.memory_steps, args.memory_repeats)
    if "zeta" not in args.skip:
        results["zeta"] = time_zeta_and_resolve(args.candidates, args.zeta_threads, args.zeta_repeats)
        torch.set_num_threads(settings.threads)
    if "llm_spaces" not in args.skip:
        torch.set_num_threads(1)
        spaces = [(shape, max_rank) for shape in args.llm_shapes for max_rank in args.llm_ranks]
        results["llm_spaces"] = [time_llm_space(shape, max_rank, args.zeta_repeats) for shape, max_rank in spaces]
        torch.set_num_threads(settings.threads)
    results["load_average"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
    results["targets"] = target_checks(results)

    size_suffix = "" if settings.model_size == "small" else f"_{settings.model_size}"
    stem = args.name or f"speed_{settings.device}{size_suffix}"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / f"{stem}.json").write_text(json.dumps(results, indent=1))
    report = markdown(results)
    (args.output_dir / f"{stem}.md").write_text(report)
    print(report)
    return results


if __name__ == "__main__":
    main()
