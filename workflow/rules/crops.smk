# A crop-table cohort (cohort.source: crops): the crops stand in for ingest, localisation and extraction. The rules
# keep the names `ingest` and `extract` and write the same outputs, so every later stage runs unchanged.


rule ingest:
    input:
        unpack(crops_inputs),
        code=code("ingest_crops"),
    output:
        crops=directory(out("ingest", "crops")),
        crop_table=out("ingest", "crops.parquet"),
        manifest=out("ingest", "manifest.parquet"),
        manifest_csv=out("ingest", "manifest.csv"),
        files=out("ingest", "files.parquet"),
        files_csv=out("ingest", "files.csv"),
        gradings=out("ingest", "gradings.parquet"),
        subjects=out("ingest", "subjects.parquet"),
        summary=out("ingest", "summary.json"),
    params:
        root=out("ingest"),
        options=crops_flags,
    log:
        logs("ingest", "ingest"),
    benchmark:
        bench("ingest", "ingest")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=120,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.ingest_crops --table {input.table} --out {params.root} {params.options} > {log} 2>&1"


rule extract:
    input:
        code=code("extract_crops"),
        crops=rules.ingest.output.crops,
        crop_table=rules.ingest.output.crop_table,
    output:
        vertebrae=out("extract", "vertebrae.npy"),
        discs=out("extract", "discs.npy"),
        axial=out("extract", "axial.npy"),
        index=out("extract", "index.parquet"),
        index_csv=out("extract", "index.csv"),
    params:
        ingest=out("ingest"),
        root=out("extract"),
        options=lambda wildcards: section_options(config["extract"]),
    log:
        logs("extract", "extract"),
    benchmark:
        bench("extract", "extract")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=120,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.extract_crops --ingest {params.ingest} --out {params.root} {params.options} > {log} 2>&1"


rule extract_qc:
    input:
        code=code("extract_qc"),
        index=rules.extract.output.index,
        vertebrae=rules.extract.output.vertebrae,
        discs=rules.extract.output.discs,
    output:
        gallery=report(out("extract", "qc", "gallery.png"), caption="../report/extraction_gallery.rst",
                       category="2. Localisation and extraction", labels={"name": "extracted volumes"}),
    params:
        ingest=out("ingest"),
        extract=out("extract"),
    log:
        logs("extract", "extract_qc"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.extract_qc --ingest {params.ingest} --extract {params.extract} "
        "--out-gallery {output.gallery} > {log} 2>&1"
