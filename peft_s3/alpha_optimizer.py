"""The optimizer of the structural parameters alpha.

AdamW divides each coordinate's step by that coordinate's own gradient scale, so every gate moves by about the
learning rate per step however small its gradient is. Early in a search most gates have gradients near zero (their
deltas have barely moved from the identity), and that rule lets a consistent but tiny push, such as the global
competition of eqs. 14-15 pressing on a gate whose delta is not trained yet, close the gate before its delta can
show what it is worth. `SharedScaleAdamW` keeps Adam's first moment per gate but one second moment, the mean
square of the whole alpha gradient, so the steps keep the gradients' relative sizes and only their overall scale is
normalised.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Optional

import torch

ALPHA_SECOND_MOMENTS = ("per_gate", "shared")


class SharedScaleAdamW(torch.optim.Optimizer):
    """AdamW with one second-moment estimate per parameter tensor (the mean of its squared gradient) instead of one
    per coordinate. Decoupled weight decay and bias correction as in `torch.optim.AdamW`."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad.float()
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros((), dtype=grad.dtype, device=grad.device)
                state["step"] += 1
                state["exp_avg"].lerp_(grad, 1 - beta1)
                state["exp_avg_sq"].lerp_(grad.square().mean(), 1 - beta2)
                first = state["exp_avg"] / (1 - beta1 ** state["step"])
                scale = (state["exp_avg_sq"] / (1 - beta2 ** state["step"])).sqrt() + group["eps"]
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.sub_((group["lr"] * first / scale).to(param.dtype))
        return loss


def check_alpha_second_moment(alpha_second_moment: str) -> None:
    if alpha_second_moment not in ALPHA_SECOND_MOMENTS:
        raise ValueError(
            f"alpha_second_moment={alpha_second_moment!r} is not allowed: use one of "
            f"{', '.join(ALPHA_SECOND_MOMENTS)}."
        )


def build_alpha_optimizer(
    alpha: torch.nn.Parameter,
    learning_rate: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    second_moment: str,
) -> torch.optim.Optimizer:
    """AdamW on alpha: `"per_gate"` second moments (torch's AdamW) or one `"shared"` by all gates."""
    check_alpha_second_moment(second_moment)
    optimizer_class = torch.optim.AdamW if second_moment == "per_gate" else SharedScaleAdamW
    return optimizer_class([alpha], lr=learning_rate, betas=betas, eps=eps, weight_decay=weight_decay)
