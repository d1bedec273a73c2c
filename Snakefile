# clipsvd: few-shot adaptation of CLIP-style models to medical images (CLIP-SVD and baselines).
#
#   snakemake --cores 8                      # the default, offline demo study
#   snakemake --cores 8 --use-conda          # rules run in the conda environment of envs/
#   snakemake --cores 8 --configfile config/studies/<study>.yaml
#
# This file only wires things: rules live in workflow/rules/, logic in src/clipsvd/.
from snakemake.utils import min_version

min_version("8.20")


# The home page of `snakemake --report` (give it the study's --configfile too).
report: "workflow/report/workflow.rst"


# The default study, unless config files are given with --configfile: a study file then stands
# alone and no demo setting leaks into it.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/adapt.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        report_outputs(),
