"""Heatmaps of S3 structures in the style of the paper's Fig. 3: positions x layers, coloured by p or by selection.

matplotlib is optional (`pip install peft-s3[plot]`) and imported only when a figure is drawn; `structure_matrix`,
the data behind every plot, needs only numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

from .gate_report import report_of
from .resolution import resolve
from .structure import SearchedStructure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PLOT_VALUES = ("p", "selected")
OTHER_COLUMN = "other"


@dataclass
class StructureMatrix:
    """The heatmap data: `values[row, column]` for the rows and columns named by the labels.

    A row is a position and candidate kind within one stack of blocks, a column a layer index; candidates outside the
    blocks (layer None) sit in a last column labelled "other", each on its own row. A cell is the mean p of the
    candidates there (LoRA has one per rank slot) for value="p", and their number selected (the LoRA rank, else 0 or
    1) for value="selected"; NaN where the search space has no such candidate.
    """

    values: np.ndarray
    row_labels: list[str]
    column_labels: list[str]
    row_stacks: list[Optional[str]]
    value: str


def _entries(source: Any, value: str, adapter_name: Optional[str]) -> list[tuple[Optional[str], Any, str, str, float]]:
    """(stack, layer, position, kind, value) of every candidate of the search space, in gate order."""
    if isinstance(source, SearchedStructure):
        structure = source
    elif value == "selected":
        if isinstance(source, list):
            raise ValueError(
                "value='selected' needs the budget, which a list of gate-report rows lacks: pass a SearchedStructure, "
                "an S3 model, or a directory with s3_gates.json."
            )
        structure = resolve(source, adapter_name=adapter_name)
    else:
        rows = source if isinstance(source, list) else report_of(source, adapter_name)["candidates"]
        return [(row["stack"], row["layer"], row["position"], row["kind"], row["p"]) for row in rows]
    return [
        (c.stack, c.layer, c.position, c.kind, float(c.selected) if value == "selected" else c.p)
        for c in structure.search_space
    ]


def _stack_labels(stacks: list[str]) -> dict[str, str]:
    """Shortest distinguishing names: the dotted components shared by all stacks at either end are dropped."""
    if len(stacks) < 2:
        return dict.fromkeys(stacks, "")
    parts = [stack.split(".") for stack in stacks]
    prefix = 0
    while all(len(p) > prefix + 1 and p[prefix] == parts[0][prefix] for p in parts):
        prefix += 1
    suffix = 0
    while all(len(p) > prefix + suffix + 1 and p[-1 - suffix] == parts[0][-1 - suffix] for p in parts):
        suffix += 1
    return {stack: ".".join(p[prefix : len(p) - suffix]) for stack, p in zip(stacks, parts, strict=True)}


def structure_matrix(source: Any, value: str = "p", adapter_name: Optional[str] = None) -> StructureMatrix:
    """The positions x layers matrix that `plot_structure` draws.

    Args:
        source: a `SearchedStructure`; a PeftModel / S3Model with a search adapter; a directory with s3_gates.json
            or a report dict (`peft_s3.gate_report.gate_report`); or a list of `S3Model.gate_report` rows (value="p"
            only). For value="selected", anything but a SearchedStructure is resolved with its search budget.
        value: "p" (gate probabilities) or "selected" (the resolved structure).
        adapter_name: the adapter of a model or report (default: the active one).
    """
    if value not in PLOT_VALUES:
        raise ValueError(f"value={value!r} is not allowed; choose one of {list(PLOT_VALUES)}.")
    entries = _entries(source, value, adapter_name)
    if not entries:
        raise ValueError("There are no candidates to plot.")
    stacks = list(dict.fromkeys(stack for stack, *_ in entries if stack is not None))
    short = _stack_labels(stacks)
    num_layers = 1 + max((layer for _, layer, *_ in entries if layer is not None), default=-1)
    has_other = any(layer is None for _, layer, *_ in entries)
    rows: dict[tuple[Optional[str], str, str], int] = {}
    for stack, _, position, kind, _ in entries:
        rows.setdefault((stack, position, kind), len(rows))
    sums = np.zeros((len(rows), num_layers + has_other))
    counts = np.zeros_like(sums)
    for stack, layer, position, kind, cell in entries:
        row = rows[(stack, position, kind)]
        column = num_layers if layer is None else layer
        sums[row, column] += cell
        counts[row, column] += 1
    with np.errstate(invalid="ignore"):
        values = sums / counts if value == "p" else np.where(counts > 0, sums, np.nan)
    labels = [
        " | ".join(part for part in (short.get(stack, ""), position, kind) if part) for stack, position, kind in rows
    ]
    column_labels = [str(layer) for layer in range(num_layers)] + ([OTHER_COLUMN] if has_other else [])
    return StructureMatrix(values, labels, column_labels, [stack for stack, _, _ in rows], value)


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "Plotting S3 structures needs matplotlib: install it with `pip install peft-s3[plot]`."
        ) from error
    return plt


def plot_structure(
    structure_or_model: Any,
    ax: Optional[Axes] = None,
    value: str = "p",
    path: Optional[Union[str, Path]] = None,
    adapter_name: Optional[str] = None,
    annotate: bool = True,
) -> Figure:
    """Draw the heatmap of the paper's Fig. 3: rows are positions (stack | position | kind), columns layers.

    The colour is the gate probability p (value="p") or the selection of the resolved structure (value="selected");
    blank cells have no candidate. See `structure_matrix` for the accepted sources. With `annotate`, each cell shows
    its value. Saves the figure to `path` (PNG or any format matplotlib knows by the suffix) and returns it.
    """
    matrix = structure_matrix(structure_or_model, value=value, adapter_name=adapter_name)
    plt = _pyplot()
    num_rows, num_columns = matrix.values.shape
    if ax is None:
        label_width = max(len(label) for label in matrix.row_labels) * 0.075
        figure, ax = plt.subplots(figsize=(2.5 + label_width + 0.45 * num_columns, 1.5 + 0.26 * num_rows))
    else:
        figure = ax.figure
    masked = np.ma.masked_invalid(matrix.values)
    top = 1.0 if value == "p" else max(1.0, float(masked.max()))
    colours = plt.get_cmap("Blues").with_extremes(bad="whitesmoke")
    image = ax.imshow(masked, cmap=colours, vmin=0.0, vmax=top, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(num_columns), matrix.column_labels)
    ax.set_yticks(range(num_rows), matrix.row_labels, fontsize=8)
    ax.set_xlabel("layer")
    # Lines between stacks keep e.g. encoder and decoder rows apart, as in the paper's figure.
    for row in range(1, num_rows):
        if matrix.row_stacks[row] != matrix.row_stacks[row - 1]:
            ax.axhline(row - 0.5, color="black", linewidth=1.0)
    if annotate:
        for (row, column), cell in np.ndenumerate(matrix.values):
            # Zeros of a selection would only clutter the figure; its blank cells say the same.
            if np.isfinite(cell) and (value == "p" or cell > 0):
                text = f"{cell:.2f}" if value == "p" else f"{cell:g}"
                colour = "white" if cell > 0.6 * top else "black"
                ax.text(column, row, text, ha="center", va="center", fontsize=6, color=colour)
    figure.colorbar(image, ax=ax, label="p" if value == "p" else "selected (LoRA: rank)", fraction=0.04)
    ax.set_title("S3 gate probabilities p" if value == "p" else "S3 searched structure")
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=150)
    return figure
