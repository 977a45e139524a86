# The report: one rule per figure or table, each reading result tables only (stages/figures.py), the Grad-CAM maps
# (stages/gradcam.py, stages/disc_masks.py) and the t-SNE maps (stages/embeddings.py). Figures are PNG (shown in the
# HTML report, with their caption from workflow/report/) and PDF (for a paper); tables are HTML and CSV. The functions
# these rules call are in report_common.smk.
#
#     snakemake --cores 2                      # the workflow, these figures included
#     snakemake --report results/report.html   # one self-contained HTML file with every figure and table


# Every figure and table rule has the shape of this one (`use rule figure_pretext as ... with:`): it runs
# `stages.figures {params.figure}` with its files as options named after the rule's inputs and outputs
# (`--distances {input.distances} --png {output.png} --pdf {output.pdf}`: file_flags) and its other settings in
# `options`. The rules below state what they read, what they write, their subcommand and options, log and benchmark.
rule figure_pretext:
    input:
        code=code("figures"),
        distances=expand(rules.pretext_eval.output.distances, method=PRETRAINED),
        evaluations=expand(rules.pretext_eval.output.evaluation, method=PRETRAINED),
    output:
        png=in_report(fig("pretext"), "pretext", "3. Pretext task", "pretext task, trained vs untrained"),
        pdf=fig("pretext", "pdf"),
    log:
        logs("report", "figure_pretext"),
    benchmark:
        bench("report", "figure_pretext")
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        figure="pretext",
        files=file_flags,
        options=f"--methods {' '.join(PRETRAINED)}",
    shell:
        "python -m stages.figures {params.figure} {params.files} {params.options} > {log} 2>&1"


use rule figure_pretext as figure_label_efficiency with:
    input:
        code=code("figures"),
        summary=rules.probe_summary.output.summary,
    output:
        png=in_report(
            fig("label_efficiency"), "label_efficiency", "4. Label efficiency", "label efficiency, every task"
        ),
        pdf=fig("label_efficiency", "pdf"),
    log:
        logs("report", "figure_label_efficiency"),
    benchmark:
        bench("report", "figure_label_efficiency")
    params:
        figure="label-efficiency",
        options=END_TO_END_OPTION,


use rule figure_pretext as figure_label_curves with:
    input:
        code=code("figures"),
        summary=rules.probe_summary.output.summary,
    output:
        png=in_report(
            fig("label_curves_herniation"), "label_curves", "4. Label efficiency", "herniation vs number of labels"
        ),
        pdf=fig("label_curves_herniation", "pdf"),
    log:
        logs("report", "figure_label_curves"),
    benchmark:
        bench("report", "figure_label_curves")
    params:
        figure="label-curves",
        options=END_TO_END_OPTION,


use rule figure_pretext as table_figure_of_merit with:
    input:
        code=code("figures"),
        efficiency=rules.probe_summary.output.efficiency,
    output:
        html=in_report(table("figure_of_merit"), "figure_of_merit", "4. Label efficiency", "figure of merit (table)"),
        csv=table("figure_of_merit", "csv"),
    log:
        logs("report", "table_figure_of_merit"),
    benchmark:
        bench("report", "table_figure_of_merit")
    params:
        figure="figure-of-merit",
        options="",


use rule figure_pretext as table_benchmark with:
    input:
        code=code("figures"),
        summary=rules.probe_summary.output.summary,
        segmentation=SEGMENTATION_SUMMARIES,
    output:
        html=in_report(table("benchmark"), "benchmark", "4. Label efficiency", "benchmark of every model (table)"),
        csv=table("benchmark", "csv"),
    log:
        logs("report", "table_benchmark"),
    benchmark:
        bench("report", "table_benchmark")
    params:
        figure="benchmark-table",
        options=COST_OPTIONS,


use rule table_benchmark as figure_benchmark with:
    output:
        png=in_report(fig("benchmark"), "benchmark", "4. Label efficiency", "benchmark of every model"),
        pdf=fig("benchmark", "pdf"),
    log:
        logs("report", "figure_benchmark"),
    benchmark:
        bench("report", "figure_benchmark")
    params:
        figure="benchmark",
        options=COST_OPTIONS,


use rule figure_pretext as figure_roc with:
    input:
        code=code("figures"),
        predictions=rules.probe_summary.output.predictions,
    output:
        png=in_report(fig("roc_herniation"), "roc", "5. Downstream results", "herniation ROC curves"),
        pdf=fig("roc_herniation", "pdf"),
    log:
        logs("report", "figure_roc"),
    benchmark:
        bench("report", "figure_roc")
    params:
        figure="roc",
        options=END_TO_END_OPTION,


use rule figure_pretext as figure_confusion with:
    input:
        code=code("figures"),
        predictions=rules.probe_summary.output.predictions,
    output:
        png=in_report(fig("confusion_grade"), "confusion", "5. Downstream results", "grade confusion matrices"),
        pdf=fig("confusion_grade", "pdf"),
    log:
        logs("report", "figure_confusion"),
    benchmark:
        bench("report", "figure_confusion")
    params:
        figure="confusion",
        options=END_TO_END_OPTION,


use rule figure_pretext as table_metrics with:
    input:
        code=code("figures"),
        results=rules.probe_summary.output.results,
    output:
        html=in_report(
            table("herniation_metrics"), "metrics_table", "5. Downstream results", "ACC, SEN, SPE, AUC (table)"
        ),
        csv=table("herniation_metrics", "csv"),
    log:
        logs("report", "table_metrics"),
    benchmark:
        bench("report", "table_metrics")
    params:
        figure="metrics-table",
        options=END_TO_END_OPTION,


use rule figure_pretext as table_ablation with:
    input:
        code=code("figures"),
        results=rules.probe_summary.output.results,
        evaluations=expand(rules.pretext_eval.output.evaluation, method=REGIONS_IN_USE),
    output:
        html=in_report(table("mlsscl_ablation"), "ablation_table", "5. Downstream results", "MLSSCL ablation (table)"),
        csv=table("mlsscl_ablation", "csv"),
    log:
        logs("report", "table_ablation"),
    benchmark:
        bench("report", "table_ablation")
    params:
        figure="ablation-table",
        options="",


use rule figure_pretext as table_curricula with:
    input:
        code=code("figures"),
        summary=rules.probe_summary.output.summary,
        orderings=[rules.curriculum_order.output.json] if ORDERED else [],
        attention=expand(out("report", "gradcam", "{model}", "summary.json"), model=GRADCAM_MODELS),
        searches=[step_output(c, i, "lr_search.csv") for c, n in CURRICULUM_STEPS.items() for i in range(1, n + 1)],
    output:
        html=in_report(table("curricula"), "curricula_table", "5. Downstream results", "curricula (table)"),
        csv=table("curricula", "csv"),
    log:
        logs("report", "table_curricula"),
    benchmark:
        bench("report", "table_curricula")
    params:
        figure="curricula-table",
        options=curricula_table_options(),


rule embeddings:
    input:
        code=code("embeddings"),
        features=rules.features.output.features,
        volumes=rules.splits.output.volumes,
        manifest=rules.ingest.output.manifest,
    output:
        coords=out("report", "embeddings", "{encoder}.parquet"),
    log:
        logs("report", "embeddings_{encoder}"),
    benchmark:
        bench("report", "embeddings_{encoder}")
    wildcard_constraints:
        encoder="|".join(BODY_ENCODERS),
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        options=stage_options("reports", keys=("seed",)),
    shell:
        "python -m stages.embeddings --features {input.features} --volumes {input.volumes} "
        "--manifest {input.manifest} {params.options} --out {output.coords} > {log} 2>&1"


use rule figure_pretext as figure_embeddings with:
    input:
        code=code("figures"),
        coords=expand(rules.embeddings.output.coords, encoder=BODY_ENCODERS),
    output:
        png=in_report(fig("embeddings"), "embeddings", "6. Representations", "t-SNE maps of the features"),
        pdf=fig("embeddings", "pdf"),
    log:
        logs("report", "figure_embeddings"),
    benchmark:
        bench("report", "figure_embeddings")
    params:
        figure="embeddings",
        options="",


rule normative:
    input:
        code=code("normative"),
        pooled=rules.disc_features.output.pooled,
        volumes=rules.splits.output.volumes,
        manifest=rules.ingest.output.manifest,
    output:
        deviations=out("report", "normative", "{encoder}.parquet"),
        deviations_csv=out("report", "normative", "{encoder}.csv"),
        summary=out("report", "normative", "{encoder}.json"),
    log:
        logs("report", "normative_{encoder}"),
    benchmark:
        bench("report", "normative_{encoder}")
    wildcard_constraints:
        encoder="|".join(DISC_ENCODERS),
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        options=stage_options("normative"),
    shell:
        "python -m stages.normative --pooled {input.pooled} --volumes {input.volumes} --manifest {input.manifest} "
        "{params.options} --out-deviations {output.deviations} --out-summary {output.summary} > {log} 2>&1"


use rule figure_pretext as figure_normative with:
    input:
        code=code("figures"),
        deviations=expand(rules.normative.output.deviations, encoder=DISC_ENCODERS),
        summaries=expand(rules.normative.output.summary, encoder=DISC_ENCODERS),
    output:
        png=in_report(
            fig("normative"), "normative", "6. Representations", "deviation from healthy discs by grade and age"
        ),
        pdf=fig("normative", "pdf"),
    log:
        logs("report", "figure_normative"),
    benchmark:
        bench("report", "figure_normative")
    params:
        figure="normative",
        options="",


rule population:
    input:
        code=code("population"),
        pooled=rules.disc_features.output.pooled,
        volumes=rules.splits.output.volumes,
        manifest=rules.ingest.output.manifest,
    output:
        subjects=out("report", "population", "{encoder}.parquet"),
        subjects_csv=out("report", "population", "{encoder}.csv"),
        tests=out("report", "population", "{encoder}_tests.csv"),
        summary=out("report", "population", "{encoder}.json"),
    log:
        logs("report", "population_{encoder}"),
    benchmark:
        bench("report", "population_{encoder}")
    wildcard_constraints:
        encoder="|".join(DISC_ENCODERS),
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        options=stage_options("population"),
        # the supervised baseline learnt the training part's grades: only the held-out subjects (the last --subjects
        # wins)
        held_out=lambda wildcards: "--subjects held_out" if wildcards.encoder == "supervised" else "",
    shell:
        "python -m stages.population --pooled {input.pooled} --volumes {input.volumes} --manifest {input.manifest} "
        "{params.options} {params.held_out} --out-subjects {output.subjects} --out-tests {output.tests} "
        "--out-summary {output.summary} > {log} 2>&1"


use rule figure_pretext as figure_population with:
    input:
        code=code("figures"),
        tests=expand(rules.population.output.tests, encoder=DISC_ENCODERS),
        summaries=expand(rules.population.output.summary, encoder=DISC_ENCODERS),
    output:
        png=in_report(
            fig("population"),
            "population",
            "6. Representations",
            "subgroups, associations with covariates, the scanner confound and longitudinal change",
        ),
        pdf=fig("population", "pdf"),
    log:
        logs("report", "figure_population"),
    benchmark:
        bench("report", "figure_population")
    params:
        figure="population",
        options="",


use rule figure_pretext as figure_training with:
    input:
        code=code("figures"),
        pretrain=expand(rules.pretrain.output.metrics, method=PRETRAINED),
        supervised=training_history_inputs("supervised"),
        end_to_end=training_history_inputs("end_to_end"),
    output:
        png=in_report(fig("training_curves"), "training", "7. Training", "training curves"),
        pdf=fig("training_curves", "pdf"),
    log:
        logs("report", "figure_training"),
    benchmark:
        bench("report", "figure_training")
    params:
        figure="training",
        options="",


# The label maps are read from the paths the manifest names (ingest's labels/ folder, written with the manifest). The
# disc is cut with the crop of what the models read: the disc volume's (probes.disc_input: disc) or the two bodies'.
rule disc_masks:
    input:
        code=code("disc_masks"),
        manifest=rules.ingest.output.manifest,
        structures=out("localise", "structures.parquet"),  # a path: no localise rule for a crop-table cohort
        volumes=rules.splits.output.volumes,
    output:
        masks=out("report", "gradcam", "disc_masks.npz"),
    log:
        logs("report", "disc_masks"),
    benchmark:
        bench("report", "disc_masks")
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        task=stage_options("reports", keys=("gradcam_task",)),
        crop=disc_masks_options(),
    shell:
        "python -m stages.disc_masks --manifest {input.manifest} --structures {input.structures} "
        "--volumes {input.volumes} {params.task} {params.crop} --out {output.masks} > {log} 2>&1"


# An axial method reads the axial_slices stage's slices (native or resliced): that stage cuts the disc's label map on
# exactly their pixels; the test discs' rows of those masks (stages/axial_masks.py) are the attention score's masks.
rule axial_masks:
    input:
        code=code("axial_masks"),
        index=out("axial", "index.parquet"),  # paths: no axial_slices rule for a crop-table cohort
        masks=out("axial", "masks.npy"),
        volumes=rules.splits.output.volumes,
    output:
        masks=out("report", "gradcam", "axial_masks.npz"),
    log:
        logs("report", "axial_masks"),
    benchmark:
        bench("report", "axial_masks")
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        task=stage_options("reports", keys=("gradcam_task",)),
        spacing=stage_options("extract", keys=("axial_spacing_mm",)),
    shell:
        "python -m stages.axial_masks --axial-index {input.index} --axial-masks {input.masks} "
        "--volumes {input.volumes} {params.task} {params.spacing} --out {output.masks} > {log} 2>&1"


rule gradcam:
    input:
        unpack(gradcam_inputs),
    output:
        scores=out("report", "gradcam", "{model}", "scores.csv"),
        maps=out("report", "gradcam", "{model}", "maps.npz"),
        summary=out("report", "gradcam", "{model}", "summary.json"),
    log:
        logs("report", "gradcam_{model}"),
    benchmark:
        bench("report", "gradcam_{model}")
    wildcard_constraints:
        model="|".join(FROZEN + END_TO_END),
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        volumes=gradcam_volumes_flag,
        encoder=gradcam_encoder_flags,
        layer=stage_options("reports", keys=("gradcam_layer",)),
    shell:
        "python -m stages.gradcam probe --model {wildcards.model} --metrics {input.metrics} "
        "--predictions {input.predictions} --model-file {input.model} --masks {input.masks} "
        "{params.volumes} {params.encoder} {params.layer} --scores {output.scores} "
        "--maps {output.maps} --summary {output.summary} --threads {threads} > {log} 2>&1"


rule gradcam_pairs:
    input:
        code=code("gradcam"),
        encoder=rules.pretrain.output.encoder,
        distances=rules.pretext_eval.output.distances,
        vertebrae=rules.extract.output.vertebrae,
    output:
        pairs=out("report", "gradcam", "{method}", "pairs.npz"),
    log:
        logs("report", "gradcam_pairs_{method}"),
    benchmark:
        bench("report", "gradcam_pairs_{method}")
    wildcard_constraints:
        method=METHODS_PATTERN,
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
        flags=runtime_flags("reports", "pair_examples"),
    params:
        layer=stage_options("reports", keys=("gradcam_layer",)),
    shell:
        "python -m stages.gradcam pairs --encoder {input.encoder} --distances {input.distances} "
        "--vertebrae {input.vertebrae} {params.layer} {resources.flags} --out {output.pairs} "
        "--threads {threads} > {log} 2>&1"


use rule figure_pretext as figure_gradcam with:
    input:
        code=code("figures"),
        maps=expand(rules.gradcam.output.maps, model=GRADCAM_MODELS),
        vertebrae=rules.extract.output.vertebrae,
    output:
        png=in_report(fig("gradcam_{variant}"), "gradcam", "8. Grad-CAM", "Grad-CAM, {variant}"),
        pdf=fig("gradcam_{variant}", "pdf"),
    log:
        logs("report", "figure_gradcam_{variant}"),
    benchmark:
        bench("report", "figure_gradcam_{variant}")
    wildcard_constraints:
        variant="standard|hou",
    params:
        figure="gradcam",
        options=lambda wildcards: "--variant " + ("gradcam" if wildcards.variant == "standard" else "hou"),


use rule figure_pretext as table_attention with:
    input:
        code=code("figures"),
        summaries=expand(rules.gradcam.output.summary, model=GRADCAM_MODELS),
    output:
        html=in_report(table("attention_inside_disc"), "attention", "8. Grad-CAM", "attention inside the disc (table)"),
        csv=table("attention_inside_disc", "csv"),
    log:
        logs("report", "table_attention"),
    benchmark:
        bench("report", "table_attention")
    params:
        figure="attention",
        options="",


use rule figure_pretext as figure_pairs with:
    input:
        code=code("figures"),
        pairs=rules.gradcam_pairs.output.pairs,
        vertebrae=rules.extract.output.vertebrae,
    output:
        png=in_report(fig("pairs_{method}"), "pairs", "8. Grad-CAM", "Siamese pair maps, {method}"),
        pdf=fig("pairs_{method}", "pdf"),
    log:
        logs("report", "figure_pairs_{method}"),
    benchmark:
        bench("report", "figure_pairs_{method}")
    wildcard_constraints:
        method=METHODS_PATTERN,
    params:
        figure="pairs",
        options="",


# The configuration that makes the results: its x-runtime keys (threads, read-ahead, picture counts) are left out of
# the params and of the page, so that changing them re-runs nothing (report_common.smk, results_config).
rule report_config:
    input:
        code=code("report_config"),
    output:
        html=in_report(table("configuration"), "configuration", "9. Configuration", "the run's configuration"),
        yaml=table("configuration", "yaml"),
    log:
        logs("report", "report_config"),
    benchmark:
        bench("report", "report_config")
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        config=results_config(),
    shell:
        "python -m stages.report_config --config {params.config:q} --out {output.yaml} --html {output.html} "
        "> {log} 2>&1"
