# Self-supervised pretraining, one job per method in `pretrain.methods`, and each model's pretext evaluation.
#
# The rolling checkpoint (results/pretrain/{method}/resume/last.pt) is deliberately not a declared output: Snakemake
# deletes a failed job's outputs (and restores `update()` outputs to their state before the job), which would throw
# away the progress of a killed or timed-out run. Left undeclared, it survives a failed or killed job, and the re-run
# job resumes from it; the stage deletes it once the run completes (its content is then in checkpoint.pt).


rule pretrain:
    input:
        code=code("pretrain"),
        pairs=rules.splits.output.pairs,
        volumes=pretrain_volumes,
        array=pretrain_array,
    output:
        encoder=out("pretrain", "{method}", "encoder.pt"),
        checkpoint=out("pretrain", "{method}", "checkpoint.pt"),
        metrics=out("pretrain", "{method}", "metrics.csv"),
        run_config=out("pretrain", "{method}", "run_config.yaml"),
    log:
        logs("pretrain", "{method}"),
    benchmark:
        bench("pretrain", "{method}")
    wildcard_constraints:
        method=METHODS_PATTERN,
    conda:
        ENV
    threads: config["pretrain"]["threads"]
    resources:
        mem_mb=8000,
        runtime=24 * 60,
        gpu=config["pretrain"]["gpus"],
        flags=runtime_flags("pretrain", "prefetch", "eval_batch_size", "checkpoint_every"),
    params:
        ddp=ddp_launcher(),
        options=stage_options("pretrain", skip=("methods",)),
        method=method_options,
    shell:
        "python {params.ddp} -m stages.pretrain --method {wildcards.method} --pairs {input.pairs} "
        "--volumes {input.volumes} --array {input.array} --encoder {output.encoder} "
        "--checkpoint {output.checkpoint} --metrics {output.metrics} --run-config {output.run_config} "
        "{params.options} {params.method} {resources.flags} --threads {threads} > {log} 2>&1"


rule pretext_eval:
    input:
        code=code("pretext_eval"),
        checkpoint=rules.pretrain.output.checkpoint,
        pairs=rules.splits.output.pairs,
        volumes=pretrain_volumes,
        array=pretrain_array,
    output:
        evaluation=out("pretrain", "{method}", "pretext", "evaluation.json"),
        distances=out("pretrain", "{method}", "pretext", "distances.parquet"),
        distances_csv=out("pretrain", "{method}", "pretext", "distances.csv"),
    log:
        logs("pretext_eval", "{method}"),
    benchmark:
        bench("pretext_eval", "{method}")
    wildcard_constraints:
        method=METHODS_PATTERN,
    conda:
        ENV
    threads: 2
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "python -m stages.pretext_eval --checkpoint {input.checkpoint} --pairs {input.pairs} "
        "--volumes {input.volumes} --array {input.array} --evaluation {output.evaluation} "
        "--scores {output.distances} --scores-csv {output.distances_csv} --threads {threads} > {log} 2>&1"
