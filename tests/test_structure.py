"""Resolving a search into a fixed structure, its converters, persistence, model card and upload path."""

from __future__ import annotations

import collections
import inspect
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from conftest import TASK_TYPES, TINY_MODELS, make_batch
from huggingface_hub import HfApi, ModelCard
from test_trainer import MarkerTask, arguments, search_model
from transformers import BertConfig, BertForSequenceClassification

import peft_s3
from peft_s3.gate_report import GATE_REPORT_FILE, load_gate_report, save_gate_report
from peft_s3.resolution import resolve
from peft_s3.sharing import (
    MODEL_CARD_HEADING,
    STRUCTURE_FIGURE,
    push_to_hub_with_structure,
    save_pretrained_with_structure,
    write_model_card,
)
from peft_s3.structure import LORA_CONVERSION_LIMITS, STRUCTURE_FILE, SearchedStructure, apply_structure

BERT_LAYER = "bert.encoder.layer.0."


def _search(arch: str = "bert", budget: int | float = 100, **kwargs: Any) -> peft.PeftModel:
    config = peft_s3.S3SearchConfig(budget=budget, task_type=TASK_TYPES[arch], **kwargs)
    return peft.get_peft_model(TINY_MODELS[arch](), config)


def _names(model: peft.PeftModel) -> list[str]:
    return [candidate.name for candidate in model.base_model.candidates()]


def _set_alpha(model: peft.PeftModel, alpha: torch.Tensor) -> None:
    with torch.no_grad():
        model.base_model.s3_alpha["default"].copy_(alpha)


def _prefer(model: peft.PeftModel, ranked: list[str]) -> None:
    """Give `ranked` the highest alphas, in that order, and every other candidate the same low alpha."""
    names = _names(model)
    alpha = torch.full((len(names),), -5.0)
    for rank, name in enumerate(ranked):
        alpha[names.index(name)] = 3.0 - 0.5 * rank
    _set_alpha(model, alpha)


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _head_params(structure: SearchedStructure, arch: str = "bert") -> int:
    """Parameters of the head modules_to_save (counted on an unwrapped model: peft keeps a frozen original)."""
    heads = set(structure.modules_to_save or [])
    base = TINY_MODELS[arch]()
    return sum(
        p.numel() for name, module in base.named_modules() if name.split(".")[-1] in heads for p in module.parameters()
    )


def _logits(model: torch.nn.Module, arch: str = "bert") -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**make_batch(arch)).logits


# ----------------------------------------------------------------------------------------------- selection


def test_resolve_takes_candidates_by_descending_p_until_the_budget_is_full() -> None:
    model = _search(budget=100)
    # Alphas falling in gate order: p falls in gate order too. Sizes (hidden 16): q/k/v LoRA 32, their BitFit 16.
    _set_alpha(model, -0.1 * torch.arange(len(_names(model)), dtype=torch.float32))
    structure = resolve(model, method="greedy")
    # 32 + 16 + 32 + 16 = 96; the next candidate (value LoRA, 32) and every later one (>= 16) would exceed 100.
    expected = ["query:lora[0]", "query:bitfit", "key:lora[0]", "key:bitfit"]
    assert [c.name for c in structure.candidates] == [f"{BERT_LAYER}attention.self.{name}" for name in expected]
    assert structure.num_trainable_params == 96
    assert structure.budget == 100
    p = model.base_model.gate_probabilities().tolist()
    assert [c.p for c in structure.candidates] == p[:4]
    assert len(structure.search_space) == len(p)


def test_resolve_skips_a_candidate_that_does_not_fit_and_fills_with_smaller_ones() -> None:
    model = _search(budget=64)
    query, intermediate, key = (
        f"{BERT_LAYER}attention.self.query:lora[0]",
        f"{BERT_LAYER}intermediate.dense:lora[0]",
        f"{BERT_LAYER}attention.self.key:lora[0]",
    )
    _prefer(model, [query, intermediate, key])
    structure = resolve(model, method="greedy")
    # query (32) fits; intermediate (48) would make 80 > 64 and is skipped; key (32) brings the total to 64.
    assert [c.name for c in structure.candidates] == [query, key]
    assert structure.num_trainable_params == 64
    skipped = next(c for c in structure.search_space if c.name == intermediate)
    assert not skipped.selected and skipped.p > structure.candidates[1].p


def test_resolve_breaks_ties_by_candidate_order_and_is_deterministic() -> None:
    model = _search(budget=100)  # every alpha is alpha_init = 0: all p are equal
    first = resolve(model, method="greedy")
    assert [c.name for c in first.candidates] == _names(model)[:4]
    assert resolve(model, method="greedy") == first


def test_resolve_ranks_saturated_p_by_alpha() -> None:
    model = _search(budget=100)
    names = _names(model)
    alpha = torch.zeros(len(names))
    alpha[2], alpha[4] = 30.0, 40.0  # key and value LoRA, 32 parameters each
    _set_alpha(model, alpha)
    p = model.base_model.gate_probabilities()
    assert p[2] == p[4] == 1.0  # float32 saturation hides which one the search preferred
    assert [c.name for c in resolve(model, budget=32, method="greedy").candidates] == [names[4]]


def test_resolve_is_greedy_under_random_alphas() -> None:
    model = _search("t5", budget=0.02, max_rank=2)
    _set_alpha(model, torch.randn(len(_names(model)), generator=torch.Generator().manual_seed(0)))
    structure = resolve(model, method="greedy")
    space = structure.search_space
    ranked = sorted(range(len(space)), key=lambda i: (-space[i].p, i))
    assert 0 < structure.num_trainable_params <= structure.budget == int(0.02 * structure.backbone_num_params)
    taken = 0
    for index in ranked:
        # A candidate is left out exactly when it does not fit next to those ranked above it.
        fits = taken + space[index].num_params <= structure.budget
        assert space[index].selected == fits, space[index].name
        taken += space[index].num_params if fits else 0


def test_budget_override_as_count_and_fraction() -> None:
    model = _search(budget=100)
    _set_alpha(model, torch.randn(len(_names(model)), generator=torch.Generator().manual_seed(1)))
    backbone = model.base_model.backbone_num_params
    by_fraction = resolve(model, budget=0.05)
    assert by_fraction.budget == int(0.05 * backbone)
    assert by_fraction == resolve(model, budget=int(0.05 * backbone))
    assert by_fraction.num_trainable_params > resolve(model).num_trainable_params


@pytest.mark.parametrize("budget", [-3, 0, 1.5, True, float("nan"), "100"])
def test_resolve_rejects_invalid_budgets(budget: Any) -> None:
    model = _search()
    with pytest.raises(ValueError, match=r"budget="):
        resolve(model, budget=budget)


def test_resolve_rejects_a_budget_below_the_smallest_candidate() -> None:
    with pytest.raises(ValueError, match=r"allows 15 trainable parameters, fewer than the smallest candidate \(16\)"):
        resolve(_search(), budget=15)


def test_resolve_rejects_models_without_a_search_adapter(tmp_path: Path) -> None:
    structure = resolve(_search())
    fixed = apply_structure(TINY_MODELS["bert"](), structure)
    with pytest.raises(ValueError, match="fixed structure"):
        resolve(fixed)
    # A retraining run may still write gate reports; they describe the structure but cannot be resolved.
    report = load_gate_report(save_gate_report(fixed, tmp_path))
    assert report["budget"] is None and [row["p"] for row in report["candidates"]] == [1.0] * len(structure.candidates)
    with pytest.raises(ValueError, match="fixed structure"):
        resolve(tmp_path)
    lora = peft.get_peft_model(TINY_MODELS["bert"](), peft.LoraConfig(target_modules=["query"]))
    with pytest.raises(ValueError, match="Expected a PeftModel with an S3 adapter.*LoraModel"):
        resolve(lora)
    with pytest.raises(ValueError, match="Unknown S3 adapter 'other'"):
        resolve(_search(), adapter_name="other")


# ----------------------------------------------------------------------------------------------- persistence


def test_gate_report_and_structure_round_trip(tmp_path: Path) -> None:
    model = _search("t5", budget=200)
    _set_alpha(model, torch.randn(len(_names(model)), generator=torch.Generator().manual_seed(2)))
    path = save_gate_report(model, tmp_path / "checkpoint-10")
    assert path == tmp_path / "checkpoint-10" / GATE_REPORT_FILE
    report = load_gate_report(path.parent)
    assert report["candidates"] == json.loads(json.dumps(model.base_model.gate_report()))
    assert report["budget"] == model.base_model.budget()
    assert report["search_space_signature"] == model.peft_config["default"].search_space_signature
    assert report["config"]["budget"] == 200
    assert report["modules"]["encoder.block.0.layer.0.layer_norm"] == {"type": "norm", "bias_params": 0}

    structure = resolve(model)
    assert resolve(path.parent) == structure
    assert resolve(path) == structure
    assert structure.save(tmp_path / "out") == tmp_path / "out" / STRUCTURE_FILE
    assert SearchedStructure.load(tmp_path / "out") == structure
    assert SearchedStructure.load(structure.save(tmp_path / "named.json")) == structure

    with pytest.raises(ValueError, match="belongs to adapter 'default'"):
        resolve(path.parent, adapter_name="other")
    with pytest.raises(FileNotFoundError, match=GATE_REPORT_FILE):
        load_gate_report(tmp_path / "out")
    data = json.loads((tmp_path / "out" / STRUCTURE_FILE).read_text())
    del data["budget"]
    (tmp_path / "broken.json").write_text(json.dumps({**data, "colour": "blue"}))
    with pytest.raises(ValueError, match=r"unexpected keys \['colour'\], missing keys \['budget'\]"):
        SearchedStructure.load(tmp_path / "broken.json")


def test_a_mid_search_checkpoint_resolves_alike_from_its_directory_and_its_loaded_model(tmp_path: Path) -> None:
    # A default search anneals tau and the expected size over its first half; checkpoint-2 of 4 is inside that.
    model = search_model(budget=0.02)
    args = arguments(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    peft_s3.S3SearchTrainer(model=model, args=args, train_dataset=MarkerTask(64)).train()
    checkpoint = tmp_path / "checkpoint-2"
    from_directory = resolve(checkpoint)
    from_model = resolve(peft.PeftModel.from_pretrained(TINY_MODELS["bert"](), checkpoint))

    stored_p = [row["p"] for row in load_gate_report(checkpoint)["candidates"]]
    # The checkpoint's report holds p at the annealed settings, far from the p at the config's.
    assert max(abs(stored - c.p) for stored, c in zip(stored_p, from_model.search_space, strict=True)) > 0.1
    assert from_directory.structure == from_model.structure
    assert [c.p for c in from_directory.search_space] == [c.p for c in from_model.search_space]
    # At the end of the search the schedules are over: the report's p are those resolve ranks by.
    final = resolve(tmp_path / "checkpoint-4")
    stored_final = [row["p"] for row in load_gate_report(tmp_path / "checkpoint-4")["candidates"]]
    assert [c.p for c in final.search_space] == pytest.approx(stored_final, abs=1e-6)


def test_table_and_markdown_list_each_module_and_kind() -> None:
    model = _search(budget=200, max_rank=2)
    query, layer_norm = f"{BERT_LAYER}attention.self.query", f"{BERT_LAYER}output.LayerNorm"
    _prefer(model, [f"{query}:lora[0]", f"{query}:lora[1]", f"{layer_norm}:lnfit"])
    structure = resolve(model, budget=80)
    lines = str(structure).splitlines()
    assert lines[0].startswith("S3 searched structure: 3 candidates, 80 trainable parameters")
    assert lines[1].split() == ["stack", "layer", "position", "kind", "params", "p"]
    assert lines[2].split()[:6] == ["bert.encoder.layer", "0", "attention.self.query", "lora", "r=2", "64"]
    assert lines[3].split()[:5] == ["bert.encoder.layer", "0", "output.LayerNorm", "lnfit", "16"]
    markdown = structure.to_markdown().splitlines()
    assert markdown[2:4] == ["| stack | layer | position | kind | params | p |", "|---|---|---|---|---|---|"]
    assert markdown[4].startswith("| `bert.encoder.layer` | 0 | attention.self.query | lora r=2 | 64 |")
    assert len(markdown) == 6


# ----------------------------------------------------------------------------------------------- retraining


@pytest.mark.parametrize(("arch", "max_rank"), [("bert", 1), ("t5", 2)])
def test_apply_structure_builds_exactly_the_structure(arch: str, max_rank: int) -> None:
    model = _search(arch, budget=0.03, max_rank=max_rank)
    names = _names(model)
    alpha = torch.randn(len(names), generator=torch.Generator().manual_seed(3))
    # The first LoRA module gets all its rank slots, so the structure has a module of rank max_rank.
    alpha[[i for i, name in enumerate(names) if name.startswith(names[0].split(":")[0] + ":lora")]] = 10.0
    _set_alpha(model, alpha)
    structure = resolve(model)
    config = structure.to_peft_config()
    assert config.budget is None and config.structure == structure.structure
    assert max(kinds.get("lora", 0) for kinds in config.structure.values()) == max_rank

    base = TINY_MODELS[arch]()
    reference = _logits(base, arch)
    retrain = apply_structure(base, structure)
    # LoRA slots are interchangeable once retrained from scratch: a module keeps its rank, not its slot numbers.
    built = collections.Counter((c.module, c.kind) for c in retrain.base_model.candidates())
    assert built == collections.Counter((c.module, c.kind) for c in structure.candidates)
    assert retrain.base_model.gate_bank() is None
    assert _trainable(retrain) == structure.num_trainable_params + _head_params(structure, arch)
    # Freshly initialised: every candidate starts as the identity.
    assert torch.allclose(_logits(retrain, arch), reference, atol=1e-6)


def test_apply_structure_errors_and_size_mismatch() -> None:
    structure = resolve(_search())
    with pytest.raises(ValueError, match="does not have"):
        apply_structure(TINY_MODELS["t5"](), structure)
    wider = BertForSequenceClassification(
        BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    )
    with pytest.warns(UserWarning, match=f"has {structure.num_trainable_params} trainable parameters"):
        apply_structure(wider, structure)


# ----------------------------------------------------------------------------------------------- LoraConfig


def _lora_model(structure: SearchedStructure, policy: str) -> tuple[peft.PeftModel, Any]:
    conversion = structure.lora_conversion(policy)
    base = TINY_MODELS["bert"]()
    return peft.get_peft_model(base, conversion.config), conversion


def test_lora_structure_converts_exactly_with_the_search_scaling() -> None:
    model = _search(budget=96, candidate_kinds=["lora"], max_rank=2, lora_alpha=6)
    query, value = f"{BERT_LAYER}attention.self.query", "bert.encoder.layer.1.attention.self.value"
    _prefer(model, [f"{query}:lora[0]", f"{value}:lora[0]", f"{query}:lora[1]"])
    structure = resolve(model)
    assert structure.structure == {query: {"lora": 2}, value: {"lora": 1}}

    lora, conversion = _lora_model(structure, "raise")
    assert conversion.exact and conversion.num_trainable_params == structure.num_trainable_params == 96
    assert _trainable(lora) == 96 + _head_params(structure)
    assert conversion.config.bias == "none"
    # The rank-1 module keeps the search's scaling lora_alpha / max_rank = 3 instead of LoRA's alpha / r = 6.
    assert lora.get_submodule(f"base_model.model.{value}").scaling["default"] == 3.0
    assert lora.get_submodule(f"base_model.model.{query}").scaling["default"] == 3.0

    # Same weights in both adapters give the same function.
    retrain = apply_structure(TINY_MODELS["bert"](), structure)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for module in (query, value):
            s3_layer = retrain.base_model.model.get_submodule(module)
            lora_layer = lora.base_model.model.get_submodule(module)
            # Both factors come from the seeded generator: LoRA A's init draws from the global RNG, which depends on
            # the tests that ran before.
            for factor in (s3_layer.s3_lora_A["default"], s3_layer.s3_lora_B["default"]):
                factor.copy_(torch.randn(factor.shape, generator=generator))
            lora_layer.lora_A["default"].weight.copy_(s3_layer.s3_lora_A["default"])
            lora_layer.lora_B["default"].weight.copy_(s3_layer.s3_lora_B["default"])
        # A random head makes the logits large enough to tell the adapted model from the base one.
        head = retrain.base_model.model.classifier.modules_to_save["default"]
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator))
        lora.base_model.model.classifier.modules_to_save["default"].load_state_dict(
            retrain.base_model.model.classifier.modules_to_save["default"].state_dict()
        )
    base = TINY_MODELS["bert"]()
    base.classifier.load_state_dict(head.state_dict())
    assert not torch.allclose(_logits(retrain), _logits(base), atol=1e-2)
    assert torch.allclose(_logits(lora), _logits(retrain), atol=1e-6)


@pytest.mark.parametrize("to_config", ["to_lora_config", "to_peft_config"])
def test_converted_seq_cls_configs_list_each_module_to_save_once(to_config: str) -> None:
    # peft appends the classification heads to a SEQ_CLS config's modules_to_save itself.
    model = _search(budget=96, candidate_kinds=["lora"], modules_to_save=["pooler.dense"])
    _prefer(model, [f"{BERT_LAYER}attention.self.query:lora[0]"])
    structure = resolve(model)
    assert structure.task_type == "SEQ_CLS"
    config = getattr(structure, to_config)()
    peft.get_peft_model(TINY_MODELS["bert"](), config)
    assert config.modules_to_save == ["pooler.dense", "classifier", "score"]


def test_mix_structure_converts_exactly_when_lora_config_can_express_it() -> None:
    model = _search(budget=80)
    query, layer_norm = f"{BERT_LAYER}attention.self.query", f"{BERT_LAYER}attention.output.LayerNorm"
    _prefer(model, [f"{query}:lora[0]", f"{query}:bitfit", f"{layer_norm}:lnfit", f"{layer_norm}:bitfit"])
    structure = resolve(model)
    assert structure.num_trainable_params == 80
    lora, conversion = _lora_model(structure, "raise")
    assert conversion.exact
    assert conversion.config.bias == "lora_only"
    assert layer_norm in conversion.config.modules_to_save
    assert _trainable(lora) == 80 + _head_params(structure)


def _inexpressible_bert() -> SearchedStructure:
    model = _search(budget=96)
    names = [
        "attention.self.query:lora[0]",
        "attention.self.key:bitfit",
        "output.dense:adapter",
        "output.LayerNorm:lnfit",
    ]
    _prefer(model, [BERT_LAYER + name for name in names])
    structure = resolve(model)
    assert structure.num_trainable_params == 32 + 16 + 32 + 16
    return structure


def test_lora_conversion_raise_lists_every_inexpressible_candidate() -> None:
    structure = _inexpressible_bert()
    with pytest.raises(ValueError, match="3 candidates of this structure cannot be expressed") as error:
        structure.to_lora_config()
    for name, reason in [
        ("attention.self.key:bitfit", "bitfit_lora_only"),
        ("output.dense:adapter", "adapter"),
        ("output.LayerNorm:lnfit", "norm_whole"),
    ]:
        assert f"- {BERT_LAYER}{name}: {LORA_CONVERSION_LIMITS[reason]}" in str(error.value)
    with pytest.raises(ValueError, match=r"policy='exact' is not allowed; choose one of \['raise', 'drop'"):
        structure.to_lora_config(policy="exact")


def test_lora_conversion_drop_trains_the_expressible_subset() -> None:
    structure = _inexpressible_bert()
    with pytest.warns(UserWarning, match="It trains 32 parameters in the adapted modules where the structure has 96"):
        structure.to_lora_config(policy="drop")
    lora, conversion = _lora_model(structure, "drop")
    assert conversion.dropped == {
        f"{BERT_LAYER}attention.self.key:bitfit": "bitfit_lora_only",
        f"{BERT_LAYER}output.dense:adapter": "adapter",
        f"{BERT_LAYER}output.LayerNorm:lnfit": "norm_whole",
    }
    assert conversion.approximated == {} and conversion.config.bias == "none"
    assert _trainable(lora) == 32 + _head_params(structure)


def test_lora_conversion_approximate_trains_whole_norms() -> None:
    structure = _inexpressible_bert()
    lora, conversion = _lora_model(structure, "approximate")
    # The LayerNorm is trained whole (scale 16 + bias 16). For the key BitFit, bias='lora_only' would train the
    # query bias instead (16 wrong parameters + 16 missed) which is worse than leaving it out (16 missed).
    assert conversion.approximated == {f"{BERT_LAYER}output.LayerNorm:lnfit": "norm_whole"}
    assert set(conversion.dropped) == {f"{BERT_LAYER}attention.self.key:bitfit", f"{BERT_LAYER}output.dense:adapter"}
    assert conversion.config.bias == "none"
    assert conversion.num_trainable_params == 32 + 32
    assert _trainable(lora) == 64 + _head_params(structure)


def test_lora_conversion_approximate_picks_lora_only_when_it_is_closer() -> None:
    model = _search(budget=128)
    ranked = [f"{BERT_LAYER}attention.self.{m}:lora[0]" for m in ("query", "key", "value")]
    ranked += [f"{BERT_LAYER}attention.self.{m}:bitfit" for m in ("query", "key")]
    _prefer(model, ranked)
    structure = resolve(model)
    assert structure.num_trainable_params == 128
    lora, conversion = _lora_model(structure, "approximate")
    assert conversion.config.bias == "lora_only"
    assert set(conversion.approximated) == set(ranked[3:])
    # LoRA 3 x 32 plus the biases of all three LoRA targets, the value bias (16) being the price of the approximation.
    assert conversion.num_trainable_params == 96 + 48
    assert _trainable(lora) == 144 + _head_params(structure)


def test_lora_conversion_of_bias_free_t5() -> None:
    model = _search("t5", budget=64)
    query, layer_norm = "encoder.block.1.layer.0.SelfAttention.q", "decoder.block.0.layer.2.layer_norm"
    _prefer(model, [f"{query}:lora[0]", f"{query}:bitfit", f"{layer_norm}:lnfit"])
    structure = resolve(model)
    with pytest.raises(ValueError, match=f"{query}:bitfit: BitFit on a module without a bias"):
        structure.to_lora_config()
    conversion = structure.lora_conversion("approximate")
    # T5LayerNorm has no bias, so LNFit becomes an exact modules_to_save; a bias cannot be added to q.
    assert conversion.dropped == {f"{query}:bitfit": "bitfit_without_bias"} and not conversion.approximated
    lora = peft.get_peft_model(TINY_MODELS["t5"](), conversion.config)
    assert _trainable(lora) == conversion.num_trainable_params == 32 + 16


def test_lora_conversion_of_gpt2_conv1d() -> None:
    model = _search("gpt2", budget=112)
    _prefer(model, ["transformer.h.0.attn.c_attn:lora[0]", "transformer.h.0.attn.c_attn:bitfit"])
    structure = resolve(model)
    config = structure.to_lora_config()
    assert config.fan_in_fan_out and config.bias == "lora_only"
    with warnings.catch_warnings():
        # peft would warn and flip fan_in_fan_out itself if the config got it wrong for Conv1D.
        warnings.simplefilter("error", UserWarning)
        lora = peft.get_peft_model(TINY_MODELS["gpt2"](), config)
    assert _trainable(lora) == structure.num_trainable_params == 64 + 48


def test_lora_conversion_needs_a_lora_candidate() -> None:
    model = _search(budget=32)
    _prefer(model, [f"{BERT_LAYER}output.LayerNorm:lnfit", f"{BERT_LAYER}output.LayerNorm:bitfit"])
    with pytest.raises(ValueError, match="no LoRA candidate"):
        resolve(model).to_lora_config(policy="approximate")


# ----------------------------------------------------------------------------------------------- hub


def _retrained(structure: SearchedStructure) -> peft.PeftModel:
    """A fixed-structure model whose adapter weights moved away from the identity, as after retraining."""
    model = apply_structure(TINY_MODELS["bert"](), structure)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model


def _searched_bert(budget: int | None = None) -> SearchedStructure:
    model = _search(budget=0.02)
    _set_alpha(model, torch.randn(len(_names(model)), generator=torch.Generator().manual_seed(6)))
    return resolve(model, budget=budget)


def test_save_pretrained_with_structure_writes_model_card_section(tmp_path: Path) -> None:
    structure = _searched_bert()
    save_pretrained_with_structure(_retrained(structure), tmp_path, structure)
    assert SearchedStructure.load(tmp_path) == structure
    readme = (tmp_path / "README.md").read_text()
    assert readme.count(MODEL_CARD_HEADING) == 1
    assert structure.to_markdown() in readme
    # The heatmap is drawn next to the adapter and shown in the card.
    assert (tmp_path / STRUCTURE_FIGURE).read_bytes().startswith(b"\x89PNG")
    assert f"]({STRUCTURE_FIGURE})" in readme
    # peft's own card survives, metadata included.
    assert ModelCard.load(tmp_path / "README.md").data.library_name == "peft"
    assert "### Framework versions" in readme

    # Writing again replaces the section instead of adding a second one, and keeps text written after it.
    (tmp_path / "README.md").write_text(readme + "\n## Notes\n\nkeep me\n")
    smaller = _searched_bert(budget=50)
    write_model_card(tmp_path, smaller)
    updated = (tmp_path / "README.md").read_text()
    assert updated.count(MODEL_CARD_HEADING) == 1
    assert smaller.to_markdown() in updated and structure.to_markdown() not in updated
    assert updated.endswith("## Notes\n\nkeep me\n")

    (tmp_path / "fresh").mkdir()
    write_model_card(tmp_path / "fresh", structure)
    assert (tmp_path / "fresh" / "README.md").read_text().startswith(MODEL_CARD_HEADING)

    save_pretrained_with_structure(_retrained(structure), tmp_path / "no_figure", structure, figure=False)
    assert not (tmp_path / "no_figure" / STRUCTURE_FIGURE).exists()
    assert STRUCTURE_FIGURE not in (tmp_path / "no_figure" / "README.md").read_text()


class LocalHub:
    """A stand-in for `huggingface_hub.HfApi` that commits into local folders, one per repository.

    Every call is checked against the signature of the real HfApi method, so `push_to_hub_with_structure` must call
    it exactly as it would call the Hub; README metadata is validated with huggingface_hub's own ModelCard parser, as
    the Hub does before accepting an upload.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.repos: dict[str, bool] = {}

    def create_repo(self, **kwargs: Any) -> str:
        inspect.signature(HfApi.create_repo).bind(HfApi, **kwargs)
        self.repos[kwargs["repo_id"]] = bool(kwargs.get("private"))
        return kwargs["repo_id"]

    def upload_folder(self, **kwargs: Any) -> str:
        inspect.signature(HfApi.upload_folder).bind(HfApi, **kwargs)
        if kwargs["repo_id"] not in self.repos:
            raise ValueError(f"Repository {kwargs['repo_id']} was never created.")
        folder = Path(kwargs["folder_path"])
        ModelCard.load(folder / "README.md")
        target = self.root / kwargs["repo_id"]
        shutil.copytree(folder, target, dirs_exist_ok=True)
        return kwargs["commit_message"]


def test_push_to_hub_with_structure_round_trip(tmp_path: Path) -> None:
    structure = _searched_bert()
    model = _retrained(structure)
    expected = _logits(model)
    hub = LocalHub(tmp_path)
    message = push_to_hub_with_structure(model, "user/s3-bert", structure, api=hub, private=True)
    assert message == "Upload S3 searched structure and adapter" and hub.repos == {"user/s3-bert": True}

    repo = tmp_path / "user" / "s3-bert"
    assert {path.name for path in repo.iterdir()} >= {"adapter_config.json", "README.md", STRUCTURE_FILE}
    loaded_structure = SearchedStructure.load(repo)
    assert loaded_structure == structure
    loaded = peft.PeftModel.from_pretrained(TINY_MODELS["bert"](), repo)
    assert torch.equal(_logits(loaded), expected)
    rebuilt = apply_structure(TINY_MODELS["bert"](), loaded_structure)
    assert sorted(rebuilt.state_dict()) == sorted(loaded.state_dict())
