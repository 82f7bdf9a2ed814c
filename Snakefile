# kalmanrl: GRPO vs KRPO vs KPO, from data to report.
# Thin by design: validate the config (common.smk; its `plugins` are imported first, so every name they register is
# checked like a built-in one), include one rule file per stage, name the final targets.
from snakemake.utils import min_version

min_version("9.19")


# The default study, unless --configfile names another: Snakemake would otherwise merge the two, and a paper grid
# would inherit the laptop study's models and datasets.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        REPORT_OUTPUTS,
    default_target: True
