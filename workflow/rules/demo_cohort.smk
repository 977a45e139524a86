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
    params:
        root=out("demo_cohort"),
        options=demo_options(),
    log:
        logs("demo_cohort", "demo_cohort"),
    benchmark:
        bench("demo_cohort", "demo_cohort")
    threads: 8
    resources:
        mem_mb=lambda wildcards, threads: 1000 + 600 * threads,
        runtime=lambda wildcards, attempt: 30 + config["demo"]["n_subjects"] // 4,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.demo_cohort --out {params.root} --threads {threads} {params.options} > {log} 2>&1"


rule demo_montage:
    input:
        code=code("demo_montage"),
        dicom=rules.demo_cohort.output.dicom,
        studies=rules.demo_cohort.output.studies,
        gradings=rules.demo_cohort.output.gradings,
        landmarks=rules.demo_cohort.output.landmarks,
    output:
        png=report(out("demo_cohort", "montage.png"), caption="../report/demo_montage.rst", category="1. Demo cohort",
                   labels={"name": "demo cohort montage"}),
    params:
        root=out("demo_cohort"),
        subjects=config["demo"]["montage_subjects"],
    log:
        logs("demo_cohort", "demo_montage"),
    benchmark:
        bench("demo_cohort", "demo_montage")
    threads: 1
    resources:
        mem_mb=1500,
        runtime=10,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.demo_montage --cohort {params.root} --subjects {params.subjects} --out {output.png} > {log} 2>&1"
