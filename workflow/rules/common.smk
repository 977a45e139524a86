# Config look-ups, path builders and input functions shared by every rule. A rule passes its stage only the slice of
# the config it needs; every output path is built by `out()`, so the layout of results/ is decided here alone.
import json
import os
import shlex
import sys

from snakemake.settings.types import DeploymentMethod

from stages.core.cli import section_options
from stages.core.config import runtime_keys
from stages.core.imports import local_imports

RESULTS = config["results"]
ENV = "../../envs/spine-ssl.yaml"
BASEDIR = workflow.basedir
# The interpreter every rule runs its stage with (`{PYTHON} -m stages.<name>`): the one running Snakemake, so that
# `.venv/bin/snakemake` works without an activated environment (a cluster job runs Snakemake with the same one);
# under --sdm conda, the `python` of the rule's conda environment.
PYTHON = "python" if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method else shlex.quote(
    sys.executable)
# Stages run as `python -m stages.<name>`; make the package importable from any working directory (--directory),
# in a conda environment, and in a cluster job (which inherits this environment).
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (BASEDIR, os.environ.get("PYTHONPATH")) if p)


def out(stage, *parts):
    """Path of an output of `stage`: {results}/{stage}/{parts...}."""
    return "/".join([RESULTS, stage, *parts])


def logs(stage, name):
    return "/".join([RESULTS, "logs", stage, f"{name}.log"])


def bench(stage, name):
    return "/".join([RESULTS, "benchmarks", stage, f"{name}.tsv"])


def code(stage):
    """The source files of ``stages.<stage>`` and of every stage module it imports, transitively: a rule's ``code``
    input, so that a change in any of them re-runs the rule (stages/core/imports.py)."""
    return [os.path.join(BASEDIR, path) for path in local_imports(BASEDIR, stage)]


def stage_options(section, keys=None, skip=()):
    """A rule's params: the keys of config ``section`` its stage reads that change results, as command-line options
    (``keys``, or every key but ``skip``). Keys marked ``x-runtime`` in the schema never get here (runtime_flags)."""
    runtime = runtime_keys(section)
    chosen = [k for k in config[section] if k not in skip] if keys is None else list(keys)
    asked = sorted(runtime.intersection(chosen)) if keys is not None else []
    if asked:
        raise ValueError(f"{section}.{asked[0]} does not change results: pass it with runtime_flags, not as a param")
    return section_options({k: config[section][k] for k in chosen if k not in runtime})


def runtime_flags(section, *keys):
    """The ``x-runtime`` keys of ``section`` a stage reads, as command-line options. A rule hands them over as a
    resource, which Snakemake does not compare between runs: changing them re-runs nothing."""
    runtime = runtime_keys(section)
    wrong = [k for k in keys if k not in runtime]
    if wrong:
        raise ValueError(f"{section}.{wrong[0]} changes results: pass it with stage_options")
    return section_options({k: config[section][k] for k in keys})


def demo_options():
    return stage_options("demo")


def ingest_inputs(wildcards):
    """The archive and its companions: the demo cohort's outputs, or the folders and tables named in `cohort`."""
    cohort = config["cohort"]
    if cohort["source"] == "demo":
        return {
            "dicom": out("demo_cohort", "dicom"),
            "key_file": out("demo_cohort", "pseudonym.key"),
            "label_dir": out("demo_cohort", "truth", "labels"),
            "gradings": out("demo_cohort", "truth", "gradings.csv"),
            "subjects": out("demo_cohort", "truth", "subjects.csv"),
        }
    source = {"dicom": "dicom_dir", "volumes": "volumes_table"}[cohort["source"]]
    if not cohort[source]:
        raise ValueError(f"cohort.source is {cohort['source']} but cohort.{source} is empty: name it in the config")
    if not cohort["key_file"] and not os.environ.get("SPINE_SSL_PSEUDONYM_KEY"):
        raise ValueError("no pseudonymisation key: set cohort.key_file or the environment variable "
                         "SPINE_SSL_PSEUDONYM_KEY (at least 16 bytes; keep it out of the repository)")
    named = {"key_file": cohort["key_file"], "gradings": cohort["gradings"], "subjects": cohort["subjects"],
             "landmarks": cohort["landmarks"]}
    if cohort["source"] == "dicom":
        named.update(dicom=cohort["dicom_dir"], label_dir=cohort["label_dir"])
    else:
        named.update(table=cohort["volumes_table"])
    return {k: v for k, v in named.items() if v}


def ingest_plan_inputs(wildcards):
    """The plan reads the archive only (and the key)."""
    named = ingest_inputs(wildcards)
    return {k: named[k] for k in ("dicom", "key_file") if k in named}


def ingest_shard_inputs(wildcards):
    """A shard job reads the archive and the label maps (and the key)."""
    named = ingest_inputs(wildcards)
    return {k: named[k] for k in ("dicom", "key_file", "label_dir") if k in named}


def ingest_merge_inputs(wildcards):
    """The merge writes the pseudonymised tables: gradings, subjects, landmarks (and needs the key)."""
    named = ingest_inputs(wildcards)
    return {k: named[k] for k in ("key_file", "gradings", "subjects", "landmarks") if k in named}


def ingest_shard_dirs(wildcards):
    """The ingest shard folders, as many as the plan (a checkpoint) made."""
    with open(checkpoints.ingest_plan.get().output.summary) as handle:
        n = json.load(handle)["shards"]
    return [out("ingest", "shards", f"{i:04d}") for i in range(n)]


def ingest_flags(wildcards, input):
    flags = [f"--dicom-dir {input.dicom}"] if "dicom" in input.keys() else (
        [f"--table {input.table}"] if "table" in input.keys() else [])
    for name in ("key_file", "label_dir", "gradings", "subjects", "landmarks"):
        if name in input.keys():
            flags.append(f"--{name.replace('_', '-')} {input[name]}")
    if "landmarks" in input.keys():
        from shlex import quote
        flags += [f"--landmark-column {quote(f'{ours}={theirs}')}"
                  for ours, theirs in sorted(config["cohort"]["landmark_columns"].items())]
        flags.append(numbering_flags())
    return " ".join(flags)


CROPS = config["cohort"]["source"] == "crops"


def crops_inputs(wildcards):
    """The crop table (source crops) and the pseudonymisation key file when one is named."""
    cohort = config["cohort"]
    if not cohort["crops_table"]:
        raise ValueError("cohort.source is crops but cohort.crops_table is empty: name it in the config")
    if not cohort["key_file"] and not os.environ.get("SPINE_SSL_PSEUDONYM_KEY"):
        raise ValueError("no pseudonymisation key: set cohort.key_file or the environment variable "
                         "SPINE_SSL_PSEUDONYM_KEY (at least 16 bytes; keep it out of the repository)")
    return {"table": cohort["crops_table"], **({"key_file": cohort["key_file"]} if cohort["key_file"] else {})}


def crops_flags(wildcards, input):
    """stages.ingest_crops options from cohort.crops and cohort.level_numbering (quoted: names may have spaces)."""
    from shlex import quote
    cohort = config["cohort"]
    crops = cohort["crops"]
    flags = [f"--key-file {quote(input.key_file)}"] if "key_file" in input.keys() else []
    flags += [f"--column {quote(f'{ours}={theirs}')}" for ours, theirs in sorted(crops["columns"].items())]
    flags += [f"--label {name}={low:g}:{high:g}" for name, (low, high) in sorted(crops["labels"].items())]
    flags += [f"--slice-axis {crops['slice_axis']}", numbering_flags()]
    return " ".join(flags)


def numbering_flags():
    numbering = config["cohort"]["level_numbering"]
    first = f" --level-first {numbering['first']}" if numbering["first"] else ""
    return f"--level-count-from {numbering['count_from']}{first}"


def n_shards():
    """Shards of the per-scan stages (localise, extract): ceil(scans in the manifest / scale.scans_per_shard). Read
    from ingest's manifest once ingest (a checkpoint) has run. Only input functions may call it: a shard job is told
    its index and the scans per shard, and the stage counts the shards itself (a cluster job cannot ask a checkpoint
    in its params)."""
    import pandas as pd
    from stages.core.shards import shard_count
    manifest = checkpoints.ingest.get().output.manifest
    return shard_count(len(pd.read_parquet(manifest, columns=["scan_id"])), config["scale"]["scans_per_shard"])


def shard_files(stage, name):
    """``name`` in every shard folder of ``stage``: results/{stage}/shards/{0000...}/{name}."""
    return [out(stage, "shards", f"{i:04d}", name) for i in range(n_shards())]


def ingest_stage():
    """The stage module that ingests this config's cohort."""
    return "ingest_volumes" if config["cohort"]["source"] == "volumes" else "ingest"


METHODS_PATTERN = "|".join(config["pretrain"]["methods"])


def ddp_launcher():
    """Nothing, or torchrun's arguments (run by the project's interpreter before `-m stages.pretrain`) with one process
    per GPU when a pretraining job asks for 2 or more GPUs (DDP)."""
    gpus = config["pretrain"]["gpus"]
    return f"-m torch.distributed.run --standalone --nproc-per-node {gpus}" if gpus > 1 else ""


PROBES = config["probes"]
# Frozen encoders (features extracted once each) and models trained end to end, as named in results/probes/.
FROZEN = list(config["pretrain"]["methods"]) + [b for b in PROBES["baselines"] if b in ("random", "supervised")]
END_TO_END = (["scratch"] if "scratch" in PROBES["baselines"] else []) + (
    [f"{m}-finetune" for m in config["pretrain"]["methods"]] if PROBES["finetune"] else [])


def probe_targets():
    """metrics.json of every probe job: (model, task, label subset, seed); the level task for frozen encoders only."""
    from stages.evaluation.probe_data import run_folder
    return [out("probes", "runs", run_folder(model, task, fraction, seed), "metrics.json")
            for model in FROZEN + END_TO_END for task in PROBES["tasks"]
            if not (task == "level" and model in END_TO_END)
            for fraction in PROBES["label_fractions"] for seed in range(PROBES["seeds"])]


REPORTS = config["reports"]
# The probe job each report figure of a model reads: the Grad-CAM task (or the first disc task), every label, seed 0.
REPORT_TASK = REPORTS["gradcam_task"] if REPORTS["gradcam_task"] in PROBES["tasks"] else next(
    (t for t in PROBES["tasks"] if t != "level"), None)
# Grad-CAM needs the discs' label maps (their share of the attention); a crop-table cohort has none.
GRADCAM_MODELS = FROZEN + END_TO_END if REPORTS["gradcam_task"] in PROBES["tasks"] and not CROPS else []


def report_run(model):
    """The probe job folder the report explains for ``model``: REPORT_TASK, the largest label fraction, seed 0."""
    from stages.evaluation.probe_data import run_folder
    return out("probes", "runs", run_folder(model, REPORT_TASK, max(PROBES["label_fractions"]), 0))


def training_history_inputs(kind):
    """Inputs of the training-curves figure: the supervised encoder's history, or the end-to-end probe jobs'
    metrics.json (their history.csv is written beside it by the same job)."""
    if kind == "supervised":
        return [out("probes", "encoders", "supervised", "history.csv")] if "supervised" in PROBES["baselines"] else []
    return [os.path.join(report_run(m), "metrics.json") for m in END_TO_END] if REPORT_TASK else []


def training_flags(wildcards, input):
    flags = [f"--pretrain {' '.join(input.pretrain)}"] if input.pretrain else []
    if input.supervised:
        flags.append(f"--supervised {input.supervised[0]}")
    if input.end_to_end:
        flags.append("--end-to-end " + " ".join(os.path.join(os.path.dirname(m), "history.csv")
                                                for m in input.end_to_end))
    return " ".join(flags)


def gradcam_inputs(wildcards):
    model = wildcards.model
    inputs = {"code": code("gradcam"),
              "model": os.path.join(report_run(model), "model.npz"), "masks": out("report", "gradcam", "disc_masks.npz"),
              "vertebrae": out("extract", "vertebrae.npy")}
    if model in FROZEN and model != "random":
        inputs["encoder"] = encoder_file(model)
    return inputs


def gradcam_encoder_flags(wildcards, input):
    if wildcards.model == "random":
        p = config["pretrain"]
        return f"--random {p['seed']} {p['width']} {p['embedding_dim']}"
    return f"--encoder {input.encoder}" if "encoder" in input.keys() else ""


def report_targets():
    """Every figure and table of the report (those whose task was run)."""
    figures = ["label_efficiency", "training_curves"]
    figures += ["pretext"] if config["pretrain"]["methods"] else []
    figures += ["label_curves_herniation", "roc_herniation"] if "herniation" in PROBES["tasks"] else []
    figures += ["confusion_grade"] if "grade" in PROBES["tasks"] else []
    figures += ["embeddings"] if REPORTS["embeddings"] and FROZEN else []
    figures += ["gradcam_standard", "gradcam_hou"] if GRADCAM_MODELS else []
    figures += [f"pairs_{m}" for m in config["pretrain"]["methods"]]
    tables = ["figure_of_merit", "configuration"]
    tables += ["herniation_metrics"] if "herniation" in PROBES["tasks"] else []
    tables += ["attention_inside_disc"] if GRADCAM_MODELS else []
    return ([out("report", "figures", f"{f}.{ext}") for f in figures for ext in ("png", "pdf")]
            + [out("report", "tables", f"{t}.html") for t in tables])


def all_targets():
    targets = [out("ingest", "manifest.parquet"), out("extract", "index.parquet"), out("extract", "qc", "gallery.png"),
               out("splits", "summary.json")]
    if not CROPS:  # a crop-table cohort is not localised
        targets += [out("localise", "evaluation.json"), out("extract", "qc", "localisation.png")]
    targets += [out("pretrain", method, "pretext", "evaluation.json") for method in config["pretrain"]["methods"]]
    targets.append(out("probes", "label_efficiency.csv"))
    targets += report_targets()
    if config["cohort"]["source"] == "demo":
        targets.append(out("demo_cohort", "montage.png"))
    return targets


def apply_cluster_resources(rules):
    """config.yaml's `cluster` section as SLURM resources of every rule (read by the SLURM executor plugin with
    --profile workflow/profiles/slurm; a local run ignores them): partition, account, qos, and the GPU type of the
    rules that ask for GPUs."""
    settings = {"slurm_partition": config["cluster"]["partition"], "slurm_account": config["cluster"]["account"],
                "qos": config["cluster"]["qos"]}
    for job_rule in rules:
        for name, value in settings.items():
            if value:
                job_rule.resources[name] = value
        if config["cluster"]["gpu_model"] and "gpu" in job_rule.resources:
            job_rule.resources["gpu_model"] = config["cluster"]["gpu_model"]
