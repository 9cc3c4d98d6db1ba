"""`pathssl subsample`: writes the nested low-label subsets of `pathssl_cli.data.subsets` as subset files
(the algorithm and the file format are described there)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pathssl_cli import console
from pathssl_cli.data.subset_files import FORMAT_VERSION
from pathssl_cli.data.subsets import Items, load_items, nested_subsets, subset_file_name, subset_text
from pathssl_cli.fileio import atomic_write
from pathssl_cli.runs import claim_run_dir, open_run

if TYPE_CHECKING:
    from pathssl_cli.specs.subsample import SubsampleSpec


def spec_items(spec: SubsampleSpec) -> Items:
    """The items of the spec's one source ([data] or [images])."""
    images = spec.images
    return load_items(spec.data, images.format if images else None, images.root if images else None)


def run_subsample(spec: SubsampleSpec) -> dict[str, Any]:
    """Write a subset file per fraction into `spec.run.output_dir` plus `subsets.json`; return the latter."""
    claim_run_dir(spec, spec.run.output_dir)
    items = spec_items(spec)
    fractions = spec.subsample.fractions
    seed = spec.subsample.seed
    subsets = nested_subsets(items.ids, items.targets, items.classes, fractions, seed)
    source_counts = np.bincount(items.targets, minlength=len(items.classes))
    summary: dict[str, Any] = {
        "source": items.source, "seed": seed, "classes": items.classes, "n_items": len(items.ids),
        "per_class": dict(zip(items.classes, source_counts.tolist(), strict=True)), "subsets": {},
    }
    with open_run(spec, spec.run.output_dir, seed=seed) as run:
        for fraction, positions in subsets.items():
            kept = np.bincount(items.targets[positions], minlength=len(items.classes))
            counts = dict(zip(items.classes, kept.tolist(), strict=True))
            meta = {"version": FORMAT_VERSION, "fraction": fraction, "seed": seed, "source": items.source,
                    "n": len(positions), "counts": counts}
            name = subset_file_name(fraction)
            atomic_write(run.path / name, subset_text(items, positions, meta))
            summary["subsets"][f"{fraction:g}"] = {"file": name, "n": len(positions), "per_class": counts}
            console.info(f"{name}: {len(positions)} of {len(items.ids)} items ({fraction:g} per class)")
        run.write_json("subsets.json", summary)
    return summary
