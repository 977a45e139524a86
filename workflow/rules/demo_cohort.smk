# The synthetic demo cohort: a DICOM archive with its ground truth, and a montage to look at.


rule demo_cohort:
    input:
        code=code("demo_cohort"),
    output:
        dicom=directory(out("demo_cohort", "dicom")),
        labels=directory(out("demo_cohort", "truth", "labels")),
        subjects=out("demo_cohort", "truth", "subjects.csv"),
        studies=out("demo_cohort", "truth", "studies.csv"),
        gradings=out("demo_cohort", "truth", "gradings.csv"),
        landmarks=out("demo_cohort", "truth", "landmarks.csv"),
        planted=out("demo_cohort", "truth", "planted_files.csv"),
        key=out("demo_cohort", "pseudonym.key"),
        genotypes=out("demo_cohort", "truth", "genotypes.csv"),
        genetics=out("demo_cohort", "truth", "genetics.json"),
    log:
        logs("demo_cohort", "demo_cohort"),
    benchmark:
        bench("demo_cohort", "demo_cohort")
    conda:
        ENV
    threads: 8
    resources:
        mem_mb=lambda wildcards, threads: 1000 + 600 * threads,
        runtime=lambda wildcards, attempt: 30 + config["demo"]["n_subjects"] // 4,
    params:
        options=stage_options("demo"),
    shell:
        "python -m stages.demo_cohort --threads {threads} {params.options} --out-dicom {output.dicom} "
        "--out-labels {output.labels} --out-subjects {output.subjects} --out-studies {output.studies} "
        "--out-gradings {output.gradings} --out-landmarks {output.landmarks} --out-planted {output.planted} "
        "--out-key {output.key} --out-genotypes {output.genotypes} --out-genetics {output.genetics} > {log} 2>&1"


rule demo_montage:
    input:
        code=code("demo_montage"),
        dicom=rules.demo_cohort.output.dicom,
        studies=rules.demo_cohort.output.studies,
        gradings=rules.demo_cohort.output.gradings,
        landmarks=rules.demo_cohort.output.landmarks,
    output:
        png=report(
            out("demo_cohort", "montage.png"),
            caption="../report/demo_montage.rst",
            category="1. Demo cohort",
            labels={"name": "demo cohort montage"},
        ),
    log:
        logs("demo_cohort", "demo_montage"),
    benchmark:
        bench("demo_cohort", "demo_montage")
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1500,
        runtime=10,
        flags=runtime_flags("demo", "montage_subjects"),
    shell:
        "python -m stages.demo_montage --dicom {input.dicom} --studies {input.studies} --gradings {input.gradings} "
        "--landmarks {input.landmarks} {resources.flags} --out {output.png} > {log} 2>&1"
