"""Tests of the search dynamics options of S3SearchTrainer: annealing, the scheduled xi, convergence metrics, early
stopping and validation-based selection of the structure."""

from __future__ import annotations

import pytest
import torch
from test_trainer import MarkerTask, arguments, search_model

import peft_s3
from peft_s3.annealing import SearchAnnealing
from peft_s3.trainer import S3SearchTrainer


def test_annealing_schedules_start_wide_and_end_at_the_config() -> None:
    model = search_model(budget=0.01, tau=0.2, beta=0.5)
    bank = model.base_model.gate_bank()
    annealing = SearchAnnealing(budget_from=3.0, tau_from=2.0, beta_from=1.0, fraction=0.5)
    annealing.apply(bank, 0.2, 0.5, progress=0.0)
    assert bank.budget_scale == 3.0 and bank.tau == 2.0 and bank.beta == 1.0
    assert float(bank.probabilities().detach() @ bank.sizes.float()) == pytest.approx(3 * bank.budget, rel=1e-4)
    annealing.apply(bank, 0.2, 0.5, progress=0.5)
    assert bank.budget_scale == pytest.approx(1 + 2 * 0.5**3)
    assert bank.tau == pytest.approx((2.0 * 0.2) ** 0.5)  # geometric mean halfway
    annealing.apply(bank, 0.2, 0.5, progress=1.0)
    assert (bank.budget_scale, bank.tau, bank.beta) == (1.0, 0.2, 0.5)
    assert annealing.progress(0, 10) == 0.0 and annealing.progress(3, 10) == 0.6 and annealing.progress(9, 10) == 1.0
    # A start budget beyond the search space is capped at 90 % of it.
    SearchAnnealing(budget_from=1e6).apply(bank, 0.2, 0.5, progress=0.0)
    assert bank.expected_size == pytest.approx(0.9 * float(bank.sizes.sum()))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget_from": 0.5}, "budget_from=0.5 is not allowed"),
        ({"tau_from": 0}, "tau_from=0 is not allowed"),
        ({"beta_from": float("inf")}, "beta_from=inf is not allowed"),
        ({"fraction": 0}, "fraction=0 is not allowed"),
    ],
)
def test_bad_annealing_settings(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        SearchAnnealing(**kwargs)


def test_trainer_anneals_per_step_and_leaves_the_config_values(tmp_path) -> None:
    model = search_model(budget=0.01, tau=0.5)
    bank = model.base_model.gate_bank()
    seen = []
    model.base_model.model.register_forward_pre_hook(lambda *_: seen.append((bank.budget_scale, bank.tau)))
    trainer = S3SearchTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=6),
        train_dataset=MarkerTask(64),
        bilevel="first_order",  # two passes per step: alpha, then delta
        annealing={"budget_from": 4.0, "tau_from": 2.0, "fraction": 0.5},
    )
    trainer.train()
    # Two passes (alpha, delta) per step; the schedule takes 3 of the 6 steps, then holds the config's values.
    scales = [scale for scale, _ in seen[::2]]
    assert scales[0] == 4.0 and scales[1] == pytest.approx(1 + 3 * (2 / 3) ** 3)
    assert scales[3:] == [1.0] * 3
    assert [tau for _, tau in seen[::2]][3:] == [0.5] * 3
    assert (bank.budget_scale, bank.tau) == (1.0, 0.5)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[0]["s3/expected_params"] == pytest.approx(4.0 * bank.budget, rel=1e-3)
    assert logs[-1]["s3/tau"] == 0.5


def test_unrolled_step_uses_the_scheduled_learning_rate(tmp_path, monkeypatch) -> None:
    model = search_model(init_weights=False)
    trainer = S3SearchTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=4, learning_rate=0.1, lr_scheduler_type="linear"),
        train_dataset=MarkerTask(64),
        bilevel="second_order",
    )
    used = []
    original = peft_s3.estimators._move

    def spy(parameters, start, scale, direction):
        used.append(float(scale))
        original(parameters, start, scale, direction)

    monkeypatch.setattr(peft_s3.estimators, "_move", spy)
    trainer.train()
    # The first _move of each step is the virtual step delta' = delta - xi grad: xi follows the linear decay.
    virtual = used[::3]
    assert virtual == pytest.approx([-0.1, -0.075, -0.05, -0.025])


def test_logs_say_how_decided_the_search_is(tmp_path) -> None:
    model = search_model(tau=0.05)  # the schedule's end point: a sharp sigmoid
    trainer = S3SearchTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=30, logging_steps=10),
        train_dataset=MarkerTask(128),
        alpha_learning_rate=0.5,
        bilevel="first_order",
        annealing={"tau_from": 1.0},
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    masses = [entry["s3/decided_mass"] for entry in logs]
    assert all(0 <= mass <= 1 + 1e-6 for mass in masses)
    # The first entry counts every resolved candidate as new; with tau annealed to 0.05 the search ends decided.
    assert logs[0]["s3/resolved_changed"] > 0
    assert all(isinstance(entry["s3/resolved_changed"], int) for entry in logs)
    assert masses[-1] > 0.9 and masses[-1] > masses[0]


def test_stop_when_stable_ends_the_search_early(tmp_path) -> None:
    model = search_model()
    trainer = S3SearchTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=200, learning_rate=0.0),
        train_dataset=MarkerTask(64),
        annealing=None,  # stability is only checked once the annealing has ended
        stop_when_stable=3,
    )
    trainer.train()
    # With a zero delta learning rate the deltas stay zero, alpha never moves, the structure never changes.
    assert trainer.state.global_step == 3


def test_select_on_validation_keeps_the_best_evaluated_structure(tmp_path) -> None:
    model = search_model()
    trainer = S3SearchTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=12, eval_strategy="steps", eval_steps=4),
        train_dataset=MarkerTask(128),
        eval_dataset=MarkerTask(32, seed=1),
        alpha_learning_rate=0.5,
        select_on_validation=True,
    )
    trainer.train()
    evaluations = trainer.structure_evaluations
    assert [entry["step"] for entry in evaluations] == [4, 8, 12, 12]  # every 4 steps, and the end of the search
    best = min(evaluations, key=lambda entry: entry["value"])
    assert [c.name for c in trainer.best_structure.candidates] == best["candidates"]
    # The evaluation saw the resolved 0/1 structure: its loss is that of the model with exactly those gates open.
    mask = torch.tensor([c.selected for c in trainer.best_structure.search_space], dtype=torch.float32)
    assert mask.sum() == len(best["candidates"])
    assert model.base_model.gate_bank().eval_values is None


def test_select_on_validation_needs_an_evaluation(tmp_path) -> None:
    with pytest.raises(ValueError, match="select_on_validation=True evaluates the resolved structure"):
        S3SearchTrainer(
            model=search_model(), args=arguments(tmp_path), train_dataset=MarkerTask(16), select_on_validation=True
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"annealing": 3}, "annealing=3 is not allowed"),
        ({"annealing": {"budget_from": 0}}, "budget_from=0 is not allowed"),
        ({"selection_method": "best"}, "selection_method='best' is not allowed"),
        ({"stop_when_stable": 0}, "stop_when_stable=0 is not allowed"),
    ],
)
def test_bad_dynamics_arguments(tmp_path, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        S3SearchTrainer(model=search_model(), args=arguments(tmp_path), train_dataset=MarkerTask(16), **kwargs)


def test_fixed_eval_gates_override_p_in_eval_mode_only() -> None:
    model = search_model()
    tuner = model.base_model
    mask = torch.zeros(len(tuner.candidates()))
    model.eval()
    with tuner.fixed_eval_gates(mask):
        model(input_ids=torch.ones(2, 4, dtype=torch.long))
        assert torch.equal(tuner.gate_bank().values, mask)
    with pytest.raises(ValueError, match="got \\(3,\\) gate values"):
        with tuner.fixed_eval_gates(torch.zeros(3)):
            pass
