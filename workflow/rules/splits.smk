# Splits (by subject and family) for self-supervision and grading, and longitudinal pairs.


rule splits:
    input:
        code=code("splits"),
        index=rules.extract.output.index,
        subjects=rules.ingest.output.subjects,
        gradings=rules.ingest.output.gradings,
    output:
        subjects=out("splits", "subjects.parquet"),
        subjects_csv=out("splits", "subjects.csv"),
        volumes=out("splits", "volumes.parquet"),
        volumes_csv=out("splits", "volumes.csv"),
        pairs=out("splits", "pairs.parquet"),
        pairs_csv=out("splits", "pairs.csv"),
        summary=out("splits", "summary.json"),
    log:
        logs("splits", "splits"),
    benchmark:
        bench("splits", "splits")
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    params:
        options=stage_options("splits"),
        structure=stage_options("pretrain", keys=("structure",)),
    shell:
        "python -m stages.splits --index {input.index} --subjects {input.subjects} --gradings {input.gradings} "
        "{params.options} {params.structure} --out-subjects {output.subjects} --out-volumes {output.volumes} --out-pairs {output.pairs} "
        "--out-summary {output.summary} > {log} 2>&1"
