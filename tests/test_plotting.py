"""The structure heatmap (paper Fig. 3): its data matrix, cell by cell, and the drawn figure."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import peft
import pytest
import torch
from conftest import TASK_TYPES, TINY_MODELS

import peft_s3
from peft_s3.gate_report import gate_report, save_gate_report
from peft_s3.plotting import OTHER_COLUMN, plot_structure, structure_matrix
from peft_s3.resolution import resolve

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _search(arch: str, seed: int = 0, **kwargs: Any) -> peft.PeftModel:
    config = peft_s3.S3SearchConfig(task_type=TASK_TYPES[arch], **{"budget": 0.02, **kwargs})
    model = peft.get_peft_model(TINY_MODELS[arch](), config)
    alpha = model.base_model.s3_alpha["default"]
    with torch.no_grad():
        alpha.copy_(torch.randn(alpha.shape, generator=torch.Generator().manual_seed(seed)))
    return model


def _cell(matrix: Any, label: str, column: str) -> float:
    return matrix.values[matrix.row_labels.index(label), matrix.column_labels.index(column)]


def test_matrix_of_one_stack_holds_p_of_every_candidate() -> None:
    model = _search("bert", max_rank=2)
    rows = model.base_model.gate_report()
    matrix = structure_matrix(model)
    # One stack: the rows need no stack name.
    assert matrix.row_labels[:3] == [
        "attention.self.query | lora",
        "attention.self.query | bitfit",
        "attention.self.key | lora",
    ]
    assert matrix.column_labels == ["0", "1"]
    assert matrix.values.shape == (len(rows) // 2 - 6, 2)  # two LoRA slots share a row at each of 6 linears
    assert not np.isnan(matrix.values).any()
    for row in rows:
        if row["kind"] == "lora":
            slots = [r["p"] for r in rows if r["module"] == row["module"] and r["kind"] == "lora"]
            expected = sum(slots) / len(slots)
        else:
            expected = row["p"]
        assert _cell(matrix, f"{row['position']} | {row['kind']}", str(row["layer"])) == pytest.approx(expected)


def test_matrix_separates_stacks_and_puts_out_of_block_candidates_in_other() -> None:
    # The regex also matches the final norms of encoder and decoder, which lie outside the blocks.
    model = _search("t5", norm_modules=r".*layer_norm")
    report = gate_report(model)
    matrix = structure_matrix(report)
    assert matrix.column_labels == ["0", "1", OTHER_COLUMN]
    for row in report["candidates"]:
        if row["layer"] is None:
            label, column = f"{row['position']} | {row['kind']}", OTHER_COLUMN
        else:
            label, column = f"{row['stack'].split('.')[0]} | {row['position']} | {row['kind']}", str(row["layer"])
        assert _cell(matrix, label, column) == pytest.approx(row["p"])
    other = matrix.row_labels.index("encoder.final_layer_norm | lnfit")
    assert np.isnan(matrix.values[other, :2]).all()
    cross = matrix.row_labels.index("decoder | layer.1.EncDecAttention.q | lora")
    assert np.isnan(matrix.values[cross, 2])
    # Cells without a candidate are NaN; every candidate has exactly one cell (max_rank=1).
    assert np.isfinite(matrix.values).sum() == len(report["candidates"])
    assert matrix.row_stacks[other] is None and matrix.row_stacks[cross] == "decoder.block"


def test_selected_matrix_counts_the_resolved_candidates(tmp_path: Path) -> None:
    model = _search("bert", max_rank=2, budget=0.05)
    structure = resolve(model)
    matrix = structure_matrix(structure, value="selected")
    assert np.nansum(matrix.values) == len(structure.candidates)
    for module, kinds in structure.structure.items():
        candidate = next(c for c in structure.candidates if c.module == module)
        for kind, count in kinds.items():
            assert _cell(matrix, f"{candidate.position} | {kind}", str(candidate.layer)) == count
    assert set(np.unique(matrix.values)) <= {0.0, 1.0, 2.0}
    # A model or a checkpoint directory is resolved with its search budget.
    np.testing.assert_array_equal(structure_matrix(model, value="selected").values, matrix.values)
    save_gate_report(model, tmp_path)
    np.testing.assert_array_equal(structure_matrix(tmp_path, value="selected").values, matrix.values)


def test_plot_structure_draws_the_matrix_and_saves_a_png(tmp_path: Path) -> None:
    model = _search("t5")
    path = tmp_path / "structure.png"
    figure = plot_structure(model, path=path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = figure.axes[0].images[0].get_array()
    expected = structure_matrix(model).values
    np.testing.assert_array_equal(image.mask, np.isnan(expected))
    np.testing.assert_allclose(image.filled(np.nan), expected)
    assert [tick.get_text() for tick in figure.axes[0].get_yticklabels()] == structure_matrix(model).row_labels
    plt.close(figure)

    figure, ax = plt.subplots()
    assert plot_structure(resolve(model), ax=ax, value="selected") is figure
    plt.close(figure)


def test_plot_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _search("bert")
    with pytest.raises(ValueError, match=r"value='alpha' is not allowed; choose one of \['p', 'selected'\]"):
        structure_matrix(model, value="alpha")
    with pytest.raises(ValueError, match="needs the budget"):
        structure_matrix(model.base_model.gate_report(), value="selected")
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install peft-s3\[plot\]"):
        plot_structure(model)
