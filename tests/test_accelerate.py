"""Data-parallel structure search: `accelerate launch` with 2 CPU processes (gloo) against a single process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from peft_s3.selection import P_RESOLUTION
from peft_s3.trainer import BILEVEL_MODES

SCRIPT = Path(__file__).with_name("_accelerate_search.py")
# Both runs see the same global batches, gate noise and seeds; what remains is the order of floating-point
# reductions (two half-batch means averaged instead of one mean), a few float32 ulps per step.
ALPHA_TOLERANCE = 1e-5
TIMEOUT = 300


def assert_same_structure_up_to_near_ties(first: dict, second: dict) -> None:
    """The two runs resolve to the same structure, or to structures that differ only where p is tied to the
    selection's resolution: each is then as good as the other under either run's p, within half a grid step per
    differing candidate. (Selection compares p on a grid, so float noise flips a choice only when a p lies on a
    grid boundary.)"""
    if first["structure"] == second["structure"]:
        return
    chosen = [{i for i, selected in enumerate(run["selected"]) if selected} for run in (first, second)]
    differing = len(chosen[0] ^ chosen[1])
    for p in (first["resolved_p"], second["resolved_p"]):
        sums = [sum(p[i] for i in indices) for indices in chosen]
        assert abs(sums[0] - sums[1]) <= differing * P_RESOLUTION, (first["structure"], second["structure"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_search_matches_single_process(tmp_path):
    # No user accelerate config may leak in; one thread per process keeps the 2-process run from oversubscribing.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf_home")}
    single_file, parallel_file = tmp_path / "single.json", tmp_path / "parallel.json"
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
    ]  # fmt: skip
    # accelerate's --multi_gpu launcher is torch.distributed.run; the script trains with use_cpu=True, so the two
    # processes run on the CPU and communicate over gloo.
    runs = [
        subprocess.Popen([*launch, str(SCRIPT), str(parallel_file)], env=env, stderr=subprocess.PIPE, text=True),
        subprocess.Popen([sys.executable, str(SCRIPT), str(single_file)], env=env, stderr=subprocess.PIPE, text=True),
    ]
    for run in runs:
        _, stderr = run.communicate(timeout=TIMEOUT)
        assert run.returncode == 0, stderr[-3000:]

    single, parallel = json.loads(single_file.read_text()), json.loads(parallel_file.read_text())
    for mode in BILEVEL_MODES:
        assert (single[mode]["world_size"], parallel[mode]["world_size"]) == (1, 2)
        assert parallel[mode]["wrapper"] == "DistributedDataParallel"
        alpha_single, alpha_parallel = torch.tensor(single[mode]["alpha"]), torch.tensor(parallel[mode]["alpha"])
        # The search moved the alphas far beyond the tolerance, so agreement is not trivial.
        assert alpha_single.std() > 100 * ALPHA_TOLERANCE
        torch.testing.assert_close(alpha_parallel, alpha_single, atol=ALPHA_TOLERANCE, rtol=0)
        torch.testing.assert_close(
            torch.tensor(parallel[mode]["alpha_losses"]), torch.tensor(single[mode]["alpha_losses"]), atol=1e-5, rtol=0
        )
        assert_same_structure_up_to_near_ties(single[mode], parallel[mode])


FSDP_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_trainer import MarkerTask, S3SearchTrainer, arguments, search_model
try:
    S3SearchTrainer(model=search_model(), args=arguments({output!r}, fsdp=True), train_dataset=MarkerTask(16))
except ValueError as error:
    print("REFUSED:", error)
"""


def test_fsdp_is_refused_with_the_reason(tmp_path):
    # FSDP needs a distributed run: one process of one (gloo), set up through the environment torchrun would set.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    env |= {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    script = FSDP_SCRIPT.format(tests=str(Path(__file__).parent), output=str(tmp_path))
    completed = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert "REFUSED: S3SearchTrainer does not run under FSDP (fsdp=True)" in completed.stdout, completed.stderr[-2000:]
    assert "Search with DDP instead" in completed.stdout
