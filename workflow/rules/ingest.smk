# Ingest: the archive (the demo's, the user's DICOM, or a NIfTI/MetaImage cohort) -> pseudonymised volumes, a scan
# manifest, and the accounting. The same outputs whatever the source, so later stages never ask. A checkpoint: the
# number of scans in its manifest decides how many shard jobs localise and extract run (scale.scans_per_shard).


checkpoint ingest:
    input:
        unpack(ingest_inputs),
        code=[src(ingest_stage()), src("ingest"), src("dicom_index"), src("dicom_volume"), src("pseudonym"),
              src("landmarks"), src("levels")],
    output:
        volumes=directory(out("ingest", "volumes")),
        labels=directory(out("ingest", "labels")),
        manifest=out("ingest", "manifest.parquet"),
        manifest_csv=out("ingest", "manifest.csv"),
        files=out("ingest", "files.parquet"),
        files_csv=out("ingest", "files.csv"),
        series=out("ingest", "series.csv"),
        gradings=out("ingest", "gradings.parquet"),
        subjects=out("ingest", "subjects.parquet"),
        landmarks=out("ingest", "landmarks.parquet"),
        landmark_rows=out("ingest", "landmark_rows.csv"),
        summary=out("ingest", "summary.json"),
    params:
        root=out("ingest"),
        inputs=ingest_flags,
        stage=ingest_stage(),
        options=lambda wildcards: section_options(config["ingest"]) if ingest_stage() == "ingest" else "",
    log:
        logs("ingest", "ingest"),
    benchmark:
        bench("ingest", "ingest")
    threads: 8
    resources:
        mem_mb=lambda wildcards, threads: 1500 + 500 * threads,
        runtime=120,
    conda:
        ENV
    shell:
        "python -m stages.{params.stage} {params.inputs} --out {params.root} --threads {threads} {params.options} "
        "> {log} 2>&1"
