"""Planted-structure probes: does a search setting find a structure that is known to be the right one?

Each case is a tiny randomly initialised model (BERT or Llama, all dropout 0) with a frozen regression head. The
*teacher* is that model plus planted deltas on a few search-space candidates (LoRA rank-1 slices, BitFit, LNFit,
low-rank adapters), built as an S3 fixed-structure adapter whose random deltas are rescaled so that each planted
candidate on its own moves the outputs by `Case.effect` times their spread over the inputs. The targets are the
teacher's outputs on random tokens, so the data are noise free and only the planted candidates can explain them
(head and backbone are identical and frozen in teacher and student). The *student* is the same base with an S3
search adapter whose budget is exactly the planted set's parameter count; it is searched with `S3SearchTrainer`
(D_alpha / D_delta split automatically) and resolved with `peft_s3.resolve`. A run recovers the case when the
resolved structure ({module: {kind: count}}) equals the planted one. Each run also records the p and the rank (by p)
of every planted candidate, the best other candidate, and a teacher-free check: the MSE of the student's own deltas
with only the planted gates open against only the resolved gates open.

A variant is a search setting: `--variant NAME=JSON` with the keys `trainer` (S3SearchTrainer keyword arguments),
`config` (extra S3SearchConfig fields), `resolve` (peft_s3.resolve keyword arguments), `args` (TrainingArguments
fields), `steps` and `learning_rate` (the delta learning rate). Names are checked against those signatures and every
variant is built once on a small case before the suite starts, so a typo or a bad value fails in seconds. The
variant `default` ({}) is the library's defaults with the probe's steps and learning rate.

    python benchmarks/planted.py --list
    nice python benchmarks/planted.py --output benchmarks/results/planted/default.json
    nice python benchmarks/planted.py --variant so='{"trainer": {"bilevel": "second_order"}}' \\
        --output benchmarks/results/planted/second_order.json --resume
    python benchmarks/planted.py --report-only --output benchmarks/results/planted/second_order.json
    python benchmarks/planted.py --retrain-misses --output benchmarks/results/planted/second_order.json
    nice python benchmarks/planted.py --hidden-size 128 --init-scale 2 --output benchmarks/results/planted/h128.json

`--hidden-size` and `--init-scale` (the base's initializer_range in units of hidden_size**-0.5) vary the probe's
models away from the size and scale its settings were built on; each file holds one size and scale.

A miss is checked by training the planted and the resolved structure alone (`retrained_mse`): when the planted one
fits the held-out targets better, the search failed; otherwise the case does not identify its plants.

Results (every run, the variants, the settings and each command line) are written to --output after every run, so
--resume continues a killed suite. See "Planted-structure probes" in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import fnmatch
import inspect
import json
import math
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import peft
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedModel,
    PrinterCallback,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging as transformers_logging

import peft_s3
from peft_s3.tuner.search_space import Candidate, build_search_space

DEFAULT_OUTPUT = "benchmarks/results/planted/planted.json"
DEFAULT_SEEDS = (0, 1)
VOCAB_SIZE = 64
# Ids 0-2 are Llama's pad/bos/eos; random tokens start above them so no sequence contains padding.
FIRST_TOKEN = 3
# The tensor each kind's planted delta lives in; scaling it scales the candidate's effect, zeroing it removes it.
DELTA_TENSORS = {"lora": "s3_lora_B", "bitfit": "s3_bias", "lnfit": "s3_scale", "adapter": "s3_adapter_up"}
# Rescaling the planted deltas: a few fixed-point rounds (the effect is not linear in the delta), then a check.
_RESCALE_ROUNDS = 4
_EFFECT_TOLERANCE = 0.1
_TEACHER_DRAWS = 5
VARIANT_KEYS = ("trainer", "config", "resolve", "args", "steps", "learning_rate", "adapter_features_given")
# Set by the probe itself; a variant that tried to change them would break the probe, not test a setting.
_RESERVED = {
    "trainer": {"model", "args", "train_dataset", "eval_dataset", "search_dataset"},
    "config": {"budget", "structure", "task_type", "modules_to_save", "init_weights", "inference_mode"},
    "resolve": {"model_or_checkpoint", "adapter_name"},
    "args": {"output_dir", "max_steps", "learning_rate", "seed", "use_cpu", "report_to", "save_strategy"},
}


# ---------------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Plant:
    """One planted candidate: `kind` on the module `position` (path inside the block) of block `layer`."""

    layer: int
    position: str
    kind: str


@dataclass(frozen=True)
class Case:
    """A tiny model and the candidates planted in it; `effect` is each plant's solo output change / output spread."""

    name: str
    model: str
    plants: tuple[Plant, ...]
    num_layers: int = 2
    effect: float = 0.3

    @property
    def kinds(self) -> list[str]:
        return sorted({plant.kind for plant in self.plants})


@dataclass(frozen=True)
class Settings:
    """The probe's fixed sizes; runs are only comparable under equal settings (checked on --resume)."""

    examples: int = 256
    heldout_examples: int = 64
    seq_len: int = 8
    hidden_size: int = 32
    num_heads: int = 4
    num_labels: int = 8
    batch_size: int = 16
    steps: int = 240
    learning_rate: float = 1e-2
    # The base's initializer_range in units of hidden_size**-0.5 (the scale the probe was built on).
    init_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.hidden_size <= 0 or self.hidden_size % self.num_heads or not self.init_scale > 0:
            raise ValueError(
                f"hidden_size must be a positive multiple of num_heads={self.num_heads} (got {self.hidden_size}) "
                f"and init_scale > 0 (got {self.init_scale})."
            )


# Planted positions avoid the exact symmetries of the search space, where another candidate of the same size
# explains the targets equally well: a key bias shifts every score of a query equally (softmax ignores it), and a
# value bias passes the attention unchanged, so it equals a bias on the attention output projection.
CASES: dict[str, Case] = {
    case.name: case
    for case in (
        Case("bert-lora-q", "bert", (Plant(1, "attention.self.query", "lora"),)),
        Case("bert-lora-v", "bert", (Plant(0, "attention.self.value", "lora"),)),
        Case("bert-lora-ffn-out", "bert", (Plant(1, "output.dense", "lora"),)),
        Case("bert-bitfit-ffn-in", "bert", (Plant(0, "intermediate.dense", "bitfit"),)),
        Case("bert-lnfit-attn", "bert", (Plant(0, "attention.output.LayerNorm", "lnfit"),)),
        Case("bert-adapter-attn", "bert", (Plant(1, "attention.output.dense", "adapter"),)),
        Case(
            "bert-lora-k+bitfit-q",
            "bert",
            (Plant(0, "attention.self.key", "lora"), Plant(1, "attention.self.query", "bitfit")),
        ),
        Case(
            "bert-lnfit+adapter",
            "bert",
            (Plant(1, "output.LayerNorm", "lnfit"), Plant(0, "output.dense", "adapter")),
        ),
        Case(
            "bert4-lora+bitfit+adapter",
            "bert",
            (
                Plant(0, "attention.output.dense", "lora"),
                Plant(2, "output.LayerNorm", "bitfit"),
                Plant(3, "output.dense", "adapter"),
            ),
            num_layers=4,
        ),
        Case("llama-lora-o", "llama", (Plant(1, "self_attn.o_proj", "lora"),)),
        Case(
            "llama-lora-up+bitfit-q",
            "llama",
            (Plant(0, "mlp.up_proj", "lora"), Plant(1, "self_attn.q_proj", "bitfit")),
        ),
        Case(
            "llama-lora+lnfit+adapter",
            "llama",
            (
                Plant(1, "self_attn.v_proj", "lora"),
                Plant(1, "input_layernorm", "lnfit"),
                Plant(0, "mlp.down_proj", "adapter"),
            ),
        ),
    )
}


def select_cases(patterns: Optional[Sequence[str]]) -> list[Case]:
    """Cases whose names match any of the shell-style `patterns` (all cases when None)."""
    if not patterns:
        return list(CASES.values())
    chosen = [case for name, case in CASES.items() if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not chosen:
        raise ValueError(f"--cases {list(patterns)} matches no case; the cases are {list(CASES)}.")
    return chosen


# ---------------------------------------------------------------------------------------------------- variants


@dataclass
class Variant:
    """A search setting; the empty variant is the library's defaults."""

    name: str
    trainer: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    resolve: dict[str, Any] = field(default_factory=dict)
    args: dict[str, Any] = field(default_factory=dict)
    steps: Optional[int] = None
    learning_rate: Optional[float] = None
    # A diagnostic, not a search setting: the student's planted adapters start with the teacher's down-projection,
    # so their feature is given and only its weight (the up-projection) has to be found.
    adapter_features_given: bool = False

    def spec(self) -> dict[str, Any]:
        spec = {key: value for key, value in dataclasses.asdict(self).items() if key != "name"}
        # Left out when off, so the specs recorded before the key existed still match on --resume.
        if not self.adapter_features_given:
            del spec["adapter_features_given"]
        return spec


def _keyword_names(function: Any) -> set[str]:
    parameters = inspect.signature(function).parameters.values()
    return {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _allowed_names() -> dict[str, set[str]]:
    # Read from the signatures at run time, so options added to the trainer, config or resolve pass straight through.
    allowed = {
        "trainer": _keyword_names(peft_s3.S3SearchTrainer.__init__) - {"self"} | set(peft_s3.SearchOptions.names()),
        "config": {f.name for f in dataclasses.fields(peft_s3.S3SearchConfig) if f.init},
        "resolve": _keyword_names(peft_s3.resolve),
        "args": {f.name for f in dataclasses.fields(TrainingArguments) if f.init},
    }
    return {key: names - _RESERVED[key] for key, names in allowed.items()}


def make_variant(name: str, spec: dict[str, Any]) -> Variant:
    """A Variant from its JSON spec; unknown or reserved keys fail with the names that are allowed."""
    if not isinstance(spec, dict):
        raise ValueError(f"Variant {name!r}: the spec must be a JSON object, got {spec!r}.")
    unknown = sorted(set(spec) - set(VARIANT_KEYS))
    if unknown:
        raise ValueError(f"Variant {name!r}: unknown keys {unknown}; allowed: {list(VARIANT_KEYS)}.")
    allowed = _allowed_names()
    for key, names in allowed.items():
        kwargs = spec.get(key, {})
        if not isinstance(kwargs, dict):
            raise ValueError(f"Variant {name!r}: {key!r} must be a JSON object of keyword arguments, got {kwargs!r}.")
        bad = sorted(set(kwargs) - names)
        if bad:
            reserved = sorted(set(bad) & _RESERVED[key])
            note = f" ({reserved} are set by the probe itself)" if reserved else ""
            raise ValueError(
                f"Variant {name!r}: {key} has unknown or reserved keyword arguments {bad}{note}; allowed: "
                f"{sorted(names)}."
            )
    steps, learning_rate = spec.get("steps"), spec.get("learning_rate")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"Variant {name!r}: steps={steps!r} must be an int >= 1.")
    if learning_rate is not None and not (isinstance(learning_rate, (int, float)) and learning_rate > 0):
        raise ValueError(f"Variant {name!r}: learning_rate={learning_rate!r} must be a number > 0.")
    features_given = spec.get("adapter_features_given", False)
    if not isinstance(features_given, bool):
        raise ValueError(f"Variant {name!r}: adapter_features_given={features_given!r} must be true or false.")
    return Variant(name, **{key: spec[key] for key in VARIANT_KEYS if key in spec})


def parse_variant(text: str) -> Variant:
    """`NAME=JSON` from the command line."""
    name, sep, body = text.partition("=")
    if not sep or not name:
        raise ValueError(f'--variant {text!r}: expected NAME=JSON, e.g. so=\'{{"trainer": {{"bilevel": ...}}}}\'.')
    try:
        spec = json.loads(body)
    except json.JSONDecodeError as error:
        raise ValueError(f"--variant {name!r}: the spec is not valid JSON ({error}): {body!r}") from None
    return make_variant(name, spec)


DEFAULT_VARIANT = Variant("default")


# ---------------------------------------------------------------------------------------------------- models


def base_model(case: Case, seed: int, settings: Settings = Settings()) -> PreTrainedModel:
    """The case's tiny model with a regression head; the same weights for the same (case, seed)."""
    common = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": settings.hidden_size,
        "intermediate_size": 2 * settings.hidden_size,
        "num_hidden_layers": case.num_layers,
        "num_attention_heads": settings.num_heads,
        "max_position_embeddings": 2 * settings.seq_len,
        "num_labels": settings.num_labels,
        "problem_type": "regression",
        # Pretrained-like scale: with the default 0.02 the blocks barely touch the residual stream and attention is
        # uniform, so deltas on attention saturate at a negligible output change.
        "initializer_range": settings.init_scale * settings.hidden_size**-0.5,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if case.model == "bert":
            config = BertConfig(**common, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
            model = BertForSequenceClassification(config)
        elif case.model == "llama":
            config = LlamaConfig(
                **common,
                num_key_value_heads=settings.num_heads // 2,
                attention_dropout=0.0,
                pad_token_id=0,
                bos_token_id=1,
                eos_token_id=2,
            )
            model = LlamaForSequenceClassification(config)
        else:
            raise ValueError(f"Case {case.name!r}: model={case.model!r} is unknown; use 'bert' or 'llama'.")
    return model.eval()


def _student_config(budget: int, variant: Variant) -> peft_s3.S3SearchConfig:
    # task_type None: peft then adds no modules_to_save, so the regression head stays frozen like the backbone.
    return peft_s3.S3SearchConfig(**{"budget": budget, **variant.config})


def _planted_candidates(case: Case, space: Sequence[Candidate]) -> list[Candidate]:
    found = []
    for plant in case.plants:
        matches = [
            c
            for c in space
            if c.layer == plant.layer and c.position == plant.position and c.kind == plant.kind and c.slot == 0
        ]
        if len(matches) != 1:
            positions = sorted({c.position for c in space})
            raise ValueError(
                f"Case {case.name!r}: {plant} matches {len(matches)} search-space candidates, not 1; positions "
                f"here: {positions}."
            )
        found.append(matches[0])
    return found


def _search_space(
    case: Case, seed: int, settings: Settings, config: Optional[dict[str, Any]] = None
) -> list[Candidate]:
    # A budget of 1 parameter only lists the space (the budget check runs when the adapter is injected).
    probe = peft_s3.S3SearchConfig(**{**(config or {}), "budget": 1})
    return build_search_space(base_model(case, seed, settings), probe)


def _student_budget(case: Case, planted: Sequence[Candidate], space: Sequence[Candidate]) -> int:
    """Parameters of the planted (module, kind) pairs in the student's space, which a variant's config may change
    (adapter_rank, say); a planted pair missing from that space is an error, not a silent miss."""
    sizes = {(c.module, c.kind): c.num_params for c in space if c.slot == 0}
    missing = [c.name for c in planted if (c.module, c.kind) not in sizes]
    if missing:
        raise ValueError(
            f"Case {case.name!r}: the variant's search space lacks the planted candidates {missing}; a probe of "
            "this case cannot succeed. Leave candidate_kinds / target_modules alone or choose other cases."
        )
    return sum(sizes[(c.module, c.kind)] for c in planted)


def _delta(model: peft.PeftModel, candidate: Candidate, tensor: Optional[str] = None) -> nn.Parameter:
    """The candidate's delta tensor (`DELTA_TENSORS`), or its layer's `tensor` such as `s3_adapter_down`."""
    layer = model.base_model.model.get_submodule(candidate.module)
    return getattr(layer, tensor or DELTA_TENSORS[candidate.kind])["default"]


def random_inputs(count: int, seed: int, settings: Settings = Settings()) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_TOKEN, VOCAB_SIZE, (count, settings.seq_len), generator=generator)


@torch.no_grad()
def outputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Regression outputs (logits) of `model` in eval mode, in batches."""
    model.eval()
    chunks = [model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits for ids in input_ids.split(batch_size)]
    return torch.cat(chunks)


def _rms(x: torch.Tensor) -> float:
    return x.pow(2).mean().sqrt().item()


@contextlib.contextmanager
def only_planted(teacher: peft.PeftModel, keep: Sequence[Candidate], planted: Sequence[Candidate]) -> Iterator[None]:
    """Within the block, the planted deltas not in `keep` are zero (their candidates are then the identity)."""
    saved = {c.name: _delta(teacher, c).detach().clone() for c in planted}
    kept = {c.name for c in keep}
    try:
        with torch.no_grad():
            for candidate in planted:
                if candidate.name not in kept:
                    _delta(teacher, candidate).zero_()
        yield
    finally:
        with torch.no_grad():
            for candidate in planted:
                _delta(teacher, candidate).copy_(saved[candidate.name])


def solo_effects(
    teacher: peft.PeftModel, planted: Sequence[Candidate], input_ids: torch.Tensor, base_out: torch.Tensor
) -> dict[str, float]:
    """RMS output change of each planted candidate alone."""
    effects = {}
    for candidate in planted:
        with only_planted(teacher, [candidate], planted):
            effects[candidate.name] = _rms(outputs(teacher, input_ids) - base_out)
    return effects


class UnplantableCase(ValueError):
    """The planted deltas cannot move the outputs by the case's effect at these settings (e.g. saturated attention)."""


def build_teacher(case: Case, seed: int, planted: Sequence[Candidate], settings: Settings) -> peft.PeftModel:
    """Base + the planted candidates with random deltas, each rescaled to move the outputs by `case.effect`."""
    structure: dict[str, dict[str, int]] = {}
    for candidate in planted:
        structure.setdefault(candidate.module, {})[candidate.kind] = 1
    config = peft_s3.S3SearchConfig(structure=structure, candidate_kinds=case.kinds, init_weights=False)
    base = base_model(case, seed, settings)
    # The first inputs of the data set: the effect is meant on the data the search sees.
    input_ids = random_inputs(settings.examples, seed, settings)[:128]
    base_out = outputs(base, input_ids)
    target = case.effect * _rms(base_out - base_out.mean(0))
    teacher, effects = _live_teacher(case, seed, base, config, planted, input_ids, base_out)
    for _ in range(_RESCALE_ROUNDS):
        with torch.no_grad():
            for candidate in planted:
                _delta(teacher, candidate).mul_(target / max(effects[candidate.name], 1e-12))
        effects = solo_effects(teacher, planted, input_ids, base_out)
    off = {
        name: value
        for name, value in effects.items()
        if not math.isfinite(value) or abs(value / target - 1) > _EFFECT_TOLERANCE
    }
    if off:
        raise UnplantableCase(
            f"Case {case.name!r} seed {seed}: planted candidates {off} do not reach the solo effect {target:.4g} "
            "(the output does not depend on them enough); plant them elsewhere."
        )
    return teacher


def _live_teacher(
    case: Case,
    seed: int,
    base: PreTrainedModel,
    config: peft_s3.S3SearchConfig,
    planted: Sequence[Candidate],
    input_ids: torch.Tensor,
    base_out: torch.Tensor,
) -> tuple[peft.PeftModel, dict[str, float]]:
    """The teacher with random deltas, redrawn (at most `_TEACHER_DRAWS` times) while a planted candidate has no
    effect, and the solo effects of its planted candidates.

    An adapter whose random down-projection is negative on every input is dead behind its ReLU, and no rescaling can
    give it an effect; the first draw is kept whenever it is alive, so existing cases keep their teachers.
    """
    for draw in range(_TEACHER_DRAWS):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 20_000 + 1_000 * draw)
            teacher = peft.get_peft_model(copy.deepcopy(base), config)
        teacher.eval()
        effects = solo_effects(teacher, planted, input_ids, base_out)
        if all(math.isfinite(value) and value > 0 for value in effects.values()):
            return teacher, effects
    raise ValueError(
        f"Case {case.name!r} seed {seed}: planted candidates {effects} have no effect on the outputs in "
        f"{_TEACHER_DRAWS} random draws; plant them elsewhere."
    )


class PlantedData(torch.utils.data.Dataset):
    """Random token sequences with the teacher's outputs as regression targets."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor) -> None:
        self.input_ids = input_ids
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[index]}


def teacher_data(teacher: peft.PeftModel, count: int, seed: int, settings: Settings) -> PlantedData:
    """`count` random sequences (drawn from `seed`) labelled with the teacher's outputs."""
    input_ids = random_inputs(count, seed, settings)
    return PlantedData(input_ids, outputs(teacher, input_ids))


def build_case(
    case: Case, seed: int, variant: Variant = DEFAULT_VARIANT, settings: Settings = Settings()
) -> tuple[peft.PeftModel, peft.PeftModel, PlantedData]:
    """(teacher, student, dataset) of one probe; `teacher.planted` lists the planted candidates.

    The teacher and the data depend on (case, seed) only, so every variant searches for the same targets; the
    student's budget is the planted size counted in the variant's own search space.
    """
    planted = _planted_candidates(case, _search_space(case, seed, settings))
    teacher = build_teacher(case, seed, planted, settings)
    teacher.planted = planted
    dataset = teacher_data(teacher, settings.examples, seed, settings)
    budget = _student_budget(case, planted, _search_space(case, seed, settings, variant.config))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 30_000)
        student = peft.get_peft_model(base_model(case, seed, settings), _student_config(budget, variant))
    if variant.adapter_features_given:
        _give_adapter_features(case, teacher, student, planted)
    return teacher, student, dataset


@torch.no_grad()
def _give_adapter_features(
    case: Case, teacher: peft.PeftModel, student: peft.PeftModel, planted: Sequence[Candidate]
) -> None:
    for candidate in planted:
        if candidate.kind != "adapter":
            continue
        given, own = _delta(teacher, candidate, "s3_adapter_down"), _delta(student, candidate, "s3_adapter_down")
        if given.shape != own.shape:
            raise ValueError(
                f"Case {case.name!r}: adapter_features_given needs the teacher's adapter shape {tuple(given.shape)} "
                f"in the student, which has {tuple(own.shape)}; leave adapter_rank alone."
            )
        own.copy_(given)


# ---------------------------------------------------------------------------------------------------- one run


def _trainer(
    student: peft.PeftModel,
    dataset: PlantedData,
    heldout: PlantedData,
    variant: Variant,
    seed: int,
    settings: Settings,
    output_dir: str,
) -> peft_s3.S3SearchTrainer:
    """The search; `heldout` is only evaluated when a variant turns evaluation on (e.g. for select_on_validation)."""
    arguments = {
        "per_device_train_batch_size": settings.batch_size,
        "logging_steps": 10,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        **variant.args,
        "output_dir": output_dir,
        "max_steps": variant.steps or settings.steps,
        "learning_rate": variant.learning_rate or settings.learning_rate,
        "seed": seed,
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
    }
    trainer = peft_s3.S3SearchTrainer(
        model=student,
        args=TrainingArguments(**arguments),
        train_dataset=dataset,
        eval_dataset=heldout,
        **variant.trainer,
    )
    # With disable_tqdm the Trainer prints every log dict; the probe prints one line per run instead.
    trainer.remove_callback(PrinterCallback)
    return trainer


@contextlib.contextmanager
def gate_values(student: peft.PeftModel, values: torch.Tensor) -> Iterator[None]:
    """Within the block, the gates are `values` (one per candidate, in gate order), whatever alpha says."""
    bank = student.base_model.gate_bank()

    def refresh(training: bool) -> None:
        bank.values = values
        bank.segments = values.split(bank.segment_sizes)

    bank.refresh = refresh
    try:
        yield
    finally:
        del bank.refresh


def fixed_gates(student: peft.PeftModel, names: set[str]) -> contextlib.AbstractContextManager[None]:
    """Within the block, the gates of the candidates in `names` are 1 and all others 0, whatever alpha says."""
    mask = torch.tensor([float(c.name in names) for c in student.base_model.candidates()])
    return gate_values(student, mask)


def _mse(model: nn.Module, dataset: PlantedData) -> float:
    return (outputs(model, dataset.input_ids) - dataset.labels).pow(2).mean().item()


def structure_of(names: Sequence[str]) -> dict[str, dict[str, int]]:
    """{module: {kind: count}} of candidate names such as `...attention.self.query:lora[0]` or `...:lnfit`."""
    structure: dict[str, dict[str, int]] = {}
    for name in names:
        module, _, kind = name.rpartition(":")
        counts = structure.setdefault(module, {})
        kind = kind.split("[")[0]
        counts[kind] = counts.get(kind, 0) + 1
    return structure


def retrained_mse(
    case: Case,
    seed: int,
    structure: dict[str, dict[str, int]],
    dataset: PlantedData,
    heldout: PlantedData,
    steps: int,
    learning_rate: float,
    settings: Settings = Settings(),
) -> float:
    """Held-out MSE of `structure` trained alone from its identity start (a fixed S3 adapter on the case's base,
    the plain Trainer, the run's steps and delta learning rate): what the structure can fit, free of the search.
    An empty structure (a search whose gates all ended closed) has nothing to train: the base's own MSE."""
    if not structure:
        return _mse(base_model(case, seed, settings), heldout)
    kinds = sorted({kind for counts in structure.values() for kind in counts})
    config = peft_s3.S3SearchConfig(structure=structure, candidate_kinds=kinds)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 50_000)
        model = peft.get_peft_model(base_model(case, seed, settings), config)
    with tempfile.TemporaryDirectory() as output_dir:
        arguments = TrainingArguments(
            output_dir=output_dir,
            max_steps=steps,
            learning_rate=learning_rate,
            per_device_train_batch_size=settings.batch_size,
            seed=seed,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            logging_strategy="no",
            dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=arguments, train_dataset=dataset)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    return _mse(model, heldout)


def _retrained_pair(
    case: Case,
    seed: int,
    planted: dict[str, dict[str, int]],
    resolved: dict[str, dict[str, int]],
    dataset: PlantedData,
    heldout: PlantedData,
    steps: int,
    learning_rate: float,
    settings: Settings,
) -> dict[str, float]:
    """`retrained_mse` of a miss's planted and resolved structure, under the same training."""
    return {
        name: retrained_mse(case, seed, structure, dataset, heldout, steps, learning_rate, settings)
        for name, structure in (("planted", planted), ("resolved", resolved))
    }


def _ranking(report: list[dict[str, Any]]) -> list[str]:
    # Greedy resolve's order: p descending, then alpha descending, then gate order.
    order = sorted(range(len(report)), key=lambda i: (-report[i]["p"], -report[i]["alpha"], i))
    return [report[i]["name"] for i in order]


def _planted_slots(planted: Sequence[Candidate], report: list[dict[str, Any]], ranking: list[str]) -> dict[str, str]:
    """Each planted candidate's counterpart in the student: the best-ranked candidate of its module and kind.

    With max_rank > 1 the student's LoRA slots are interchangeable, and any one of them can take the planted slice.
    """
    position = {name: index for index, name in enumerate(ranking)}
    slots = {}
    for candidate in planted:
        names = [r["name"] for r in report if r["module"] == candidate.module and r["kind"] == candidate.kind]
        slots[candidate.name] = min(names, key=position.__getitem__)
    return slots


def run_case(
    case: Case, seed: int, variant: Variant = DEFAULT_VARIANT, settings: Settings = Settings()
) -> dict[str, Any]:
    """Search one probe with `variant` and compare the resolved structure with the planted one."""
    start = time.perf_counter()
    teacher, student, dataset = build_case(case, seed, variant, settings)
    with tempfile.TemporaryDirectory() as output_dir:
        heldout = teacher_data(teacher, settings.heldout_examples, seed + 40_000, settings)
        trainer = _trainer(student, dataset, heldout, variant, seed, settings, output_dir)
        trainer.train()
    # With select_on_validation the search's answer is the best structure it evaluated, not the final gates'.
    if trainer.search_options.select_on_validation:
        structure = trainer.best_structure
    else:
        structure = peft_s3.resolve(student, **variant.resolve)
    rows = student.base_model.gate_report()
    report = {row["name"]: row for row in rows}
    ranking = _ranking(rows)
    slots = _planted_slots(teacher.planted, rows, ranking)
    planted = list(slots.values())
    resolved = [c.name for c in structure.candidates]
    selected_pairs = {(c.module, c.kind) for c in structure.candidates}
    planted_structure = structure_of([c.name for c in teacher.planted])
    others = [name for name in ranking if name not in planted]
    with fixed_gates(student, set(planted)):
        loss_planted = _mse(student, dataset)
    with fixed_gates(student, set(resolved)):
        loss_resolved = _mse(student, dataset)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    retrained = None
    if structure.structure != planted_structure:
        # The search's own steps and delta learning rate.
        steps, learning_rate = trainer.args.max_steps, trainer.args.learning_rate
        retrained = _retrained_pair(
            case, seed, planted_structure, structure.structure, dataset, heldout, steps, learning_rate, settings
        )
    return {
        "variant": variant.name,
        "case": case.name,
        "seed": seed,
        "model": case.model,
        "kinds": [c.kind for c in teacher.planted],
        "count": len(planted),
        "budget": structure.budget,
        "planted": planted,
        "resolved": resolved,
        # Compared as {module: {kind: count}}, so interchangeable LoRA slots do not count as a miss.
        "recovered": structure.structure == planted_structure,
        "planted_p": {name: report[name]["p"] for name in planted},
        "planted_rank": {name: ranking.index(name) + 1 for name in planted},
        "planted_selected": {slots[c.name]: (c.module, c.kind) in selected_pairs for c in teacher.planted},
        "sum_planted_p": sum(report[name]["p"] for name in planted),
        "best_other": {"name": others[0], "p": report[others[0]]["p"]},
        "loss_start": _mse(base_model(case, seed, settings), dataset),
        "loss_search": _mse(student, dataset),
        "loss_planted_gates": loss_planted,
        "loss_resolved_gates": loss_resolved,
        "planted_gates_better": loss_planted <= loss_resolved,
        # Misses only: held-out MSE of the planted and the resolved structure, each trained alone.
        "retrained_mse": retrained,
        "final_train_loss": logs[-1]["loss"] if logs else None,
        "final_alpha_loss": logs[-1].get("s3/alpha_loss") if logs else None,
        "steps": trainer.state.global_step,
        "seconds": time.perf_counter() - start,
    }


def retrain_misses(path: Path) -> dict[str, Any]:
    """Add `retrained_mse` to the misses in `path` that lack it (runs written before that check existed)."""
    results = _load(path)
    settings = Settings(**results["settings"])
    for run in results["runs"]:
        if run["recovered"] or run.get("retrained_mse"):
            continue
        case, seed, spec = CASES[run["case"]], run["seed"], results["variants"][run["variant"]]
        planted = _planted_candidates(case, _search_space(case, seed, settings))
        teacher = build_teacher(case, seed, planted, settings)
        dataset = teacher_data(teacher, settings.examples, seed, settings)
        heldout = teacher_data(teacher, settings.heldout_examples, seed + 40_000, settings)
        steps = spec.get("steps") or settings.steps
        learning_rate = spec.get("learning_rate") or settings.learning_rate
        run["retrained_mse"] = _retrained_pair(
            case,
            seed,
            structure_of([c.name for c in planted]),
            structure_of(run["resolved"]),
            dataset,
            heldout,
            steps,
            learning_rate,
            settings,
        )
        _save(path, results)
        print(f"{run['variant']:>12} {run['case']:<28} seed {seed}: retrained MSE {run['retrained_mse']}", flush=True)
    return results


def check_variant(variant: Variant) -> None:
    """Build the variant's config, trainer and resolve on the smallest case without training: bad values fail now.

    At the default settings, where the case can be planted: a variant's values are valid or not whatever the size.
    """
    settings = Settings()
    case = CASES["bert-lora-q"]
    _, student, dataset = build_case(case, 0, variant, dataclasses.replace(settings, examples=16))
    with tempfile.TemporaryDirectory() as output_dir:
        _trainer(student, dataset, dataset, variant, 0, settings, output_dir)
    peft_s3.resolve(student, **variant.resolve)


# ---------------------------------------------------------------------------------------------------- the suite


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _save(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(results, indent=1))
    partial.replace(path)


def _defaults(function: Any) -> dict[str, str]:
    parameters = inspect.signature(function).parameters.values()
    return {p.name: repr(p.default) for p in parameters if p.default is not inspect.Parameter.empty}


def _field_default(field_: dataclasses.Field) -> str:
    if field_.default_factory is not dataclasses.MISSING:
        return repr(field_.default_factory())
    return repr(field_.default)


def _search_option_defaults() -> dict[str, str]:
    defaults = peft_s3.SearchOptions()
    return {name: repr(getattr(defaults, name)) for name in peft_s3.SearchOptions.names()}


def library_defaults() -> dict[str, dict[str, str]]:
    """The defaults a variant inherits (as repr strings): `default` means these, and they change between commits."""
    return {
        "trainer": {**_defaults(peft_s3.S3SearchTrainer.__init__), **_search_option_defaults()},
        "config": {f.name: _field_default(f) for f in dataclasses.fields(peft_s3.S3SearchConfig) if f.init},
        "resolve": _defaults(peft_s3.resolve),
    }


def _git_commit() -> Optional[str]:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "peft_s3"], cwd=root, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + (" (peft_s3 modified)" if dirty.stdout.strip() else "")


def _start_results(path: Path, resume: bool, variants: Sequence[Variant], settings: Settings) -> dict[str, Any]:
    """The JSON to append to: the old one with --resume (same settings, library defaults and variant specs
    required), else new."""
    old = _load(path) if resume else {}
    # Files from before a setting existed were made at its default.
    if old and dataclasses.asdict(Settings(**old["settings"])) != dataclasses.asdict(settings):
        raise ValueError(
            f"{path} was written with settings {old['settings']}; these are {dataclasses.asdict(settings)}."
        )
    defaults = library_defaults()
    if old and old.get("library_defaults") != defaults:
        recorded = old.get("library_defaults") or {}
        changed = {
            f"{group}.{name}": (recorded.get(group, {}).get(name), value)
            for group, values in defaults.items()
            for name, value in values.items()
            if recorded.get(group, {}).get(name) != value
        }
        raise ValueError(
            f"{path} was written with other library defaults, so its runs and new ones would not be comparable under "
            f"the same variant names; write to a new --output. Changed (then, now): {changed or recorded}."
        )
    results = old or {
        "settings": dataclasses.asdict(settings),
        "library_defaults": defaults,
        "variants": {},
        "commands": [],
        "runs": [],
    }
    results.setdefault("commits", []).append(_git_commit())
    for variant in variants:
        known = results["variants"].get(variant.name)
        if known is not None and known != variant.spec():
            raise ValueError(
                f"{path} has results of variant {variant.name!r} with the spec {known}, not {variant.spec()}: "
                "give the new spec another name."
            )
        results["variants"][variant.name] = variant.spec()
    results["commands"].append(shlex.join(["python", *sys.argv]))
    return results


def run_suite(
    cases: Sequence[Case],
    seeds: Sequence[int],
    variants: Sequence[Variant],
    output: Path,
    resume: bool = False,
    settings: Settings = Settings(),
    check: bool = True,
) -> dict[str, Any]:
    """Run every (variant, case, seed) not yet in `output` (with `resume`), saving after each run."""
    if check:
        for variant in variants:
            check_variant(variant)
    results = _start_results(output, resume, variants, settings)
    done = {(run["variant"], run["case"], run["seed"]) for run in results["runs"]}
    # A (case, seed) that cannot be planted at these settings is reported, not a reason to stop the suite.
    unplantable = results.setdefault("unplantable", {})
    for variant in variants:
        for case in cases:
            for seed in seeds:
                teacher_key = f"{case.name} seed {seed}"
                if (variant.name, case.name, seed) in done or teacher_key in unplantable:
                    continue
                try:
                    run = run_case(case, seed, variant, settings)
                except UnplantableCase as error:
                    unplantable[teacher_key] = str(error)
                    _save(output, results)
                    print(f"     skipped: {error}", flush=True)
                    continue
                results["runs"].append(run)
                _save(output, results)
                print(_run_line(run), flush=True)
    _save(output, results)
    return results


def _run_line(run: dict[str, Any]) -> str:
    ranks = ",".join(str(rank) for rank in run["planted_rank"].values())
    probabilities = ",".join(f"{p:.2f}" for p in run["planted_p"].values())
    mark = "recovered" if run["recovered"] else "MISSED"
    return (
        f"{run['variant']:>12} {run['case']:<28} seed {run['seed']}: {mark:<9} ranks {ranks:<8} p {probabilities:<15} "
        f"loss {run['loss_start']:.2e}->{run['loss_search']:.2e} {run['seconds']:5.1f} s"
    )


# ---------------------------------------------------------------------------------------------------- reporting


def _rate(flags: Sequence[bool]) -> str:
    return f"{sum(flags)}/{len(flags)}" if flags else "-"


def summary_table(runs: Sequence[dict[str, Any]], variants: Sequence[str]) -> str:
    """Per variant: set recovery overall and by planted count, candidate recall by kind, ranks, p and time.

    `lora` ... `adapter` count planted candidates of that kind that were selected (over all cases); `n=1` ... count
    cases whose whole planted set was recovered, by the number of planted candidates, and so does `cases without /
    with an adapter` (adapters are the kind a search recovers least). `worst rank-n` is the lowest
    planted rank minus the planted count (0: the planted set holds the top p's). `planted gates better` counts runs
    whose student fits the targets at least as well with only the planted gates open as with the resolved ones.
    `misses: planted retrains better` counts the misses whose planted structure, trained alone, reaches a lower
    held-out MSE than the resolved one trained alone (a search failure; the other misses found a structure at least
    as good, so the case does not identify its plants), over the misses with that check.
    """
    kinds = peft_s3.CANDIDATE_KINDS
    counts = sorted({run["count"] for run in runs})
    header = ["variant", "recovered", *(f"n={c}" for c in counts), "cases without / with an adapter", *kinds]
    header += ["mean rank", "worst rank-n", "mean planted p", "planted gates better"]
    header += ["misses: planted retrains better", "s/run", "s total"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in variants:
        mine = [run for run in runs if run["variant"] == name]
        if not mine:
            continue
        row = [name, f"{_rate([r['recovered'] for r in mine])} ({_share(mine):.0%})"]
        row += [_rate([r["recovered"] for r in mine if r["count"] == c]) for c in counts]
        without_adapter = [r["recovered"] for r in mine if "adapter" not in r["kinds"]]
        with_adapter = [r["recovered"] for r in mine if "adapter" in r["kinds"]]
        row.append(f"{_rate(without_adapter)} / {_rate(with_adapter)}")
        for kind in kinds:
            selected = [
                selected
                for r in mine
                for (_, selected), k in zip(r["planted_selected"].items(), r["kinds"], strict=True)
                if k == kind
            ]
            row.append(_rate(selected))
        ranks = [rank for r in mine for rank in r["planted_rank"].values()]
        excess = [max(r["planted_rank"].values()) - r["count"] for r in mine]
        probabilities = [p for r in mine for p in r["planted_p"].values()]
        seconds = [r["seconds"] for r in mine]
        row += [
            f"{statistics.mean(ranks):.2f}",
            f"{statistics.mean(excess):.2f}",
            f"{statistics.mean(probabilities):.3f}",
            _rate([r["planted_gates_better"] for r in mine]),
            _rate([_planted_retrains_better(r) for r in mine if r.get("retrained_mse")]),
            f"{statistics.mean(seconds):.1f}",
            f"{sum(seconds):.0f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _planted_retrains_better(run: dict[str, Any]) -> bool:
    return run["retrained_mse"]["planted"] < run["retrained_mse"]["resolved"]


def _share(runs: Sequence[dict[str, Any]]) -> float:
    return sum(r["recovered"] for r in runs) / len(runs)


def case_table(runs: Sequence[dict[str, Any]], variants: Sequence[str]) -> str:
    """Per case and variant: seeds recovered, the worst planted rank per seed, and seconds per run."""
    cases = list(dict.fromkeys(run["case"] for run in runs))
    header = ["case", *variants]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for case in cases:
        row = [case]
        for name in variants:
            mine = [r for r in runs if r["case"] == case and r["variant"] == name]
            if not mine:
                row.append("-")
                continue
            worst = "/".join(str(max(r["planted_rank"].values())) for r in mine)
            seconds = statistics.mean(r["seconds"] for r in mine)
            row.append(f"{_rate([r['recovered'] for r in mine])} (rank {worst}; {seconds:.1f} s)")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def report(results: dict[str, Any]) -> str:
    variants = list(results["variants"])
    tables = summary_table(results["runs"], variants) + "\n\n" + case_table(results["runs"], variants)
    skipped = sorted(results.get("unplantable", {}))
    return tables + (
        f"\n\nNot run, the planted deltas cannot reach the case's effect: {', '.join(skipped)}" if skipped else ""
    )


# ---------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help=f"a search setting, repeatable; JSON keys {list(VARIANT_KEYS)}. Default: default={{}}.",
    )
    parser.add_argument("--cases", nargs="+", help="case names or shell patterns (default: all; see --list)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--output", type=Path, default=Path(DEFAULT_OUTPUT))
    parser.add_argument("--resume", action="store_true", help="skip (variant, case, seed) runs already in --output")
    parser.add_argument("--report-only", action="store_true", help="print the tables of --output and exit")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument(
        "--retrain-misses",
        action="store_true",
        help="train the planted and the resolved structure of each miss in --output alone (where not done yet), "
        "print the tables and exit",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models gain nothing from more)")
    parser.add_argument(
        "--hidden-size", type=int, default=Settings.hidden_size, help="of every case's model (intermediate: twice it)"
    )
    parser.add_argument(
        "--init-scale",
        type=float,
        default=Settings.init_scale,
        help="the base's initializer_range in units of hidden_size**-0.5",
    )
    return parser


def _list_cases() -> str:
    lines = []
    for case in CASES.values():
        plants = "; ".join(f"L{p.layer} {p.position} {p.kind}" for p in case.plants)
        lines.append(f"{case.name:<28} {case.model}, {case.num_layers} layers: {plants}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = _parser().parse_args(argv)
    if args.list:
        print(_list_cases())
        return
    if args.report_only:
        print(report(_load(args.output)))
        return
    torch.set_num_threads(args.threads)
    transformers_logging.set_verbosity_error()
    if args.retrain_misses:
        print(report(retrain_misses(args.output)))
        return
    try:
        settings = Settings(hidden_size=args.hidden_size, init_scale=args.init_scale)
        variants = [parse_variant(text) for text in args.variant] or [DEFAULT_VARIANT]
        cases = select_cases(args.cases)
        for variant in variants:
            check_variant(variant)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    names = [variant.name for variant in variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"error: variant names must be unique, got {names}.")
    start = time.perf_counter()
    results = run_suite(cases, args.seeds, variants, args.output, args.resume, settings, check=False)
    print(f"\n{len(results['runs'])} runs in {args.output} ({time.perf_counter() - start:.0f} s this call)\n")
    print(report(results))


if __name__ == "__main__":
    main()
