# Genetics of the population analysis: the cohort's genotype table pseudonymised (ingest_genotypes, when there is
# one: the demo's, or cohort.genotypes), then per frozen 3D encoder the twin heritability and the SNP scan of the mean
# baseline grade and of the population stage's leading components (genetics), and one figure of them all.


rule ingest_genotypes:
    input:
        unpack(lambda wildcards: GENOTYPE_INPUTS),
        code=code("ingest_genotypes"),
    output:
        genotypes=out("ingest", "genotypes.parquet"),
        rows=out("ingest", "genotype_rows.csv"),
    log:
        logs("ingest", "ingest_genotypes"),
    benchmark:
        bench("ingest", "ingest_genotypes")
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        key=lambda wildcards, input: (f"--key-file {shlex.quote(input.key_file)}" if "key_file" in input.keys() else ""),
    shell:
        "python -m stages.ingest_genotypes --genotypes {input.genotypes:q} {params.key} "
        "--out-genotypes {output.genotypes} --out-rows {output.rows} > {log} 2>&1"


rule genetics:
    input:
        code=code("genetics"),
        population=rules.population.output.subjects,
        subjects=rules.ingest.output.subjects,
        genotypes=[rules.ingest_genotypes.output.genotypes] if GENOTYPE_INPUTS else [],
    output:
        heritability=out("report", "genetics", "{encoder}_heritability.csv"),
        scan=out("report", "genetics", "{encoder}_scan.csv"),
        summary=out("report", "genetics", "{encoder}.json"),
    log:
        logs("report", "genetics_{encoder}"),
    benchmark:
        bench("report", "genetics_{encoder}")
    wildcard_constraints:
        encoder="|".join(DISC_ENCODERS),
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        options=stage_options("genetics"),
        genotypes=lambda wildcards, input: f"--genotypes {input.genotypes}" if GENOTYPE_INPUTS else "",
    shell:
        "python -m stages.genetics --population {input.population} --subjects {input.subjects} {params.genotypes} "
        "{params.options} --out-heritability {output.heritability} --out-scan {output.scan} "
        "--out-summary {output.summary} > {log} 2>&1"


use rule figure_pretext as figure_genetics with:
    input:
        code=code("figures"),
        heritability=expand(rules.genetics.output.heritability, encoder=DISC_ENCODERS),
        scans=expand(rules.genetics.output.scan, encoder=DISC_ENCODERS),
        summaries=expand(rules.genetics.output.summary, encoder=DISC_ENCODERS),
        truth=[out("demo_cohort", "truth", "genetics.json")] if config["cohort"]["source"] == "demo" else [],
    output:
        png=in_report(
            fig("genetics"), "genetics", "6. Representations", "twin heritability and SNP association (Manhattan)"
        ),
        pdf=fig("genetics", "pdf"),
    log:
        logs("report", "figure_genetics"),
    benchmark:
        bench("report", "figure_genetics")
    params:
        figure="genetics",
        options="",
