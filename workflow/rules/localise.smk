# Localisation of vertebral bodies and discs: every scan localised (from its label map, from ingest's landmark table,
# or by the learned localiser), with doubtful scans flagged. The localiser is localise.model: the built-in weights
# shipped in stages/anatomy/weights, one trained on the cohort's scans with label maps (cohort), or a file.
# One job per shard of scale.scans_per_shard scans (a folder each), then the merge.

check_localiser_model()


rule localiser_train:
    input:
        code=code("localiser_train"),
        manifest=rules.ingest.output.manifest,
        volumes=rules.ingest.output.volumes,
        labels=rules.ingest.output.labels,
        start=BUILTIN_LOCALISER if config["localise"]["start_from_builtin"] else [],
    output:
        model=out("localise", "model", "localiser.pt"),
        history=out("localise", "model", "training.csv"),
        scans=out("localise", "model", "training_scans.csv"),
    log:
        logs("localise", "localiser_train"),
    benchmark:
        bench("localise", "localiser_train")
    conda:
        ENV
    threads: 4
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        options=stage_options("localise"),
    shell:
        "python -m stages.localiser_train --manifest {input.manifest} --volumes {input.volumes} "
        "--labels {input.labels} --threads {threads} {params.options} --out-model {output.model} "
        "--out-history {output.history} --out-scans {output.scans} > {log} 2>&1"


rule localise_shard:
    input:
        code=code("localise"),
        manifest=rules.ingest.output.manifest,
        volumes=rules.ingest.output.volumes,
        labels=rules.ingest.output.labels,
        landmarks=rules.ingest.output.landmarks,
        model=localiser_weights,
    output:
        shard=temp(directory(out("localise", "shards", "{shard}"))),
    log:
        logs("localise", "localise_shard_{shard}"),
    benchmark:
        bench("localise", "localise_shard_{shard}")
    wildcard_constraints:
        shard=r"\d{4}",
    conda:
        ENV
    threads: 8
    resources:
        mem_mb=lambda wildcards, threads: 1000 + 500 * threads,
        runtime=60,
    params:
        index=lambda wildcards: int(wildcards.shard),
        per_shard=config["scale"]["scans_per_shard"],
        # The trained model carries the network's settings; this stage reads which label maps to withhold.
        options=stage_options("localise", keys=("withhold_label_fraction", "seed")),
        # cohort.label_scheme, as ingest is given it: a label map is expected to hold only the levels its scheme can
        # name (SPIDER's masks have no S1). Empty for VerSe and the demo.
        label_scheme=LABEL_SCHEME,
    shell:
        "python -m stages.localise --manifest {input.manifest} --volumes {input.volumes} --labels {input.labels} "
        "--landmarks {input.landmarks} --weights {input.model} --shard {params.index} "
        "--scans-per-shard {params.per_shard} --out {output.shard} --threads {threads} {params.options} "
        "{params.label_scheme} > {log} 2>&1"


rule localise:
    input:
        code=code("localise"),
        shards=lambda wildcards: shard_dirs("localise"),
    output:
        structures=out("localise", "structures.parquet"),
        structures_csv=out("localise", "structures.csv"),
        flags=out("localise", "flags.csv"),
        evaluation=out("localise", "evaluation.csv"),
        summary=out("localise", "evaluation.json"),
    log:
        logs("localise", "localise"),
    benchmark:
        bench("localise", "localise")
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "python -m stages.localise --merge {input.shards} --out-structures {output.structures} "
        "--out-flags {output.flags} --out-evaluation {output.evaluation} --out-summary {output.summary} > {log} 2>&1"
