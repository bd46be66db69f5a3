"""Data-parallel structure search on 2 CPU processes (gloo) against a single process: DDP through `accelerate launch`,
FSDP2 through `peft_s3.distributed.shard_model` under torchrun (accelerate runs FSDP only on accelerators)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from peft_s3.selection import P_RESOLUTION

SCRIPT = Path(__file__).with_name("_accelerate_search.py")
ROOT = Path(__file__).parent.parent
# Both runs see the same global batches, gate noise and seeds; what remains is the order of floating-point
# reductions (two half-batch means averaged instead of one mean), a few float32 ulps per step, which AdamW's
# normalised steps turn into alpha differences of a few 1e-6, up to 1.03e-5 seen on another machine (central
# difference). The forward difference divides the difference of two gradients from separate passes by epsilon,
# without the central difference's symmetric cancellation; it was seen at 1.1e-5 (DDP) and 1.8e-5 (FSDP2). The
# tolerances leave about 5x room over the largest difference seen; the search moves alphas far further (checked).
ALPHA_TOLERANCES = {"first_order": 5e-5, "second_order": 5e-5, "second_order_forward": 1e-4}
LOSS_TOLERANCE = 1e-5
TIMEOUT = 300


def assert_same_structure_up_to_near_ties(first: dict, second: dict) -> bool:
    """The two runs resolve to the same structure (returns True), or to structures that differ only where p is tied
    to the selection's resolution (returns False): each is then as good as the other under either run's p, within
    half a grid step per differing candidate. (Selection compares p on a grid, so float noise flips a choice only
    when a p lies on a grid boundary.)"""
    if first["structure"] == second["structure"]:
        return True
    chosen = [{i for i, selected in enumerate(run["selected"]) if selected} for run in (first, second)]
    differing = len(chosen[0] ^ chosen[1])
    for p in (first["resolved_p"], second["resolved_p"]):
        sums = [sum(p[i] for i in indices) for indices in chosen]
        assert abs(sums[0] - sums[1]) <= differing * P_RESOLUTION, (first["structure"], second["structure"])
    return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment(tmp_path: Path) -> dict[str, str]:
    # No user accelerate config may leak in; one thread per process keeps 2-process runs from oversubscribing; the
    # scripts import this checkout's peft_s3, not an installed one.
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": pythonpath}


class _BackgroundRun:
    """A script run started in the background, whose results (its JSON output) are read once it has finished."""

    def __init__(self, command: list[str], output_file: Path, tmp_path: Path) -> None:
        self.output_file = output_file
        self.process = subprocess.Popen(command, env=_environment(tmp_path), stderr=subprocess.PIPE, text=True)
        self._results: dict[str, Any] | None = None

    def results(self) -> dict[str, Any]:
        if self._results is None:
            _, stderr = self.process.communicate(timeout=TIMEOUT)
            assert self.process.returncode == 0, stderr[-3000:]
            self._results = json.loads(self.output_file.read_text())
        return self._results

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def _lazy_run(tmp_path: Path, command: Callable[[Path], list[str]]) -> Iterator[Callable[[], _BackgroundRun]]:
    """Yields a function that starts the run writing to tmp_path/out.json at its first call and returns it after."""
    runs: list[_BackgroundRun] = []

    def start() -> _BackgroundRun:
        if not runs:
            runs.append(_BackgroundRun(command(tmp_path / "out.json"), tmp_path / "out.json", tmp_path))
        return runs[0]

    yield start
    for run in runs:
        run.stop()


@pytest.fixture(scope="module")
def single_process(tmp_path_factory) -> Iterator[Callable[[], _BackgroundRun]]:
    """The single-process searches that both 2-process runs are compared with, run once."""
    yield from _lazy_run(tmp_path_factory.mktemp("single"), lambda output: [sys.executable, str(SCRIPT), str(output)])


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory) -> Iterator[Callable[[], _BackgroundRun]]:
    """The searches, retraining and refused setups of a 2-process FSDP2 run (torchrun, gloo), run once."""

    def command(output: Path) -> list[str]:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        return [*launch, "--master_port", str(_free_port()), str(SCRIPT), str(output), "--fsdp2"]

    yield from _lazy_run(tmp_path_factory.mktemp("fsdp2"), command)


def _assert_matches_single_process(parallel: dict[str, Any], single: dict[str, Any], wrapper: str) -> None:
    assert parallel.keys() == single.keys() == ALPHA_TOLERANCES.keys()
    for name, tolerance in ALPHA_TOLERANCES.items():
        assert (single[name]["world_size"], parallel[name]["world_size"]) == (1, 2)
        assert parallel[name]["wrapper"] == wrapper
        alpha_single, alpha_parallel = torch.tensor(single[name]["alpha"]), torch.tensor(parallel[name]["alpha"])
        # The search moved the alphas far beyond the tolerance, so agreement is not trivial.
        assert alpha_single.std() > 100 * tolerance
        torch.testing.assert_close(
            alpha_parallel, alpha_single, atol=tolerance, rtol=0, msg=lambda message, name=name: f"{name}: {message}"
        )
        torch.testing.assert_close(
            torch.tensor(parallel[name]["alpha_losses"]),
            torch.tensor(single[name]["alpha_losses"]),
            atol=LOSS_TOLERANCE,
            rtol=0,
        )
        same_structure = assert_same_structure_up_to_near_ties(single[name], parallel[name])
        assert single[name]["reloads_exactly"] and parallel[name]["reloads_exactly"]
        if not same_structure:
            continue
        # The plain Trainer retrains the resolved structure on the same global batches.
        torch.testing.assert_close(
            torch.tensor(parallel[name]["retrain_losses"]),
            torch.tensor(single[name]["retrain_losses"]),
            atol=LOSS_TOLERANCE,
            rtol=0,
        )


def test_ddp_search_matches_single_process(tmp_path, single_process):
    single = single_process()
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
    ]  # fmt: skip
    # accelerate's --multi_gpu launcher is torch.distributed.run; the script trains with use_cpu=True, so the two
    # processes run on the CPU and communicate over gloo.
    ddp = _BackgroundRun([*launch, str(SCRIPT), str(tmp_path / "ddp.json")], tmp_path / "ddp.json", tmp_path)
    parallel = ddp.results()["searches"]
    _assert_matches_single_process(parallel, single.results()["searches"], wrapper="DistributedDataParallel")


def test_fsdp2_search_matches_single_process_on_half_the_base_weights(single_process, fsdp2_run):
    single, fsdp2 = single_process(), fsdp2_run()
    parallel, single = fsdp2.results()["searches"], single.results()["searches"]
    # fully_shard turns the model's class into FSDP<class>, the same object: the Trainer did not wrap it in DDP.
    _assert_matches_single_process(parallel, single, wrapper="FSDPPeftModelForSequenceClassification")
    for name in single:
        ((held, total),) = single[name]["base_weight_shares"]
        assert held == total
        shares = parallel[name]["base_weight_shares"]
        assert [share_total for _, share_total in shares] == [total, total]
        assert sum(share for share, _ in shares) == total
        for share, _ in shares:
            assert 0.45 * total <= share <= 0.55 * total


def test_accelerate_fsdp2_search_matches_single_process(tmp_path, single_process):
    # TrainingArguments(fsdp=True, fsdp_config={"version": 2}), accelerate's GPU-only FSDP2 opened to the CPU: it
    # shards the model after the optimizer exists, replacing every parameter, with alpha in its ignored_modules.
    single = single_process()
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
    ]
    output_file = tmp_path / "accelerate_fsdp2.json"
    run = _BackgroundRun([*launch, str(SCRIPT), str(output_file), "--accelerate-fsdp2"], output_file, tmp_path)
    parallel = run.results()["searches"]
    _assert_matches_single_process(parallel, single.results()["searches"], "FSDPPeftModelForSequenceClassification")
    for name in parallel:
        assert [share for share, _ in parallel[name]["base_weight_shares"]] == [3177, 3177]


def test_fsdp_setups_the_search_cannot_run_are_refused_with_the_reason(fsdp2_run):
    refusals = fsdp2_run().results()["refusals"]
    assert refusals.keys() == {"fsdp_on_cpu", "alpha_sharded", "root_not_sharded"}
    # On a CPU accelerate would silently run DDP; the search says so and how to shard instead.
    assert "accelerate did not enable FSDP" in refusals["fsdp_on_cpu"]
    assert "shard_model(model)" in refusals["fsdp_on_cpu"]
    assert "['base_model.s3_alpha.default'] are sharded" in refusals["alpha_sharded"]
    assert "the model itself must be the root FSDP unit" in refusals["root_not_sharded"]
