# Ingest: the archive (the demo's, the user's DICOM, or a NIfTI/MetaImage cohort) -> pseudonymised volumes, a scan
# manifest, and the accounting. The same outputs whatever the source, so later stages never ask. A checkpoint: the
# number of scans in its manifest decides how many shard jobs localise and extract run (scale.scans_per_shard).
# A DICOM archive (and the demo's) is ingested in shards: a plan (a checkpoint: it splits the archive by subject),
# one job per shard, and the merge (`ingest`). A volumes table is one job.


if ingest_stage() == "ingest":

    checkpoint ingest_plan:
        input:
            unpack(ingest_plan_inputs),
            code=code("ingest"),
        output:
            plan=out("ingest", "plan", "plan.parquet"),
            summary=out("ingest", "plan", "plan.json"),
        params:
            root=out("ingest", "plan"),
            inputs=ingest_flags,
            per_shard=config["scale"]["scans_per_shard"],
        log:
            logs("ingest", "ingest_plan"),
        benchmark:
            bench("ingest", "ingest_plan")
        threads: 8
        resources:
            mem_mb=lambda wildcards, threads: 1500 + 500 * threads,
            runtime=120,
        conda:
            ENV
        shell:
            "{PYTHON} -m stages.ingest {params.inputs} --make-plan --plan {params.root} "
            "--scans-per-shard {params.per_shard} --threads {threads} > {log} 2>&1"

    rule ingest_shard:
        input:
            unpack(ingest_shard_inputs),
            code=code("ingest"),
            plan=rules.ingest_plan.output.plan,
        output:
            shard=temp(directory(out("ingest", "shards", "{shard}"))),
        wildcard_constraints:
            shard=r"\d{4}",
        params:
            inputs=ingest_flags,
            plan=out("ingest", "plan"),
            index=lambda wildcards: int(wildcards.shard),
            options=lambda wildcards: section_options(config["ingest"]),
        log:
            logs("ingest", "ingest_shard_{shard}"),
        benchmark:
            bench("ingest", "ingest_shard_{shard}")
        threads: 8
        resources:
            mem_mb=lambda wildcards, threads: 1500 + 500 * threads,
            runtime=120,
        conda:
            ENV
        shell:
            "{PYTHON} -m stages.ingest {params.inputs} --plan {params.plan} --shard {params.index} --out {output.shard} "
            "--threads {threads} {params.options} > {log} 2>&1"

    checkpoint ingest:
        input:
            unpack(ingest_merge_inputs),
            code=code("ingest"),
            plan=rules.ingest_plan.output.plan,
            shards=ingest_shard_dirs,
        output:
            volumes=directory(out("ingest", "volumes")),
            labels=directory(out("ingest", "labels")),
            manifest=out("ingest", "manifest.parquet"),
            manifest_csv=out("ingest", "manifest.csv"),
            files=out("ingest", "files.parquet"),
            files_csv=out("ingest", "files.csv"),
            series=out("ingest", "series.csv"),
            gradings=out("ingest", "gradings.parquet"),
            subjects=out("ingest", "subjects.parquet"),
            landmarks=out("ingest", "landmarks.parquet"),
            landmark_rows=out("ingest", "landmark_rows.csv"),
            summary=out("ingest", "summary.json"),
        params:
            root=out("ingest"),
            inputs=ingest_flags,
            dicom=lambda wildcards: ingest_inputs(wildcards)["dicom"],
            plan=out("ingest", "plan"),
        log:
            logs("ingest", "ingest"),
        benchmark:
            bench("ingest", "ingest")
        threads: 1
        resources:
            mem_mb=2000,
            runtime=60,
        conda:
            ENV
        shell:
            "{PYTHON} -m stages.ingest --dicom-dir {params.dicom} {params.inputs} --merge {input.shards} --plan {params.plan} "
            "--out {params.root} > {log} 2>&1"

else:

    checkpoint ingest:
        input:
            unpack(ingest_inputs),
            code=code(ingest_stage()),
        output:
            volumes=directory(out("ingest", "volumes")),
            labels=directory(out("ingest", "labels")),
            manifest=out("ingest", "manifest.parquet"),
            manifest_csv=out("ingest", "manifest.csv"),
            files=out("ingest", "files.parquet"),
            files_csv=out("ingest", "files.csv"),
            series=out("ingest", "series.csv"),
            gradings=out("ingest", "gradings.parquet"),
            subjects=out("ingest", "subjects.parquet"),
            landmarks=out("ingest", "landmarks.parquet"),
            landmark_rows=out("ingest", "landmark_rows.csv"),
            summary=out("ingest", "summary.json"),
        params:
            root=out("ingest"),
            inputs=ingest_flags,
            stage=ingest_stage(),
            options=lambda wildcards: section_options(config["ingest"]) if ingest_stage() == "ingest" else "",
        log:
            logs("ingest", "ingest"),
        benchmark:
            bench("ingest", "ingest")
        threads: 8
        resources:
            mem_mb=lambda wildcards, threads: 1500 + 500 * threads,
            runtime=120,
        conda:
            ENV
        shell:
            "{PYTHON} -m stages.{params.stage} {params.inputs} --out {params.root} --threads {threads} {params.options} "
            "> {log} 2>&1"
