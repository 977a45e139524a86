# The downstream comparison: frozen features once per encoder, one job per (model, task, label subset, seed), and
# the results table with its summary and the label-efficiency figure of merit (stages/probe*.py, stages/features.py).
#
# A probe job's inputs are the splits tables and its encoder's features (or the array store, end to end); the label
# subset is drawn inside the job from (fraction, seed) alone. Adding a fraction or a seed to `probes` therefore adds
# jobs and re-runs only the summary: every finished job is kept.

def encoder_file(name):
    """encoder.pt of a pretrained method or of the supervised-transfer encoder."""
    if name == "supervised":
        return out("probes", "encoders", "supervised", "encoder.pt")
    return out("pretrain", name, "encoder.pt")


def features_inputs(wildcards):
    inputs = {"code": code("features"), "vertebrae": rules.extract.output.vertebrae}
    if wildcards.encoder != "random":
        inputs["encoder"] = encoder_file(wildcards.encoder)
    return inputs


def features_flags(wildcards, input):
    if wildcards.encoder == "random":
        p = config["pretrain"]
        return f"--random --seed {p['seed']} --width {p['width']} --embedding-dim {p['embedding_dim']}"
    return f"--encoder {input.encoder}"


def probe_inputs(wildcards):
    inputs = {"code": code("probe"),
              "subjects": rules.splits.output.subjects, "volumes": rules.splits.output.volumes}
    model = wildcards.model
    if model in END_TO_END:
        inputs["vertebrae"] = rules.extract.output.vertebrae
        if model.endswith("-finetune"):
            inputs["encoder"] = encoder_file(model.removesuffix("-finetune"))
    else:
        inputs["features"] = out("probes", "features", model, "features.npy")
    return inputs


# The probe_training keys each kind of job reads: a change to the end-to-end settings re-runs no frozen job.
HEAD_KEYS = ("seed", "heads", "linear_c", "cv_folds", "mlp_hidden", "mlp_alpha", "max_iter")
NETWORK_KEYS = ("seed", "epochs", "patience", "batch_size", "learning_rate", "weight_decay", "device")


def probe_options(wildcards):
    keys = NETWORK_KEYS if wildcards.model in END_TO_END else HEAD_KEYS
    return section_options({k: config["probe_training"][k] for k in keys})


def probe_flags(wildcards, input):
    if wildcards.model in END_TO_END:
        p = config["pretrain"]
        flags = f"--end-to-end --extract {out('extract')} --width {p['width']} --embedding-dim {p['embedding_dim']}"
        return flags + (f" --encoder {input.encoder}" if "encoder" in input.keys() else "")
    return f"--features {os.path.dirname(input.features)}"


rule supervised:
    input:
        code=code("supervised"),
        subjects=rules.splits.output.subjects,
        volumes=rules.splits.output.volumes,
        vertebrae=rules.extract.output.vertebrae,
    output:
        encoder=out("probes", "encoders", "supervised", "encoder.pt"),
        history=out("probes", "encoders", "supervised", "history.csv"),
    params:
        splits=out("splits"),
        extract=out("extract"),
        root=out("probes", "encoders", "supervised"),
        size=f"--width {config['pretrain']['width']} --embedding-dim {config['pretrain']['embedding_dim']}",
        options=lambda wildcards: section_options(config["probe_training"]),
    log:
        logs("probes", "supervised"),
    benchmark:
        bench("probes", "supervised")
    threads: config["probe_training"]["threads"]
    resources:
        mem_mb=8000,
        runtime=12 * 60,
        gpu=min(config["pretrain"]["gpus"], 1),
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.supervised --splits {params.splits} --extract {params.extract} --out {params.root} "
        "{params.size} {params.options} --threads {threads} > {log} 2>&1"


rule features:
    input:
        unpack(features_inputs),
    output:
        features=out("probes", "features", "{encoder}", "features.npy"),
        meta=out("probes", "features", "{encoder}", "features.json"),
    wildcard_constraints:
        encoder="|".join(FROZEN),
    params:
        extract=out("extract"),
        root=lambda wildcards: out("probes", "features", wildcards.encoder),
        flags=features_flags,
    log:
        logs("probes", "features_{encoder}"),
    benchmark:
        bench("probes", "features_{encoder}")
    threads: 2
    resources:
        mem_mb=4000,
        runtime=120,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.features {params.flags} --extract {params.extract} --out {params.root} "
        "--threads {threads} > {log} 2>&1"


rule probe:
    input:
        unpack(probe_inputs),
    output:
        metrics=out("probes", "runs", "{model}", "{task}", "f{fraction}", "seed{seed}", "metrics.json"),
        predictions=out("probes", "runs", "{model}", "{task}", "f{fraction}", "seed{seed}", "predictions.parquet"),
        model=out("probes", "runs", "{model}", "{task}", "f{fraction}", "seed{seed}", "model.npz"),
    wildcard_constraints:
        model="|".join(FROZEN + END_TO_END),
        task="grade|herniation|level",
        fraction=r"[0-9.]+",
        seed=r"\d+",
    params:
        splits=out("splits"),
        root=lambda wildcards, output: os.path.dirname(output.metrics),
        flags=probe_flags,
        options=probe_options,
    log:
        logs("probes", "{model}_{task}_f{fraction}_seed{seed}"),
    benchmark:
        bench("probes", "{model}_{task}_f{fraction}_seed{seed}")
    threads: lambda wildcards: config["probe_training"]["threads"] if wildcards.model in END_TO_END else 1
    resources:
        mem_mb=4000,
        runtime=lambda wildcards: 6 * 60 if wildcards.model in END_TO_END else 30,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.probe --model {wildcards.model} --task {wildcards.task} --fraction {wildcards.fraction} "
        "--subset-seed {wildcards.seed} --splits {params.splits} --out {params.root} {params.flags} "
        "{params.options} --threads {threads} > {log} 2>&1"


rule probe_summary:
    input:
        code=code("probe_summary"),
        subjects=rules.splits.output.subjects,
        runs=probe_targets(),
    output:
        results=out("probes", "results.parquet"),
        summary=out("probes", "summary.parquet"),
        efficiency=out("probes", "label_efficiency.csv"),
        subsets=out("probes", "subsets.parquet"),
        predictions=out("probes", "predictions.parquet"),
    params:
        runs=out("probes", "runs"),
        splits=out("splits"),
        root=out("probes"),
        models=" ".join(FROZEN + END_TO_END),
        options=lambda wildcards: section_options(config["probes"]),
        probe_seed=config["probe_training"]["seed"],
    log:
        logs("probes", "summary"),
    benchmark:
        bench("probes", "summary")
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        ENV
    shell:
        "{PYTHON} -m stages.probe_summary --runs {params.runs} --splits {params.splits} --out {params.root} "
        "--models {params.models} --probe-seed {params.probe_seed} {params.options} > {log} 2>&1"
