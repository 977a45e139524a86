"""Stage embeddings: a 2D map (t-SNE) of one frozen encoder's features of the held-out subjects' vertebral bodies, with
what each body is (level, the grade of the disc below it, the subject's age and sex, the scanner's field strength and
vendor, the years since the subject's first scan, subject), to see whether the representation separates anatomy,
the person, time or the scanner.

The bodies mapped are those of the two test parts: the downstream test subjects (no probe learnt from them) and the
self-supervision test subjects (no encoder learnt from them: pretraining and the supervised encoder use the
self-supervision training and validation parts only); column ``part`` says which. The latter hold the follow-up
studies, often on another scanner, so that the map can show whether the features group by field strength. t-SNE
(scikit-learn, PCA initialisation, seeded: the same map on the same features) runs on the standardised features.

Run:
    python -m stages.embeddings --features results/probes/features/siamese/features.npy \\
        --volumes results/splits/volumes.parquet --manifest results/ingest/manifest.parquet \\
        --out results/report/embeddings/siamese.parquet

Writes one row per body: x, y, scan (pseudonymous), subject (pseudonymous), part, level, grade, field_strength_t,
vendor, age_years, sex, years_since_baseline.

t-SNE, not UMAP: umap-learn's numba compiles its functions in every new process (measured on 2 cores: 26 s to import,
14 s for the first fit of 400 points), about 40 s per encoder's map against t-SNE's few seconds.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.core import cli

log = logging.getLogger("embeddings")


def bodies_of_test_part(volumes: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """The vertebral bodies of the downstream and the self-supervision test parts with their level, the grade of
    the disc below them (the body above a graded disc) and the scan's field strength."""
    ssl_test = volumes.ssl_part == "test" if "ssl_part" in volumes else False
    bodies = volumes[(volumes.kind == "vertebra") & ((volumes.downstream_part == "test") | ssl_test)]
    table = bodies[["row", "scan_id", "subject_id", "level"]].copy()
    table["part"] = np.where(bodies.downstream_part == "test", "downstream test", "self-supervision test")
    table["grade"] = np.nan
    if "pfirrmann" in volumes:
        discs = volumes[(volumes.kind == "disc") & volumes.pfirrmann.notna()]
        grade = {(s, lv.split("-")[0]): g for s, lv, g in zip(discs.scan_id, discs.level, discs.pfirrmann)}
        table["grade"] = [grade.get((s, lv), np.nan) for s, lv in zip(table.scan_id, table.level)]
    meta = manifest.drop_duplicates("scan_id").set_index("scan_id")

    def scan_column(column: str) -> pd.Series:
        return table.scan_id.map(meta[column]) if column in meta else pd.Series(np.nan, index=table.index)

    table["field_strength_t"] = pd.to_numeric(scan_column("field_strength_t"), errors="coerce").round(1)
    table["vendor"] = scan_column("manufacturer").astype("string").str.strip().replace("", pd.NA).astype(object)
    table["age_years"] = pd.to_numeric(scan_column("age_years"), errors="coerce")
    table["sex"] = scan_column("sex").astype("string").str.strip().replace("", pd.NA).astype(object)
    days = (bodies.days_since_first_study if "days_since_first_study" in bodies
            else pd.to_numeric(scan_column("days_since_first_study"), errors="coerce"))
    table["years_since_baseline"] = pd.to_numeric(pd.Series(np.asarray(days), index=table.index),
                                                  errors="coerce") / 365.25
    return table.sort_values(["scan_id", "level"]).reset_index(drop=True)


def tsne(features: np.ndarray, seed: int, perplexity: float = 30.0) -> np.ndarray:
    """2D t-SNE of standardised features; the perplexity is capped for small sets (it must stay below n)."""
    from sklearn.manifold import TSNE
    n = len(features)
    if n < 3:
        raise ValueError(f"t-SNE needs at least 3 test bodies, got {n}")
    x = np.asarray(features, dtype=np.float64)
    x = (x - x.mean(0)) / np.where(x.std(0) > 1e-12, x.std(0), 1.0)
    return TSNE(n_components=2, perplexity=min(perplexity, (n - 1) / 3), init="pca", random_state=seed,
                learning_rate="auto").fit_transform(x)


def run(features: Path, volumes: Path, manifest: Path, out: Path, seed: int) -> dict[str, Any]:
    feats = np.load(features, mmap_mode="r")
    table = bodies_of_test_part(pd.read_parquet(volumes), pd.read_parquet(manifest))
    xy = tsne(np.asarray(feats[table.row.to_numpy()]), seed)
    table.insert(0, "x", xy[:, 0])
    table.insert(1, "y", xy[:, 1])
    table = table.rename(columns={"subject_id": "subject"}).drop(columns="row")
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(out, index=False)
    log.info("t-SNE of %d bodies (%d subjects) of the test parts", len(table), table.subject.nunique())
    return {"bodies": len(table)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.embeddings", description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=cli.existing_file, required=True,
                        help="The encoder's features.npy (stages.features: one row per volume of extract).")
    parser.add_argument("--volumes", type=cli.existing_file, required=True, help="splits/volumes.parquet.")
    parser.add_argument("--manifest", type=cli.existing_file, required=True, help="ingest/manifest.parquet.")
    parser.add_argument("--out", type=Path, required=True, help="The .parquet file to write.")
    parser.add_argument("--seed", type=int, default=0, help="t-SNE seed (default 0).")
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cli.setup_logging(args.log, "embeddings")
    run(args.features, args.volumes, args.manifest, args.out, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
