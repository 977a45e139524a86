# Localisation of vertebral bodies and discs: a learned localiser trained on the scans with label maps, then every
# scan localised (from its label map, or by the localiser), with doubtful scans flagged.


rule localiser_train:
    input:
        code=code("localiser_train"),
        manifest=rules.ingest.output.manifest,
        labels=rules.ingest.output.labels,
    output:
        model=out("localise", "model", "localiser.pt"),
        history=out("localise", "model", "training.csv"),
        scans=out("localise", "model", "training_scans.csv"),
    params:
        ingest=out("ingest"),
        root=out("localise", "model"),
        options=lambda wildcards: section_options(config["localise"]),
    log:
        logs("localise", "localiser_train"),
    benchmark:
        bench("localise", "localiser_train")
    threads: 4
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.localiser_train --ingest {params.ingest} --out {params.root} --threads {threads} "
        "{params.options} > {log} 2>&1"


rule localise_shard:
    input:
        code=code("localise"),
        manifest=rules.ingest.output.manifest,
        labels=rules.ingest.output.labels,
        landmarks=rules.ingest.output.landmarks,
        model=rules.localiser_train.output.model,
    output:
        structures=temp(out("localise", "shards", "{shard}", "structures.parquet")),
        structures_csv=temp(out("localise", "shards", "{shard}", "structures.csv")),
        flags=temp(out("localise", "shards", "{shard}", "flags.csv")),
        evaluation=temp(out("localise", "shards", "{shard}", "evaluation.csv")),
        summary=temp(out("localise", "shards", "{shard}", "evaluation.json")),
    wildcard_constraints:
        shard=r"\d{4}",
    params:
        ingest=out("ingest"),
        root=lambda wildcards: out("localise", "shards", wildcards.shard),
        shard=lambda wildcards: int(wildcards.shard),
        per_shard=config["scale"]["scans_per_shard"],
        options=lambda wildcards: section_options(config["localise"]),
    log:
        logs("localise", "localise_shard_{shard}"),
    benchmark:
        bench("localise", "localise_shard_{shard}")
    threads: 8
    resources:
        mem_mb=lambda wildcards, threads: 1000 + 500 * threads,
        runtime=60,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.localise --ingest {params.ingest} --model {input.model} --out {params.root} "
        "--shard {params.shard} --scans-per-shard {params.per_shard} --threads {threads} {params.options} > {log} 2>&1"


rule localise:
    input:
        code=code("localise"),
        shards=lambda wildcards: shard_files("localise", "evaluation.json"),
        tables=lambda wildcards: shard_files("localise", "structures.parquet") + shard_files("localise", "flags.csv")
        + shard_files("localise", "evaluation.csv"),
    output:
        structures=out("localise", "structures.parquet"),
        structures_csv=out("localise", "structures.csv"),
        flags=out("localise", "flags.csv"),
        evaluation=out("localise", "evaluation.csv"),
        summary=out("localise", "evaluation.json"),
    params:
        shards=lambda wildcards, input: " ".join(os.path.dirname(p) for p in input.shards),
        root=out("localise"),
    log:
        logs("localise", "localise"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.localise --merge {params.shards} --out {params.root} > {log} 2>&1"
