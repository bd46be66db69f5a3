"""The planted-structure probes (benchmarks/planted.py): the teacher, the budget, one recovery and variant checks."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_benchmark

planted = load_benchmark("planted")

# Mixed kinds on both architectures: LoRA + LNFit + adapter on Llama, LoRA + BitFit + adapter on a 4-layer BERT.
MIXED_CASES = ("llama-lora+lnfit+adapter", "bert4-lora+bitfit+adapter")


@pytest.mark.parametrize("name", MIXED_CASES)
def test_teacher_differs_from_base_only_through_planted_candidates(name):
    case = planted.CASES[name]
    teacher, _, dataset = planted.build_case(case, seed=0)
    assert sorted(c.name for c in teacher.base_model.candidates()) == sorted(c.name for c in teacher.planted)
    base_out = planted.outputs(planted.base_model(case, 0), dataset.input_ids)
    assert torch.equal(dataset.labels, planted.outputs(teacher, dataset.input_ids))
    # Each planted candidate on its own moves the outputs noticeably: about effect x their spread over the inputs.
    target = case.effect * planted._rms(base_out - base_out.mean(0))
    effects = planted.solo_effects(teacher, teacher.planted, dataset.input_ids, base_out)
    assert all(0.7 * target < effect < 1.3 * target for effect in effects.values()), (effects, target)
    with planted.only_planted(teacher, [], teacher.planted):
        torch.testing.assert_close(planted.outputs(teacher, dataset.input_ids), base_out, rtol=0, atol=1e-6)
    # The context restores the deltas.
    assert torch.equal(planted.outputs(teacher, dataset.input_ids), dataset.labels)


@pytest.mark.parametrize("name", MIXED_CASES)
def test_budget_is_the_planted_size_and_only_candidates_train(name):
    case = planted.CASES[name]
    teacher, student, _ = planted.build_case(case, seed=1)
    names = [c.name for c in student.base_model.candidates()]
    assert len(teacher.planted) == len(case.plants) == len(set(c.name for c in teacher.planted))
    assert all(c.name in names for c in teacher.planted)
    assert [c.kind for c in teacher.planted] == [p.kind for p in case.plants]
    assert student.base_model.budget() == sum(c.num_params for c in teacher.planted)
    # The regression head is frozen (no modules_to_save): only the candidates and alpha train.
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all(".s3_" in n for n in trainable), [n for n in trainable if ".s3_" not in n]


def test_run_case_recovers_an_easy_case():
    # Pinned, not the library defaults, which move: first order with a fast alpha, no annealing, the paper's tau.
    trainer = {"bilevel": "first_order", "alpha_learning_rate": 1.0, "annealing": None}
    variant = planted.make_variant("fast", {"trainer": trainer, "config": {"tau": 1.0}, "steps": 60})
    run = planted.run_case(planted.CASES["llama-lora-o"], 0, variant)
    assert run["recovered"], run
    assert run["resolved"] == run["planted"] == ["model.layers.1.self_attn.o_proj:lora[0]"]
    assert run["planted_rank"] == {run["planted"][0]: 1}
    assert run["planted_p"][run["planted"][0]] > 0.5 > run["best_other"]["p"]
    assert run["steps"] == 60
    assert run["loss_search"] < 0.3 * run["loss_start"]
    assert run["retrained_mse"] is None  # only misses are retrained
    json.dumps(run)  # the suite writes it to JSON as is


def test_select_on_validation_answers_with_the_best_evaluated_structure(monkeypatch):
    chosen = []
    original = planted.peft_s3.S3SearchTrainer.train

    def train(self, *args, **kwargs):
        output = original(self, *args, **kwargs)
        chosen.append([c.name for c in self.best_structure.candidates])
        # Reverse the final gates' ranking, so that an answer read from them would differ from the validated one.
        with torch.no_grad():
            self.model.base_model.s3_alpha["default"].neg_()
        return output

    monkeypatch.setattr(planted.peft_s3.S3SearchTrainer, "train", train)
    trainer = {"bilevel": "first_order", "alpha_learning_rate": 1.0, "annealing": None, "select_on_validation": True}
    spec = {"trainer": trainer, "config": {"tau": 1.0}, "args": {"eval_strategy": "steps", "eval_steps": 20}}
    run = planted.run_case(planted.CASES["llama-lora-o"], 0, planted.make_variant("val", {**spec, "steps": 60}))
    assert run["resolved"] == chosen[0] == ["model.layers.1.self_attn.o_proj:lora[0]"]
    assert run["recovered"], run
    assert run["planted_rank"][run["planted"][0]] > 1  # the final gates now rank it low


def test_structure_of_counts_kinds_per_module():
    names = ["m.q:lora[0]", "m.q:lora[1]", "m.q:bitfit", "m.LayerNorm:lnfit"]
    assert planted.structure_of(names) == {"m.q": {"lora": 2, "bitfit": 1}, "m.LayerNorm": {"lnfit": 1}}


def test_retrained_planted_structure_fits_better_than_a_wrong_one():
    """The check that tells a search failure (planted retrains better) from a case that does not identify its plant."""
    case, settings = planted.CASES["bert-lora-q"], planted.Settings(steps=120)
    teacher, _, dataset = planted.build_case(case, 0, settings=settings)
    heldout = planted.teacher_data(teacher, settings.heldout_examples, 40_000, settings)
    planted_structure = planted.structure_of([c.name for c in teacher.planted])
    wrong = {"bert.encoder.layer.0.attention.output.LayerNorm": {"bitfit": 1, "lnfit": 1}}
    mse = {
        name: planted.retrained_mse(case, 0, structure, dataset, heldout, settings.steps, 1e-2, settings)
        for name, structure in (("planted", planted_structure), ("wrong", wrong))
    }
    start = planted._mse(planted.base_model(case, 0, settings), heldout)
    assert mse["planted"] < 0.2 * start and mse["planted"] < 0.5 * mse["wrong"], (mse, start)

    assert planted.retrained_mse(case, 0, {}, dataset, heldout, settings.steps, 1e-2, settings) == start


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"trainer": {"bilevle": "second_order"}}, "bilevle"),
        ({"trainer": {"train_dataset": None}}, "set by the probe itself"),
        ({"config": {"budget": 3}}, "budget"),
        ({"resolve": {"methd": "greedy"}}, "methd"),
        ({"args": {"max_steps": 3}}, "max_steps"),
        ({"trianer": {}}, "unknown keys"),
        ({"steps": 0}, "steps"),
        ({"adapter_features_given": "yes"}, "adapter_features_given='yes' must be true or false"),
    ],
)
def test_bad_variant_names_fail_clearly(spec, message):
    with pytest.raises(ValueError, match=message):
        planted.make_variant("bad", spec)


def test_bad_variant_values_fail_before_the_suite_runs(tmp_path):
    with pytest.raises(ValueError, match="not valid JSON"):
        planted.parse_variant("x={bilevel: second_order}")
    variant = planted.parse_variant('x={"trainer": {"bilevel": "third_order"}}')
    with pytest.raises(ValueError, match="bilevel='third_order'"):
        planted.run_suite([planted.CASES["bert-lora-q"]], [0], [variant], tmp_path / "out.json")
    assert not (tmp_path / "out.json").exists()


def test_resume_refuses_a_changed_variant_spec(tmp_path):
    output = tmp_path / "out.json"
    first = planted.make_variant("v", {"trainer": {"alpha_learning_rate": 0.3}})
    planted._save(output, planted._start_results(output, False, [first], planted.Settings()))
    changed = planted.make_variant("v", {"trainer": {"alpha_learning_rate": 1.0}})
    with pytest.raises(ValueError, match="give the new spec another name"):
        planted._start_results(output, True, [changed], planted.Settings())
    results = planted._start_results(output, True, [first], planted.Settings())
    assert len(results["commands"]) == 2
    # A file written under other library defaults is not resumed: its `default` meant something else.
    stale = json.loads(output.read_text())
    stale["library_defaults"]["trainer"]["bilevel"] = "'some_other_mode'"
    output.write_text(json.dumps(stale))
    with pytest.raises(ValueError, match="other library defaults"):
        planted._start_results(output, True, [first], planted.Settings())


def test_adapter_features_given_starts_the_students_planted_adapter_at_the_teachers_feature():
    case = planted.CASES["bert-lnfit+adapter"]
    given = planted.make_variant("given", {"adapter_features_given": True})
    teacher, student, _ = planted.build_case(case, 0, given)
    _, own, _ = planted.build_case(case, 0)
    adapter = next(c for c in teacher.planted if c.kind == "adapter")
    teacher_down = planted._delta(teacher, adapter, "s3_adapter_down")
    assert torch.equal(planted._delta(student, adapter, "s3_adapter_down"), teacher_down)
    assert not torch.equal(planted._delta(own, adapter, "s3_adapter_down"), teacher_down)
    # Only the feature is given: the student's up-projection (the adapter's delta) still starts at zero.
    assert not planted._delta(student, adapter).any()
    # The other candidates' parameters are those of the student without the diagnostic.
    own_state, given_state = own.state_dict(), student.state_dict()
    changed = [name for name in own_state if not torch.equal(own_state[name], given_state[name])]
    assert changed == [name for name in own_state if adapter.module in name and "s3_adapter_down" in name]
    # Off, the key stays out of the spec, so result files written before it existed still resume.
    assert "adapter_features_given" not in planted.make_variant("off", {}).spec()
    assert given.spec()["adapter_features_given"] is True


def test_model_size_and_init_scale_reach_the_base_and_resume_checks_them(tmp_path):
    case = planted.CASES["llama-lora-o"]
    wide = planted.Settings(hidden_size=64, init_scale=0.5)
    model = planted.base_model(case, 0, wide)
    assert model.config.hidden_size == 64 and model.config.intermediate_size == 128
    assert model.config.initializer_range == pytest.approx(0.5 * 64**-0.5)
    output = tmp_path / "out.json"
    planted._save(output, planted._start_results(output, False, [planted.DEFAULT_VARIANT], wide))
    with pytest.raises(ValueError, match="init_scale"):
        planted._start_results(output, True, [planted.DEFAULT_VARIANT], planted.Settings(hidden_size=64))
    # A file from before init_scale existed was made at its default, and resumes under it.
    old = json.loads(output.read_text())
    old["settings"] = {key: value for key, value in old["settings"].items() if key != "init_scale"}
    old["settings"]["hidden_size"] = planted.Settings.hidden_size
    output.write_text(json.dumps(old))
    assert planted._start_results(output, True, [planted.DEFAULT_VARIANT], planted.Settings())["runs"] == []


def test_settings_and_cli_refuse_a_hidden_size_the_heads_do_not_divide_and_a_scale_below_zero(tmp_path):
    with pytest.raises(SystemExit, match="error: hidden_size must be a positive multiple of num_heads=4 \\(got 30\\)"):
        planted.main(["--hidden-size", "30", "--output", str(tmp_path / "out.json")])
    assert not (tmp_path / "out.json").exists()
    with pytest.raises(ValueError, match="init_scale > 0 \\(got -1.0\\)"):
        planted.Settings(init_scale=-1.0)


def test_a_case_that_cannot_be_planted_is_reported_and_the_suite_goes_on(tmp_path):
    # At half the probe's init scale BERT's attention saturates: a query slice cannot move the outputs enough.
    settings = planted.Settings(init_scale=0.5)
    output = tmp_path / "out.json"
    results = planted.run_suite(
        [planted.CASES["bert-lora-q"]], [0], [planted.DEFAULT_VARIANT], output, False, settings
    )
    assert results["runs"] == []
    assert "do not reach the solo effect" in json.loads(output.read_text())["unplantable"]["bert-lora-q seed 0"]
    assert "cannot reach the case's effect: bert-lora-q seed 0" in planted.report(results)
