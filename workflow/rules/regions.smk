# The lumbar regions of the scans (T12 to S1, isotropic, with their label maps): what the region methods (mlsscl) cut
# their clips from, and the segmentation downstream (Cao et al. 2022, Table 2): every pretrained 3D encoder and the
# same network from scratch under a U-Net decoder, on label subsets. Cohorts of scans only (not a crop table).


rule lumbar_regions:
    input:
        code=code("lumbar_regions"),
        manifest=rules.ingest.output.manifest,
        volumes=rules.ingest.output.volumes,
        labels=rules.ingest.output.labels,
        structures=rules.localise.output.structures,
        splits_volumes=rules.splits.output.volumes,
    output:
        array=out("regions", "regions.npy"),
        labels=out("regions", "labels.npy"),
        table=out("regions", "regions.parquet"),
        table_csv=out("regions", "regions.csv"),
        flags=out("regions", "flags.csv"),
    log:
        logs("lumbar_regions", "lumbar_regions"),
    benchmark:
        bench("lumbar_regions", "lumbar_regions")
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        options=stage_options("regions"),
    shell:
        "python -m stages.lumbar_regions --manifest {input.manifest} --volumes {input.volumes} "
        "--labels {input.labels} --structures {input.structures} --splits-volumes {input.splits_volumes} "
        "--out-array {output.array} --out-labels {output.labels} --out-table {output.table} "
        "--out-flags {output.flags} --threads {threads} {params.options} > {log} 2>&1"


rule segment:
    input:
        code=code("segment"),
        regions=rules.lumbar_regions.output.array,
        labels=rules.lumbar_regions.output.labels,
        table=rules.lumbar_regions.output.table,
        encoder=lambda wildcards: (
            [] if wildcards.model in SCRATCH_MODELS else rules.pretrain.output.encoder.format(method=wildcards.model)
        ),
    output:
        scores=out("segmentation", "{model}", "scores.parquet"),
        scores_csv=out("segmentation", "{model}", "scores.csv"),
        summary=out("segmentation", "{model}", "summary.parquet"),
        summary_csv=out("segmentation", "{model}", "summary.csv"),
        history=out("segmentation", "{model}", "history.csv"),
        examples=out("segmentation", "{model}", "examples.npz"),
    log:
        logs("segment", "{model}"),
    benchmark:
        bench("segment", "{model}")
    wildcard_constraints:
        model="|".join(SEGMENT_MODELS) or "none",
    conda:
        ENV
    threads: config["segmentation"]["threads"]
    resources:
        mem_mb=4000,
        runtime=120,
        flags=runtime_flags("segmentation", "threads"),
    params:
        source=segment_source,
        options=stage_options("segmentation", skip=("run",)),
    shell:
        "python -m stages.segment --regions {input.regions} --labels {input.labels} --table {input.table} "
        "{params.source} --out-scores {output.scores} --out-summary {output.summary} "
        "--out-history {output.history} --out-examples {output.examples} {params.options} {resources.flags} "
        "> {log} 2>&1"


use rule figure_pretext as table_segmentation with:
    input:
        code=code("figures"),
        summaries=expand(rules.segment.output.summary, model=SEGMENT_MODELS),
    output:
        html=in_report(table("segmentation"), "segmentation_table", "5. Downstream results", "segmentation (table)"),
        csv=table("segmentation", "csv"),
    log:
        logs("report", "table_segmentation"),
    benchmark:
        bench("report", "table_segmentation")
    params:
        figure="segmentation-table",
        options="",


use rule figure_pretext as figure_segmentation with:
    input:
        code=code("figures"),
        summaries=expand(rules.segment.output.summary, model=SEGMENT_MODELS),
        examples=expand(rules.segment.output.examples, model=SEGMENT_MODELS),
    output:
        png=in_report(fig("segmentation"), "segmentation", "5. Downstream results", "segmentation"),
        pdf=fig("segmentation", "pdf"),
    log:
        logs("report", "figure_segmentation"),
    benchmark:
        bench("report", "figure_segmentation")
    params:
        figure="segmentation",
        options="",
