"""The baseline builders of the quality benchmark (benchmarks/baselines.py) on a tiny BERT."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import peft
import pytest
import torch
from conftest import make_batch, tiny_bert

import peft_s3

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "baselines.py"
_SPEC = importlib.util.spec_from_file_location("benchmark_baselines", _PATH)
baselines = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = baselines
_SPEC.loader.exec_module(baselines)


@pytest.fixture(scope="module")
def report() -> dict:
    return baselines.search_space_report(tiny_bert())


def _trainable(model: torch.nn.Module) -> dict[str, int]:
    return {name: p.numel() for name, p in model.named_parameters() if p.requires_grad and "classifier" not in name}


def _size(report: dict, kind: str) -> int:
    return sum(row["num_params"] for row in report["candidates"] if row["kind"] == kind)


def test_search_space_report_leaves_model_untouched_and_lists_the_mix_space(report):
    model = tiny_bert()
    before = {name: p.clone() for name, p in model.state_dict().items()}
    baselines.search_space_report(model)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(p, before[name]) for name, p in model.state_dict().items())
    assert {row["kind"] for row in report["candidates"]} == set(peft_s3.CANDIDATE_KINDS)
    lora_only = baselines.search_space_report(tiny_bert(), candidate_kinds=peft_s3.LORA_SPACE)
    assert {row["kind"] for row in lora_only["candidates"]} == {"lora"}


@pytest.mark.parametrize(
    ("name", "marker", "kind"),
    [("bitfit", "s3_bias", "bitfit"), ("lnfit", "s3_scale", "lnfit"), ("adapter-lr", "s3_adapter_", "adapter")],
)
def test_kind_baselines_train_every_candidate_of_their_kind_and_nothing_else(report, name, marker, kind):
    model = baselines.build_baseline(name, tiny_bert(), report)
    trainable = _trainable(model)
    assert trainable and all(marker in parameter for parameter in trainable)
    assert sum(trainable.values()) == _size(report, kind)
    assert {c.kind for c in model.base_model.candidates()} == {kind}
    assert model.base_model.gate_bank() is None  # a fixed structure: no gates to search
    model(**make_batch("bert")).loss.backward()


@pytest.mark.parametrize(("name", "rank"), [("lora-r1-qv", 1), ("lora-r8-qv", 8)])
def test_lora_qv_baselines_use_query_and_value_with_the_search_space_scaling(report, name, rank):
    model = baselines.build_baseline(name, tiny_bert(), report)
    trainable = _trainable(model)
    targets = {parameter.split(".lora_")[0].rsplit(".", 1)[-1] for parameter in trainable}
    assert targets == {"query", "value"}
    hidden = tiny_bert().config.hidden_size
    layers = tiny_bert().config.num_hidden_layers
    assert sum(trainable.values()) == layers * 2 * rank * 2 * hidden
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert layer.scaling["default"] == pytest.approx(baselines.lora_candidate_scaling(report))


def test_lora_all_linear_is_the_whole_lora_space(report):
    model = baselines.build_baseline("lora-all-linear", tiny_bert(), report)
    assert sum(_trainable(model).values()) == _size(report, "lora")
    modules = {row["module"] for row in report["candidates"] if row["kind"] == "lora"}
    assert {name for name, module in model.base_model.model.named_modules() if hasattr(module, "lora_A")} == modules


def test_every_baseline_and_random_structure_trains_the_report_head():
    head = ["pooler"]
    report = baselines.search_space_report(tiny_bert(), modules_to_save=head)
    assert head == ["pooler"]  # peft extends the config's list in place; the caller's must stay as it was
    models = [baselines.build_baseline(name, tiny_bert(), report) for name in baselines.BASELINES]
    models.append(peft_s3.apply_structure(tiny_bert(), baselines.random_structure(report, 200, seed=0)))
    for model in models:
        trained = {n.split(".modules_to_save")[0] for n, p in model.named_parameters() if p.requires_grad}
        assert {"base_model.model.bert.pooler", "base_model.model.classifier"} <= trained


def test_unknown_baseline_and_missing_kind_are_clear_errors(report):
    with pytest.raises(ValueError, match="Unknown baseline 'prefix'"):
        baselines.build_baseline("prefix", tiny_bert(), report)
    lora_only = baselines.search_space_report(tiny_bert(), candidate_kinds=peft_s3.LORA_SPACE)
    with pytest.raises(ValueError, match="no candidate of kind 'bitfit'"):
        baselines.kind_structure(lora_only, "bitfit")


@pytest.mark.parametrize("budget", [100, 300, 0.05])
def test_random_structure_is_seeded_within_budget_and_maximal(report, budget):
    structure = baselines.random_structure(report, budget, seed=3)
    limit = budget if budget >= 1 else int(budget * report["backbone_num_params"])
    assert structure.budget == limit
    assert 0 < structure.num_trainable_params <= limit
    left = limit - structure.num_trainable_params
    assert all(c.num_params > left for c in structure.search_space if not c.selected)
    again = baselines.random_structure(report, budget, seed=3)
    assert again.structure == structure.structure
    others = {str(baselines.random_structure(report, budget, seed=s).structure) for s in range(5)}
    assert len(others) > 1
    model = peft_s3.apply_structure(tiny_bert(), structure)
    assert sum(_trainable(model).values()) == structure.num_trainable_params


def test_random_structure_below_the_smallest_candidate_is_refused(report):
    smallest = min(row["num_params"] for row in report["candidates"])
    with pytest.raises(ValueError, match="no structure fits"):
        baselines.random_structure(report, smallest - 1, seed=0)


def test_composition_counts_kinds_in_candidate_order(report):
    structure = baselines.random_structure(report, 400, seed=0)
    counts = baselines.composition(structure.candidates)
    assert list(counts) == [kind for kind in peft_s3.CANDIDATE_KINDS if kind in counts]
    assert sum(counts.values()) == len(structure.candidates)


def test_lora_qv_needs_a_model_type_peft_knows(report):
    model = tiny_bert()
    model.config.model_type = "not-a-model"
    with pytest.raises(ValueError, match="no default LoRA target modules for model type 'not-a-model'"):
        baselines.baseline_config("lora-r1-qv", model, report)
    assert isinstance(baselines.baseline_config("lora-all-linear", model, report), peft.LoraConfig)
