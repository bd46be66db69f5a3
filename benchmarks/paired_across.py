"""Paired differences between the runs of one `quality.py` output and the methods of another.

For a search variant run into its own --output-dir (e.g. `--search-options '{"alpha_warmup_steps": 0.25}'`): its runs
are paired with the reference output's runs of the same data set, budget and seed (the seed fixes split, head
initialisation and data order for every method), per data set and pooled, with the same statistics as quality.py.
Each row names how the structures of both sides started their retraining (quality.py --retrain-init; "-" for a method
that retrains no structure): one output directory holds one init, so inits are compared by passing two directories.
A variant run by several processes side by side (one --output-dir each, e.g. split by data set) is passed as several
variant directories before the reference one; their runs are pooled.

    python benchmarks/paired_across.py benchmarks/results/power_warmup benchmarks/results/power \\
        --method s3pet-m --references s3pet-m random-m adalora eva --output benchmarks/results/power_warmup/paired.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from quality import paired_observations, paired_statistics, retrain_inits, run_key

METRICS = ("test_accuracy", "test_macro_f1", "decided_mass")


def _runs(output_dir: Path) -> list[dict[str, Any]]:
    path = output_dir / "quality.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist; pass a quality.py --output-dir.")
    return json.loads(path.read_text())["runs"]


def pooled_runs(output_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """The runs of several outputs of one variant; a run in two of them is refused (it would be paired twice)."""
    runs: dict[tuple, dict[str, Any]] = {}
    for output_dir in output_dirs:
        for run in _runs(output_dir):
            if run_key(run) in runs:
                raise SystemExit(
                    f"error: the run {run_key(run)} is in {output_dir} and in an earlier variant directory."
                )
            runs[run_key(run)] = run
    return list(runs.values())


def _inits(runs: list[dict[str, Any]], method: str) -> str:
    """The retraining inits of `method`'s runs, "-" for a method that retrains no structure."""
    return retrain_inits(runs, method) or "-"


def paired_rows(
    variant: list[dict[str, Any]], reference: list[dict[str, Any]], method: str, references: list[str], metric: str
) -> list[dict[str, Any]]:
    """Variant minus reference of `metric` per (reference method, budget), per data set and pooled (in points for
    scores, as a plain difference for decided_mass)."""
    scale = 1.0 if metric == "decided_mass" else 100.0
    groups = paired_observations(variant, reference, {method: references}, metric)
    init = _inits(variant, method)
    rows = []
    # By reference in the order asked for, then by budget in the order the variant ran them.
    for (_, other, budget), observations in sorted(groups.items(), key=lambda item: references.index(item[0][1])):
        datasets = list(dict.fromkeys(dataset for dataset, _ in observations))
        for scope in [*datasets, "pooled"]:
            differences = [scale * d for (dataset, _), d in observations.items() if scope in ("pooled", dataset)]
            rows.append(
                {
                    "metric": metric,
                    "reference": other,
                    "retrain_init": init,
                    "reference_retrain_init": _inits(reference, other),
                    "budget": budget,
                    "scope": scope,
                    **paired_statistics(differences),
                }
            )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| metric | budget | minus | inits (method / reference) | scope | n | mean | 95 % CI | win / tie / loss "
        "| verdict |",
        "|" + "---|" * 10,
    ]
    for row in rows:
        lines.append(
            f"| {row['metric']} | {row['budget']:g} | {row['reference']} | "
            f"{row['retrain_init']} / {row['reference_retrain_init']} | {row['scope']} | {row['n']} | "
            f"{row['mean']:+.3f} | [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}] | "
            f"{row['wins']} / {row['ties']} / {row['losses']} | {row['verdict']} |"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant_dirs", type=Path, nargs="+", help="quality.py --output-dir(s) of the variant")
    parser.add_argument("reference_dir", type=Path, help="quality.py --output-dir holding the reference methods")
    parser.add_argument("--method", default="s3pet-m", help="the variant's method")
    parser.add_argument("--references", nargs="+", default=["s3pet-m", "random-m", "adalora", "eva"])
    parser.add_argument("--output", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    variant, reference = pooled_runs(args.variant_dirs), _runs(args.reference_dir)
    rows = [row for metric in METRICS for row in paired_rows(variant, reference, args.method, args.references, metric)]
    print(table(rows))
    if args.output:
        args.output.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
