# The downstream comparison: frozen features once per encoder, one job per (model, task, label subset, seed), and
# the results table with its summary and the label-efficiency figure of merit (stages/probe*.py, stages/features.py).
#
# A probe job's inputs are the splits tables and its encoder's features (or the array store, end to end); the label
# subset is drawn inside the job from (fraction, seed) alone. Adding a fraction or a seed to `probes` therefore adds
# jobs and re-runs only the summary: every finished job is kept. The functions these rules call are in common.smk.


rule supervised:
    input:
        code=code("supervised"),
        subjects=rules.splits.output.subjects,
        volumes=rules.splits.output.volumes,
        array=rules.extract.output.discs if PROBES["disc_input"] == "disc" else rules.extract.output.vertebrae,
    output:
        encoder=out("probes", "encoders", "supervised", "encoder.pt"),
        history=out("probes", "encoders", "supervised", "history.csv"),
    log:
        logs("probes", "supervised"),
    benchmark:
        bench("probes", "supervised")
    conda:
        ENV
    threads: config["probe_training"]["threads"]
    resources:
        mem_mb=8000,
        runtime=12 * 60,
        gpu=min(config["pretrain"]["gpus"], 1),
    params:
        size=encoder_size_flags(),
        array=supervised_array_flag(),
        options=supervised_options(),
    shell:
        "python -m stages.supervised --subjects {input.subjects} --volumes {input.volumes} "
        "{params.array} {input.array} --encoder {output.encoder} --history {output.history} {params.size} "
        "{params.options} --threads {threads} > {log} 2>&1"


rule features:
    input:
        unpack(features_inputs),
    output:
        features=out("probes", "features", "{encoder}", "features.npy"),
        meta=out("probes", "features", "{encoder}", "features.json"),
    log:
        logs("probes", "features_{encoder}"),
    benchmark:
        bench("probes", "features_{encoder}")
    wildcard_constraints:
        encoder="|".join(FROZEN),
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
    params:
        flags=features_flags,
    shell:
        "python -m stages.features {params.flags} --vertebrae {input.vertebrae} --features {output.features} "
        "--meta {output.meta} --threads {threads} > {log} 2>&1"


rule axial_features:
    input:
        unpack(axial_features_inputs),
    output:
        pooled=disc_features_file("{encoder}", "pooled.npy"),
        meta=disc_features_file("{encoder}", "features.json"),
    log:
        logs("probes", "axial_features_{encoder}"),
    benchmark:
        bench("probes", "axial_features_{encoder}")
    wildcard_constraints:
        encoder="|".join([m for m in FROZEN if axial_method(m)]) or "^$",
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=120,
        flags=runtime_flags("probe_training", "threads"),
    params:
        options=stage_options("probe_training", keys=("device",)),
        initial=lambda wildcards: initial_weights_flags(wildcards.encoder),
    shell:
        "python -m stages.axial_features --encoder {input.encoder} --axial {input.axial} {params.initial} "
        "--out-pooled {output.pooled} --out-meta {output.meta} {params.options} {resources.flags} > {log} 2>&1"


rule disc_features:
    input:
        unpack(disc_features_inputs),
    output:
        maps=disc_features_file("{encoder}", "maps.npy"),
        pooled=disc_features_file("{encoder}", "pooled.npy"),
        trunk=disc_features_file("{encoder}", "trunk.npz"),
        meta=disc_features_file("{encoder}", "features.json"),
    log:
        logs("probes", "disc_features_{encoder}"),
    benchmark:
        bench("probes", "disc_features_{encoder}")
    wildcard_constraints:
        encoder="|".join([m for m in FROZEN if not axial_method(m)]),
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
        flags=runtime_flags("probe_training", "threads"),
    params:
        flags=disc_features_flags,
        options=stage_options("probe_training", keys=("seed", "augment_views", "device") + AUGMENT_KEYS),
    shell:
        "python -m stages.disc_features {params.flags} --discs {input.discs} --out-maps {output.maps} "
        "--out-pooled {output.pooled} --out-trunk {output.trunk} --out-meta {output.meta} {params.options} "
        "{resources.flags} > {log} 2>&1"


rule probe:
    input:
        unpack(probe_inputs),
    output:
        metrics=probe_output("metrics.json"),
        predictions=probe_output("predictions.parquet"),
        model=probe_output("model.npz"),
        history=probe_output("history.csv"),
    log:
        logs("probes", "{model}_{task}_f{fraction}_seed{seed}"),
    benchmark:
        bench("probes", "{model}_{task}_f{fraction}_seed{seed}")
    wildcard_constraints:
        model="|".join(FROZEN + END_TO_END),
        task="grade|herniation|level",
        fraction=r"[0-9.]+",
        seed=r"\d+",
    conda:
        ENV
    threads: probe_threads
    resources:
        mem_mb=4000,
        runtime=lambda wildcards: 6 * 60 if trains_network(wildcards.model) else 30,
    params:
        flags=probe_flags,
        options=probe_options,
    shell:
        "python -m stages.probe --model {wildcards.model} --task {wildcards.task} --fraction {wildcards.fraction} "
        "--subset-seed {wildcards.seed} --subjects {input.subjects} --volumes {input.volumes} {params.flags} "
        "--metrics {output.metrics} --predictions {output.predictions} --model-file {output.model} "
        "--history {output.history} {params.options} --threads {threads} > {log} 2>&1"


rule probe_summary:
    input:
        code=code("probe_summary"),
        subjects=rules.splits.output.subjects,
        metrics=probe_targets(),
        predictions=probe_targets("predictions.parquet"),
    output:
        results=out("probes", "results.parquet"),
        results_csv=out("probes", "results.csv"),
        summary=out("probes", "summary.parquet"),
        summary_csv=out("probes", "summary.csv"),
        efficiency=out("probes", "label_efficiency.csv"),
        efficiency_parquet=out("probes", "label_efficiency.parquet"),
        efficiency_json=out("probes", "label_efficiency.json"),
        efficiency_differences=out("probes", "label_efficiency_differences.parquet"),
        efficiency_differences_csv=out("probes", "label_efficiency_differences.csv"),
        subsets=out("probes", "subsets.parquet"),
        subsets_csv=out("probes", "subsets.csv"),
        predictions=out("probes", "predictions.parquet"),
    log:
        logs("probes", "summary"),
    benchmark:
        bench("probes", "summary")
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        models=" ".join(FROZEN + END_TO_END),
        options=stage_options(
            "probes", keys=("tasks", "label_fractions", "seeds", "bootstrap", "ci_level", "match_margin")
        ),
        probe_seed=config["probe_training"]["seed"],
    shell:
        "python -m stages.probe_summary --metrics {input.metrics} --predictions {input.predictions} "
        "--subjects {input.subjects} --results {output.results} --summary {output.summary} "
        "--efficiency {output.efficiency} --efficiency-differences {output.efficiency_differences} "
        "--subsets {output.subsets} --all-predictions {output.predictions} "
        "--models {params.models} --probe-seed {params.probe_seed} {params.options} > {log} 2>&1"
