# Path builders and input functions of the report's rules (workflow/rules/report.smk).

REPORTS = config["reports"]
# The probe job each report figure of a model reads: the Grad-CAM task (or the first disc task), every label, seed 0.
REPORT_TASK = (
    REPORTS["gradcam_task"]
    if REPORTS["gradcam_task"] in PROBES["tasks"]
    else next((t for t in PROBES["tasks"] if t != "level"), None)
)
# Grad-CAM needs the discs' label maps (their share of the attention); a crop-table cohort has none. The axial
# methods (simclr) are explained on their axial slices (their frozen linear probe); their baselines are not.
GRADCAM_MODELS = (
    [m for m in FROZEN + END_TO_END if not axial_method(m) or m in AXIAL_METHODS]
    if REPORTS["gradcam_task"] in PROBES["tasks"] and not CROPS
    else []
)
# The frozen encoders with disc features (disc_features; every frozen 3D encoder): the normative model of healthy discs.
DISC_ENCODERS = [m for m in FROZEN if not axial_method(m)]
# The methods whose pretext evaluation scores the test pairs of vertebral bodies (not the axial ones, not the region
# ones, not the single pretext tasks, not the generative baseline; a curriculum as its last step): their pretext test pairs are explained
# (gradcam_pairs, figure_pairs).
PAIR_METHODS = [
    m
    for m in PRETRAINED
    if last_task(m) not in AXIAL_METHODS + REGION_METHODS + TASK_METHODS + GENERATIVE_METHODS + ["ordered"]
]
# The figures' option naming the models trained end to end (they are labelled so, not by their probe head).
END_TO_END_OPTION = f"--end-to-end {' '.join(END_TO_END)}"


def fig(name, ext="png"):
    """A figure of the report: results/report/figures/{name}.{ext} (png for the HTML report, pdf for a paper)."""
    return out("report", "figures", f"{name}.{ext}")


def table(name, ext="html"):
    """A table of the report: results/report/tables/{name}.{ext} (html for the HTML report, and csv)."""
    return out("report", "tables", f"{name}.{ext}")


def curricula_table_options():
    """The curricula table's named curricula (NAME=TASK,TASK), its downstream task and probe head."""
    named = " ".join(f"{n}={','.join(s)}" for n, s in CURRICULA.items())
    task, head = ORDERING["task"], ORDERING["head"]
    return (f"--curricula {named} " if named else "") + f"--task {task} --head {head}"


def in_report(path, caption, category, label):
    """``path``, shown in the HTML report (snakemake --report) under ``category`` as ``label``, with its caption
    workflow/report/{caption}.rst."""
    return report(path, caption=f"../report/{caption}.rst", category=category, labels={"name": label})


def file_flags(wildcards, input, output):
    """Options of stages.figures naming the files of a figure's or a table's job, as its rule declares them
    (params): ``--{name} {files}`` for every named input but ``code`` and every named output (``end_to_end`` is
    ``--end-to-end``); an empty input list is left out."""
    named = [(k, v) for k, v in [*input.items(), *output.items()] if k != "code"]
    return " ".join(
        f"--{k.replace('_', '-')} " + " ".join(shlex.quote(f) for f in ([v] if isinstance(v, str) else v))
        for k, v in named
        if v
    )


def report_job(model, name):
    """File ``name`` of the probe job the report explains for ``model``: REPORT_TASK, every label, seed 0."""
    return probe_job(model, REPORT_TASK, max(PROBES["label_fractions"]), 0, name)


def training_history_inputs(kind):
    """Inputs of the training-curves figure: the supervised encoder's history, or the end-to-end probe jobs'."""
    if kind == "supervised":
        return [out("probes", "encoders", "supervised", "history.csv")] if "supervised" in PROBES["baselines"] else []
    return [report_job(m, "history.csv") for m in END_TO_END] if REPORT_TASK else []


def gradcam_on_disc():
    """Whether the Grad-CAM task's models read the disc volume (probes.disc_input: disc), not the two bodies."""
    return on_disc(REPORTS["gradcam_task"])


def gradcam_inputs(wildcards):
    """The probe job explained (its task, test samples and model), the disc masks and the volumes the model reads:
    on the disc volume discs.npy and, for a frozen encoder, its disc classifier's Conv1-Conv5 (disc_trunk.npz: the
    transfer head in model.npz is FC6-FC8 alone); on the two bodies vertebrae.npy and, for a frozen probe of a
    trained encoder, the encoder; an axial method's probe its axial slices, their masks and its encoder."""
    model = wildcards.model
    inputs = {
        "code": code("gradcam"),
        "metrics": report_job(model, "metrics.json"),
        "predictions": report_job(model, "predictions.parquet"),
        "model": report_job(model, "model.npz"),
        "masks": rules.disc_masks.output.masks,
    }
    if model in AXIAL_METHODS:
        return inputs | {
            "masks": rules.axial_masks.output.masks,
            "axial": axial_array(),
            "encoder": encoder_file(model),
        }
    if gradcam_on_disc():
        inputs["discs"] = rules.extract.output.discs
        if model in FROZEN:
            inputs["disc_trunk"] = disc_features_file(model, "trunk.npz")
        return inputs
    inputs["vertebrae"] = rules.extract.output.vertebrae
    if model in FROZEN and model != "random":
        inputs["encoder"] = encoder_file(model)
    return inputs


def gradcam_encoder_flags(wildcards, input):
    """What the explained model is rebuilt from besides its model.npz: on the disc volume the frozen encoder's
    disc_trunk.npz; on the two bodies the frozen encoder (the random one is rebuilt from its seed and size); on the
    axial slices the simclr encoder. Nothing for a model trained end to end."""
    if "disc_trunk" in input.keys():
        return f"--disc-trunk {input.disc_trunk}"
    if wildcards.model in AXIAL_METHODS:
        return f"--encoder {input.encoder}"
    if gradcam_on_disc():
        return ""
    if wildcards.model == "random":
        return f"--random {stage_options('pretrain', keys=('seed', 'width', 'embedding_dim'))}"
    return f"--encoder {input.encoder}" if "encoder" in input.keys() else ""


def gradcam_volumes_flag(wildcards, input):
    """The volumes the explained model reads: --discs (the disc volume), --vertebrae (the two bodies) or --axial
    (an axial method's slices)."""
    for name in ("discs", "vertebrae", "axial"):
        if name in input.keys():
            return f"--{name} {input[name]}"
    raise ValueError(f"gradcam {wildcards.model}: no volumes among the inputs {list(input.keys())}")


def disc_masks_options():
    """stages.disc_masks options: the input the models read and its crop (extract.disc_size, or vertebra_size for
    the two bodies) with extract.width_fraction; only the keys that input's crop reads."""
    crop = stage_options("extract", keys=("disc_size" if gradcam_on_disc() else "vertebra_size", "width_fraction"))
    return f"--disc-input {PROBES['disc_input']} {crop}"


def results_config():
    """The validated configuration without its x-runtime keys, as JSON: the configuration table's params. The keys
    that do not change results (threads, read-ahead, picture counts) are left out, so changing them re-runs nothing;
    the page names them (stages/report_config.py)."""
    kept = {
        section: (
            {k: v for k, v in values.items() if k not in runtime_keys(section)} if isinstance(values, dict) else values
        )
        for section, values in config.items()
    }
    return json.dumps(kept, sort_keys=True)


# The benchmark of every model: each pretraining job's benchmark file, named by the model it trained (a curriculum's
# steps repeat its name), passed as options (not inputs: a missing file is a missing cost, never a reason to run a
# pretraining job again), and every segmentation summary where segmentation runs.
PRETRAINING_COSTS = [(m, bench("pretrain", m)) for m in config["pretrain"]["methods"]] + [
    (c, bench("pretrain", f"{c}_step{i}")) for c, n in CURRICULUM_STEPS.items() for i in range(1, n + 1)
]
COST_OPTIONS = " ".join(
    ["--costs", *(p for _, p in PRETRAINING_COSTS), "--cost-models", *(m for m, _ in PRETRAINING_COSTS)]
)
SEGMENTATION_SUMMARIES = [out("segmentation", m, "summary.parquet") for m in SEGMENT_MODELS]


def report_targets():
    """Every figure and table of the report (those whose task was run)."""
    figures = ["label_efficiency", "training_curves"]
    figures += ["pretext"] if config["pretrain"]["methods"] else []
    figures += ["label_curves_herniation", "roc_herniation"] if "herniation" in PROBES["tasks"] else []
    figures += ["confusion_grade"] if "grade" in PROBES["tasks"] else []
    figures += ["embeddings"] if REPORTS["embeddings"] and BODY_ENCODERS else []
    figures += ["normative"] if "grade" in PROBES["tasks"] and DISC_ENCODERS else []
    figures += ["population", "genetics"] if DISC_ENCODERS else []
    figures += ["gradcam_standard", "gradcam_hou"] if GRADCAM_MODELS else []
    figures += [f"pairs_{m}" for m in PAIR_METHODS]
    figures += ["benchmark"]
    tables = ["figure_of_merit", "configuration", "benchmark"]
    tables += ["herniation_metrics"] if "herniation" in PROBES["tasks"] else []
    tables += ["mlsscl_ablation"] if REGIONS_IN_USE else []
    tables += ["curricula"] if CURRICULUM_STEPS else []
    tables += ["segmentation"] if SEGMENT_MODELS else []
    figures += ["segmentation"] if SEGMENT_MODELS else []
    tables += ["attention_inside_disc"] if GRADCAM_MODELS else []
    return [fig(f, ext) for f in figures for ext in ("png", "pdf")] + [table(t) for t in tables]
