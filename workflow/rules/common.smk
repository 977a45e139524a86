# Config look-ups, path builders and input functions shared by every rule. A rule passes its stage only the slice of
# the config it needs; every output path is built by `out()`, so the layout of results/ is decided here alone.
import os

from stages.cli import section_options

RESULTS = config["results"]
ENV = "../../envs/spine-ssl.yaml"
BASEDIR = workflow.basedir
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


def src(module):
    """The source file of a stage module, listed among a rule's inputs so that a code change re-runs it."""
    return os.path.join(BASEDIR, "stages", f"{module}.py")


def demo_options():
    return section_options(config["demo"])


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
    named = {"key_file": cohort["key_file"], "gradings": cohort["gradings"], "subjects": cohort["subjects"]}
    if cohort["source"] == "dicom":
        named.update(dicom=cohort["dicom_dir"], label_dir=cohort["label_dir"])
    else:
        named.update(table=cohort["volumes_table"])
    return {k: v for k, v in named.items() if v}


def ingest_flags(wildcards, input):
    flags = [f"--dicom-dir {input.dicom}"] if "dicom" in input.keys() else [f"--table {input.table}"]
    for name in ("key_file", "label_dir", "gradings", "subjects"):
        if name in input.keys():
            flags.append(f"--{name.replace('_', '-')} {input[name]}")
    return " ".join(flags)


def ingest_stage():
    """The stage module that ingests this config's cohort."""
    return "ingest_volumes" if config["cohort"]["source"] == "volumes" else "ingest"


METHODS_PATTERN = "|".join(config["pretrain"]["methods"])


def pretrain_launcher():
    """`python`, or `torchrun` with one process per GPU when a pretraining job asks for 2 or more GPUs (DDP)."""
    gpus = config["pretrain"]["gpus"]
    return f"torchrun --standalone --nproc-per-node {gpus}" if gpus > 1 else "python"


PROBES = config["probes"]
# Frozen encoders (features extracted once each) and models trained end to end, as named in results/probes/.
FROZEN = list(config["pretrain"]["methods"]) + [b for b in PROBES["baselines"] if b in ("random", "supervised")]
END_TO_END = (["scratch"] if "scratch" in PROBES["baselines"] else []) + (
    [f"{m}-finetune" for m in config["pretrain"]["methods"]] if PROBES["finetune"] else [])


def probe_targets():
    """metrics.json of every probe job: (model, task, label subset, seed); the level task for frozen encoders only."""
    from stages.probe_data import run_folder
    return [out("probes", "runs", run_folder(model, task, fraction, seed), "metrics.json")
            for model in FROZEN + END_TO_END for task in PROBES["tasks"]
            if not (task == "level" and model in END_TO_END)
            for fraction in PROBES["label_fractions"] for seed in range(PROBES["seeds"])]


def all_targets():
    targets = [out("ingest", "manifest.parquet"), out("localise", "evaluation.json"), out("extract", "index.parquet"),
               out("extract", "qc", "localisation.png"), out("splits", "summary.json")]
    targets += [out("pretrain", method, "pretext", "evaluation.json") for method in config["pretrain"]["methods"]]
    targets.append(out("probes", "label_efficiency.csv"))
    if config["cohort"]["source"] == "demo":
        targets.append(out("demo_cohort", "montage.png"))
    return targets
