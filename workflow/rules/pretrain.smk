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
        method=PRETRAIN_PATTERN,
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


# One step of a curriculum (curricula.runs): the step's method, started from the previous step's encoder, its learning
# rate searched first (curricula.lr_candidates; the search's table beside it).
rule curriculum_step:
    input:
        code=code("pretrain"),
        pairs=rules.splits.output.pairs,
        volumes=rules.splits.output.volumes,
        array=pretrain_array(),
        init=curriculum_init,
        order=step_order,
    output:
        encoder=step_output("{curriculum}", "{step}", "encoder.pt"),
        checkpoint=step_output("{curriculum}", "{step}", "checkpoint.pt"),
        metrics=step_output("{curriculum}", "{step}", "metrics.csv"),
        run_config=step_output("{curriculum}", "{step}", "run_config.yaml"),
        search=step_output("{curriculum}", "{step}", "lr_search.csv"),
    log:
        logs("pretrain", "{curriculum}_step{step}"),
    benchmark:
        bench("pretrain", "{curriculum}_step{step}")
    wildcard_constraints:
        curriculum=CURRICULA_PATTERN,
        step=r"\d+",
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
        method=step_method,
        step=step_options,
    shell:
        "python {params.ddp} -m stages.pretrain {params.method} --pairs {input.pairs} "
        "--volumes {input.volumes} --array {input.array} --encoder {output.encoder} "
        "--checkpoint {output.checkpoint} --metrics {output.metrics} --run-config {output.run_config} "
        "--search-table {output.search} {params.options} {params.step} {resources.flags} --threads {threads} "
        "> {log} 2>&1"


# A curriculum's encoder: its last step's, under the curriculum's name (what every downstream rule reads).
rule curriculum:
    input:
        encoder=lambda w: step_output(w.curriculum, CURRICULUM_STEPS[w.curriculum], "encoder.pt"),
        checkpoint=lambda w: step_output(w.curriculum, CURRICULUM_STEPS[w.curriculum], "checkpoint.pt"),
        metrics=lambda w: step_output(w.curriculum, CURRICULUM_STEPS[w.curriculum], "metrics.csv"),
        run_config=lambda w: step_output(w.curriculum, CURRICULUM_STEPS[w.curriculum], "run_config.yaml"),
    output:
        encoder=out("pretrain", "{curriculum}", "encoder.pt"),
        checkpoint=out("pretrain", "{curriculum}", "checkpoint.pt"),
        metrics=out("pretrain", "{curriculum}", "metrics.csv"),
        run_config=out("pretrain", "{curriculum}", "run_config.yaml"),
    log:
        logs("pretrain", "{curriculum}"),
    wildcard_constraints:
        curriculum=CURRICULA_PATTERN,
    localrule: True
    conda:
        ENV
    shell:
        "(cp -v {input.encoder} {output.encoder} && cp -v {input.checkpoint} {output.checkpoint} && "
        "cp -v {input.metrics} {output.metrics} && cp -v {input.run_config} {output.run_config}) > {log} 2>&1"


# The orderings C, AC and MC of curricula.orderings.tasks, from those tasks' own probe results.
rule curriculum_order:
    input:
        code=code("curriculum_order"),
        metrics=ordering_metrics,
    output:
        json=out("pretrain", "orderings.json"),
        csv=out("pretrain", "orderings.csv"),
    log:
        logs("pretrain", "curriculum_order"),
    benchmark:
        bench("pretrain", "curriculum_order")
    conda:
        ENV
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        options=f"--tasks {' '.join(ORDERING['tasks'])} --probe-task {ORDERING['task']} --head {ORDERING['head']}",
    shell:
        "python -m stages.curriculum_order {params.options} --metrics {input.metrics} --out-json {output.json} "
        "--out-csv {output.csv} > {log} 2>&1"


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
