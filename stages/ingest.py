"""Stage ingest: from a DICOM archive to pseudonymised volumes, a scan manifest, and an account of every file.

Run (one job; or set SPINE_SSL_PSEUDONYM_KEY instead of --key-file):
    python -m stages.ingest --dicom-dir ARCHIVE --key-file KEY --threads 2 \\
        --out-volumes results/ingest/volumes --out-labels results/ingest/labels \\
        --out-manifest results/ingest/manifest.parquet --out-files results/ingest/files.parquet \\
        --out-series results/ingest/series.csv --out-gradings results/ingest/gradings.parquet \\
        --out-subjects results/ingest/subjects.parquet --out-landmarks results/ingest/landmarks.parquet \\
        --out-landmark-rows results/ingest/landmark_rows.csv --out-summary results/ingest/summary.json \
        --out-second-volumes results/ingest/second --out-second-series results/ingest/second_series.parquet
In shards, as the workflow runs it: a plan (``--out-plan plan.parquet --out-plan-summary plan.json
--scans-per-shard P``), one job per shard (``--plan plan.parquet --shard I --out SHARD_DIR``), and the merge
(``--plan plan.parquet --merge SHARD_DIR ...`` with the --out-* files above).

What happens:
  1. Every file below the archive is found, whatever its name, and its header read (no pixel data), in parallel.
  2. Files are grouped into series and studies; each series is classified (modality, plane from
     ImageOrientationPatient, weighting from TE/TR/TI with SeriesDescription as a hint, localizer) and the ones the
     selection asks for (default: sagittal T2 MR) become candidates, one per study. Tie-break among candidates of a
     study: more slices, then finer in-plane pixels, then the higher SeriesNumber, then the SeriesInstanceUID.
  3. The chosen series (single-frame files, or the frames of enhanced multi-frame objects) is ordered along the slice
     normal, checked (one orthonormal orientation, matrix and pixel spacing; no missing slices; duplicates dropped;
     at least min_slices positions, so one 2D image with min_slices 1) and written as NIfTI with its full geometry.
     If it fails, the next candidate of the study is tried.
  4. With ingest.second_series, each study's second series (a plane in second_plane, a weighting in second_weighting;
     default axial T2, Hou et al. 2023) is kept beside it: one per study (the weighting listed first, then as in 2),
     in blocks of one orientation without gaps (an axial series angled to each disc has a block per disc), each
     block written like a volume. Its files are used, skipped (another was preferred; the study has no selected
     series) or quarantined (a block that cannot become a volume) like any other.

Writes (each Parquet table with a CSV copy beside it):
    --out-volumes              {scan_id}.nii.gz, one volume per study (LPS geometry kept in the NIfTI header)
    --out-labels               {scan_id}.nii.gz, label maps, when --label-dir has one named {SeriesInstanceUID}.nii.gz,
                               in the workflow's numbering (VerSe; --label-scheme says how they are numbered, see
                               stages/archive/label_scheme.py); the manifest's label_problem names values the scheme
                               does not know (set to background), or that no level was found (the map is not used)
    --out-manifest             one row per volume: ids, days since the subject's first study, scanner, geometry
    --out-files                every file found: used, skipped (with its series' classification) or quarantined,
                               with the reason; the counts add up to the number of files
    --out-series               one row per series: classification and decision (CSV)
    --out-gradings, -subjects  pseudonymised copies of the --gradings / --subjects tables (empty when not given)
    --out-landmarks            the --landmarks table's usable rows under scan ids (scan_id, kind, level, i, j, k,
                               depth_mm; stages.anatomy.landmarks), empty when not given
    --out-landmark-rows        every row of the --landmarks table by row number: used, or rejected with the reason
    --out-summary              the counts (JSON)
    --out-second-volumes       {series}_{block}.nii.gz, the blocks of each study's second series (default: second/
                               beside --out-manifest)
    --out-second-series        one row per block: scan_id (the study's volume), subject, study, series, block, plane,
                               weighting, geometry, volume (Parquet, a CSV copy beside it; default:
                               second_series.parquet beside --out-manifest)

Identity never leaves this stage: subject, study and scan ids are keyed hashes (HMAC-SHA256); names, IDs, birth dates,
accession numbers, institutions and dates appear in no output, log or file name; paths and descriptions are scrubbed
of them. The run exits with status 1 when no volume could be written.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import shutil
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
from tqdm import tqdm

from stages.archive import pseudonym as pn
from stages.archive.dicom_index import (
    ClassifyRules,
    classify_series,
    fill_missing_uids,
    read_header,
    second_preference,
    tie_break_key,
    walk,
)
from stages.archive.dicom_volume import SeriesError, assemble, split_blocks, write_volume
from stages.archive.label_scheme import (
    VERSE,
    LabelScheme,
    add_label_scheme_option,
    problem_counts,
    remap_image,
    scheme_from_args,
)
from stages.archive.landmark_tables import add_landmark_options, landmark_options, read_landmark_table, write_landmarks
from stages.archive.manifest import (
    INGEST_OUTPUTS,
    MANIFEST_COLUMNS,
    QUARANTINED,
    SECOND_COLUMNS,
    SECOND_OUTPUTS,
    SKIPPED,
    USED,
    IngestOutputs,
    SecondOutputs,
    write_pseudonymised_tables,
    write_table,
)
from stages.core import cli
from stages.core.shards import add_shard_options, shard_block, shard_count, shard_from_args

log = logging.getLogger("ingest")


@dataclass(frozen=True)
class Context:
    root: Path
    volumes: Path
    labels: Path
    key: bytes
    label_dir: Path | None
    scrubber: re.Pattern | None
    label_scheme: LabelScheme = VERSE
    second: Path | None = None  # the folder of the second series' volumes (ingest.second_series)
    # Folder and file names already scrubbed: the files of a series share their folders' names, and searching one
    # name for every piece of identity in the archive took more time than the rest of the accounting (issue 20).
    names: dict[str, str] = field(default_factory=dict, compare=False, repr=False)


def _scrub(text: str, ctx: Context) -> str:
    return ctx.scrubber.sub(pn.REDACTED, text) if ctx.scrubber and text else text


def _scrub_path(path: str, ctx: Context) -> str:
    """The path below the archive, each folder or file name that holds identity replaced by [redacted]."""
    parts = Path(path).relative_to(ctx.root).parts
    for part in parts:
        if part not in ctx.names:
            ctx.names[part] = pn.REDACTED if ctx.scrubber is not None and ctx.scrubber.search(part) else part
    return "/".join(ctx.names[part] for part in parts)


def _scrub_reason(text: str, ctx: Context) -> str:
    """A reason that names files of the archive: their paths below it, identity replaced by [redacted]."""
    return _scrub(text.replace(str(ctx.root) + "/", ""), ctx)


def _date(text: str) -> dt.date | None:
    try:
        return dt.datetime.strptime(text[:8], "%Y%m%d").date()
    except (TypeError, ValueError):
        return None


def _age(record: dict[str, Any]) -> float:
    birth, study = _date(record["birth_date"]), _date(record["study_date"])
    years = None
    if birth and study:
        years = (study - birth).days / 365.25
    elif re.fullmatch(r"\d{3}Y", record["age"] or ""):
        years = float(record["age"][:3])
    return float("nan") if years is None else float(min(int(years), pn.MAX_AGE))


def build_scrubber(records: list[dict[str, Any]]) -> re.Pattern | None:
    """One regular expression that matches any piece of identity found in the archive's headers."""
    tokens: set[str] = set()
    for r in records:
        if r.get("problem") and "patient_id" not in r:
            continue
        tokens |= pn.identity_tokens([r.get("patient_name", ""), r.get("patient_id", ""), r.get("accession", "")])
        for key in ("birth_date", "institution"):
            if len(r.get(key) or "") >= 3:
                tokens.add(r[key].lower())
    if not tokens:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)), re.IGNORECASE)


def _study_job(job: tuple[Context, list[list[dict[str, Any]]], int, list[tuple[list[dict[str, Any]], dict]]]
               ) -> dict[str, Any]:
    """Try the candidate series of one study in order; write the first that makes a good volume (of at least
    ``min_slices`` distinct slice positions); then the study's second series (:func:`_second_series`), from the
    second-series candidates (records and classification), the last item of ``job``."""
    ctx, candidates, min_slices, seconds = job
    statuses: dict[str, tuple[str, str]] = {}
    row = None
    for rank, records in enumerate(candidates):
        paths = [r["path"] for r in records]
        if row is not None:
            for p in paths:
                statuses[p] = (SKIPPED, "not chosen: another series of this study was preferred (more slices, finer "
                                        "pixels, later series number)")
            continue
        pids = {r["patient_id"] for r in records}
        if pids == {""}:
            statuses.update({p: (QUARANTINED, "missing identity: empty PatientID") for p in paths})
            continue
        if len(pids) > 1:
            statuses.update({p: (QUARANTINED, "inconsistent identity: several PatientIDs in one series") for p in paths})
            continue
        try:
            volume = assemble(records, min_slices)
        except SeriesError as err:
            for p in paths:
                statuses[p] = (QUARANTINED, err.files.get(p, f"series unusable: {err}"))
            continue
        first = records[0]
        scan_id = pn.series_id(ctx.key, first["series_uid"])
        write_volume(volume, ctx.volumes / f"{scan_id}.nii.gz")
        label_map, label_problem = _copy_label(ctx, first["series_uid"], scan_id, volume)
        statuses.update({p: (USED, f"in volume {scan_id}" + (f"; {_scrub_reason(volume.notes[p], ctx)}"
                                                             if p in volume.notes else "")) for p in volume.used})
        statuses.update({p: (QUARANTINED, _scrub_reason(reason, ctx)) for p, reason in volume.dropped.items()})
        shape = volume.array.shape
        row = {
            "_patient_id": first["patient_id"],  # for the second series' identity check; never written
            "scan_id": scan_id, "subject_id": pn.subject_id(ctx.key, first["patient_id"]),
            "study_id": pn.study_id(ctx.key, first["study_uid"]), "study_date": first["study_date"],
            "age_years": _age(first), "sex": first["sex"] or "", "modality": first["modality"],
            "field_strength_t": first["field_strength"], "manufacturer": first["manufacturer"],
            "model": first["model"], "echo_time_ms": first["echo_time"], "repetition_time_ms": first["repetition_time"],
            "spacing_x": volume.spacing[0], "spacing_y": volume.spacing[1], "spacing_z": volume.spacing[2],
            "size_x": shape[2], "size_y": shape[1], "size_z": shape[0],
            "series_description": _scrub(first["series_description"], ctx), "n_source_files": len(volume.used),
            "candidate_rank": rank, "volume": f"volumes/{scan_id}.nii.gz", "label_map": label_map,
            "label_problem": label_problem,
        }
    second_rows = _second_series(ctx, row, seconds, statuses)
    if row is not None:
        row.pop("_patient_id")
    return {"row": row, "statuses": statuses, "second_rows": second_rows}


def _second_series(ctx: Context, row: dict[str, Any] | None, seconds: list[tuple[list[dict[str, Any]], dict]],
                   statuses: dict[str, tuple[str, str]]) -> list[dict[str, Any]]:
    """The study's second series (ingest.second_series: e.g. its axial T2), beside the selected one (``row``, None
    when the study has none: then no second series is kept): the first candidate in ``seconds`` (in order of
    preference) whose slices all make volumes, one volume per block (one orientation, no gap:
    stages.archive.dicom_volume.split_blocks) as ``second/{series}_{block}.nii.gz``. Files' statuses go into
    ``statuses``; returns the rows of second_series.parquet."""
    rows: list[dict[str, Any]] = []
    for rank, (records, c) in enumerate(seconds):
        paths = [r["path"] for r in records]
        if row is None:
            statuses.update({p: (SKIPPED, "second series not kept: the study has no selected series") for p in paths})
            continue
        if rows:
            statuses.update({p: (SKIPPED, f"not chosen: another {c['plane']} series of this study was preferred as "
                                          "its second series (weighting order, more slices, finer pixels, later "
                                          "series number)") for p in paths})
            continue
        if {r["patient_id"] for r in records} != {row["_patient_id"]}:
            statuses.update({p: (QUARANTINED, "inconsistent identity: the second series' PatientID differs from the "
                                              "study's selected series") for p in paths})
            continue
        try:
            volumes = [assemble(block, 1) for block in split_blocks(records)]
        except SeriesError as err:
            for p in paths:
                statuses[p] = (QUARANTINED, _scrub_reason(err.files.get(p, f"second series unusable: {err}"), ctx))
            continue
        series = pn.series_id(ctx.key, records[0]["series_uid"])
        first = records[0]
        for block, volume in enumerate(volumes):
            name = f"{series}_{block}.nii.gz"
            write_volume(volume, ctx.second / name)
            statuses.update({p: (USED, f"in second series {series} of scan {row['scan_id']}" + (
                f"; {_scrub_reason(volume.notes[p], ctx)}" if p in volume.notes else "")) for p in volume.used})
            statuses.update({p: (QUARANTINED, _scrub_reason(reason, ctx)) for p, reason in volume.dropped.items()})
            shape = volume.array.shape
            rows.append({
                "scan_id": row["scan_id"], "subject_id": row["subject_id"], "study_id": row["study_id"],
                "series": series, "block": block, "plane": c["plane"], "weighting": c["weighting"],
                "echo_time_ms": first["echo_time"], "repetition_time_ms": first["repetition_time"],
                "spacing_x": volume.spacing[0], "spacing_y": volume.spacing[1], "spacing_z": volume.spacing[2],
                "size_x": shape[2], "size_y": shape[1], "size_z": shape[0],
                "series_description": _scrub(first["series_description"], ctx), "n_source_files": len(volume.used),
                "candidate_rank": rank, "volume": f"second/{name}"})
    return rows


def _copy_label(ctx: Context, series_uid: str, scan_id: str, volume) -> tuple[str, str]:
    if ctx.label_dir is None:
        return "", ""
    source = ctx.label_dir / f"{series_uid}.nii.gz"
    if not source.is_file():
        return "", ""
    label = sitk.ReadImage(str(source))
    image = volume.to_sitk()
    if (label.GetSize() != image.GetSize()
            or not np.allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-2)
            or not np.allclose(label.GetSpacing(), image.GetSpacing(), atol=1e-3)
            or not np.allclose(label.GetDirection(), image.GetDirection(), atol=1e-3)):
        return "", "label map geometry differs from the volume"
    remapped, check = remap_image(label, ctx.label_scheme)
    if not check.usable:
        return "", check.problem
    target = ctx.labels / f"{scan_id}.nii.gz"
    target.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(remapped, str(target), useCompression=True)
    return f"labels/{scan_id}.nii.gz", check.problem


def _select(records: list[dict[str, Any]], ctx: Context, rules: ClassifyRules) -> tuple[
        dict[str, tuple[str, str]], dict[str, dict[str, Any]], list[dict[str, Any]], list[tuple[Context, list]]]:
    """Screen the files, group them into series and classify each: the files' statuses so far, each grouped file's
    series information (for the accounting), the rows of series.csv, and one volume job per study with candidates
    (for the selected series or the second series: ingest.second_series)."""
    status = screen(records, ctx)
    info: dict[str, dict[str, Any]] = {}
    by_series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if not r["problem"] and r["path"] not in status:
            by_series[r["series_uid"]].append(r)
    series_rows = []
    candidates: dict[str, list[list[dict[str, Any]]]] = defaultdict(list)
    seconds: dict[str, list[tuple[list[dict[str, Any]], dict[str, Any]]]] = defaultdict(list)
    for uid, members in by_series.items():
        c = classify_series(members, rules)
        sid = pn.series_id(ctx.key, uid)
        description = _scrub(c["description"], ctx)
        for r in members:
            info[r["path"]] = {"series": sid, "modality": c["modality"], "plane": c["plane"],
                               "weighting": c["weighting"], "description": description}
        series_rows.append({"series": sid, "study_id": pn.study_id(ctx.key, members[0]["study_uid"]),
                            **{k: v for k, v in c.items() if k not in ("reasons", "description", "second_reasons")},
                            "second_candidate": bool(c["reasons"]) and not c["second_reasons"],
                            "uid_note": members[0]["uid_note"],
                            "description": description, "reasons": "; ".join(c["reasons"])})
        if not c["reasons"]:
            candidates[members[0]["study_uid"]].append(members)
        elif not c["second_reasons"]:
            seconds[members[0]["study_uid"]].append((members, c))
        else:
            for r in members:
                status[r["path"]] = (SKIPPED, "series not selected: " + "; ".join(c["reasons"]))
    jobs = [(ctx, sorted(candidates.get(study, []), key=tie_break_key), rules.min_slices,
             sorted(seconds.get(study, []), key=lambda s: second_preference(s[0], s[1]["weighting"], rules)))
            for study in sorted(set(candidates) | set(seconds))]
    return status, info, series_rows, jobs


def ingest_dicom(root: Path, out: IngestOutputs, key: bytes, rules: ClassifyRules, workers: int = 1,
                 label_dir: Path | None = None, gradings: Path | None = None,
                 subjects: Path | None = None, landmark_table: Path | None = None,
                 landmark_columns: dict[str, str] | None = None, level_count_from: str = "top",
                 level_first: str | None = None, files: list[Path] | None = None,
                 label_scheme: LabelScheme = VERSE, second: SecondOutputs | None = None) -> dict[str, Any]:
    """Run the stage; return the summary. Raises RuntimeError when no volume could be written.

    ``landmark_table`` (CSV or Parquet) gives level centres by SeriesInstanceUID (stages.anatomy.landmarks), its columns
    named as in ``landmark_columns`` (ours -> the table's), numeric levels counted from ``level_count_from`` starting
    at ``level_first``. ``files`` (a shard of the archive, see :func:`ingest_shard`) replaces walking the archive:
    then the accounting keeps each file's key and an empty result is no error. Label maps are numbered as
    ``label_scheme`` says (stages.archive.label_scheme). Each study's second series (``rules.second_series``) goes to
    ``second`` (default: laid out beside ``out.manifest``)."""
    second = second or SecondOutputs.in_folder(out.manifest.parent)
    if not root.is_dir():
        raise FileNotFoundError(f"DICOM folder {root} does not exist")
    marks = read_landmark_table(landmark_table, landmark_columns, level_count_from, level_first)
    root = root.resolve()
    shard = files is not None
    files = walk(root) if files is None else files
    log.info("found %d files", len(files))
    if not files and not shard:
        raise RuntimeError(f"no files found below {root}")
    # One pool for both passes, started before the headers are in memory: workers forked after the header pass
    # inherit the parent's whole heap, and copy-on-write then counted much of it again in each worker (60 MiB more on
    # the benchmark's demo archive, measured as summed PSS; issue 20).
    with ProcessPoolExecutor(max_workers=workers) as pool:
        records = list(tqdm(pool.map(read_header, files, chunksize=64), total=len(files), desc="headers",
                            mininterval=5))
        ctx = Context(root=root, volumes=out.volumes, labels=out.labels, key=key, label_dir=label_dir,
                      scrubber=build_scrubber(records), label_scheme=label_scheme, second=second.volumes)
        status, info, series_rows, jobs = _select(records, ctx, rules)
        out.volumes.mkdir(parents=True, exist_ok=True)
        out.labels.mkdir(parents=True, exist_ok=True)
        second.volumes.mkdir(parents=True, exist_ok=True)
        results = list(tqdm(pool.map(_study_job, jobs), total=len(jobs), desc="volumes", mininterval=5))
    rows, second_rows = [], []
    for result in results:
        status.update(result["statuses"])
        second_rows += result["second_rows"]
        if result["row"]:
            rows.append(result["row"])
    # Time: days since the subject's first study in the archive (any series), then drop the absolute date.
    first_date: dict[str, dt.date] = {}
    for r in records:
        if r["problem"]:
            continue
        d = _date(r["study_date"])
        if d and r["patient_id"]:
            sid = pn.subject_id(key, r["patient_id"])
            first_date[sid] = min(d, first_date.get(sid, d))
    for row in rows:
        d = _date(row.pop("study_date"))
        row["days_since_first_study"] = (d - first_date[row["subject_id"]]).days if d else np.nan
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS).sort_values(["subject_id", "days_since_first_study",
                                                                          "scan_id"])
    accounting = pd.DataFrame([{
        "file": _scrub_path(p, ctx), "status": status[p][0], "reason": status[p][1],
        **info.get(p, EMPTY_INFO), **({"file_key": file_key(key, root, p)} if shard else {}),
    } for p in map(str, files)], columns=FILES_COLUMNS + (["file_key"] if shard else []))
    missing = set(map(str, files)) - set(status)
    if missing:  # every file must be accounted for; this is a bug if it ever happens
        raise AssertionError(f"{len(missing)} files have no status")
    series = pd.DataFrame(series_rows)
    series = series.sort_values("series").reset_index(drop=True) if len(series) else series
    seconds = pd.DataFrame(second_rows, columns=SECOND_COLUMNS).sort_values(["scan_id", "block"])
    if shard:  # the rest is written once, by merge_shards
        write_table(manifest, out.manifest)
        write_table(seconds, second.table)
        write_table(accounting, out.files)
        write_table(series, out.series, parquet=False)
        log.info("shard: %d files, %d volumes", len(accounting), len(manifest))
        return {"files": len(accounting), "volumes": len(manifest)}
    return finish(out, key, manifest, accounting, series, gradings, subjects, marks, second, seconds)


FILES_COLUMNS = ["file", "status", "reason", "series", "modality", "plane", "weighting", "description"]
EMPTY_INFO = {"series": "", "modality": "", "plane": "", "weighting": "", "description": ""}


def file_key(key: bytes, root: Path, path: str | Path) -> str:
    """A keyed hash of a file's path below the archive: names a file across jobs without writing its path."""
    return pn.digest(key, "file", str(Path(path).relative_to(root)), 24)


def finish(out: IngestOutputs, key: bytes, manifest: pd.DataFrame, accounting: pd.DataFrame, series: pd.DataFrame,
           gradings: Path | None, subjects: Path | None, marks: pd.DataFrame | None, second: SecondOutputs,
           seconds: pd.DataFrame) -> dict[str, Any]:
    """Write the manifest, the accounting, series.csv, the second series' table, the pseudonymised tables and
    landmarks, and the summary."""
    write_table(manifest, out.manifest)
    write_table(seconds, second.table)
    write_table(accounting, out.files)
    write_table(series, out.series, parquet=False)
    tables = write_pseudonymised_tables(out, key, gradings, subjects, {"patient_id": str, "family_id": str})
    ingested = set(manifest.scan_id)
    scan_ids = {} if marks is None else {
        uid: sid for uid in set(marks.scan) - {""} if (sid := pn.series_id(key, uid)) in ingested}
    sizes = {r.scan_id: (int(r.size_x), int(r.size_y), int(r.size_z)) for r in manifest.itertuples()}
    landmark_summary = write_landmarks(out.landmarks, out.landmark_rows, marks, scan_ids, sizes)
    counts = accounting.status.value_counts().to_dict()
    summary = {"files": len(accounting), "used": counts.get(USED, 0), "skipped": counts.get(SKIPPED, 0),
               "quarantined": counts.get(QUARANTINED, 0), "volumes": len(manifest),
               "subjects": int(manifest.subject_id.nunique()), "studies": int(manifest.study_id.nunique()),
               "with_label_map": int((manifest.label_map != "").sum()), "tables": tables,
               "second_series": int(seconds.series.nunique()), "second_volumes": len(seconds),
               "quarantine_reasons": _reason_counts(accounting[accounting.status == QUARANTINED].reason),
               **problem_counts(manifest.label_problem), "landmarks": landmark_summary}
    assert summary["used"] + summary["skipped"] + summary["quarantined"] == summary["files"]
    out.summary.parent.mkdir(parents=True, exist_ok=True)
    out.summary.write_text(json.dumps(summary, indent=2) + "\n")
    log.info("%(files)d files: %(used)d used in %(volumes)d volumes (%(subjects)d subjects), "
             "%(skipped)d skipped, %(quarantined)d quarantined (see files.csv)", summary)
    if summary["label_maps_without_level"] or summary["label_maps_with_unknown_values"]:
        log.warning("label maps: %(label_maps_without_level)d without any level of the workflow (not used), "
                    "%(label_maps_with_unknown_values)d with values their label scheme does not know (set to "
                    "background); see label_problem in manifest.csv", summary)
    if not len(manifest):
        raise RuntimeError(f"no volume could be written from {len(accounting)} files; see "
                           f"{out.files.with_suffix('.csv')} for why")
    return summary


def screen(records: list[dict[str, Any]], ctx: Context) -> dict[str, tuple[str, str]]:
    """Status of the files no series can use: header problems (skipped: DICOMDIR, hidden files; else quarantined),
    no SOPInstanceUID, or the same SOPInstanceUID as an earlier file (a duplicate). Fills missing UIDs in place."""
    status: dict[str, tuple[str, str]] = {}
    first_of_uid: dict[str, str] = {}
    for r in records:
        if r["problem"]:
            status[r["path"]] = (SKIPPED if r.get("kind") in ("dicomdir", "hidden") else QUARANTINED, r["problem"])
            continue
        fill_missing_uids(r)
        if not r["sop_uid"]:
            status[r["path"]] = (QUARANTINED, "missing identity of the image: no SOPInstanceUID")
        elif r["sop_uid"] in first_of_uid:
            status[r["path"]] = (QUARANTINED, "duplicate file: same SOPInstanceUID as "
                                              + _scrub_path(first_of_uid[r["sop_uid"]], ctx))
        else:
            first_of_uid[r["sop_uid"]] = r["path"]
    return status


def plan_shards(root: Path, plan_file: Path, summary_file: Path, key: bytes, workers: int,
                scans_per_shard: int) -> dict[str, Any]:
    """Split the archive for parallel ingest jobs, by subject: every file of a subject (all its studies and series,
    which the days since the first study need) goes to one shard; subjects sorted by pseudonymous id, in contiguous
    blocks of about ``scans_per_shard`` studies. Files that no shard can use (unreadable, not DICOM, hidden, without
    SOPInstanceUID, or a duplicate of another file, decided here over the whole archive) get their status here.

    Writes ``plan_file`` (Parquet): one row per file in the archive's order, with its key (a keyed hash of its
    path), its name as the accounting shows it (identity scrubbed with the whole archive's identity), its shard (-1:
    decided here) and, for the decided ones, status and reason; and ``summary_file`` (JSON: the number of shards)."""
    root = root.resolve()
    files = walk(root)
    if not files:
        raise RuntimeError(f"no files found below {root}")
    with ProcessPoolExecutor(max_workers=workers) as pool:
        records = list(tqdm(pool.map(read_header, files, chunksize=64), total=len(files), desc="headers",
                            mininterval=5))
    ctx = Context(root=root, volumes=Path(), labels=Path(), key=key, label_dir=None,
                  scrubber=build_scrubber(records))
    status = screen(records, ctx)
    studies: dict[str, set[str]] = defaultdict(set)
    subject_of: dict[str, str] = {}
    for r in records:
        if r["path"] not in status:
            subject = pn.subject_id(key, r["patient_id"])
            subject_of[r["path"]] = subject
            studies[subject].add(r["study_uid"])
    ordered = sorted(studies)
    n_studies = sum(len(v) for v in studies.values())
    n = min(shard_count(n_studies, scans_per_shard), max(len(ordered), 1))
    shard_of = {subject: i for i in range(n) for subject in ordered[shard_block(len(ordered), i, n)]}
    plan = pd.DataFrame([{"file_key": file_key(key, root, p), "name": _scrub_path(p, ctx),
                          "shard": shard_of[subject_of[p]] if p in subject_of else -1,
                          "status": status.get(p, ("", ""))[0], "reason": status.get(p, ("", ""))[1]}
                         for p in map(str, files)])
    plan_file.parent.mkdir(parents=True, exist_ok=True)
    plan.to_parquet(plan_file, index=False)
    summary = {"shards": n, "files": len(files), "decided_here": int((plan.shard < 0).sum()),
               "subjects": len(ordered), "studies": n_studies}
    summary_file.parent.mkdir(parents=True, exist_ok=True)
    summary_file.write_text(json.dumps(summary, indent=2) + "\n")
    log.info("%(files)d files: %(subjects)d subjects with %(studies)d studies in %(shards)d shards; "
             "%(decided_here)d files unusable by any shard", summary)
    return summary


def plan_shard_count(plan: Path) -> int:
    """The number of shards of ``plan`` (plan.parquet of :func:`plan_shards`): every shard holds a subject."""
    shards = pd.read_parquet(plan, columns=["shard"]).shard
    return max(1, int(shards.max()) + 1 if len(shards) else 1)


def ingest_shard(root: Path, plan: Path, shard: int, out: Path, key: bytes, rules: ClassifyRules,
                 workers: int = 1, label_dir: Path | None = None, label_scheme: LabelScheme = VERSE) -> dict[str, Any]:
    """Ingest the files of shard ``shard`` of ``plan`` (plan.parquet of :func:`plan_shards`) into the folder ``out``
    (laid out as IngestOutputs.in_folder): volumes, labels (numbered as ``label_scheme`` says), the shard's manifest,
    accounting (with file keys), series."""
    root = root.resolve()
    table = pd.read_parquet(plan, columns=["file_key", "shard"])
    mine = set(table.file_key[table.shard == shard])
    files = [p for p in walk(root) if file_key(key, root, p) in mine]
    if len(files) != len(mine):
        raise RuntimeError(f"the archive changed since the plan: {len(mine)} files planned for shard {shard}, "
                           f"{len(files)} found; re-run the ingest plan")
    return ingest_dicom(root, IngestOutputs.in_folder(out), key, rules, workers, label_dir, files=files,
                        label_scheme=label_scheme, second=SecondOutputs.in_folder(out))


def merge_shards(plan: Path, shards: list[Path], out: IngestOutputs, key: bytes, gradings: Path | None = None,
                 subjects: Path | None = None, landmark_table: Path | None = None,
                 landmark_columns: dict[str, str] | None = None, level_count_from: str = "top",
                 level_first: str | None = None, second: SecondOutputs | None = None) -> dict[str, Any]:
    """The shards' outputs (folders of :func:`ingest_shard`) as one ingest over the whole archive: volumes and labels
    linked (or copied) into ``out``'s folders, manifest and series concatenated, every file of ``plan`` (plan.parquet)
    accounted for in the archive's order; the second series' volumes and table into ``second`` (default: beside
    ``out.manifest``)."""
    second = second or SecondOutputs.in_folder(out.manifest.parent)
    marks = read_landmark_table(landmark_table, landmark_columns, level_count_from, level_first)
    plan_table = pd.read_parquet(plan)
    parts = [IngestOutputs.in_folder(s) for s in shards]
    done = pd.concat([pd.read_parquet(part.files) for part in parts], ignore_index=True)
    by_key = done.set_index("file_key")
    rows = []
    for p in plan_table.itertuples():
        if p.shard < 0:
            rows.append({"file": p.name, "status": p.status, "reason": p.reason, **EMPTY_INFO})
        else:
            hit = by_key.loc[p.file_key]
            rows.append({"file": p.name, **{c: hit[c] for c in FILES_COLUMNS[1:]}})
    accounting = pd.DataFrame(rows, columns=FILES_COLUMNS)
    for folder in ("volumes", "labels"):
        getattr(out, folder).mkdir(parents=True, exist_ok=True)
        for part in parts:
            for source in sorted(getattr(part, folder).glob("*.nii.gz")):
                _link(source, getattr(out, folder) / source.name)
    second.volumes.mkdir(parents=True, exist_ok=True)
    for shard_dir in shards:
        for source in sorted(SecondOutputs.in_folder(shard_dir).volumes.glob("*.nii.gz")):
            _link(source, second.volumes / source.name)
    second_parts = [pd.read_parquet(SecondOutputs.in_folder(s).table) for s in shards]
    seconds = pd.concat([t for t in second_parts if len(t)] or second_parts[:1], ignore_index=True).sort_values(
        ["scan_id", "block"]).reset_index(drop=True)
    manifests = [pd.read_parquet(part.manifest) for part in parts]
    manifest = pd.concat([m for m in manifests if len(m)] or manifests[:1], ignore_index=True).sort_values(
        ["subject_id", "days_since_first_study", "scan_id"])
    series_parts = [pd.read_csv(part.series) for part in parts if part.series.stat().st_size > 1]
    series = pd.concat(series_parts, ignore_index=True).sort_values("series").reset_index(drop=True) \
        if series_parts else pd.DataFrame()
    log.info("merged %d shards", len(shards))
    return finish(out, key, manifest, accounting, series, gradings, subjects, marks, second, seconds)


def _link(source: Path, target: Path) -> None:
    """A hard link (no copy on the same file system), else a copy; replaces an older target."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _reason_counts(reasons: pd.Series) -> dict[str, int]:
    """Quarantine reasons grouped by their kind (the text before the first colon)."""
    return {k: int(v) for k, v in reasons.str.split(":").str[0].value_counts().items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dicom-dir", type=Path, default=None,
                        help="Root folder of the DICOM archive (required but with --merge).")
    pn.add_key_option(parser)
    parser.add_argument("--label-dir", type=Path, default=None,
                        help="Optional folder of label maps named {SeriesInstanceUID}.nii.gz, copied beside volumes.")
    add_label_scheme_option(parser)
    parser.add_argument("--gradings", type=Path, default=None,
                        help="Optional CSV with patient_id, study_uid and label columns, written pseudonymised.")
    parser.add_argument("--subjects", type=Path, default=None,
                        help="Optional CSV with patient_id (and family_id, sex, age...), written pseudonymised.")
    parser.add_argument("--threads", type=cli.positive_int, default=1, help="Worker processes (default: 1).")
    plan = parser.add_argument_group("the shard plan (splits the archive by subject; --shard and --merge read it)")
    plan.add_argument("--out-plan", type=Path, default=None, metavar="FILE",
                      help="Only write the plan (Parquet; needs --scans-per-shard, counted in studies) ...")
    plan.add_argument("--out-plan-summary", type=Path, default=None, metavar="FILE",
                      help="... and its summary (JSON: the number of shards).")
    plan.add_argument("--plan", type=cli.existing_file, default=None, metavar="FILE",
                      help="The plan (written by --out-plan) that --shard and --merge follow.")
    add_shard_options(parser, "the archive's files as --plan shares them out")
    add_landmark_options(parser, "the SeriesInstanceUID")
    cli.add_section_options(parser, "ingest")
    cli.add_output_options(parser, INGEST_OUTPUTS, required=False, title="outputs (but with --out-plan or --shard)")
    cli.add_output_options(parser, SECOND_OUTPUTS, required=False, title="the second series (ingest.second_series)")
    cli.add_log_option(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    marks = landmark_options(args, parser)
    for name in ("dicom_dir", "label_dir"):
        value = getattr(args, name)
        if value is not None and not value.is_dir():
            parser.error(f"--{name.replace('_', '-')} {value} is not a folder")
    for name in ("gradings", "subjects"):
        value = getattr(args, name)
        if value is not None and not value.is_file():
            parser.error(f"--{name.replace('_', '-')} {value} is not a file")
    rules = ClassifyRules.from_config(cli.section_from_args(args, "ingest", parser))
    scheme = scheme_from_args(args, parser)
    key = pn.key_from_args(args, parser)
    make_plan = args.out_plan is not None or args.out_plan_summary is not None
    if make_plan and (args.shard is not None or args.merge):
        parser.error("--out-plan, --shard and --merge go one at a time")
    if make_plan and (args.out_plan is None or args.out_plan_summary is None or args.scans_per_shard is None):
        parser.error("--out-plan needs --out-plan-summary and --scans-per-shard")
    if (args.shard is not None or args.merge) and args.plan is None:
        parser.error(f"--{'shard' if args.shard is not None else 'merge'} needs --plan")
    shard = shard_from_args(args, parser, lambda: plan_shard_count(args.plan))
    if args.dicom_dir is None and not args.merge:
        parser.error("--dicom-dir is required (but with --merge)")
    if shard is not None and shard[1] != plan_shard_count(args.plan):
        parser.error(f"--shard {args.shard}: the plan has {plan_shard_count(args.plan)} shards")
    whole = not make_plan and shard is None
    out = IngestOutputs(**cli.outputs_from_args(args, parser, INGEST_OUTPUTS)) if whole else None
    second = None
    if whole:
        second = SecondOutputs.in_folder(out.manifest.parent)
        second = SecondOutputs(volumes=args.out_second_volumes or second.volumes,
                               table=args.out_second_series or second.table)
    cli.setup_logging(args.log, "ingest")
    try:
        if make_plan:
            plan_shards(args.dicom_dir, args.out_plan, args.out_plan_summary, key, args.threads, args.scans_per_shard)
        elif shard is not None:
            ingest_shard(args.dicom_dir, args.plan, shard[0], args.out, key, rules, args.threads, args.label_dir,
                         scheme)
        elif args.merge:
            merge_shards(args.plan, args.merge, out, key, args.gradings, args.subjects, **marks, second=second)
        else:
            ingest_dicom(args.dicom_dir, out, key, rules, args.threads, args.label_dir, args.gradings,
                         args.subjects, **marks, label_scheme=scheme, second=second)
    except RuntimeError as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
