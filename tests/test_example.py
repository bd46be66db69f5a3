"""The example script (the README's main command) end to end, on a tiny BERT saved to disk instead of MiniLM."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_search_and_retrain_script_writes_structure_plots_and_results(tiny_model_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    command = [
        sys.executable,
        str(ROOT / "examples" / "search_and_retrain.py"),
        *("--model", str(tiny_model_dir), "--dataset", "amazon_food", "--budget", "100"),
        *("--max-train", "48", "--max-eval", "16", "--max-length", "16", "--batch-size", "8"),
        *("--search-epochs", "1", "--retrain-epochs", "1", "--output-dir", str(output)),
    ]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((output / "results.json").read_text())
    assert 0 < results["structure_params"] <= results["budget"] == 100
    assert results["trainable_params_without_head"] == results["structure_params"]
    assert 0.0 <= results["test_accuracy"] <= 1.0
    for name in ("s3_structure.json", "gates_p.png", "structure.png", "retrained/adapter_config.json"):
        assert (output / name).is_file(), name
    assert "S3 searched structure" in (output / "retrained" / "README.md").read_text()
