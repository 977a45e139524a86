# Localisation of vertebral bodies and discs: a learned localiser trained on the scans with label maps, then every
# scan localised (from its label map, from ingest's landmark table, or by the localiser), with doubtful scans flagged.
# One job per shard of scale.scans_per_shard scans (a folder each), then the merge.


rule localiser_train:
    input:
        code=code("localiser_train"),
        manifest=rules.ingest.output.manifest,
        volumes=rules.ingest.output.volumes,
        labels=rules.ingest.output.labels,
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
        model=rules.localiser_train.output.model,
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
    shell:
        "python -m stages.localise --manifest {input.manifest} --volumes {input.volumes} --labels {input.labels} "
        "--landmarks {input.landmarks} --model {input.model} --shard {params.index} "
        "--scans-per-shard {params.per_shard} --out {output.shard} --threads {threads} {params.options} > {log} 2>&1"


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
