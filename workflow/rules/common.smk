# Config look-ups, path builders and input functions shared by every rule. A rule passes its stage only the slice of
# the config it needs; every output path is built by `out()`, so the layout of results/ is decided here alone.
import json
import os
import shlex
import sys

from stages.archive.label_scheme import scheme_options
from stages.core.cli import section_options
from stages.core.config import load_schema, runtime_keys
from stages.core.imports import local_imports
from stages.evaluation.probe_data import RUN_FOLDER, run_folder

RESULTS = config["results"]
ENV = "../../envs/spine-ssl.yaml"
BASEDIR = workflow.basedir
# Every job runs its stage as `python -m stages.<name>`, with the interpreter that runs Snakemake first on the PATH:
# `.venv/bin/snakemake` works without an activated environment, and a cluster job (which runs Snakemake with the same
# interpreter and reads this file again) too. Under --sdm conda, the activated conda environment comes first.
os.environ.update(PATH=os.pathsep.join(p for p in (os.path.dirname(sys.executable), os.environ.get("PATH")) if p))
# Stages run as `python -m stages.<name>` from the working directory (--directory). The venv has the project
# installed (`pip install -e .`), but the conda environment of --sdm conda does not: put the project on the import
# path of every job (a cluster job inherits this environment). Set here, not asked of the user (no `envvars:`).
os.environ.update(PYTHONPATH=os.pathsep.join(p for p in (BASEDIR, os.environ.get("PYTHONPATH")) if p))


def out(stage, *parts):
    """Path of an output of `stage`: {results}/{stage}/{parts...}."""
    return os.path.join(RESULTS, stage, *parts)


def logs(stage, name):
    """The log file of a rule's job: {results}/logs/{stage}/{name}.log."""
    return os.path.join(RESULTS, "logs", stage, f"{name}.log")


def bench(stage, name):
    """The benchmark file of a rule's job: {results}/benchmarks/{stage}/{name}.tsv."""
    return os.path.join(RESULTS, "benchmarks", stage, f"{name}.tsv")


def code(stage):
    """The source files of ``stages.<stage>`` and of every stage module it imports, transitively: a rule's ``code``
    input, so that a change in any of them re-runs the rule (stages/core/imports.py)."""
    return [os.path.join(BASEDIR, path) for path in local_imports(BASEDIR, stage)]


def stage_options(section, keys=None, skip=(), prefix=""):
    """A rule's params: the keys of config ``section`` its stage reads that change results, as command-line options
    (``keys``, or every key but ``skip``; ``--prefix-key`` with a ``prefix``). Keys marked ``x-runtime`` in the schema
    never get here (runtime_flags)."""
    runtime = runtime_keys(section)
    chosen = [k for k in config[section] if k not in skip] if keys is None else list(keys)
    asked = sorted(runtime.intersection(chosen)) if keys is not None else []
    if asked:
        raise ValueError(f"{section}.{asked[0]} does not change results: pass it with runtime_flags, not as a param")
    return section_options({k: config[section][k] for k in chosen if k not in runtime}, prefix)


def runtime_flags(section, *keys):
    """The ``x-runtime`` keys of ``section`` a stage reads, as command-line options. A rule hands them over as a
    resource, which Snakemake does not compare between runs: changing them re-runs nothing."""
    runtime = runtime_keys(section)
    wrong = [k for k in keys if k not in runtime]
    if wrong:
        raise ValueError(f"{section}.{wrong[0]} changes results: pass it with stage_options")
    return section_options({k: config[section][k] for k in keys})


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
    named = {
        **key_file_input(),
        "gradings": cohort["gradings"],
        "subjects": cohort["subjects"],
        "landmarks": cohort["landmarks"],
    }
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


def key_file_input():
    """{"key_file": cohort.key_file}, or nothing when the key comes from the environment (SPINE_SSL_PSEUDONYM_KEY);
    raises ValueError when there is neither."""
    key_file = config["cohort"]["key_file"]
    if not key_file and not os.environ.get("SPINE_SSL_PSEUDONYM_KEY"):
        raise ValueError(
            "no pseudonymisation key: set cohort.key_file or the environment variable "
            "SPINE_SSL_PSEUDONYM_KEY (at least 16 bytes; keep it out of the repository)"
        )
    return {"key_file": key_file} if key_file else {}


def ingest_flags(wildcards, input):
    """The ingest stage's input options, from the rule's named inputs (quoted: user paths may have spaces)."""
    flags = (
        [f"--dicom-dir {shlex.quote(input.dicom)}"]
        if "dicom" in input.keys()
        else ([f"--table {shlex.quote(input.table)}"] if "table" in input.keys() else [])
    )
    for name in ("key_file", "label_dir", "gradings", "subjects", "landmarks"):
        if name in input.keys():
            flags.append(f"--{name.replace('_', '-')} {shlex.quote(input[name])}")
    if ("label_dir" in input.keys() or "table" in input.keys()) and LABEL_SCHEME:
        flags.append(LABEL_SCHEME)
    if "landmarks" in input.keys():
        flags += [
            f"--landmark-column {shlex.quote(f'{ours}={theirs}')}"
            for ours, theirs in sorted(config["cohort"]["landmark_columns"].items())
        ]
        flags.append(numbering_flags())
    return " ".join(flags)


def label_scheme_flags():
    """--label-scheme from cohort.label_scheme, for the jobs that read label maps; none for VerSe (the stages'
    default, so that existing results are not re-run) and for the demo, whose label maps are VerSe. Called once at
    start-up: a bad mapping stops the workflow with a message naming the key."""
    scheme = config["cohort"]["label_scheme"]
    options = scheme_options(scheme)
    return "" if scheme == "verse" or config["cohort"]["source"] == "demo" else shlex.join(options)


LABEL_SCHEME = label_scheme_flags()
CROPS = config["cohort"]["source"] == "crops"


def crops_inputs(wildcards):
    """The crop table (source crops) and the pseudonymisation key file when one is named."""
    cohort = config["cohort"]
    if not cohort["crops_table"]:
        raise ValueError("cohort.source is crops but cohort.crops_table is empty: name it in the config")
    return {"table": cohort["crops_table"], **key_file_input()}


def crops_flags(wildcards, input):
    """stages.ingest_crops options from cohort.crops and cohort.level_numbering (quoted: names may have spaces)."""
    crops = config["cohort"]["crops"]
    flags = [f"--key-file {shlex.quote(input.key_file)}"] if "key_file" in input.keys() else []
    flags += [f"--column {shlex.quote(f'{ours}={theirs}')}" for ours, theirs in sorted(crops["columns"].items())]
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


def shard_dirs(stage):
    """The shard folders of ``stage`` (localise, extract), each one job's output: results/{stage}/shards/{0000...}."""
    return [out(stage, "shards", f"{i:04d}") for i in range(n_shards())]


def ingest_stage():
    """The stage module that ingests this config's cohort."""
    return "ingest_volumes" if config["cohort"]["source"] == "volumes" else "ingest"


# Curricula (the curricular multi-task study): named sequences of pretext tasks on one backbone, each step a
# pretraining job that starts from the previous step's encoder (rule curriculum_step); the last step's encoder is the
# curriculum's (rule curriculum), a model downstream under the curriculum's name, like a method.
CURRICULA = config["curricula"]["runs"]
# The ordered curricula (curricula.orderings): C, AC and MC of the orderings' tasks, their order known once the single
# tasks' probes have run (rule curriculum_order); each step reads its method from the orderings' file.
ORDERING = config["curricula"]["orderings"]
ORDERED = (["C", "AC"] + (["MC"] if len(ORDERING["tasks"]) >= 3 else [])) if ORDERING["tasks"] else []
CURRICULUM_STEPS = {**{n: len(s) for n, s in CURRICULA.items()}, **{n: len(ORDERING["tasks"]) for n in ORDERED}}
TASK_METHODS = ["rotation", "relative_location", "swav"]  # the study's single pretext tasks: no test pairs scored
GENERATIVE_METHODS = ["vae"]  # the generative baseline: no test pairs scored either
# The genotype table and the key that pseudonymises it, for ingest_genotypes - the demo's, or cohort.genotypes with
# the cohort's key; none when the cohort has no genotype table.
GENOTYPE_INPUTS = (
    {"genotypes": out("demo_cohort", "truth", "genotypes.csv"), "key_file": out("demo_cohort", "pseudonym.key")}
    if config["cohort"]["source"] == "demo"
    else ({"genotypes": config["cohort"]["genotypes"], **key_file_input()} if config["cohort"]["genotypes"] else {})
)
PRETRAINED = list(config["pretrain"]["methods"]) + list(CURRICULA) + ORDERED
METHODS_PATTERN = "|".join(PRETRAINED)
PRETRAIN_PATTERN = "|".join(config["pretrain"]["methods"])  # what the pretrain rule trains (not the curricula)
CURRICULA_PATTERN = "|".join(CURRICULUM_STEPS) or "no-curriculum"


# Methods that read the axial slices through each disc (their own structure, whatever pretrain.structure says), and
# give 2D slice features: no vertebral-body features (level task, t-SNE maps), no 3D trunk (transfer head, pairs).
AXIAL_METHODS = ["simclr"]


def axial_array():
    """The axial slices through each disc that the axial methods and their probes read: the axial_slices stage's
    (the study's own axial series, the resliced slices where there is none); a crop-table cohort has only the
    extract stage's (blank: it is not resliced)."""
    return rules.extract.output.axial if CROPS else rules.axial_slices.output.slices


# Methods that read each scan's lumbar region (the lumbar_regions stage), set in the mlsscl section; their trunk reads
# clips of the downstream volumes' shape, so downstream they are 3D encoders like the Siamese one.
REGION_METHODS = ["mlsscl", "mlsscl_multiview", "mlsscl_long_short"]
REGIONS_IN_USE = [m for m in config["pretrain"]["methods"] if m in REGION_METHODS]
# The config section of a method whose section is not named after it.
METHOD_SECTIONS = {m: "mlsscl" for m in REGION_METHODS}


def pretrain_array(wildcards=None):
    """The array a pretraining method reads: the axial slices for an axial method, the lumbar regions for a region
    method; else (pretrain.structure) the extract stage's vertebrae.npy or discs.npy."""
    if wildcards is not None and wildcards.method in AXIAL_METHODS:
        return axial_array()
    if wildcards is not None and wildcards.method in REGION_METHODS:
        return rules.lumbar_regions.output.array
    return rules.extract.output.discs if config["pretrain"]["structure"] == "disc" else rules.extract.output.vertebrae


def pretrain_volumes(wildcards):
    """The table of the volumes a pretraining method reads (their subjects and parts): the lumbar_regions stage's for
    a region method, else the splits stage's."""
    if wildcards.method in REGION_METHODS:
        return rules.lumbar_regions.output.table
    return rules.splits.output.volumes


def method_options(wildcards):
    """The config section of a method that has one (simclr, moco, byol, longitudinal_nce, mlsscl and its
    ablations), as --SECTION-KEY options of the pretrain stage."""
    section = METHOD_SECTIONS.get(wildcards.method, wildcards.method)
    if section in config:
        return stage_options(section, prefix=section)
    return ""


def trunk_volume_size():
    """[height, width, slices] of the volumes the pretrained trunks read downstream (pretrain.structure's crops)."""
    structure = config["pretrain"]["structure"]
    return config["extract"]["vertebra_size" if structure == "vertebra" else "disc_size"]


def check_clip_shape():
    """A region method's trunk reads, downstream, the volumes of pretrain.structure: its clips must have their shape.
    And region methods need the scans (not a crop table)."""
    if not REGIONS_IN_USE:
        return
    if config["cohort"]["source"] == "crops":
        raise ValueError(
            f"pretrain.methods {REGIONS_IN_USE} read each scan's lumbar region: a crop-table cohort has no scans"
        )
    structure = config["pretrain"]["structure"]
    height, width, slices = trunk_volume_size()
    clips = config["mlsscl"]
    for method, weight in (("mlsscl_multiview", "alpha"), ("mlsscl_long_short", "beta")):
        if method in REGIONS_IN_USE and clips[weight] == 0:
            raise ValueError(f"{method} keeps only mlsscl.{weight}'s loss, but mlsscl.{weight} is 0: nothing to learn")
    if [clips["clip_slices"], *clips["clip_size"]] != [slices, height, width]:
        raise ValueError(
            f"mlsscl.clip_slices and mlsscl.clip_size ({clips['clip_slices']}, {clips['clip_size']}) must be the "
            f"shape of the {structure} volumes the encoder reads downstream (extract.{structure}_size "
            f"{[height, width, slices]}: clip_slices {slices}, clip_size [{height}, {width}])"
        )


check_clip_shape()


def backbone_of(method):
    """The 3D backbone a method (or a curriculum: its steps') hands on: its section's backbone (the momentum family's,
    the pretext tasks'), else the Siamese trunk."""
    if method in CURRICULA:
        return backbone_of(CURRICULA[method][-1])
    if method in ORDERED:
        return backbone_of(ORDERING["tasks"][0])
    return config.get(METHOD_SECTIONS.get(method, method), {}).get("backbone", "trunk")


def scratch_model(backbone):
    """The segmentation downstream's from-scratch model of a backbone: scratch (the trunk), scratch_resnet18."""
    return "scratch" if backbone == "trunk" else f"scratch_{backbone}"


# The segmentation downstream: every pretrained 3D encoder (not an axial method's) and the same network from scratch,
# one for each backbone the encoders have.
THREE_D_METHODS = [m for m in PRETRAINED if m not in AXIAL_METHODS]
SEGMENT_MODELS = (
    THREE_D_METHODS + [scratch_model(b) for b in sorted({backbone_of(m) for m in THREE_D_METHODS})]
    if config["segmentation"]["run"] and THREE_D_METHODS and config["cohort"]["source"] != "crops"
    else []
)
SCRATCH_MODELS = {scratch_model(b): b for b in ("trunk", "resnet18")}


def schema_methods():
    """Every pretraining method the schema knows (pretrain.methods' enum)."""
    return load_schema()["properties"]["pretrain"]["properties"]["methods"]["items"]["enum"]


def check_curricula():
    """A curriculum's name is no method's, and its steps share one backbone (each starts from the last's weights)."""
    taken = set(schema_methods()) | {"random", "supervised", "scratch", "scratch_resnet18"}
    clash = sorted(n for n in CURRICULA if n in taken or n.endswith(("-finetune", "-random", "-scratch")))
    if clash:
        raise ValueError(
            f"curricula.runs names {clash[0]!r}, a pretraining method's or a baseline's name: give the curriculum "
            "another name"
        )
    if set(ORDERED) & set(CURRICULA):
        raise ValueError(
            f"curricula.runs names {sorted(set(ORDERED) & set(CURRICULA))}: C, AC and MC are the orderings'"
        )
    tasks = ORDERING["tasks"]
    if tasks:
        missing = [t for t in tasks if t not in config["pretrain"]["methods"]]
        if len(tasks) < 2 or missing:
            raise ValueError(
                f"curricula.orderings.tasks {tasks}: needs two or more tasks, each in pretrain.methods (its own "
                f"downstream results order them; missing {missing})"
            )
        if (
            ORDERING["task"] not in config["probes"]["tasks"]
            or ORDERING["head"] not in config["probe_training"]["heads"]
        ):
            raise ValueError(
                f"curricula.orderings scores the tasks by the {ORDERING['head']} head on {ORDERING['task']}: add them "
                "to probe_training.heads and probes.tasks"
            )
    for name, steps in {**CURRICULA, **({"the orderings": tasks} if tasks else {})}.items():
        backbones = {backbone_of(task) for task in steps}
        if len(backbones) > 1:
            raise ValueError(
                f"curriculum {name!r} mixes backbones {sorted(backbones)} ({', '.join(f'{t}: {backbone_of(t)}' for t in steps)}): "
                "each step starts from the last step's encoder, so set one backbone in the steps' sections"
            )


check_curricula()


def last_task(model):
    """The method whose network a model is: a curriculum's last step (an ordered curriculum's is known only when it
    runs: "ordered"), else the model itself."""
    return CURRICULA[model][-1] if model in CURRICULA else "ordered" if model in ORDERED else model


def step_method(wildcards, input):
    """The method a curriculum step trains: --method, or an ordered curriculum's --ordering and step."""
    if wildcards.curriculum in ORDERED:
        return f"--ordering {input.order} --ordering-name {wildcards.curriculum} --step {wildcards.step}"
    return f"--method {CURRICULA[wildcards.curriculum][int(wildcards.step) - 1]}"


def step_order(wildcards):
    """The orderings' file an ordered curriculum's step reads (none for a named curriculum)."""
    return [rules.curriculum_order.output.json] if wildcards.curriculum in ORDERED else []


def ordering_metrics(wildcards=None):
    """The single tasks' probe results that order them: every seed at the largest label fraction."""
    fraction = max(PROBES["label_fractions"])
    return [
        probe_job(task, ORDERING["task"], fraction, seed, "metrics.json")
        for task in ORDERING["tasks"]
        for seed in range(PROBES["seeds"])
    ]


def step_output(curriculum, step, name):
    return out("pretrain", curriculum, "steps", str(step), name)


def curriculum_init(wildcards):
    """The encoder a curriculum step starts from: the previous step's (none for the first)."""
    step = int(wildcards.step)
    return [step_output(wildcards.curriculum, step - 1, "encoder.pt")] if step > 1 else []


def step_options(wildcards, input, output):
    """A step's --init-encoder, its section's options and its learning-rate search (curricula section)."""
    if wildcards.curriculum in ORDERED:
        tasks = ORDERING["tasks"]
    else:
        tasks = [CURRICULA[wildcards.curriculum][int(wildcards.step) - 1]]
    options = [f"--init-encoder {input.init}" if input.init else ""]
    for section in dict.fromkeys(METHOD_SECTIONS.get(task, task) for task in tasks):
        options.append(stage_options(section, prefix=section) if section in config else "")
    if config["curricula"]["lr_candidates"]:
        options.append(stage_options("curricula", keys=("lr_candidates", "search_epochs")))
    return " ".join(o for o in options if o)


def check_resnet_width():
    """A ResNet-18 backbone's first stage has 64 x pretrain.width channels in groups of 8: fail at start-up."""
    users = [m for m in THREE_D_METHODS if backbone_of(m) == "resnet18"]
    width = config["pretrain"]["width"]
    if users and (round(64 * width) < 8 or round(64 * width) % 8):
        raise ValueError(
            f"{', '.join(users)} use the ResNet-18 backbone, whose first stage has 64 x pretrain.width channels in "
            f"groups of 8: pretrain.width {width} gives {64 * width:g}; use a multiple of 0.125"
        )


check_resnet_width()


def segment_source(wildcards, input):
    """--encoder of a pretrained model, or a scratch network's --scratch and its backbone, shape and seed (the
    pretraining encoder's: pretrain.structure's slices, pretrain.width, embedding_dim and seed)."""
    if wildcards.model not in SCRATCH_MODELS:
        return f"--encoder {input.encoder}"
    slices = trunk_volume_size()[2]
    pretrain = config["pretrain"]
    return (
        f"--scratch --slices {slices} --width {pretrain['width']} --embedding-dim {pretrain['embedding_dim']} "
        f"--encoder-seed {pretrain['seed']} --backbone {SCRATCH_MODELS[wildcards.model]}"
    )


def ddp_launcher():
    """Nothing, or torchrun's arguments (run by the project's interpreter before `-m stages.pretrain`) with one process
    per GPU when a pretraining job asks for 2 or more GPUs (DDP)."""
    gpus = config["pretrain"]["gpus"]
    return f"-m torch.distributed.run --standalone --nproc-per-node {gpus}" if gpus > 1 else ""


PROBES = config["probes"]
# Frozen encoders (features extracted once each) and models trained end to end, as named in results/probes/.
# An axial method's own baselines (Hou et al. 2023) come with the random and scratch baselines: its network at
# pretraining's initial weights, frozen (METHOD-random), and trained end to end on the three slices (METHOD-scratch).
AXIAL_IN_USE = [m for m in config["pretrain"]["methods"] if m in AXIAL_METHODS]
FROZEN = (
    list(PRETRAINED)
    + [f"{m}-random" for m in AXIAL_IN_USE if "random" in PROBES["baselines"]]
    + [b for b in PROBES["baselines"] if b in ("random", "supervised")]
)
# (probes.finetune fine-tunes the 3D encoders end to end; an axial method's fine-tuning is not implemented)
END_TO_END = (
    (["scratch"] if "scratch" in PROBES["baselines"] else [])
    + [f"{m}-scratch" for m in AXIAL_IN_USE if "scratch" in PROBES["baselines"]]
    + ([f"{m}-finetune" for m in PRETRAINED if m not in AXIAL_METHODS] if PROBES["finetune"] else [])
)


def axial_method(model):
    """The axial method whose network ``model`` is (simclr for simclr, simclr-random and simclr-scratch), or None."""
    method = model.removesuffix("-random").removesuffix("-scratch")
    return method if method in AXIAL_IN_USE and model in FROZEN + END_TO_END else None


def initial_weights_flags(model):
    """An axial baseline's extractor: its method's architecture at pretraining's initial weights (pretrain.seed)."""
    if axial_method(model) and model != axial_method(model):
        return f"--initial-weights --encoder-seed {config['pretrain']['seed']}"
    return ""


def reads_bodies(model):
    """Whether ``model``'s frozen encoder takes vertebral-body volumes (the level task needs one): the random encoder
    always, a pretrained one when pretraining read bodies, the supervised one when it was trained on bodies."""
    if model == "random":
        return True
    if model == "supervised":
        return PROBES["disc_input"] == "bodies"
    return model in FROZEN and not axial_method(model) and config["pretrain"]["structure"] == "vertebra"


# The frozen encoders whose vertebral-body features exist (the features rule): the level task and the t-SNE maps.
BODY_ENCODERS = [m for m in FROZEN if reads_bodies(m)]


def probe_targets(name="metrics.json"):
    """``name`` of every probe job: (model, task, label subset, seed); the level task for frozen encoders that read
    vertebral bodies only."""
    return [
        probe_job(model, task, fraction, seed, name)
        for model in FROZEN + END_TO_END
        for task in PROBES["tasks"]
        if not (task == "level" and not reads_bodies(model))
        for fraction in PROBES["label_fractions"]
        for seed in range(PROBES["seeds"])
    ]


def all_targets():
    targets = [
        out("ingest", "manifest.parquet"),
        out("extract", "index.parquet"),
        out("extract", "qc", "gallery.png"),
        out("splits", "summary.json"),
    ]
    if not CROPS:  # a crop-table cohort is not localised
        targets += [out("localise", "evaluation.json"), out("extract", "qc", "localisation.png")]
        targets.append(out("axial", "index.parquet"))
    targets += [out("pretrain", method, "pretext", "evaluation.json") for method in PRETRAINED]
    targets.append(out("probes", "label_efficiency.csv"))
    targets += report_targets()
    if config["cohort"]["source"] == "demo":
        targets.append(out("demo_cohort", "montage.png"))
    return targets


def apply_cluster_resources(rules):
    """config.yaml's `cluster` section as SLURM resources of every rule (read by the SLURM executor plugin with
    --profile workflow/profiles/slurm; a local run ignores them): partition, account, qos, and the GPU type of the
    rules that ask for GPUs."""
    settings = {
        "slurm_partition": config["cluster"]["partition"],
        "slurm_account": config["cluster"]["account"],
        "qos": config["cluster"]["qos"],
    }
    for each in rules:
        for name, value in settings.items():
            if value:
                each.resources[name] = value
        if config["cluster"]["gpu_model"] and "gpu" in each.resources:
            each.resources["gpu_model"] = config["cluster"]["gpu_model"]


# ---- probes (workflow/rules/probes.smk)


def encoder_file(name):
    """encoder.pt of a pretrained method or of the supervised-transfer encoder."""
    if name == "supervised":
        return out("probes", "encoders", "supervised", "encoder.pt")
    return out("pretrain", name, "encoder.pt")


def probe_job(model, task, fraction, seed, name="metrics.json"):
    """A file of one probe job: results/probes/runs/{RUN_FOLDER}/name (stages/evaluation/probe_data.py)."""
    return out("probes", "runs", run_folder(model, task, fraction, seed), name)


def probe_output(name):
    """A file of the probe rule's job, with the rule's wildcards (model, task, fraction, seed): the same layout."""
    return out("probes", "runs", RUN_FOLDER, name)


def features_inputs(wildcards):
    inputs = {"code": code("features"), "vertebrae": rules.extract.output.vertebrae}
    if wildcards.encoder != "random":
        inputs["encoder"] = encoder_file(wildcards.encoder)
    return inputs


def encoder_size_flags():
    """--width and --embedding-dim of an encoder built from random weights (pretrain.width, pretrain.embedding_dim)."""
    return stage_options("pretrain", keys=("width", "embedding_dim"))


def features_flags(wildcards, input):
    if wildcards.encoder == "random":
        return f"--random {stage_options('pretrain', keys=('seed', 'width', 'embedding_dim'))}"
    return f"--encoder {input.encoder}"


def on_disc(task):
    """Whether a probe job of ``task`` reads the disc volume (probes.disc_input: disc; the level task reads bodies)."""
    return task != "level" and PROBES["disc_input"] == "disc"


def disc_features_file(encoder, name):
    """A file of the disc_features stage for a frozen encoder: results/probes/features/{encoder}/disc_{name}."""
    return out("probes", "features", encoder, f"disc_{name}")


def axial_features_inputs(wildcards):
    encoder = encoder_file(axial_method(wildcards.encoder))
    return {"code": code("axial_features"), "axial": axial_array(), "encoder": encoder}


def disc_features_inputs(wildcards):
    inputs = {"code": code("disc_features"), "discs": rules.extract.output.discs}
    if wildcards.encoder != "random":
        inputs["encoder"] = encoder_file(wildcards.encoder)
    return inputs


def disc_features_flags(wildcards, input):
    if wildcards.encoder == "random":
        seed = config["pretrain"]["seed"]
        return f"--random --encoder-seed {seed} {stage_options('pretrain', keys=('width', 'embedding_dim'))}"
    return f"--encoder {input.encoder}"


def trains_network(model):
    """Whether a probe job of ``model`` trains a network (end to end, or Hou et al.'s classifier through a frozen
    axial extractor) rather than heads on cached features."""
    return model in END_TO_END or bool(axial_method(model))


def probe_threads(wildcards):
    """A probe job's threads: probe_training.threads where it trains a network, else 1."""
    return config["probe_training"]["threads"] if trains_network(wildcards.model) else 1


def probe_inputs(wildcards):
    inputs = {"code": code("probe"), "subjects": rules.splits.output.subjects, "volumes": rules.splits.output.volumes}
    model = wildcards.model
    disc = on_disc(wildcards.task)
    if axial_method(model):  # a disc task on the axial slices, whatever probes.disc_input says
        inputs.update(axial=axial_array(), encoder=encoder_file(axial_method(model)))
        if not CROPS:  # the second samples of 4-slice discs (the axial series; a crop-table cohort has none)
            inputs["second"] = rules.axial_slices.output.second_sample
        if model in FROZEN:
            inputs["pooled"] = disc_features_file(model, "pooled.npy")
    elif model in END_TO_END:
        inputs["array"] = rules.extract.output.discs if disc else rules.extract.output.vertebrae
        if model.endswith("-finetune"):
            inputs["encoder"] = encoder_file(model.removesuffix("-finetune"))
    elif disc:
        for name in ("maps.npy", "pooled.npy", "trunk.npz"):
            inputs[name.split(".")[0]] = disc_features_file(model, name)
    else:
        inputs["features"] = out("probes", "features", model, "features.npy")
    return inputs


# The probe_training keys each kind of job reads: a change to the end-to-end settings re-runs no frozen job.
HEAD_KEYS = ("seed", "heads", "linear_c", "cv_folds", "mlp_hidden", "mlp_alpha", "max_iter")
SCHEDULE_KEYS = ("epochs", "patience", "batch_size", "learning_rate", "weight_decay")
CLASSIFIER_KEYS = ("grad_clip", "dropout")
AUGMENT_KEYS = ("rotation_deg", "shift_fraction", "shift_slices", "scale_range", "intensity", "flip")
NETWORK_KEYS = ("seed",) + SCHEDULE_KEYS + ("device",)


def grade_classes_flag():
    """probes.grade_classes as the option of the stages that train on grades."""
    return "--grade-classes " + " ".join(str(c) for c in PROBES["grade_classes"])


def supervised_array_flag():
    """The supervised encoder's array option: --discs (the disc classifier, probes.disc_input: disc) or --vertebrae
    (a disc's two bodies), with the grade classes of the disc classifier."""
    if PROBES["disc_input"] == "disc":
        return f"{grade_classes_flag()} --discs"
    return "--vertebrae"


def supervised_options():
    if PROBES["disc_input"] == "disc":
        return stage_options("probe_training", keys=NETWORK_KEYS + CLASSIFIER_KEYS + AUGMENT_KEYS)
    return stage_options("probe_training", keys=NETWORK_KEYS + ("level_loss_weight",))


def probe_options(wildcards):
    if axial_method(wildcards.model):  # the linear and MLP heads, and Hou et al.'s classifier (slice_head)
        keys = ("seed", "device") + (HEAD_KEYS[1:] if wildcards.model in FROZEN else ())
        return f"{stage_options('probe_training', keys=keys)} {stage_options('slice_head', prefix='slice')}"
    disc = on_disc(wildcards.task)
    if wildcards.model in END_TO_END:
        keys = NETWORK_KEYS + (CLASSIFIER_KEYS + AUGMENT_KEYS if disc else ())
    else:
        keys = HEAD_KEYS + (SCHEDULE_KEYS + CLASSIFIER_KEYS if disc else ())
    return stage_options("probe_training", keys=keys)


def probe_flags(wildcards, input):
    if axial_method(wildcards.model):
        grades = f" {grade_classes_flag()}" if wildcards.task == "grade" else ""
        arrays = f"--axial {input.axial} --encoder {input.encoder} {initial_weights_flags(wildcards.model)}"
        if "second" in input.keys():
            arrays += f" --axial-second {input.second}"
        if wildcards.model in END_TO_END:
            return f"--disc-input disc{grades} --end-to-end {arrays}"
        return f"--disc-input disc{grades} --disc-pooled {input.pooled} {arrays}"
    flags = f"--disc-input {PROBES['disc_input']}"
    if wildcards.task == "grade":
        flags += f" {grade_classes_flag()}"
    if wildcards.model in END_TO_END:
        array = "--discs" if on_disc(wildcards.task) else "--vertebrae"
        flags += f" --end-to-end {array} {input.array} {encoder_size_flags()}"
        return flags + (f" --encoder {input.encoder}" if "encoder" in input.keys() else "")
    if on_disc(wildcards.task):
        return flags + f" --disc-maps {input.maps} --disc-pooled {input.pooled} --disc-trunk {input.trunk}"
    return flags + f" --features {input.features}"


BUILTIN_LOCALISER = os.path.join(BASEDIR, "stages", "anatomy", "weights", "builtin_localiser.pt")


def check_localiser_model():
    """localise.model must be builtin, cohort or a weights file that exists: checked at start-up (localisation
    comes after ingest's checkpoint, where a dry run would not look)."""
    choice = config["localise"]["model"]
    if choice not in ("builtin", "cohort") and not os.path.isfile(choice):
        raise ValueError(f"localise.model is {choice!r}: neither builtin, cohort nor an existing weights file")


def localiser_weights(wildcards=None):
    """The weights localise.model names: built-in, the cohort's (localiser_train), or a path."""
    choice = config["localise"]["model"]
    if choice == "builtin":
        return BUILTIN_LOCALISER
    if choice == "cohort":
        return rules.localiser_train.output.model
    return choice


# ---- axial slices (workflow/rules/axial.smk)


def axial_slices_inputs(wildcards):
    """The study's second series (ingest's, from a DICOM archive or the demo's); none for a volumes cohort."""
    if ingest_stage() != "ingest":
        return {}
    return {
        "second_series": rules.ingest.output.second_series,
        "second_volumes": rules.ingest.output.second_volumes,
    }


def axial_second_flags(wildcards, input):
    """--second-series and --second-volumes when the rule has them as inputs."""
    if "second_series" not in input.keys():
        return ""
    return f"--second-series {input.second_series} --second-volumes {input.second_volumes}"


def axial_options():
    """The axial section, and extract.width_fraction (the pixel size of the resliced slices the native match) and
    axial_spacing_mm (the label map is resliced as extraction resliced the image)."""
    return f"{stage_options('axial')} {stage_options('extract', keys=('width_fraction', 'axial_spacing_mm'))}"
