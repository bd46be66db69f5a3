"""Tests of the bi-level structure search: S3SearchTrainer and S3SearchCallback, on tiny models built from configs."""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from conftest import NUM_LABELS, TASK_TYPES, TINY_MODELS, VOCAB_SIZE, make_batch
from torch.func import functional_call
from transformers import Trainer, TrainerCallback, TrainingArguments

import peft_s3
from peft_s3.arguments import S3SearchArguments, SearchOptions
from peft_s3.estimators import second_order_alpha_gradient, seeded
from peft_s3.trainer import SEARCH_STATE_NAME, S3SearchCallback, S3SearchTrainer

MARKER = 5
S3_LOG_KEYS = {
    "s3/expected_params",
    "s3/target_params",
    "s3/budget",
    "s3/zeta",
    "s3/tau",
    "s3/beta",
    "s3/gate_entropy",
    "s3/gates_open",
    "s3/decided_mass",
    "s3/resolved_changed",
    "s3/alpha_loss",
}


class MarkerTask(torch.utils.data.Dataset):
    """Random token sequences; the label says whether the token MARKER occurs in the sequence (learnable)."""

    def __init__(self, size: int, seq_len: int = 8, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(MARKER + 1, VOCAB_SIZE, (size, seq_len), generator=generator)
        self.labels = torch.randint(0, NUM_LABELS, (size,), generator=generator)
        positions = torch.randint(0, seq_len, (size,), generator=generator)
        positive = self.labels.bool()
        self.input_ids[positive, positions[positive]] = MARKER

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.input_ids[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.labels[index]}


def search_model(arch: str = "bert", **config_kwargs) -> peft.PeftModel:
    """A tiny model with an S3 search adapter, the same on every call (the candidates' init draws random numbers)."""
    config_kwargs.setdefault("budget", 0.05)
    config = peft_s3.S3SearchConfig(task_type=TASK_TYPES[arch], **config_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return peft.get_peft_model(TINY_MODELS[arch](), config)


def arguments(output_dir: Path, arguments_class: type = TrainingArguments, **kwargs) -> TrainingArguments:
    defaults = {
        "per_device_train_batch_size": 8,
        "learning_rate": 3e-2,
        "max_steps": 4,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "disable_tqdm": True,
        "seed": 3,
    }
    return arguments_class(str(output_dir), **{**defaults, **kwargs})


def alpha_of(model: peft.PeftModel) -> torch.nn.Parameter:
    return model.base_model.s3_alpha["default"]


def trainable_state(model: peft.PeftModel) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_search_learns_the_task_and_keeps_the_budget(tmp_path):
    model = search_model()
    alpha_before = alpha_of(model).detach().clone()
    flags_before = {name: p.requires_grad for name, p in model.named_parameters()}
    trainer = S3SearchTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=40, logging_steps=10),
        train_dataset=MarkerTask(256),
        eval_dataset=MarkerTask(64, seed=1),
    )
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    loss_after = trainer.evaluate()["eval_loss"]

    assert loss_after < loss_before - 0.05
    assert not torch.equal(alpha_of(model), alpha_before)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags_before
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 4
    budget = model.base_model.budget()
    for entry in logs:
        assert S3_LOG_KEYS <= set(entry)
        assert entry["s3/budget"] == budget
        # The default annealing holds the expected size at a multiple of the budget first, then at the budget.
        assert abs(entry["s3/expected_params"] - entry["s3/target_params"]) <= 0.01 * budget
        assert entry["s3/target_params"] >= budget
        assert 0 <= entry["s3/gates_open"] <= len(model.base_model.candidates())
    # The search decided something: some gates are open, and the gates are less uncertain than at the start.
    assert logs[-1]["s3/target_params"] == budget
    assert logs[-1]["s3/gates_open"] > 0
    assert logs[-1]["s3/gate_entropy"] < logs[0]["s3/gate_entropy"]


@pytest.mark.parametrize("as_hf_dataset", [False, True])
def test_split_is_disjoint_complete_and_seeded(tmp_path, as_hf_dataset):
    datasets = pytest.importorskip("datasets")
    task = MarkerTask(50)
    rows = {"input_ids": task.input_ids.tolist(), "labels": task.labels.tolist(), "row": list(range(50))}
    train = datasets.Dataset.from_dict(rows) if as_hf_dataset else torch.utils.data.TensorDataset(torch.arange(50))

    def split(seed: int, search_split: float | None = None) -> tuple[list[int], list[int], type]:
        trainer = S3SearchTrainer(
            model=search_model(), args=arguments(tmp_path, seed=seed), train_dataset=train, search_split=search_split
        )
        if as_hf_dataset:
            return list(trainer.search_dataset["row"]), list(trainer.train_dataset["row"]), type(trainer.train_dataset)
        return trainer.search_dataset.indices, trainer.train_dataset.indices, type(trainer.train_dataset)

    search, delta, kind = split(seed=0)
    assert kind is (datasets.Dataset if as_hf_dataset else torch.utils.data.Subset)
    assert len(search) == len(delta) == 25
    assert not set(search) & set(delta)
    assert sorted(search + delta) == list(range(50))
    assert split(seed=0)[:2] == (search, delta)
    assert split(seed=1)[0] != search
    assert len(split(seed=0, search_split=0.2)[0]) == 10


def test_explicit_search_dataset_is_used_as_is(tmp_path):
    train, search = MarkerTask(32), MarkerTask(16, seed=1)
    trainer = S3SearchTrainer(
        model=search_model(), args=arguments(tmp_path), train_dataset=train, search_dataset=search
    )
    assert trainer.train_dataset is train
    assert trainer.search_dataset is search


def test_alpha_has_its_own_optimizer(tmp_path):
    model = search_model()
    trainer = S3SearchTrainer(model=model, args=arguments(tmp_path, max_steps=1), train_dataset=MarkerTask(32))
    trainer.train()
    alpha = alpha_of(model)
    main = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert not any(p is alpha for p in main)
    trainable = [p for p in model.parameters() if p.requires_grad and p is not alpha]
    assert {id(p) for p in main} == {id(p) for p in trainable}
    assert [p for group in trainer.alpha_optimizer.param_groups for p in group["params"]] == [alpha]
    assert trainer.alpha_optimizer.param_groups[0]["initial_lr"] == 0.5


def test_user_optimizer_with_alpha_is_refused(tmp_path):
    model = search_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    trainer = S3SearchTrainer(
        model=model, args=arguments(tmp_path), train_dataset=MarkerTask(32), optimizers=(optimizer, None)
    )
    with pytest.raises(ValueError, match="structural parameters"):
        trainer.train()


def one_step_alpha(tmp_path: Path, bilevel: str) -> torch.Tensor:
    model = search_model(init_weights=False)
    args = arguments(tmp_path / bilevel, max_steps=3)
    trainer = S3SearchTrainer(
        model=model, args=args, train_dataset=MarkerTask(64), bilevel=bilevel, unrolled_learning_rate=0.5
    )
    trainer.train()
    return alpha_of(model).detach().clone()


def test_second_order_changes_alpha_differently_from_first_order(tmp_path):
    first = one_step_alpha(tmp_path, "first_order")
    assert torch.equal(first, one_step_alpha(tmp_path, "first_order"))
    second = one_step_alpha(tmp_path, "second_order")
    assert not torch.allclose(first, second)


# Relative error bounds: measured 3e-5 (central, O(epsilon^2)) and 2e-3 (forward, O(epsilon)) at epsilon 1e-3.
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize(("finite_difference", "tolerance"), [("central", 1e-3), ("forward", 5e-3)])
def test_second_order_gradient_matches_exact_unrolled_gradient(tmp_path, finite_difference, tolerance, dropout):
    """Eq. 13 (finite differences) against eq. 11 differentiated exactly with double backward.

    With dropout, the exact gradient takes the D_delta pass with the masks of seed 7 and the D_alpha pass with those
    of seed 8: the finite difference matches it only if all its D_delta passes share one mask.
    """
    model = search_model(init_weights=False)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = dropout
    # The CPU flash-attention kernel has no double backward; the math is the same.
    model.base_model.model.set_attn_implementation("eager")
    xi = 0.5
    trainer = S3SearchTrainer(
        model=model,
        args=arguments(tmp_path),
        train_dataset=MarkerTask(16),
        bilevel="second_order",
        unrolled_learning_rate=xi,
        finite_difference=finite_difference,
        finite_difference_epsilon=1e-3,
    )
    trainer.create_optimizer()
    delta_batch, search_batch = make_batch("bert", 8, seed=1), make_batch("bert", 8, seed=2)
    alpha, deltas = alpha_of(model), trainer.search_controller.delta_parameters
    names = {id(p): name for name, p in model.named_parameters()}
    model.train()
    with model.base_model.frozen_gate_noise():
        with torch.no_grad():
            model(**delta_batch)  # draws the one gate sample that every pass below shares
        with seeded(7):
            delta_loss = model(**delta_batch).loss
        delta_grads = torch.autograd.grad(delta_loss, deltas, create_graph=True)
        unrolled = {names[id(p)]: p - xi * g for p, g in zip(deltas, delta_grads, strict=True)}
        with seeded(8):
            (exact,) = torch.autograd.grad(functional_call(model, unrolled, kwargs=search_batch).loss, alpha)
        detached = {name: value.detach() for name, value in unrolled.items()}
        with seeded(8):
            (direct,) = torch.autograd.grad(functional_call(model, detached, kwargs=search_batch).loss, alpha)
        before = [p.detach().clone() for p in deltas]
        _, delta_gradient, delta_losses, _ = second_order_alpha_gradient(
            trainer._loss_shares(model, [delta_batch], None),
            trainer._loss_shares(model, [search_batch], None),
            alpha,
            deltas,
            [delta_batch],
            [search_batch],
            step_seed=7,
            xi=xi,
            finite_difference=finite_difference,
            finite_difference_epsilon=1e-3,
        )

    # The second-order term matters here, and the finite difference gets it right.
    assert (exact - direct).norm() > 0.3 * exact.norm()
    assert (alpha.grad - exact).norm() < tolerance * exact.norm()
    assert all(torch.equal(p, b) for p, b in zip(deltas, before, strict=True))
    assert all(p.grad is None for p in deltas)
    # The delta gradient it hands to the optimizer is grad_delta L_delta(delta, alpha) at the starting point.
    assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(delta_gradient, delta_grads, strict=True))
    assert torch.allclose(torch.stack(delta_losses).sum(), delta_loss)


def test_second_order_restores_deltas_bit_exactly(tmp_path):
    """With a zero delta learning rate, deltas only move inside the alpha step, which must put them back."""
    model = search_model(init_weights=False)
    before = trainable_state(model)
    alpha_before = before.pop("base_model.s3_alpha.default")
    trainer = S3SearchTrainer(
        model=model,
        args=arguments(tmp_path, learning_rate=0.0, max_steps=3),
        train_dataset=MarkerTask(64),
        bilevel="second_order",
        unrolled_learning_rate=0.5,
    )
    trainer.train()
    after = trainable_state(model)
    assert not torch.equal(after.pop("base_model.s3_alpha.default"), alpha_before)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)


# Every option that keeps state across steps; the annealing ends at step 2, so closing gates, counting stable steps and
# the alpha losses summed for the next log entry all run across the checkpoint (at step 4, unless save_steps says).
RESUME_OPTIONS = {
    "first_order": {"bilevel": "first_order"},
    "second_order_accumulated": {"gradient_accumulation_steps": 2},
    "forward_difference": {"finite_difference": "forward"},
    "zero_correction": {"unrolled_learning_rate": 0.0},
    "every_second_step": {"alpha_update_interval": 2, "logging_steps": 3},
    # The structure resolve picks changes until step 4 and then holds: the search stops at 7, counting from 4.
    "stop_when_stable": {
        "stop_when_stable": 3,
        "bilevel": "first_order",
        "alpha_learning_rate": 0.05,
        "save_steps": 5,
    },
    "select_on_validation": {"select_on_validation": True, "eval_strategy": "steps", "eval_steps": 3},
    "no_close_overflow": {"close_overflow": False, "selection_method": "greedy"},
}
_ARGUMENT_NAMES = {"gradient_accumulation_steps", "logging_steps", "eval_strategy", "eval_steps", "save_steps"}


@pytest.mark.parametrize("option", RESUME_OPTIONS)
def test_resume_is_bit_identical_to_an_uninterrupted_search(tmp_path, option):
    options = RESUME_OPTIONS[option]
    arg_options = {"save_steps": 4, **{key: value for key, value in options.items() if key in _ARGUMENT_NAMES}}
    search_options = {key: value for key, value in options.items() if key not in _ARGUMENT_NAMES}

    def run(output_dir: Path, resume: str | None = None) -> tuple[peft.PeftModel, S3SearchTrainer]:
        model = search_model(init_weights=False)
        args = arguments(output_dir, max_steps=8, save_strategy="steps", **arg_options)
        # 20 examples per half in batches of 8: the checkpoint falls mid-epoch for both data streams.
        trainer = S3SearchTrainer(
            model=model,
            args=args,
            train_dataset=MarkerTask(40),
            eval_dataset=MarkerTask(16, seed=1),
            annealing=peft_s3.SearchAnnealing(budget_from=4.0, tau_from=1.0, fraction=0.25),
            **search_options,
        )
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    whole, whole_trainer = run(tmp_path / "whole")
    checkpoint = tmp_path / "whole" / f"checkpoint-{arg_options['save_steps']}"
    assert (checkpoint / SEARCH_STATE_NAME).is_file()
    assert (checkpoint / "s3_gates.json").is_file()
    resumed, resumed_trainer = run(tmp_path / "resumed", resume=str(checkpoint))

    if "stop_when_stable" in options:
        assert whole_trainer.state.global_step == 7
    assert resumed_trainer.state.global_step == whole_trainer.state.global_step
    assert whole_trainer.structure_evaluations == resumed_trainer.structure_evaluations
    if options.get("select_on_validation"):
        # Step 3 is before the checkpoint; step 8 twice: the Trainer's evaluation at the last step, then train()'s
        # own at the config's budget and temperatures.
        assert [entry["step"] for entry in whole_trainer.structure_evaluations] == [3, 6, 8, 8]
        assert resumed_trainer.best_structure == whole_trainer.best_structure is not None
    assert torch.equal(alpha_of(whole), alpha_of(resumed))
    whole_state, resumed_state = trainable_state(whole), trainable_state(resumed)
    assert all(torch.equal(whole_state[name], resumed_state[name]) for name in whole_state)

    # Not "loss": transformers itself restarts its running loss sum on resume, so a logging window across the
    # checkpoint averages fewer steps (the trainable state above shows the training itself is identical).
    def search_logs(trainer: S3SearchTrainer) -> list[dict[str, float]]:
        return [
            {key: value for key, value in entry.items() if key.startswith("s3/") or key == "step"}
            for entry in trainer.state.log_history
            if "loss" in entry
        ]

    assert search_logs(whole_trainer) == search_logs(resumed_trainer)


# First order (2 passes per micro-batch pair) is checked by the gradient-accumulation test below.
@pytest.mark.parametrize(
    ("options", "passes"),
    [
        ({"finite_difference": "central"}, 4),
        ({"finite_difference": "forward"}, 3),
        ({"unrolled_learning_rate": 0.0}, 2),
    ],
    ids=["central", "forward", "zero_correction"],
)
def test_second_order_passes_per_step_share_one_gate_sample(tmp_path, options, passes):
    """The cost of a step in passes: Algorithm 1 computes grad_delta L_delta(delta, alpha) once in second order, and
    with xi = 0 there is nothing to difference."""
    model = search_model(init_weights=False)
    noises = []
    model.base_model.model.register_forward_pre_hook(
        lambda module, args: noises.append(model.base_model.gate_bank().noise.clone())
    )
    trainer = S3SearchTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2),
        train_dataset=MarkerTask(64),
        bilevel="second_order",
        **options,
    )
    trainer.train()
    per_step = 2 * passes  # two micro-batches each
    assert len(noises) == 2 * per_step
    for step in range(2):
        assert all(
            torch.equal(noise, noises[step * per_step]) for noise in noises[step * per_step : (step + 1) * per_step]
        )
    assert not torch.equal(noises[0], noises[per_step])
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(0 < loss < 5 for loss in losses)


# Model passes (forward + backward) per optimizer step, counted over a run of 4 steps; a plain LoRA step is one.
COUNTED_PASSES = {
    "first_order": ({"bilevel": "first_order"}, 2.0),
    "second_order_central": ({}, 4.0),
    "second_order_forward": ({"finite_difference": "forward"}, 3.0),
    "zero_correction": ({"unrolled_learning_rate": 0.0}, 2.0),
    "second_order_every_2": ({"alpha_update_interval": 2}, 2.5),
    "first_order_every_2": ({"bilevel": "first_order", "alpha_update_interval": 2}, 1.5),
    "first_order_every_4": ({"bilevel": "first_order", "alpha_update_interval": 4}, 1.25),
    "zero_correction_every_2": ({"unrolled_learning_rate": 0.0, "alpha_update_interval": 2}, 1.5),
    "zero_correction_every_4": ({"unrolled_learning_rate": 0.0, "alpha_update_interval": 4}, 1.25),
}


@pytest.mark.parametrize("setting", COUNTED_PASSES)
def test_passes_per_optimizer_step_counted_over_a_run(tmp_path, setting):
    options, passes = COUNTED_PASSES[setting]
    model = search_model(init_weights=False)
    calls = []
    model.base_model.model.register_forward_pre_hook(lambda module, args: calls.append(module.training))
    trainer = S3SearchTrainer(
        model=model, args=arguments(tmp_path, max_steps=4), train_dataset=MarkerTask(64), **options
    )
    trainer.train()
    assert all(calls) and len(calls) / trainer.state.global_step == passes


def options_of(options: SearchOptions) -> dict[str, object]:
    return {name: getattr(options, name) for name in SearchOptions.names()}


# (search options of the S3SearchArguments, keyword arguments of the trainer, passes per optimizer step)
OPTIONS_FROM_ARGUMENTS = {
    "read_from_args": ({"bilevel": "first_order"}, {}, 2.0),
    "keyword_overrides_args": ({"bilevel": "first_order"}, {"bilevel": "second_order"}, 4.0),
    "merged_per_option": ({"bilevel": "first_order", "alpha_update_interval": 2}, {"alpha_update_interval": 4}, 1.25),
}


@pytest.mark.parametrize("setting", OPTIONS_FROM_ARGUMENTS)
def test_search_options_come_from_the_arguments_and_keywords_take_precedence(tmp_path, setting):
    in_args, keywords, passes = OPTIONS_FROM_ARGUMENTS[setting]
    model = search_model(init_weights=False)
    calls = []
    model.base_model.model.register_forward_pre_hook(lambda module, args: calls.append(module.training))
    args = arguments(tmp_path, S3SearchArguments, max_steps=4, **in_args)
    trainer = S3SearchTrainer(model=model, args=args, train_dataset=MarkerTask(64), **keywords)
    assert options_of(trainer.search_options) == {**options_of(SearchOptions()), **in_args, **keywords}
    assert (args.bilevel, args.alpha_update_interval) == (in_args["bilevel"], in_args.get("alpha_update_interval", 1))
    trainer.train()
    assert all(calls) and len(calls) / trainer.state.global_step == passes


def test_trainer_and_arguments_share_one_set_of_defaults(tmp_path):
    # The trainer declares no search option itself: SearchOptions' fields are the only defaults.
    parameters = inspect.signature(S3SearchTrainer.__init__).parameters
    assert not set(parameters) & set(SearchOptions.names())
    assert not set(inspect.signature(S3SearchCallback.__init__).parameters) & set(SearchOptions.names())
    plain = S3SearchTrainer(model=search_model(), args=arguments(tmp_path), train_dataset=MarkerTask(32))
    searching = S3SearchTrainer(
        model=search_model(), args=arguments(tmp_path, S3SearchArguments), train_dataset=MarkerTask(32)
    )
    assert options_of(plain.search_options) == options_of(searching.search_options) == options_of(SearchOptions())
    assert plain.search_options.annealing == peft_s3.DEFAULT_ANNEALING
    assert len(plain.search_dataset) == len(plain.train_dataset) == 16  # search_split None: half, as in the paper


def test_search_split_from_the_arguments(tmp_path):
    args = arguments(tmp_path, S3SearchArguments, search_split=0.25)
    trainer = S3SearchTrainer(model=search_model(), args=args, train_dataset=MarkerTask(32))
    assert (len(trainer.search_dataset), len(trainer.train_dataset)) == (8, 24)
    with pytest.raises(ValueError, match="or search_split=0.25 .* not both"):
        S3SearchTrainer(model=search_model(), args=args, train_dataset=MarkerTask(32), search_dataset=MarkerTask(8))


def test_bad_and_unknown_search_keywords_are_refused_over_good_arguments(tmp_path):
    args = arguments(tmp_path, S3SearchArguments, bilevel="first_order")
    with pytest.raises(ValueError, match=r"bilevel='third_order' is not allowed: choose one of \['first_order'"):
        S3SearchTrainer(model=search_model(), args=args, train_dataset=MarkerTask(32), bilevel="third_order")
    with pytest.raises(TypeError, match="unexpected keyword argument 'alpha_lr'"):
        S3SearchTrainer(model=search_model(), args=args, train_dataset=MarkerTask(32), alpha_lr=0.1)


def test_callback_refuses_options_it_cannot_honour():
    loader = torch.utils.data.DataLoader(MarkerTask(8), batch_size=4)
    with pytest.raises(ValueError, match=r"\['bilevel', 'stop_when_stable'\] are not options of S3SearchCallback"):
        S3SearchCallback(loader, bilevel="second_order", stop_when_stable=3)
    with pytest.raises(ValueError, match=r"\['alpha_lr'\] are not options of S3SearchCallback"):
        S3SearchCallback(loader, alpha_lr=0.1)


def test_seeded_passes_share_dropout_masks_and_forward_agrees_with_central(tmp_path, monkeypatch):
    """Issue 24: with dropout on, every pass over a D_delta micro-batch in a second-order step sees the same masks,
    so the forward difference agrees with the central one within 5 % (the gate noise, drawn lazily in the first
    seeded pass, used to take its dropout stream)."""
    corrections, masks = [], []

    def recorded(*args, **kwargs):
        result = second_order_alpha_gradient(*args, **kwargs)
        corrections.append(result.correction)
        return result

    monkeypatch.setattr(peft_s3.search_step, "second_order_alpha_gradient", recorded)

    def step(finite_difference: str) -> list[list[torch.Tensor]]:
        model = search_model(init_weights=False)
        passes = []
        model.base_model.model.register_forward_pre_hook(lambda module, args: passes.append([]))
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.1
                module.register_forward_hook(lambda module, args, output: passes[-1].append(output == 0))
        args = arguments(
            tmp_path / finite_difference, max_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=2
        )
        trainer = S3SearchTrainer(
            model=model,
            args=args,
            train_dataset=MarkerTask(64),
            finite_difference=finite_difference,
        )
        trainer.train()
        return passes

    masks = step("central")
    # Two micro-batches: delta 0, delta 1, D_alpha 0, D_alpha 1, delta+ 0, delta+ 1, delta- 0, delta- 1.
    assert len(masks) == 8
    for first, later in [(0, 4), (0, 6), (1, 5), (1, 7)]:
        assert all(torch.equal(a, b) for a, b in zip(masks[first], masks[later], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(masks[0], masks[1], strict=True))
    forward_masks = step("forward")
    assert len(forward_masks) == 6
    assert all(torch.equal(a, b) for a, b in zip(forward_masks[0], forward_masks[4], strict=True))
    central, forward = corrections
    assert central.norm() > 0
    assert (forward - central).norm() <= 0.05 * central.norm()


def test_second_order_delta_update_descends_the_gradient_before_the_alpha_update(tmp_path):
    """Algorithm 1, step 4: delta moves along grad_delta L_delta(delta, alpha) of the alpha before its update."""
    model = search_model(init_weights=False)
    args = arguments(
        tmp_path, max_steps=1, per_device_train_batch_size=16, optim="sgd", learning_rate=0.5, max_grad_norm=0.0
    )
    # 16 rows of D_delta in one batch of 16: the step's delta batch is all of D_delta.
    trainer = S3SearchTrainer(
        model=model,
        args=args,
        train_dataset=MarkerTask(32),
        bilevel="second_order",
        alpha_learning_rate=1.0,
        annealing=None,
    )
    trainer.train()
    noise = model.base_model.gate_bank().noise.clone()
    delta_batch = torch.utils.data.default_collate([trainer.train_dataset[i] for i in range(16)])

    def delta_gradient(alpha: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        fresh = search_model(init_weights=False)
        with torch.no_grad():
            alpha_of(fresh).copy_(alpha)
        deltas = [p for p in fresh.parameters() if p.requires_grad and p is not alpha_of(fresh)]
        fresh.train()
        with fresh.base_model.frozen_gate_noise():
            fresh.base_model.gate_bank().noise = noise
            return [p.detach().clone() for p in deltas], torch.autograd.grad(fresh(**delta_batch).loss, deltas)

    start, before = delta_gradient(alpha_of(search_model()).detach())
    _, after = delta_gradient(alpha_of(model).detach())
    trained = [p for p in model.parameters() if p.requires_grad and p is not alpha_of(model)]
    assert all(torch.allclose(t, s - 0.5 * g, atol=1e-6) for t, s, g in zip(trained, start, before, strict=True))
    # The alpha update changed the delta gradient, so the comparison above tells the two orders apart.
    assert not all(torch.allclose(b, a, atol=1e-4) for b, a in zip(before, after, strict=True))


def test_gradient_accumulation_updates_alpha_once_per_step_on_as_many_batches(tmp_path):
    model = search_model()
    batch_sizes, noises = [], []

    def record(module, args, kwargs):
        # Runs after the tuner's own pre-hook, which has just drawn (or reused) the gate noise.
        batch_sizes.append(len(kwargs["input_ids"]))
        noises.append(model.base_model.gate_bank().noise.clone())

    model.base_model.model.register_forward_pre_hook(record, with_kwargs=True)
    trainer = S3SearchTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2),
        train_dataset=MarkerTask(64),
        bilevel="first_order",
    )
    trainer.train()
    assert trainer.state.global_step == 3
    # The first step's alpha gradient is exactly zero (every delta starts at zero), so it makes no alpha update.
    assert trainer.alpha_lr_scheduler.last_epoch == 2
    assert trainer.alpha_optimizer.state[alpha_of(model)]["step"] == 2
    # Per optimizer step: two D_alpha micro-batches for alpha, then two D_delta micro-batches for delta, all on one
    # gate sample; the next step draws a new one.
    assert batch_sizes == [4] * (3 * (2 + 2))
    for step in range(3):
        assert all(torch.equal(noise, noises[4 * step]) for noise in noises[4 * step : 4 * step + 4])
    assert not torch.equal(noises[0], noises[4])
    assert not torch.equal(noises[4], noises[8])


def test_an_exactly_zero_alpha_gradient_spends_no_alpha_step(tmp_path):
    model = search_model()  # identity initialisation: no gate changes the loss before the deltas move
    alpha_before = alpha_of(model).detach().clone()
    trainer = S3SearchTrainer(
        model=model, args=arguments(tmp_path, max_steps=1), train_dataset=MarkerTask(32), bilevel="first_order"
    )
    trainer.train()
    assert torch.equal(alpha_of(model), alpha_before)
    assert trainer.alpha_lr_scheduler.last_epoch == 0
    assert not trainer.alpha_optimizer.state
    # Second order sees the deltas after the virtual step, which do depend on the gates: alpha moves at once.
    model = search_model()
    trainer = S3SearchTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=1),
        train_dataset=MarkerTask(32),
        bilevel="second_order",
    )
    trainer.train()
    assert not torch.equal(alpha_of(model), alpha_before)
    assert trainer.alpha_lr_scheduler.last_epoch == 1


# 0.3 of 4 steps is 1.2, rounded up to 2 as TrainingArguments does; 2.0 is the count 2, as SearchOptions reads it.
@pytest.mark.parametrize("warmup", [2, 0.3, 2.0])
def test_alpha_warmup_trains_only_deltas_first(tmp_path, warmup):
    model = search_model(init_weights=False)
    trainer = S3SearchTrainer(
        model=model, args=arguments(tmp_path, max_steps=4), train_dataset=MarkerTask(64), alpha_warmup_steps=warmup
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert ["s3/alpha_loss" in entry for entry in logs] == [False, False, True, True]
    assert trainer.alpha_lr_scheduler.last_epoch == 2


@pytest.mark.parametrize("close", [True, False])
def test_close_unfittable_acts_only_once_the_schedules_are_over(tmp_path, close):
    model = search_model(init_weights=False)
    trainer = S3SearchTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=8),
        train_dataset=MarkerTask(64),
        close_unfittable=close,
        close_overflow=True,
        selection_method="greedy",
    )
    bank, calls = model.base_model.gate_bank(), []
    close_unfittable = bank.close_unfittable

    def recorded(method: str, overflow: bool) -> int:
        calls.append((trainer.state.global_step, method, overflow))
        return close_unfittable(method=method, overflow=overflow)

    bank.close_unfittable = recorded
    trainer.train()
    # DEFAULT_ANNEALING runs over the first half of the 8 steps.
    assert calls == ([(step, "greedy", True) for step in (4, 5, 6, 7)] if close else [])


@pytest.mark.parametrize(
    ("bilevel", "scheduler_type", "final_lr"),
    [("first_order", "linear", 0.0), ("second_order", "linear", 0.0), ("second_order", "constant", 0.5)],
)
def test_alpha_updates_every_k_steps_after_warmup(tmp_path, bilevel, scheduler_type, final_lr):
    model = search_model(init_weights=False)
    trainer = S3SearchTrainer(
        model=model,
        args=arguments(tmp_path, max_steps=7),
        train_dataset=MarkerTask(64),
        alpha_warmup_steps=1,
        alpha_update_interval=2,
        bilevel=bilevel,
        alpha_learning_rate=0.5,
        alpha_lr_scheduler_type=scheduler_type,
    )
    alphas = []

    class Recorder(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            alphas.append(alpha_of(model).detach().clone())

    trainer.add_callback(Recorder())
    before = alpha_of(model).detach().clone()
    trainer.train()
    moved = [not torch.equal(now, then) for now, then in zip(alphas, [before, *alphas[:-1]], strict=True)]
    # Steps 0..6: warm-up at 0, then alpha at steps 1, 3, 5; the delta-only steps leave it alone.
    assert moved == [False, True, False, True, False, True, False]
    # Its schedule runs over the 3 alpha updates, not over 6 steps: a linear one ends at 0, a constant one at the peak.
    assert trainer.alpha_lr_scheduler.last_epoch == 3
    assert trainer.alpha_lr_scheduler.get_last_lr()[0] == final_lr
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(math.isfinite(entry["loss"]) for entry in logs)


@pytest.mark.parametrize("interval", [0, 1.5, True])
def test_alpha_update_interval_must_be_a_positive_int(tmp_path, interval):
    options = {"train_dataset": MarkerTask(64), "alpha_update_interval": interval}
    with pytest.raises(ValueError, match=f"alpha_update_interval={interval!r} is not allowed"):
        S3SearchTrainer(model=search_model(), args=arguments(tmp_path), **options)


def test_bf16_search_on_llama(tmp_path):
    batch = make_batch("llama", batch_size=32, seq_len=8)
    rows = [{key: value[index] for key, value in batch.items()} for index in range(32)]
    model = search_model("llama", init_weights=False)
    alpha_before = alpha_of(model).detach().clone()
    trainer = S3SearchTrainer(
        model=model,
        args=arguments(tmp_path, bf16=True, max_steps=3, per_device_train_batch_size=4),
        train_dataset=rows,
    )
    trainer.train()
    alpha = alpha_of(model)
    assert alpha.dtype == torch.float32
    assert torch.isfinite(alpha).all()
    assert not torch.equal(alpha, alpha_before)
    assert all(torch.isfinite(torch.tensor(entry["s3/alpha_loss"])) for entry in trainer.state.log_history[:-1])


def test_non_reentrant_activation_checkpointing(tmp_path):
    model = search_model(init_weights=False)
    alpha_before = alpha_of(model).detach().clone()
    args = arguments(
        tmp_path, max_steps=2, activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False}
    )
    trainer = S3SearchTrainer(model=model, args=args, train_dataset=MarkerTask(32), bilevel="second_order")
    trainer.train()
    assert model.base_model.model.is_activation_checkpointing
    assert not torch.equal(alpha_of(model), alpha_before)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bilevel": "third_order"}, "bilevel='third_order'"),
        ({"search_split": 1.0}, "search_split=1.0"),
        ({"search_split": 0}, "search_split=0"),
        ({"search_split": True}, "search_split=True"),
        ({"search_split": 0.5, "search_dataset": MarkerTask(4)}, "not both"),
        ({"alpha_learning_rate": 0.0}, "alpha_learning_rate=0.0"),
        ({"alpha_learning_rate": float("nan")}, "alpha_learning_rate=nan"),
        ({"alpha_weight_decay": -1.0}, "alpha_weight_decay=-1.0"),
        ({"unrolled_learning_rate": -0.1}, "unrolled_learning_rate=-0.1"),
        ({"finite_difference_epsilon": 0.0}, "finite_difference_epsilon=0.0"),
        ({"finite_difference": "backward"}, "finite_difference='backward' is not allowed: choose one of"),
        ({"alpha_warmup_steps": -1}, "alpha_warmup_steps=-1"),
        ({"alpha_warmup_steps": 1.5}, "alpha_warmup_steps=1.5"),
        ({"alpha_warmup_steps": -0.5}, r"alpha_warmup_steps=-0.5 is not allowed: .* or a float in \[0, 1\)"),
        ({"alpha_warmup_steps": True}, "alpha_warmup_steps=True"),
        ({"alpha_lr_scheduler_type": "step"}, "alpha_lr_scheduler_type='step' is not allowed: choose one of"),
        ({"search_dataset": MarkerTask(0)}, "search_dataset is empty"),
    ],
)
def test_bad_search_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        S3SearchTrainer(model=search_model(), args=arguments(tmp_path), train_dataset=MarkerTask(32), **kwargs)


def test_bad_models_and_datasets(tmp_path):
    args = arguments(tmp_path)
    lora = peft.get_peft_model(TINY_MODELS["bert"](), peft.LoraConfig(target_modules=["query"]))
    fixed = peft.get_peft_model(
        TINY_MODELS["bert"](),
        peft_s3.S3SearchConfig(structure={"bert.encoder.layer.0.attention.self.query": {"lora": 1}}),
    )
    for model, message in [
        (TINY_MODELS["bert"](), "got BertForSequenceClassification"),
        (lora, "with a LoraModel tuner"),
        (fixed, "exactly one active search adapter"),
    ]:
        with pytest.raises(ValueError, match=message):
            S3SearchTrainer(model=model, args=args, train_dataset=MarkerTask(32))
    with pytest.raises(ValueError, match="leaves 0 for D_alpha and 1 for D_delta"):
        S3SearchTrainer(model=search_model(), args=args, train_dataset=MarkerTask(1))

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(MarkerTask(8))

    with pytest.raises(ValueError, match="Pass search_dataset explicitly"):
        S3SearchTrainer(model=search_model(), args=args, train_dataset=Stream())
    reentrant = arguments(
        tmp_path, activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True}
    )
    with pytest.raises(ValueError, match="non-reentrant"):
        S3SearchTrainer(model=search_model(), args=reentrant, train_dataset=MarkerTask(32))
    trainer = S3SearchTrainer(model=search_model(), args=args, train_dataset=MarkerTask(32), alpha_warmup_steps=4)
    with pytest.raises(ValueError, match="alpha_warmup_steps=4 leaves no structure-search step"):
        trainer.train()
    trainer = S3SearchTrainer(model=search_model(), args=args, train_dataset=MarkerTask(32), alpha_warmup_steps=0.99)
    with pytest.raises(ValueError, match="alpha_warmup_steps=0.99 leaves no structure-search step"):
        trainer.train()


def test_callback_searches_alongside_a_plain_trainer(tmp_path):
    model = search_model(init_weights=False)
    alpha = alpha_of(model)
    alpha_before = alpha.detach().clone()
    callback = S3SearchCallback(torch.utils.data.DataLoader(MarkerTask(32, seed=1), batch_size=8, shuffle=True))
    trainer = Trainer(
        model=model,
        args=arguments(tmp_path, max_steps=6, gradient_accumulation_steps=2),
        train_dataset=MarkerTask(32),
        callbacks=[callback],
    )
    bank = model.base_model.gate_bank()
    seen = []
    model.base_model.model.register_forward_pre_hook(lambda *_: seen.append((bank.budget_scale, bank.tau)))
    trainer.train()
    assert not torch.equal(alpha, alpha_before)
    assert not any(p is alpha for group in trainer.optimizer.param_groups for p in group["params"])
    assert callback.alpha_lr_scheduler.last_epoch == 6
    # The default annealing: a wider budget (4x, capped at 90 % of this tiny space) and tau 1 at the first step, the
    # config's values from halfway on.
    assert seen[0][0] > 1.0 and seen[0][1] == 1.0
    assert seen[-1] == (1.0, model.base_model.peft_config["default"].tau)
    budget = model.base_model.budget()
    assert abs(bank.expected_num_params().item() - budget) <= 0.01 * budget


def test_callback_alpha_lr_scheduler_type(tmp_path):
    loader = torch.utils.data.DataLoader(MarkerTask(32, seed=1), batch_size=8)
    with pytest.raises(ValueError, match="alpha_lr_scheduler_type='step' is not allowed"):
        S3SearchCallback(loader, alpha_lr_scheduler_type="step")
    callback = S3SearchCallback(loader, alpha_learning_rate=0.5, alpha_lr_scheduler_type="constant")
    model = search_model(init_weights=False)
    Trainer(
        model=model, args=arguments(tmp_path, max_steps=3), train_dataset=MarkerTask(32), callbacks=[callback]
    ).train()
    assert callback.alpha_lr_scheduler.last_epoch == 3
    assert callback.alpha_lr_scheduler.get_last_lr()[0] == 0.5


def test_callback_added_after_init_is_refused(tmp_path):
    trainer = Trainer(model=search_model(), args=arguments(tmp_path), train_dataset=MarkerTask(32))
    trainer.add_callback(S3SearchCallback(torch.utils.data.DataLoader(MarkerTask(8), batch_size=4)))
    with pytest.raises(ValueError, match=r"Trainer\(callbacks=\[...\]\)"):
        trainer.train()


def _ddp_worker(output_dir: str) -> None:
    """One process of a 2-process gloo run: closed hard gates and no unused-parameter search must not trip DDP."""
    model = search_model(init_weights=False, hard_gates=True)
    args = arguments(
        Path(output_dir), max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        ddp_backend="gloo", ddp_find_unused_parameters=False,
    )  # fmt: skip
    trainer = S3SearchTrainer(model=model, args=args, train_dataset=MarkerTask(64), bilevel="second_order")
    trainer.train()
    state = torch.cat(
        [alpha_of(model).detach()] + [p.detach().reshape(-1) for p in trainer.search_controller.delta_parameters]
    )
    gathered = [torch.empty_like(state) for _ in range(2)]
    torch.distributed.all_gather(gathered, state)
    assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
    assert torch.equal(gathered[0], gathered[1]), "alphas or deltas diverged across processes"


@pytest.mark.slow
def test_two_process_ddp(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__, str(tmp_path)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert result.returncode == 0, result.stderr[-3000:]


if __name__ == "__main__":
    torch.set_num_threads(1)
    _ddp_worker(sys.argv[1])


def _poison_one_delta(model: peft.PeftModel) -> None:
    # A non-finite delta makes every forward pass non-finite, as a diverged search does.
    with torch.no_grad():
        next(p for name, p in model.named_parameters() if p.requires_grad and "s3_" in name).fill_(float("nan"))


DIVERGED_AT_STEP_0 = r"diverged at step 0: the alpha (\(D_alpha\) loss|gradient)"


@pytest.mark.parametrize("bilevel", ["first_order", "second_order"])
def test_a_diverged_search_stops_with_a_clear_error(tmp_path, bilevel):
    model = search_model()
    trainer = S3SearchTrainer(model=model, args=arguments(tmp_path), train_dataset=MarkerTask(64), bilevel=bilevel)
    _poison_one_delta(model)
    # A NaN delta behind a closed gate may leave the loss finite and only its gradient NaN.
    with pytest.raises(peft_s3.SearchDivergedError, match=DIVERGED_AT_STEP_0):
        trainer.train()


def test_a_diverged_callback_search_stops_with_a_clear_error(tmp_path):
    model = search_model()
    callback = S3SearchCallback(torch.utils.data.DataLoader(MarkerTask(32, seed=1), batch_size=8))
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=MarkerTask(64), callbacks=[callback])
    _poison_one_delta(model)
    with pytest.raises(peft_s3.SearchDivergedError, match="diverged at step 1"):
        trainer.train()


@pytest.mark.parametrize("checkpointing_kwargs", [{"use_reentrant": True}, {}])
def test_reentrant_checkpointing_turned_on_through_the_model_is_refused(tmp_path, checkpointing_kwargs):
    model = search_model()
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
    with pytest.raises(ValueError, match=r"reentrant activation checkpointing, turned on through the model"):
        S3SearchTrainer(model=model, args=arguments(tmp_path, max_steps=1), train_dataset=MarkerTask(64)).train()
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    S3SearchTrainer(model=model, args=arguments(tmp_path, max_steps=1), train_dataset=MarkerTask(64)).train()


def test_training_arguments_checkpointing_replaces_the_models_reentrant_setting(tmp_path):
    model = search_model()
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    args = arguments(tmp_path, max_steps=1, gradient_checkpointing=True)
    S3SearchTrainer(model=model, args=args, train_dataset=MarkerTask(64)).train()
