"""The baseline builders of the quality benchmark (benchmarks/baselines.py) on a tiny BERT."""

from __future__ import annotations

import datasets
import peft
import pytest
import torch
from conftest import NUM_LABELS, VOCAB_SIZE, load_benchmark, make_batch, tiny_bert
from transformers import DataCollatorWithPadding, PreTrainedTokenizerFast, Trainer

import peft_s3
from peft_s3.recipes import ClassificationTask, TrainingRecipe, train_and_evaluate

baselines = load_benchmark("baselines")


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


# --- budgeted baselines (AdaLoRA, EVA) -----------------------------------------------------------------------------
# tiny BERT: the uniform LoRA targets are the 8 attention projections (16 x 16), a LoRA rank costs 32 parameters, an
# AdaLoRA rank 33 (one singular value more).
ATTENTION = 8
RANK = 32
RECIPE = TrainingRecipe(epochs=1, batch_size=4, learning_rate=1e-2, seed=0, logging_steps=100, disable_tqdm=True)


@pytest.fixture(scope="module")
def head_report() -> dict:
    return baselines.search_space_report(tiny_bert(), modules_to_save=["pooler"])


def _rows(count: int, seed: int) -> datasets.Dataset:
    """Tokenized-looking rows of random lengths (4-11 tokens) with a sequence label, as `tokenize_splits` gives."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        length = int(torch.randint(4, 12, (1,), generator=generator))
        ids = torch.randint(3, VOCAB_SIZE, (length,), generator=generator).tolist()
        rows.append(
            {
                "input_ids": ids,
                "attention_mask": [1] * length,
                "labels": int(torch.randint(0, 2, (1,), generator=generator)),
            }
        )
    return datasets.Dataset.from_list(rows)


@pytest.fixture(scope="module")
def collator() -> DataCollatorWithPadding:
    tokenizers = pytest.importorskip("tokenizers")
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[PAD]": 0, "[UNK]": 1}, unk_token="[UNK]"))
    return DataCollatorWithPadding(PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]"))


def _trainer(baseline, rows: datasets.Dataset, collator, tmp_path, recipe: TrainingRecipe = RECIPE) -> Trainer:
    return Trainer(
        model=baseline.model,
        args=recipe.arguments(tmp_path, report_to=[]),
        train_dataset=rows,
        data_collator=collator,
        callbacks=baseline.callbacks,
    )


def test_uniform_lora_targets_and_rank_counts(head_report):
    targets, cost = baselines.uniform_lora_targets(head_report)
    assert cost == RANK and len(targets) == ATTENTION
    assert all(t.rsplit(".", 1)[-1] in {"query", "key", "value", "dense"} and "intermediate" not in t for t in targets)
    assert baselines.rank_count(80, 32) == 2  # 64 is 16 away, 96 is 16 away: the tie goes to fewer ranks
    assert baselines.rank_count(81, 32) == 3 and baselines.rank_count(81, 32, rounding="down") == 2
    assert baselines.rank_count(32, 32) == 1
    with pytest.raises(ValueError, match="budget of 31 parameters is below one rank \\(32 parameters\\)"):
        baselines.rank_count(31, 32)
    with pytest.raises(ValueError, match="Unknown rounding 'up'"):
        baselines.rank_count(64, 32, rounding="up")
    assert baselines.absolute_budget(head_report, 0.01) == int(0.01 * head_report["backbone_num_params"])


def test_budgeted_baselines_refuse_unknown_names_and_too_small_budgets(head_report, collator):
    rows = _rows(8, seed=0)
    with pytest.raises(ValueError, match="Unknown budgeted baseline 'lora-ga'.*'adalora', 'eva'"):
        baselines.build_budgeted_baseline("lora-ga", tiny_bert(), head_report, 100, rows, collator, RECIPE)
    for name, smallest in (("adalora", RANK + 1), ("eva", RANK)):
        with pytest.raises(ValueError, match=f"budget of {smallest - 1} parameters is below one rank"):
            baselines.build_budgeted_baseline(name, tiny_bert(), head_report, smallest - 1, rows, collator, RECIPE)


def test_adalora_prunes_to_the_budget_by_the_end_of_its_schedule(head_report, collator, tmp_path):
    rows = _rows(24, seed=1)  # 6 optimizer steps: tinit 1, pruning, final allocation at step 5 - 1 = 4
    baseline = baselines.build_budgeted_baseline("adalora", tiny_bert(), head_report, 70, rows, collator, RECIPE)
    settings = baseline.settings
    assert (settings["rank_budget"], settings["expected_params"], settings["init_r"]) == (2, 66, 1)
    assert (settings["total_step"], settings["tinit"], settings["tfinal"]) == (6, 1, 1)
    assert baseline.model.peft_config["default"].target_r * ATTENTION == pytest.approx(2)  # fractional: 0.25
    layer = baseline.model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert layer.scaling["default"] / layer.ranknum["default"].item() == baselines.lora_candidate_scaling(head_report)
    # during the schedule every target trains its init_r ranks, and the head is trained too
    assert baselines._lora_params(baseline.model) == settings["scheduled_params"] == ATTENTION * (RANK + 1)
    trained = {n.split(".modules_to_save")[0] for n, p in baseline.model.named_parameters() if p.requires_grad}
    assert {"base_model.model.bert.pooler", "base_model.model.classifier"} <= trained
    with pytest.raises(RuntimeError, match="final allocation \\(step 5\\) has not run"):
        baseline.num_trainable_params()

    # train_and_evaluate must hand the callbacks to its Trainer: without the allocation nothing would be pruned
    splits = datasets.DatasetDict(train=rows, validation=_rows(8, seed=2), test=_rows(8, seed=3))
    task = ClassificationTask("tiny", "random", collator.tokenizer, splits, ["a", "b"][:NUM_LABELS])
    metrics = train_and_evaluate(baseline.model, task, RECIPE, tmp_path, callbacks=baseline.callbacks)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0

    kept = baseline.model.peft_config["default"].rank_pattern
    assert 1 <= sum(sum(mask) for mask in kept.values()) <= 2  # ties at the threshold may prune one more
    assert baseline.num_trainable_params() == 33 * sum(sum(mask) for mask in kept.values()) <= 70
    for name, parameter in baseline.model.base_model.model.named_parameters():
        if ".lora_E." in name:  # pruned ranks have a zero singular value, kept ones do not
            assert (parameter.view(-1) != 0).tolist() == kept[name]


def test_adalora_refuses_a_trainer_that_runs_another_schedule(head_report, collator, tmp_path):
    rows = _rows(16, seed=4)
    baseline = baselines.build_budgeted_baseline("adalora", tiny_bert(), head_report, 70, rows, collator, RECIPE)
    longer = TrainingRecipe(epochs=2, batch_size=4, seed=0, disable_tqdm=True)
    with pytest.raises(ValueError, match="built for total_step=4 optimizer steps, but the Trainer will run 8"):
        _trainer(baseline, rows, collator, tmp_path, longer).train()


def test_eva_below_one_rank_per_target_initialises_and_trains_its_rank_budget(head_report, collator, tmp_path):
    rows = _rows(16, seed=5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        default = baselines.build_baseline("lora-all-linear", tiny_bert(), head_report)
        torch.manual_seed(0)
        baseline = baselines.build_budgeted_baseline("eva", tiny_bert(), head_report, 90, rows, collator, RECIPE)
    assert baseline.settings["rank_budget"] == 3 and baseline.settings["r"] == 1  # 3 ranks < 8 targets
    ranks = baseline.settings["ranks"]
    assert sum(ranks.values()) == 3 and set(ranks) < set(baselines.uniform_lora_targets(head_report)[0])
    layers = dict(baseline.model.base_model.model.named_modules())
    defaults = dict(default.base_model.model.named_modules())
    for name, rank in ranks.items():
        a = layers[name].lora_A["default"].weight
        assert a.shape == (rank, 16) and not layers[name].lora_B["default"].weight.any()
        assert torch.allclose(a @ a.T, torch.eye(rank), atol=1e-5)  # principal directions of the layer's inputs
        assert not torch.allclose(a, defaults[name].lora_A["default"].weight[:rank])
        assert layers[name].scaling["default"] == baselines.lora_candidate_scaling(head_report)
    assert baseline.num_trainable_params() == 3 * RANK == baselines._lora_params(baseline.model)

    before = {n: p.detach().clone() for n, p in baseline.model.named_parameters() if ".lora_B." in n}
    _trainer(baseline, rows, collator, tmp_path).train()
    assert any(not torch.equal(p, before[n]) for n, p in baseline.model.named_parameters() if n in before)
    assert baseline.num_trainable_params() == 3 * RANK


def test_eva_with_peft_own_budget_matches_plain_peft_eva(head_report, collator):
    rows = _rows(16, seed=6)
    baseline = baselines.build_budgeted_baseline(
        "eva", tiny_bert(), head_report, 2 * ATTENTION * RANK, rows, collator, RECIPE
    )
    assert baseline.settings["r"] == 2 and baseline.num_trainable_params() == 2 * ATTENTION * RANK
    targets, _ = baselines.uniform_lora_targets(head_report)
    config = peft.LoraConfig(
        r=2,
        lora_alpha=2 * baselines.lora_candidate_scaling(head_report),
        target_modules=targets,
        modules_to_save=["pooler"],
        task_type="SEQ_CLS",
        init_lora_weights="eva",
        eva_config=peft.EvaConfig(rho=2.0, use_label_mask=False),
    )
    plain = peft.get_peft_model(tiny_bert(), config)
    peft.initialize_lora_eva_weights(plain, baselines.eva_dataloader(rows, collator, RECIPE), show_progress_bar=False)
    ours = dict(baseline.model.named_modules())
    theirs = {n: m for n, m in plain.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert {n for n, m in ours.items() if isinstance(m, peft.tuners.lora.LoraLayer)} == set(theirs)
    for name, module in theirs.items():
        assert torch.equal(ours[name].lora_A["default"].weight, module.lora_A["default"].weight)
        assert ours[name].scaling == module.scaling
