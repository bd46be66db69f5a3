"""Paired differences between the runs of one `quality.py` output and the methods of another.

For a search variant run into its own --output-dir (e.g. `--search-options '{"alpha_warmup_steps": 0.25}'`): its runs
are paired with the reference output's runs of the same data set, budget and seed (the seed fixes split, head
initialisation and data order for every method), per data set and pooled, with the same statistics as quality.py.
Each row names how the structures of both sides started their retraining (quality.py --retrain-init; "-" for a method
that retrains no structure): one output directory holds one init, so inits are compared by passing two directories.

    python benchmarks/paired_across.py benchmarks/results/power_warmup benchmarks/results/power \\
        --method s3pet-m --references s3pet-m random-m adalora eva --output benchmarks/results/power_warmup/paired.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from quality import paired_observations, paired_statistics, retrain_init_of

METRICS = ("test_accuracy", "test_macro_f1", "decided_mass")


def _runs(output_dir: Path) -> list[dict[str, Any]]:
    path = output_dir / "quality.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist; pass a quality.py --output-dir.")
    return json.loads(path.read_text())["runs"]


def _inits(runs: list[dict[str, Any]], method: str) -> str:
    """The retraining inits of `method`'s runs, "-" for a method that retrains no structure."""
    return "/".join(sorted({retrain_init_of(run) or "-" for run in runs if run["method"] == method})) or "-"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant_dir", type=Path, help="quality.py --output-dir of the variant")
    parser.add_argument("reference_dir", type=Path, help="quality.py --output-dir holding the reference methods")
    parser.add_argument("--method", default="s3pet-m", help="the variant's method")
    parser.add_argument("--references", nargs="+", default=["s3pet-m", "random-m", "adalora", "eva"])
    parser.add_argument("--output", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    variant, reference = _runs(args.variant_dir), _runs(args.reference_dir)
    rows = [row for metric in METRICS for row in paired_rows(variant, reference, args.method, args.references, metric)]
    print(table(rows))
    if args.output:
        args.output.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
