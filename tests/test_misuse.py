"""Inputs that once gave silently wrong structures or deep stack traces: each now fails early and says why."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
from conftest import TINY_MODELS, make_batch
from peft import get_peft_model
from transformers import (
    ElectraConfig,
    ElectraForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from peft_s3 import S3SearchConfig, SearchedStructure, apply_structure, resolve
from peft_s3.gate_report import gate_report

BUDGET = 300


def _search_model():
    return get_peft_model(TINY_MODELS["bert"](), S3SearchConfig(budget=BUDGET, task_type="SEQ_CLS"))


def test_resolve_refuses_non_finite_gates():
    model = _search_model()
    with torch.no_grad():
        model.base_model.s3_alpha["default"][3] = float("nan")
    with pytest.raises(ValueError, match=r"not finite.*search diverged"):
        resolve(model)


def test_apply_structure_refuses_the_base_a_search_wrapped():
    base = TINY_MODELS["bert"]()
    search = get_peft_model(base, S3SearchConfig(budget=BUDGET, task_type="SEQ_CLS"))
    structure = resolve(search)
    with pytest.raises(ValueError, match=r"already carries peft adapter layers.*fresh base"):
        apply_structure(base, structure)
    # The search is untouched: it still resolves to the same structure.
    assert resolve(search).candidates == structure.candidates


def test_failed_apply_structure_leaves_the_search_model_intact(tmp_path):
    search = _search_model()
    structure = resolve(search)
    with pytest.raises(ValueError, match="already carries peft adapter layers"):
        apply_structure(search, structure)
    assert search.peft_config["default"].is_search
    assert resolve(search).candidates == structure.candidates
    search.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["budget"] == BUDGET and saved["structure"] is None


def test_get_peft_model_refuses_a_wrapped_base():
    base = TINY_MODELS["bert"]()
    get_peft_model(base, S3SearchConfig(budget=BUDGET, task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="already carries peft adapter layers"):
        get_peft_model(base, S3SearchConfig(budget=BUDGET, task_type="SEQ_CLS"), adapter_name="other")


def test_saved_structure_lists_each_module_to_save_once(tmp_path):
    structure = resolve(_search_model())
    model = apply_structure(TINY_MODELS["bert"](), structure)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"]
    assert sorted(saved) == ["classifier", "score"]


def _tiny_encoder_config(config_class):
    extra = {"embedding_size": 16} if config_class is ElectraConfig else {}
    return config_class(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
        **extra,
    )


@pytest.mark.parametrize(
    "model_class, config_class",
    [(RobertaForSequenceClassification, RobertaConfig), (ElectraForSequenceClassification, ElectraConfig)],
)
def test_merge_and_unload_with_a_non_linear_head(model_class, config_class):
    # Their classification heads are small modules (dense, dropout, out_proj), not a Linear with a weight.
    config = _tiny_encoder_config(config_class)
    structure = resolve(get_peft_model(model_class(config), S3SearchConfig(budget=BUDGET, task_type="SEQ_CLS")))
    model = apply_structure(model_class(config), structure)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.normal_(std=0.1)
    model.eval()
    input_ids = make_batch("bert")["input_ids"]
    expected = model(input_ids=input_ids).logits
    merged = model.merge_and_unload()
    assert not isinstance(merged, type(model))
    torch.testing.assert_close(merged(input_ids=input_ids).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "budget, expected",
    [
        (np.float32(0.01), 0.01),
        (np.float64(0.01), 0.01),
        (np.int64(300), 300),
        (torch.tensor(300), 300),
        (torch.tensor(0.01), 0.01),
    ],
)
def test_numpy_and_torch_scalar_budgets_become_python_numbers(budget, expected):
    config = S3SearchConfig(budget=budget)
    assert config.budget == expected and type(config.budget) is type(expected)
    json.dumps(config.to_dict())


@pytest.mark.parametrize("budget", [torch.tensor([300]), torch.tensor(True), np.float32("nan")])
def test_non_scalar_or_non_finite_budgets_are_refused(budget):
    with pytest.raises(ValueError, match="budget=.*is not allowed"):
        S3SearchConfig(budget=budget)


@pytest.mark.parametrize("name", ["tau", "beta"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), 0.0, -1.0])
def test_temperatures_must_be_finite_and_positive(name, value):
    with pytest.raises(ValueError, match=f"{name}=.*finite number > 0"):
        S3SearchConfig(budget=BUDGET, **{name: value})


def test_an_exclusion_that_empties_the_space_is_named():
    with pytest.raises(ValueError, match=r"exclude_modules='\.\*' excludes every module"):
        get_peft_model(TINY_MODELS["bert"](), S3SearchConfig(budget=BUDGET, exclude_modules=".*"))


def _trained_structure() -> SearchedStructure:
    model = _search_model()
    with torch.no_grad():
        alpha = model.base_model.s3_alpha["default"]
        alpha.copy_(torch.randn(alpha.shape, generator=torch.Generator().manual_seed(0)))
    return resolve(model)


def test_resolve_warns_about_a_search_that_never_trained():
    with pytest.warns(UserWarning, match=r"same alpha .*the search has not trained"):
        resolve(_search_model())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _trained_structure()


def test_a_truncated_structure_file_is_named(tmp_path):
    file = _trained_structure().save(tmp_path)
    file.write_text(file.read_text()[:100])
    with pytest.raises(ValueError, match=rf"{file} is not valid JSON .*truncated"):
        SearchedStructure.load(file)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda row: row.pop("kind"), r" is not a scored candidate: missing keys \['kind'\]"),
        (lambda row: row.update(num_params="12"), r"\.num_params='12' is not allowed: it must be int"),
        (lambda row: row.update(num_params=True), r"\.num_params=True is not allowed: it must be int"),
        (lambda row: row.update(kind="prefix"), r"\.kind='prefix' is not allowed: choose one of \['lora'"),
    ],
)
def test_a_malformed_structure_row_is_named(tmp_path, edit, message):
    file = _trained_structure().save(tmp_path)
    data = json.loads(file.read_text())
    edit(data["search_space"][0])
    file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"{file}: search_space\[0\]{message}"):
        SearchedStructure.load(file)


def test_a_structure_without_selected_candidates_is_refused():
    structure = _trained_structure()
    empty = dataclasses.replace(
        structure, search_space=[dataclasses.replace(c, selected=False) for c in structure.search_space]
    )
    for convert in (empty.to_peft_config, empty.to_lora_config, lambda: apply_structure(TINY_MODELS["bert"](), empty)):
        with pytest.raises(ValueError, match=r"selects none of its \d+ candidates.*at least one selected candidate"):
            convert()


def test_lora_conversion_without_module_infos_is_refused():
    structure = dataclasses.replace(_trained_structure(), modules={})
    with pytest.raises(ValueError, match=r"modules has no entry for .*needs a ModuleInfo"):
        structure.to_lora_config(policy="drop")


def test_a_string_target_module_that_matches_nothing_explains_the_regex():
    with pytest.raises(ValueError, match=r"whole module name.*pass a list: \['query'\]"):
        get_peft_model(TINY_MODELS["bert"](), S3SearchConfig(budget=BUDGET, target_modules="query"))
    # A list is matched by name, as in peft.
    get_peft_model(TINY_MODELS["bert"](), S3SearchConfig(budget=BUDGET, target_modules=["query"]))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda row: row.pop("kind"), r"Row 0 of the gate report lacks \['kind'\]"),
        (
            lambda row: row.update(num_params="12"),
            r"Row 0 of the gate report .* has num_params='12': it must be an int",
        ),
        (lambda row: row.update(alpha=None), r"Row 0 of the gate report .* has alpha=None: it must be a number"),
    ],
)
def test_a_malformed_gate_report_row_is_named(edit, message):
    report = gate_report(_search_model())
    edit(report["candidates"][0])
    with pytest.raises(ValueError, match=message):
        resolve(report)
