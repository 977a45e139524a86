# Ingest: the archive (the demo's, the user's DICOM, or a NIfTI/MetaImage cohort) -> pseudonymised volumes, a scan
# manifest, and the accounting. The same outputs whatever the source, so later stages never ask. A checkpoint: the
# number of scans in its manifest decides how many shard jobs localise and extract run (scale.scans_per_shard).
# A DICOM archive (and the demo's) is ingested in shards: a plan (a checkpoint: it splits the archive by subject),
# one job per shard (a folder each), and the merge (`ingest`). A volumes table is one job. The DICOM ingest also keeps
# each study's second series (ingest.second_series: its axial T2) in second/ and second_series.parquet.


if ingest_stage() == "ingest":

    checkpoint ingest_plan:
        input:
            unpack(ingest_plan_inputs),
            code=code("ingest"),
        output:
            plan=out("ingest", "plan", "plan.parquet"),
            summary=out("ingest", "plan", "plan.json"),
        log:
            logs("ingest", "ingest_plan"),
        benchmark:
            bench("ingest", "ingest_plan")
        conda:
            ENV
        threads: 8
        resources:
            mem_mb=lambda wildcards, threads: 1500 + 500 * threads,
            runtime=120,
        params:
            inputs=ingest_flags,
            per_shard=config["scale"]["scans_per_shard"],
        shell:
            "python -m stages.ingest {params.inputs} --scans-per-shard {params.per_shard} --out-plan {output.plan} "
            "--out-plan-summary {output.summary} --threads {threads} > {log} 2>&1"

    rule ingest_shard:
        input:
            unpack(ingest_shard_inputs),
            code=code("ingest"),
            plan=rules.ingest_plan.output.plan,
        output:
            shard=temp(directory(out("ingest", "shards", "{shard}"))),
        log:
            logs("ingest", "ingest_shard_{shard}"),
        benchmark:
            bench("ingest", "ingest_shard_{shard}")
        wildcard_constraints:
            shard=r"\d{4}",
        conda:
            ENV
        threads: 8
        resources:
            mem_mb=lambda wildcards, threads: 1500 + 500 * threads,
            runtime=120,
        params:
            inputs=ingest_flags,
            index=lambda wildcards: int(wildcards.shard),
            options=stage_options("ingest"),
        shell:
            "python -m stages.ingest {params.inputs} --plan {input.plan} --shard {params.index} --out {output.shard} "
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
            gradings_csv=out("ingest", "gradings.csv"),
            subjects=out("ingest", "subjects.parquet"),
            subjects_csv=out("ingest", "subjects.csv"),
            landmarks=out("ingest", "landmarks.parquet"),
            landmarks_csv=out("ingest", "landmarks.csv"),
            landmark_rows=out("ingest", "landmark_rows.csv"),
            summary=out("ingest", "summary.json"),
            second_volumes=directory(out("ingest", "second")),
            second_series=out("ingest", "second_series.parquet"),
            second_series_csv=out("ingest", "second_series.csv"),
        log:
            logs("ingest", "ingest"),
        benchmark:
            bench("ingest", "ingest")
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=2000,
            runtime=60,
        params:
            inputs=ingest_flags,
        shell:
            "python -m stages.ingest {params.inputs} --plan {input.plan} --merge {input.shards} "
            "--out-volumes {output.volumes} --out-labels {output.labels} --out-manifest {output.manifest} "
            "--out-files {output.files} --out-series {output.series} --out-gradings {output.gradings} "
            "--out-subjects {output.subjects} --out-landmarks {output.landmarks} "
            "--out-landmark-rows {output.landmark_rows} --out-summary {output.summary} "
            "--out-second-volumes {output.second_volumes} --out-second-series {output.second_series} > {log} 2>&1"

else:

    checkpoint ingest:
        input:
            unpack(ingest_inputs),
            code=code("ingest_volumes"),
        output:
            volumes=directory(out("ingest", "volumes")),
            labels=directory(out("ingest", "labels")),
            manifest=out("ingest", "manifest.parquet"),
            manifest_csv=out("ingest", "manifest.csv"),
            files=out("ingest", "files.parquet"),
            files_csv=out("ingest", "files.csv"),
            series=out("ingest", "series.csv"),
            gradings=out("ingest", "gradings.parquet"),
            gradings_csv=out("ingest", "gradings.csv"),
            subjects=out("ingest", "subjects.parquet"),
            subjects_csv=out("ingest", "subjects.csv"),
            landmarks=out("ingest", "landmarks.parquet"),
            landmarks_csv=out("ingest", "landmarks.csv"),
            landmark_rows=out("ingest", "landmark_rows.csv"),
            summary=out("ingest", "summary.json"),
        log:
            logs("ingest", "ingest"),
        benchmark:
            bench("ingest", "ingest")
        conda:
            ENV
        threads: 8
        resources:
            mem_mb=lambda wildcards, threads: 1500 + 500 * threads,
            runtime=120,
        params:
            inputs=ingest_flags,
        shell:
            "python -m stages.ingest_volumes {params.inputs} --threads {threads} "
            "--out-volumes {output.volumes} --out-labels {output.labels} --out-manifest {output.manifest} "
            "--out-files {output.files} --out-series {output.series} --out-gradings {output.gradings} "
            "--out-subjects {output.subjects} --out-landmarks {output.landmarks} "
            "--out-landmark-rows {output.landmark_rows} --out-summary {output.summary} > {log} 2>&1"
