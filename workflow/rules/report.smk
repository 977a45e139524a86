# The report: one rule per figure or table, each reading result tables only (stages/figures.py), the Grad-CAM maps
# (stages/gradcam.py, stages/disc_masks.py) and the t-SNE maps (stages/embeddings.py). Figures are PNG (shown in the
# HTML report, with their caption from workflow/report/) and PDF (for a paper); tables are HTML and CSV.
#
#     snakemake --cores 2                      # the workflow, these figures included
#     snakemake --report results/report.html   # one self-contained HTML file with every figure and table

CAPTIONS = "../report"


def fig(name):
    return out("report", "figures", f"{name}.png")


def fig_pdf(name):
    return out("report", "figures", f"{name}.pdf")


def table(name, suffix="html"):
    return out("report", "tables", f"{name}.{suffix}")


def figure_rule_code():
    return code("figures")


rule figure_pretext:
    input:
        code=figure_rule_code(),
        distances=expand(out("pretrain", "{method}", "pretext", "distances.parquet"),
                         method=config["pretrain"]["methods"]),
    output:
        png=report(fig("pretext"), caption=f"{CAPTIONS}/pretext.rst", category="3. Pretext task",
                   labels={"name": "pretext task: pair distances and ROC"}),
        pdf=fig_pdf("pretext"),
    params:
        methods=" ".join(config["pretrain"]["methods"]),
        root=out("report", "figures", "pretext"),
    log:
        logs("report", "figure_pretext"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.figures pretext --distances {input.distances} --methods {params.methods} "
        "--out {params.root} > {log} 2>&1"


rule figure_label_efficiency:
    input:
        code=figure_rule_code(),
        summary=rules.probe_summary.output.summary,
    output:
        png=report(fig("label_efficiency"), caption=f"{CAPTIONS}/label_efficiency.rst",
                   category="4. Label efficiency", labels={"name": "label efficiency, every task"}),
        pdf=fig_pdf("label_efficiency"),
    params:
        root=out("report", "figures", "label_efficiency"),
        end_to_end=" ".join(END_TO_END),
    log:
        logs("report", "figure_label_efficiency"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.figures label-efficiency --summary {input.summary} --end-to-end {params.end_to_end} "
        "--out {params.root} > {log} 2>&1"


rule figure_label_curves:
    input:
        code=figure_rule_code(),
        summary=rules.probe_summary.output.summary,
    output:
        png=report(fig("label_curves_herniation"), caption=f"{CAPTIONS}/label_curves.rst",
                   category="4. Label efficiency", labels={"name": "herniation vs number of labels"}),
        pdf=fig_pdf("label_curves_herniation"),
    params:
        root=out("report", "figures", "label_curves_herniation"),
        end_to_end=" ".join(END_TO_END),
    log:
        logs("report", "figure_label_curves"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.figures label-curves --summary {input.summary} --end-to-end {params.end_to_end} "
        "--out {params.root} > {log} 2>&1"


rule table_figure_of_merit:
    input:
        code=figure_rule_code(),
        efficiency=rules.probe_summary.output.efficiency,
    output:
        html=report(table("figure_of_merit"), caption=f"{CAPTIONS}/figure_of_merit.rst",
                    category="4. Label efficiency", labels={"name": "figure of merit (table)"}),
        csv=table("figure_of_merit", "csv"),
    params:
        root=out("report", "tables", "figure_of_merit"),
    log:
        logs("report", "table_figure_of_merit"),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.figures figure-of-merit --efficiency {input.efficiency} --out {params.root} > {log} 2>&1"


rule figure_roc:
    input:
        code=figure_rule_code(),
        predictions=rules.probe_summary.output.predictions,
    output:
        png=report(fig("roc_herniation"), caption=f"{CAPTIONS}/roc.rst", category="5. Downstream results",
                   labels={"name": "herniation ROC curves"}),
        pdf=fig_pdf("roc_herniation"),
    params:
        root=out("report", "figures", "roc_herniation"),
        end_to_end=" ".join(END_TO_END),
    log:
        logs("report", "figure_roc"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.figures roc --predictions {input.predictions} --end-to-end {params.end_to_end} "
        "--out {params.root} > {log} 2>&1"


rule figure_confusion:
    input:
        code=figure_rule_code(),
        predictions=rules.probe_summary.output.predictions,
    output:
        png=report(fig("confusion_grade"), caption=f"{CAPTIONS}/confusion.rst", category="5. Downstream results",
                   labels={"name": "grade confusion matrices"}),
        pdf=fig_pdf("confusion_grade"),
    params:
        root=out("report", "figures", "confusion_grade"),
        end_to_end=" ".join(END_TO_END),
    log:
        logs("report", "figure_confusion"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.figures confusion --predictions {input.predictions} --end-to-end {params.end_to_end} "
        "--out {params.root} > {log} 2>&1"


rule table_metrics:
    input:
        code=figure_rule_code(),
        results=rules.probe_summary.output.results,
    output:
        html=report(table("herniation_metrics"), caption=f"{CAPTIONS}/metrics_table.rst",
                    category="5. Downstream results", labels={"name": "ACC, SEN, SPE, AUC (table)"}),
        csv=table("herniation_metrics", "csv"),
    params:
        root=out("report", "tables", "herniation_metrics"),
        end_to_end=" ".join(END_TO_END),
    log:
        logs("report", "table_metrics"),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.figures metrics-table --results {input.results} --end-to-end {params.end_to_end} "
        "--out {params.root} > {log} 2>&1"


rule embeddings:
    input:
        code=code("embeddings"),
        features=out("probes", "features", "{encoder}", "features.npy"),
        volumes=rules.splits.output.volumes,
        manifest=rules.ingest.output.manifest,
    output:
        coords=out("report", "embeddings", "{encoder}.parquet"),
    wildcard_constraints:
        encoder="|".join(FROZEN),
    params:
        features=lambda wildcards: out("probes", "features", wildcards.encoder),
        splits=out("splits"),
        ingest=out("ingest"),
        seed=config["reports"]["seed"],
    log:
        logs("report", "embeddings_{encoder}"),
    benchmark:
        bench("report", "embeddings_{encoder}")
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.embeddings --features {params.features} --splits {params.splits} --ingest {params.ingest} "
        "--seed {params.seed} --out {output.coords} > {log} 2>&1"


rule figure_embeddings:
    input:
        code=figure_rule_code(),
        coords=expand(out("report", "embeddings", "{encoder}.parquet"), encoder=FROZEN),
    output:
        png=report(fig("embeddings"), caption=f"{CAPTIONS}/embeddings.rst", category="6. Representations",
                   labels={"name": "t-SNE maps of the features"}),
        pdf=fig_pdf("embeddings"),
    params:
        root=out("report", "figures", "embeddings"),
    log:
        logs("report", "figure_embeddings"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.figures embeddings --coords {input.coords} --out {params.root} > {log} 2>&1"


rule figure_training:
    input:
        code=figure_rule_code(),
        pretrain=expand(rules.pretrain.output.metrics, method=config["pretrain"]["methods"]),
        supervised=training_history_inputs("supervised"),
        end_to_end=training_history_inputs("end_to_end"),
    output:
        png=report(fig("training_curves"), caption=f"{CAPTIONS}/training.rst", category="7. Training",
                   labels={"name": "training curves"}),
        pdf=fig_pdf("training_curves"),
    params:
        root=out("report", "figures", "training_curves"),
        flags=training_flags,
    log:
        logs("report", "figure_training"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.figures training {params.flags} --out {params.root} > {log} 2>&1"


rule disc_masks:
    input:
        code=code("disc_masks"),
        manifest=rules.ingest.output.manifest,
        structures=out("localise", "structures.parquet"),  # a path: no localise rule for a crop-table cohort
        volumes=rules.splits.output.volumes,
    output:
        masks=out("report", "gradcam", "disc_masks.npz"),
    params:
        ingest=out("ingest"),
        localise=out("localise"),
        splits=out("splits"),
        task=config["reports"]["gradcam_task"],
        size=" ".join(str(v) for v in config["extract"]["vertebra_size"]),
        width_fraction=config["extract"]["width_fraction"],
    log:
        logs("report", "disc_masks"),
    benchmark:
        bench("report", "disc_masks")
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.disc_masks --ingest {params.ingest} --localise {params.localise} --splits {params.splits} "
        "--task {params.task} --vertebra-size {params.size} --width-fraction {params.width_fraction} "
        "--out {output.masks} > {log} 2>&1"


rule gradcam:
    input:
        unpack(gradcam_inputs),
    output:
        scores=out("report", "gradcam", "{model}", "scores.csv"),
        maps=out("report", "gradcam", "{model}", "maps.npz"),
        summary=out("report", "gradcam", "{model}", "summary.json"),
    wildcard_constraints:
        model="|".join(FROZEN + END_TO_END),
    params:
        root=lambda wildcards: out("report", "gradcam", wildcards.model),
        extract=out("extract"),
        run=lambda wildcards, input: os.path.dirname(input.model),
        encoder=gradcam_encoder_flags,
        layer=config["reports"]["gradcam_layer"],
    log:
        logs("report", "gradcam_{model}"),
    benchmark:
        bench("report", "gradcam_{model}")
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.gradcam --model {wildcards.model} --run {params.run} --masks {input.masks} "
        "--extract {params.extract} {params.encoder} --layer {params.layer} --out {params.root} "
        "--threads {threads} > {log} 2>&1"


rule gradcam_pairs:
    input:
        code=code("gradcam"),
        encoder=rules.pretrain.output.encoder,
        distances=rules.pretext_eval.output.distances,
        vertebrae=rules.extract.output.vertebrae,
    output:
        pairs=out("report", "gradcam", "{method}", "pairs.npz"),
    wildcard_constraints:
        method=METHODS_PATTERN,
    params:
        root=lambda wildcards: out("report", "gradcam", wildcards.method),
        extract=out("extract"),
        layer=config["reports"]["gradcam_layer"],
        examples=config["reports"]["pair_examples"],
    log:
        logs("report", "gradcam_pairs_{method}"),
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.gradcam --model {wildcards.method} --pairs {input.distances} --encoder {input.encoder} "
        "--extract {params.extract} --layer {params.layer} --pair-examples {params.examples} --out {params.root} "
        "--threads {threads} > {log} 2>&1"


rule figure_gradcam:
    input:
        code=figure_rule_code(),
        maps=expand(out("report", "gradcam", "{model}", "maps.npz"), model=GRADCAM_MODELS),
        vertebrae=rules.extract.output.vertebrae,
    output:
        png=report(fig("gradcam_{variant}"), caption=f"{CAPTIONS}/gradcam.rst", category="8. Grad-CAM",
                   labels={"name": "Grad-CAM, {variant}"}),
        pdf=fig_pdf("gradcam_{variant}"),
    wildcard_constraints:
        variant="standard|hou",
    params:
        root=lambda wildcards: out("report", "figures", f"gradcam_{wildcards.variant}"),
        extract=out("extract"),
        variant=lambda wildcards: "gradcam" if wildcards.variant == "standard" else "hou",
    log:
        logs("report", "figure_gradcam_{variant}"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.figures gradcam --maps {input.maps} --extract {params.extract} --variant {params.variant} "
        "--out {params.root} > {log} 2>&1"


rule table_attention:
    input:
        code=figure_rule_code(),
        summaries=expand(out("report", "gradcam", "{model}", "summary.json"), model=GRADCAM_MODELS),
    output:
        html=report(table("attention_inside_disc"), caption=f"{CAPTIONS}/attention.rst", category="8. Grad-CAM",
                    labels={"name": "attention inside the disc (table)"}),
        csv=table("attention_inside_disc", "csv"),
    params:
        root=out("report", "tables", "attention_inside_disc"),
    log:
        logs("report", "table_attention"),
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.figures attention --summaries {input.summaries} --out {params.root} > {log} 2>&1"


rule figure_pairs:
    input:
        code=figure_rule_code(),
        pairs=rules.gradcam_pairs.output.pairs,
        vertebrae=rules.extract.output.vertebrae,
    output:
        png=report(fig("pairs_{method}"), caption=f"{CAPTIONS}/pairs.rst", category="8. Grad-CAM",
                   labels={"name": "Siamese pair maps, {method}"}),
        pdf=fig_pdf("pairs_{method}"),
    wildcard_constraints:
        method=METHODS_PATTERN,
    params:
        root=lambda wildcards: out("report", "figures", f"pairs_{wildcards.method}"),
        extract=out("extract"),
    log:
        logs("report", "figure_pairs_{method}"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.figures pairs --pairs {input.pairs} --extract {params.extract} --out {params.root} "
        "> {log} 2>&1"


rule report_config:
    input:
        code=code("report_config"),
    output:
        html=report(out("report", "tables", "configuration.html"), caption=f"{CAPTIONS}/configuration.rst",
                    category="9. Configuration", labels={"name": "the run's configuration"}),
        yaml=out("report", "tables", "configuration.yaml"),
    params:
        config=lambda wildcards: json.dumps(config, sort_keys=True),
    log:
        logs("report", "report_config"),
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.report_config --config {params.config:q} --out {output.yaml} --html {output.html} "
        "> {log} 2>&1"
