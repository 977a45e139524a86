# A crop-table cohort (cohort.source: crops): the crops stand in for ingest, localisation and extraction. The rules
# keep the names `ingest` and `extract` and write the same outputs, so every later stage runs unchanged.


rule ingest:
    input:
        unpack(crops_inputs),
        code=code("ingest_crops"),
    output:
        crops=directory(out("ingest", "crops")),
        crop_table=out("ingest", "crops.parquet"),
        crop_table_csv=out("ingest", "crops.csv"),
        manifest=out("ingest", "manifest.parquet"),
        manifest_csv=out("ingest", "manifest.csv"),
        files=out("ingest", "files.parquet"),
        files_csv=out("ingest", "files.csv"),
        series=out("ingest", "series.csv"),
        gradings=out("ingest", "gradings.parquet"),
        gradings_csv=out("ingest", "gradings.csv"),
        subjects=out("ingest", "subjects.parquet"),
        subjects_csv=out("ingest", "subjects.csv"),
        summary=out("ingest", "summary.json"),
    log:
        logs("ingest", "ingest"),
    benchmark:
        bench("ingest", "ingest")
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=120,
    params:
        options=crops_flags,
    shell:
        "python -m stages.ingest_crops --table {input.table} {params.options} --out-crops {output.crops} "
        "--out-crop-table {output.crop_table} --out-manifest {output.manifest} --out-files {output.files} "
        "--out-series {output.series} --out-gradings {output.gradings} --out-subjects {output.subjects} "
        "--out-summary {output.summary} > {log} 2>&1"


rule extract:
    input:
        code=code("extract_crops"),
        crop_table=rules.ingest.output.crop_table,
        crops=rules.ingest.output.crops,
    output:
        vertebrae=out("extract", "vertebrae.npy"),
        discs=out("extract", "discs.npy"),
        axial=out("extract", "axial.npy"),
        index=out("extract", "index.parquet"),
        index_csv=out("extract", "index.csv"),
    log:
        logs("extract", "extract"),
    benchmark:
        bench("extract", "extract")
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=120,
    params:
        # Crops are brought to the extraction sizes, not cut from a scan: no reslicing or width settings.
        options=stage_options("extract", keys=("vertebra_size", "disc_size", "axial_size")),
    shell:
        "python -m stages.extract_crops --crop-table {input.crop_table} --crops {input.crops} {params.options} "
        "--out-vertebrae {output.vertebrae} --out-discs {output.discs} --out-axial {output.axial} "
        "--out-index {output.index} > {log} 2>&1"


rule extract_qc:
    input:
        code=code("extract_qc"),
        index=rules.extract.output.index,
        vertebrae=rules.extract.output.vertebrae,
        discs=rules.extract.output.discs,
    output:
        gallery=report(
            out("extract", "qc", "gallery.png"),
            caption="../report/extraction_gallery.rst",
            category="2. Localisation and extraction",
            labels={"name": "extracted volumes"},
        ),
    log:
        logs("extract", "extract_qc"),
    benchmark:
        bench("extract", "extract_qc")
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    shell:
        "python -m stages.extract_qc --index {input.index} --vertebrae {input.vertebrae} --discs {input.discs} "
        "--out-gallery {output.gallery} > {log} 2>&1"
