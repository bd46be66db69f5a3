"""Tests of the alpha optimizer: AdamW with one second moment shared by all gates."""

from __future__ import annotations

import copy

import pytest
import torch
from test_trainer import MarkerTask, arguments, search_model

from peft_s3.alpha_optimizer import SharedScaleAdamW, build_alpha_optimizer
from peft_s3.trainer import S3SearchTrainer


def _steps(optimizer_class: type[torch.optim.Optimizer], gradients: list[torch.Tensor], **kwargs) -> torch.Tensor:
    param = torch.nn.Parameter(torch.zeros_like(gradients[0]))
    optimizer = optimizer_class([param], lr=0.1, **kwargs)
    for gradient in gradients:
        param.grad = gradient.clone()
        optimizer.step()
    return param.detach()


def test_one_gate_moves_as_under_adamw():
    """With a single coordinate the shared second moment is that coordinate's own: the update is AdamW's."""
    generator = torch.Generator().manual_seed(0)
    gradients = [torch.randn(1, generator=generator) * 10**k for k in range(-3, 3)]
    kwargs = {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}
    shared = _steps(SharedScaleAdamW, gradients, **kwargs)
    assert torch.allclose(shared, _steps(torch.optim.AdamW, gradients, **kwargs), rtol=1e-5, atol=1e-7)
    assert shared.abs().item() > 0.1


def test_steps_keep_the_relative_sizes_of_the_gate_gradients():
    gradients = [torch.tensor([1.0, 0.01])] * 5
    shared = _steps(SharedScaleAdamW, gradients)
    per_gate = _steps(torch.optim.AdamW, gradients)
    assert shared[0] / shared[1] == pytest.approx(100.0, rel=1e-4)
    # AdamW moves the gate with the tiny gradient as far as the other one.
    assert per_gate[0] / per_gate[1] == pytest.approx(1.0, rel=1e-4)


def test_state_dict_round_trip_continues_the_same_steps():
    generator = torch.Generator().manual_seed(1)
    gradients = [torch.randn(4, generator=generator) for _ in range(6)]
    whole = torch.nn.Parameter(torch.zeros(4))
    first = SharedScaleAdamW([whole], lr=0.1)
    for gradient in gradients[:3]:
        whole.grad = gradient.clone()
        first.step()
    resumed = torch.nn.Parameter(whole.detach().clone())
    second = SharedScaleAdamW([resumed], lr=0.1)
    second.load_state_dict(copy.deepcopy(first.state_dict()))  # as from a checkpoint file: no shared tensors
    for gradient in gradients[3:]:
        whole.grad, resumed.grad = gradient.clone(), gradient.clone()
        first.step()
        second.step()
    assert torch.equal(whole, resumed)


def test_search_trainer_takes_the_shared_second_moment(tmp_path):
    trainer = S3SearchTrainer(
        model=search_model(),
        args=arguments(tmp_path, max_steps=3),
        train_dataset=MarkerTask(32),
        alpha_second_moment="shared",
    )
    before = trainer.model.base_model.s3_alpha["default"].detach().clone()
    trainer.train()
    assert isinstance(trainer.alpha_optimizer, SharedScaleAdamW)
    assert not torch.equal(trainer.model.base_model.s3_alpha["default"], before)


def test_unknown_second_moment_is_refused():
    with pytest.raises(ValueError, match="alpha_second_moment='adam' is not allowed: use one of per_gate, shared"):
        build_alpha_optimizer(torch.nn.Parameter(torch.zeros(2)), 0.1, (0.9, 0.999), 1e-8, 0.0, "adam")
