# Extraction: the vertebral-body and disc volumes (and axial disc slices) of every unflagged scan, in an array store.
# One job per shard of scale.scans_per_shard scans (a folder each), then the merge.


rule extract_shard:
    input:
        code=code("extract"),
        manifest=rules.ingest.output.manifest,
        volumes=rules.ingest.output.volumes,
        structures=rules.localise.output.structures,
        flags=rules.localise.output.flags,
    output:
        shard=temp(directory(out("extract", "shards", "{shard}"))),
    log:
        logs("extract", "extract_shard_{shard}"),
    benchmark:
        bench("extract", "extract_shard_{shard}")
    wildcard_constraints:
        shard=r"\d{4}",
    conda:
        ENV
    threads: 8
    resources:
        mem_mb=lambda wildcards, threads: 1000 + 700 * threads,
        runtime=120,
    params:
        index=lambda wildcards: int(wildcards.shard),
        per_shard=config["scale"]["scans_per_shard"],
        options=stage_options("extract"),
    shell:
        "python -m stages.extract --manifest {input.manifest} --volumes {input.volumes} "
        "--structures {input.structures} --flags {input.flags} --shard {params.index} "
        "--scans-per-shard {params.per_shard} --out {output.shard} --threads {threads} {params.options} > {log} 2>&1"


rule extract:
    input:
        code=code("extract"),
        shards=lambda wildcards: shard_dirs("extract"),
    output:
        vertebrae=out("extract", "vertebrae.npy"),
        discs=out("extract", "discs.npy"),
        axial=out("extract", "axial.npy"),
        index=out("extract", "index.parquet"),
        index_csv=out("extract", "index.csv"),
    log:
        logs("extract", "extract"),
    benchmark:
        bench("extract", "extract")
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    shell:
        "python -m stages.extract --merge {input.shards} --out-vertebrae {output.vertebrae} "
        "--out-discs {output.discs} --out-axial {output.axial} --out-index {output.index} > {log} 2>&1"


rule extract_qc:
    input:
        code=code("extract_qc"),
        manifest=rules.ingest.output.manifest,
        volumes=rules.ingest.output.volumes,
        structures=rules.localise.output.structures,
        flags=rules.localise.output.flags,
        index=rules.extract.output.index,
        vertebrae=rules.extract.output.vertebrae,
        discs=rules.extract.output.discs,
        axial=rules.extract.output.axial,
    output:
        localisation=report(
            out("extract", "qc", "localisation.png"),
            caption="../report/localisation_qc.rst",
            category="2. Localisation and extraction",
            labels={"name": "localisation QC"},
        ),
        gallery=report(
            out("extract", "qc", "gallery.png"),
            caption="../report/extraction_gallery.rst",
            category="2. Localisation and extraction",
            labels={"name": "extracted volumes"},
        ),
    log:
        logs("extract", "extract_qc"),
    benchmark:
        bench("extract", "extract_qc")
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
        flags=runtime_flags("extract", "qc_scans"),
    shell:
        "python -m stages.extract_qc --manifest {input.manifest} --volumes {input.volumes} "
        "--structures {input.structures} --flags {input.flags} --index {input.index} --vertebrae {input.vertebrae} "
        "--discs {input.discs} --axial {input.axial} {resources.flags} --out-localisation {output.localisation} "
        "--out-gallery {output.gallery} > {log} 2>&1"
