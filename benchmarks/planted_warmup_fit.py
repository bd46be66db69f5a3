"""Why the planted probes miss: which candidates carry the fit when the search's alpha warm-up ends?

With `alpha_warmup_steps`, the deltas train while alpha stays frozen, every gate sampled at the same p (the budget
schedule's start: 4x the budget, spread over the whole space). This script runs a probe's search (`planted.py`) up to
the end of that warm-up and then scores every candidate on the training rows with the warm-up's deltas:

- leave-one-out: how much the MSE rises when its gate is closed and every other gate stays at the warm-up's p. This
  is what the alpha phase starts from: a candidate whose removal costs little gives alpha little reason to keep it.
- solo: the lowest MSE with only its gate open, over the gate values in `SOLO_GATES` (the warm-up trains the deltas
  under gates well below 1, so a gate of 1 alone would understate them).

It prints where the planted candidates rank among all candidates under both scores, per case and per kind, and
writes every run to --output (--resume skips the runs already there).

    python benchmarks/planted_warmup_fit.py --warmup-steps 960 --seeds 0 1 2 3 \\
        --output benchmarks/results/planted/warmup_fit.json
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import peft
import planted
import torch
from transformers import TrainerCallback
from transformers.utils import logging as transformers_logging

import peft_s3

SOLO_GATES = (0.1, 0.3, 1.0, 3.0, 10.0)


class _StopAtStep(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def warmed_up_student(
    case: planted.Case, seed: int, warmup_steps: int, settings: planted.Settings
) -> tuple[peft.PeftModel, peft.PeftModel, planted.PlantedData, torch.Tensor]:
    """(teacher, student, dataset, warm-up gate values) after `warmup_steps` of the probe's search (alpha frozen)."""
    variant = planted.make_variant(
        "warmup", {"steps": warmup_steps + 1, "trainer": {"alpha_warmup_steps": warmup_steps}}
    )
    teacher, student, dataset = planted.build_case(case, seed, variant, settings)
    with tempfile.TemporaryDirectory() as output_dir:
        heldout = planted.teacher_data(teacher, settings.heldout_examples, seed + 40_000, settings)
        trainer = planted._trainer(student, dataset, heldout, variant, seed, settings, output_dir)
        trainer.add_callback(_StopAtStep(warmup_steps))
        trainer.train()
    bank = student.base_model.gate_bank()
    if trainer.state.global_step != warmup_steps or bool((bank.alpha != bank.alpha[0]).any()):
        raise RuntimeError(
            f"{case.name} seed {seed}: the search did not stop at the end of its warm-up with alpha untouched "
            f"(step {trainer.state.global_step} of {warmup_steps})."
        )
    # The trainer ends its schedules when it stops; the warm-up itself ran at their start.
    config = student.peft_config["default"]
    trainer.search_options.annealing.apply(bank, config.tau, config.beta, progress=0.0)
    return teacher, student, dataset, bank.probabilities().detach()


def fit_scores(
    student: peft.PeftModel, dataset: planted.PlantedData, warmup_p: torch.Tensor
) -> tuple[list[float], list[float], float]:
    """Per candidate (gate order): MSE rise without it (leave-one-out), its best solo MSE; and the MSE at warmup_p."""
    with planted.gate_values(student, warmup_p):
        joint = planted._mse(student, dataset)
    rises, solos = [], []
    for index in range(len(warmup_p)):
        without = warmup_p.clone()
        without[index] = 0.0
        with planted.gate_values(student, without):
            rises.append(planted._mse(student, dataset) - joint)
        best = float("inf")
        for gate in SOLO_GATES:
            alone = torch.zeros_like(warmup_p)
            alone[index] = gate
            with planted.gate_values(student, alone):
                best = min(best, planted._mse(student, dataset))
        solos.append(best)
    return rises, solos, joint


def _rank(values: Sequence[float], index: int, descending: bool) -> int:
    """1-based rank of values[index]: how many values are at least as good, itself included (ties count against
    it)."""
    value = values[index]
    return sum(v >= value if descending else v <= value for v in values)


def run_case(case: planted.Case, seed: int, warmup_steps: int, settings: planted.Settings) -> dict[str, Any]:
    start = time.perf_counter()
    teacher, student, dataset, warmup_p = warmed_up_student(case, seed, warmup_steps, settings)
    names = [c.name for c in student.base_model.candidates()]
    rises, solos, joint = fit_scores(student, dataset, warmup_p)
    by_rise = sorted(range(len(names)), key=lambda i: -rises[i])
    # Interchangeable LoRA slots of one module: the planted slice is the one that carries most of the fit.
    found = planted._planted_slots(teacher.planted, student.base_model.gate_report(), [names[i] for i in by_rise])
    slots = [found[c.name] for c in teacher.planted]
    indices = [names.index(name) for name in slots]
    return {
        "case": case.name,
        "seed": seed,
        "warmup_steps": warmup_steps,
        "candidates": len(names),
        "warmup_gate": float(warmup_p[0]),
        "planted": slots,
        "kinds": [c.kind for c in teacher.planted],
        "loo_rank": [_rank(rises, i, descending=True) for i in indices],
        "solo_rank": [_rank(solos, i, descending=False) for i in indices],
        "loo_rise": [rises[i] for i in indices],
        "loo_top": [{"name": names[i], "rise": rises[i]} for i in by_rise[:5]],
        "mse_start": planted._mse(planted.base_model(case, seed, settings), dataset),
        "mse_warmup": joint,
        "seconds": time.perf_counter() - start,
    }


def _planted_records(runs: Sequence[dict[str, Any]]) -> list[tuple[str, int, int, int]]:
    """(kind, leave-one-out rank, solo rank, planted count of its case) of every planted candidate in `runs`."""
    return [
        (kind, loo, solo, len(run["kinds"]))
        for run in runs
        for kind, loo, solo in zip(run["kinds"], run["loo_rank"], run["solo_rank"], strict=True)
    ]


def report(runs: Sequence[dict[str, Any]]) -> str:
    """Per run, the planted ranks; per kind, how often a planted candidate is within the top n (n = the planted count
    of its case) by each score, and its median rank."""
    lines = ["| case | seed | planted (kind: leave-one-out rank / solo rank) |", "|---|---|---|"]
    for run in runs:
        ranks = ", ".join(f"{kind}: {loo} / {solo}" for kind, loo, solo, _ in _planted_records([run]))
        lines.append(f"| {run['case']} | {run['seed']} | {ranks} |")
    lines += [
        "",
        "| kind | planted | leave-one-out top n | median rank | solo top n | median rank |",
        "|---|---|---|---|---|---|",
    ]
    records = _planted_records(runs)
    for kind in peft_s3.CANDIDATE_KINDS:
        mine = [record for record in records if record[0] == kind]
        if not mine:
            continue
        loo_top = sum(loo <= count for _, loo, _, count in mine)
        solo_top = sum(solo <= count for _, _, solo, count in mine)
        loo_median = statistics.median(loo for _, loo, _, _ in mine)
        solo_median = statistics.median(solo for _, _, solo, _ in mine)
        lines.append(f"| {kind} | {len(mine)} | {loo_top} | {loo_median:g} | {solo_top} | {solo_median:g} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup-steps", type=int, default=960)
    parser.add_argument(
        "--cases", nargs="+", help="case names or shell patterns (default: all; see planted.py --list)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=list(planted.DEFAULT_SEEDS))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/planted/warmup_fit.json"))
    parser.add_argument("--resume", action="store_true", help="skip (case, seed, warm-up) runs already in --output")
    parser.add_argument("--report-only", action="store_true", help="print the tables of --output and exit")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.report_only:
        print(report(planted._load(args.output)["runs"]))
        return
    if args.warmup_steps < 1:
        raise SystemExit(f"error: --warmup-steps {args.warmup_steps} must be >= 1.")
    try:
        cases = planted.select_cases(args.cases)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    torch.set_num_threads(args.threads)
    transformers_logging.set_verbosity_error()
    results = planted._load(args.output) if args.resume else {}
    results = results or {
        "settings": dataclasses.asdict(planted.Settings()),
        "commands": [],
        "commits": [],
        "runs": [],
    }
    results["commands"].append(shlex.join(["python", *sys.argv]))
    results["commits"].append(planted._git_commit())
    done = {(run["case"], run["seed"], run["warmup_steps"]) for run in results["runs"]}
    for case in cases:
        for seed in args.seeds:
            if (case.name, seed, args.warmup_steps) in done:
                continue
            run = run_case(case, seed, args.warmup_steps, planted.Settings())
            results["runs"].append(run)
            planted._save(args.output, results)
            print(
                f"{case.name:<28} seed {seed}: leave-one-out ranks {run['loo_rank']} solo ranks "
                f"{run['solo_rank']} ({run['seconds']:.0f} s)",
                flush=True,
            )
    planted._save(args.output, results)
    print(report([run for run in results["runs"] if run["warmup_steps"] == args.warmup_steps]))


if __name__ == "__main__":
    main()
