"""Property-based checks over random small models, budgets, ranks and candidate kinds (hypothesis)."""

from __future__ import annotations

from pathlib import Path
from tempfile import TemporaryDirectory

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

from peft_s3 import S3SearchConfig, SearchedStructure, apply_structure, resolve
from peft_s3.tuner.config import CANDIDATE_KINDS
from peft_s3.tuner.search_space import build_search_space

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

SETTINGS = hypothesis.settings(max_examples=8, deadline=None, derandomize=True, database=None)


@st.composite
def tiny_models(draw: st.DrawFn) -> tuple[str, dict]:
    heads = draw(st.sampled_from([1, 2]))
    return draw(st.sampled_from(["bert", "llama"])), {
        "vocab_size": 32,
        "hidden_size": heads * draw(st.sampled_from([4, 8])),
        "intermediate_size": draw(st.sampled_from([8, 12, 24])),
        "num_hidden_layers": draw(st.integers(1, 3)),
        "num_attention_heads": heads,
        "max_position_embeddings": 16,
    }


def _build(arch: str, sizes: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "bert":
        return BertForSequenceClassification(BertConfig(num_labels=2, **sizes))
    return LlamaForCausalLM(LlamaConfig(num_key_value_heads=1, **sizes))


@st.composite
def searches(draw: st.DrawFn) -> tuple[str, dict, dict, float]:
    arch, sizes = draw(tiny_models())
    config = {
        "max_rank": draw(st.sampled_from([1, 2, 4])),
        "candidate_kinds": draw(st.lists(st.sampled_from(CANDIDATE_KINDS), min_size=1, max_size=4, unique=True)),
        "task_type": "SEQ_CLS" if arch == "bert" else "CAUSAL_LM",
    }
    # Where in the space the budget falls, from just above the smallest candidate to just below the whole space.
    return arch, sizes, config, draw(st.floats(0.0, 1.0))


def _search_model(arch: str, sizes: dict, config: dict, position: float):
    space = build_search_space(_build(arch, sizes, 0), S3SearchConfig(budget=1, **config))
    smallest, total = min(c.num_params for c in space), sum(c.num_params for c in space)
    hypothesis.assume(total > smallest + 1)
    budget = smallest + int(position * (total - 1 - smallest))
    return get_peft_model(_build(arch, sizes, 0), S3SearchConfig(budget=budget, **config)), budget


@SETTINGS
@hypothesis.given(search=searches(), alpha_scale=st.sampled_from([0.0, 1.0, 5.0]), seed=st.integers(0, 2**16))
def test_expected_size_holds_the_budget_and_the_resolved_size_fits(search, alpha_scale: float, seed: int) -> None:
    model, budget = _search_model(*search)
    bank = model.base_model.gate_bank()
    with torch.no_grad():
        bank.alpha.copy_(alpha_scale * torch.randn(bank.alpha.shape, generator=torch.Generator().manual_seed(seed)))
    probabilities = model.base_model.gate_probabilities()
    assert torch.isfinite(probabilities).all()
    assert bank.expected_size == pytest.approx(budget, rel=1e-6)
    structure = resolve(model)
    assert 0 < structure.num_trainable_params <= budget
    assert structure.num_trainable_params == sum(c.num_params for c in structure.candidates)


@SETTINGS
@hypothesis.given(search=searches(), seed=st.integers(0, 2**16))
def test_search_and_structure_round_trip_through_save_and_load(search, seed: int) -> None:
    arch, sizes, _, _ = search
    model, _ = _search_model(*search)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(generator=torch.Generator().manual_seed(seed))
    structure = resolve(model)
    with TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        reloaded = PeftModel.from_pretrained(_build(arch, sizes, 0), folder)
        assert torch.equal(reloaded.base_model.gate_probabilities(), model.base_model.gate_probabilities())
        assert resolve(reloaded) == structure
        assert SearchedStructure.load(structure.save(Path(folder) / "s.json")) == structure
    retrain = apply_structure(_build(arch, sizes, 0), structure)
    assert sum(c.num_params for c in retrain.base_model.candidates()) == structure.num_trainable_params
