# spine-ssl: self-supervised learning on lumbar spine MRI from a DICOM archive. See README.md.
import sys

from snakemake.utils import min_version

min_version("9.0")

sys.path.insert(0, workflow.basedir)  # the `stages` package, also when run from another directory
from stages.core.config import validate_config  # noqa: E402


configfile: "config.yaml"


config.update(validate_config(config))


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/report_common.smk"
include: "workflow/rules/demo_cohort.smk"


if config["cohort"]["source"] == "crops":  # pre-cut crops stand in for ingest, localisation and extraction

    include: "workflow/rules/crops.smk"

else:

    include: "workflow/rules/ingest.smk"
    include: "workflow/rules/localise.smk"
    include: "workflow/rules/extract.smk"
    include: "workflow/rules/axial.smk"


include: "workflow/rules/splits.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/probes.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/genetics.smk"


if not CROPS:  # the lumbar regions and the segmentation downstream need the scans

    include: "workflow/rules/regions.smk"


rule all:
    default_target: True
    input:
        all_targets(),


apply_cluster_resources(workflow.rules)
