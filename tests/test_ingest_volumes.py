"""A NIfTI/MetaImage cohort with a table (the SPIDER layout) gives the same outputs as DICOM ingest."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import SimpleITK as sitk
from conftest import ROOT, out_args

from stages.archive import pseudonym as pn
from stages.archive.manifest import IngestOutputs
from stages.ingest_volumes import ingest_volumes

KEY = b"another key of at least sixteen bytes"


def _spider_like(tiny_cohort, root):
    """images/{id}_t2.mha and masks/{id}_t2.mha from the demo's label maps, and a table with odd rows."""
    studies = pd.read_csv(tiny_cohort / "truth" / "studies.csv").iloc[:4]
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for i, study in enumerate(studies.itertuples()):
        label = sitk.ReadImage(str(tiny_cohort / study.label_map))
        image = sitk.Cast(label, sitk.sitkFloat32) * 10.0 + 5.0
        sitk.WriteImage(image, str(root / "images" / f"{i + 1}_t2.mha"))
        sitk.WriteImage(label, str(root / "masks" / f"{i + 1}_t2.mha"))
        rows.append({"image": f"images/{i + 1}_t2.mha", "mask": f"masks/{i + 1}_t2.mha", "subject": study.patient_id,
                     "date": study.study_date})
    (root / "images" / "9_t2.mha").write_text("ObjectType = Image\nNDims = 3\nthis is not an image\n")
    rows += [{"image": "images/8_t2.mha", "subject": "P8"}, {"image": "images/9_t2.mha", "subject": "P9"},
             dict(rows[0])]
    pd.DataFrame(rows).to_csv(root / "cohort.csv", index=False)
    return studies


def test_volume_cohort_gives_manifest_labels_and_accounting(tiny_cohort, tmp_path):
    studies = _spider_like(tiny_cohort, tmp_path / "spider")
    out = tmp_path / "out"
    summary = ingest_volumes(tmp_path / "spider" / "cohort.csv", IngestOutputs.in_folder(out), KEY)
    assert summary["volumes"] == 4 and summary["with_label_map"] == 4
    files = pd.read_csv(out / "files.csv")
    assert len(files) == 7
    reasons = files[files.status == "quarantined"].reason.tolist()
    assert reasons[0] == "missing file" and reasons[1].startswith("unreadable image")
    assert reasons[2].startswith("duplicated row")
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert set(manifest.subject_id) == {pn.subject_id(KEY, p) for p in studies.patient_id}
    expected = studies.assign(subject_id=[pn.subject_id(KEY, p) for p in studies.patient_id])
    expected["days"] = (pd.to_datetime(expected.study_date)
                        - pd.to_datetime(expected.study_date).groupby(expected.patient_id).transform("min")).dt.days
    assert sorted(manifest.days_since_first_study) == sorted(expected.days)
    for row in manifest.itertuples():
        vol, lab = sitk.ReadImage(str(out / row.volume)), sitk.ReadImage(str(out / row.label_map))
        assert vol.GetSize() == lab.GetSize() == (row.size_x, row.size_y, row.size_z)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(vol), sitk.GetArrayFromImage(lab) * 10.0 + 5.0)
    text = "".join(p.read_text() for p in out.glob("*.csv"))
    assert not any(p in text for p in studies.patient_id) and not any(d in text for d in studies.study_date)


def test_cli_reports_a_table_without_images(tmp_path):
    (tmp_path / "t.csv").write_text("image,subject\nnothere.nii.gz,A\n")
    key = tmp_path / "key"
    key.write_text("k" * 20)
    run = subprocess.run([sys.executable, "-m", "stages.ingest_volumes", "--table", str(tmp_path / "t.csv"),
                          *out_args(IngestOutputs.in_folder(tmp_path / "out")), "--key-file", str(key)],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1 and "no volume could be read from the 1 rows" in run.stderr
