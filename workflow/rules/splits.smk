# Splits (by subject and family) for self-supervision and grading, and longitudinal pairs.


rule splits:
    input:
        code=code("splits"),
        manifest=rules.ingest.output.manifest,
        subjects=rules.ingest.output.subjects,
        gradings=rules.ingest.output.gradings,
        index=rules.extract.output.index,
    output:
        subjects=out("splits", "subjects.parquet"),
        volumes=out("splits", "volumes.parquet"),
        pairs=out("splits", "pairs.parquet"),
        summary=out("splits", "summary.json"),
    params:
        ingest=out("ingest"),
        extract=out("extract"),
        root=out("splits"),
        options=lambda wildcards: section_options(config["splits"]),
    log:
        logs("splits", "splits"),
    benchmark:
        bench("splits", "splits")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.splits --ingest {params.ingest} --extract {params.extract} --out {params.root} "
        "{params.options} > {log} 2>&1"
