# Extraction: the vertebral-body and disc volumes (and axial disc slices) of every unflagged scan, in an array store.


rule extract_shard:
    input:
        code=code("extract"),
        manifest=rules.ingest.output.manifest,
        volumes=rules.ingest.output.volumes,
        structures=rules.localise.output.structures,
        flags=rules.localise.output.flags,
    output:
        vertebrae=temp(out("extract", "shards", "{shard}", "vertebrae.npy")),
        discs=temp(out("extract", "shards", "{shard}", "discs.npy")),
        axial=temp(out("extract", "shards", "{shard}", "axial.npy")),
        index=temp(out("extract", "shards", "{shard}", "index.parquet")),
        index_csv=temp(out("extract", "shards", "{shard}", "index.csv")),
    wildcard_constraints:
        shard=r"\d{4}",
    params:
        ingest=out("ingest"),
        localise=out("localise"),
        root=lambda wildcards: out("extract", "shards", wildcards.shard),
        shard=lambda wildcards: int(wildcards.shard),
        per_shard=config["scale"]["scans_per_shard"],
        options=lambda wildcards: section_options(config["extract"]),
    log:
        logs("extract", "extract_shard_{shard}"),
    benchmark:
        bench("extract", "extract_shard_{shard}")
    threads: 8
    resources:
        mem_mb=lambda wildcards, threads: 1000 + 700 * threads,
        runtime=120,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.extract --ingest {params.ingest} --localise {params.localise} --out {params.root} "
        "--shard {params.shard} --scans-per-shard {params.per_shard} --threads {threads} {params.options} > {log} 2>&1"


rule extract:
    input:
        code=code("extract"),
        index=lambda wildcards: shard_files("extract", "index.parquet"),
        arrays=lambda wildcards: [f for name in ("vertebrae", "discs", "axial")
                                  for f in shard_files("extract", f"{name}.npy")],
    output:
        vertebrae=out("extract", "vertebrae.npy"),
        discs=out("extract", "discs.npy"),
        axial=out("extract", "axial.npy"),
        index=out("extract", "index.parquet"),
        index_csv=out("extract", "index.csv"),
    params:
        shards=lambda wildcards, input: " ".join(os.path.dirname(p) for p in input.index),
        root=out("extract"),
    log:
        logs("extract", "extract"),
    benchmark:
        bench("extract", "extract")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.extract --merge {params.shards} --out {params.root} > {log} 2>&1"


rule extract_qc:
    input:
        code=code("extract_qc"),
        manifest=rules.ingest.output.manifest,
        structures=rules.localise.output.structures,
        flags=rules.localise.output.flags,
        index=rules.extract.output.index,
        vertebrae=rules.extract.output.vertebrae,
        discs=rules.extract.output.discs,
        axial=rules.extract.output.axial,
    output:
        localisation=report(out("extract", "qc", "localisation.png"), caption="../report/localisation_qc.rst",
                            category="2. Localisation and extraction", labels={"name": "localisation QC"}),
        gallery=report(out("extract", "qc", "gallery.png"), caption="../report/extraction_gallery.rst",
                       category="2. Localisation and extraction", labels={"name": "extracted volumes"}),
    params:
        ingest=out("ingest"),
        localise=out("localise"),
        extract=out("extract"),
        scans=config["extract"]["qc_scans"],
    log:
        logs("extract", "extract_qc"),
    benchmark:
        bench("extract", "extract_qc")
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.extract_qc --ingest {params.ingest} --localise {params.localise} --extract {params.extract} "
        "--scans {params.scans} --out-localisation {output.localisation} --out-gallery {output.gallery} > {log} 2>&1"
