"""The SLURM command the documentation gives for the paper grid works as written: dry-run exactly
that command and check what every job would ask SLURM for, and that light jobs stay local.

Part of `make test` and also run first by `make test-cluster` (it needs no cluster: a dry run)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMMAND = "snakemake --configfile config/paper.yaml --profile profiles/slurm"
# Where the command is written down for users.
DOCUMENTED_IN = ["README.md", "workflow/README.md", "Snakefile", "profiles/slurm/config.yaml",
                 "config/paper.yaml", "docs/cluster-testing.md"]
MODEL_RULES = {"evaluate_unedited", "run_cell"}  # the GPU jobs of the paper grid
# A GPU job too, planned only with share_prefix_mb > 0 (paper.yaml turns sharing off): never local.
SHARING_RULES = {"share_training"}
CLUSTER_RULES = MODEL_RULES | {"materialize_model"}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A copy of what the workflow reads, so the dry run never sees the checkout's results/."""
    work = tmp_path_factory.mktemp("documented")
    for name in ("Snakefile", "workflow", "config", "profiles", "notebooks"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    shutil.copytree(ROOT / "resources" / "reference", work / "resources" / "reference")
    return work


@pytest.fixture(scope="module")
def dry_run(scratch: Path) -> dict[str, list[dict[str, str]]]:
    """Every job of the documented command's dry run, by rule: its `resources:` as a dict."""
    snakemake = Path(sys.executable).with_name("snakemake")
    proc = subprocess.run([str(snakemake), *COMMAND.split()[1:], "-n"], cwd=scratch,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs: dict[str, list[dict[str, str]]] = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", proc.stdout + proc.stderr):
        head = re.match(r"(?:local)?rule (\w+):", block)
        res = re.search(r"^\s+resources: (.*)$", block, flags=re.M)
        if head and res:
            pairs = (kv.split("=", 1) for kv in res.group(1).split(", "))
            jobs.setdefault(head.group(1), []).append({k: v for k, v in pairs})
    return jobs


def test_the_command_is_documented_the_same_everywhere() -> None:
    for name in DOCUMENTED_IN:
        text = " ".join((ROOT / name).read_text().split())  # line breaks inside a command
        assert COMMAND in text, f"{name} does not give `{COMMAND}`"
        assert "--workflow-profile none" not in text, f"{name} still needs --workflow-profile none"
    # Snakemake layers profiles/default under every --profile; none must exist to be layered.
    assert not (ROOT / "profiles" / "default").exists()
    assert not (ROOT / "workflow" / "profiles" / "default").exists()


def test_every_cluster_job_gets_the_config_resources_and_threads(dry_run) -> None:
    paper = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    assert "set-threads" not in profile and "cores" not in profile, "threads are declared once, in the config"
    for rule in CLUSTER_RULES:
        assert dry_run.get(rule), f"the paper grid plans no {rule} job"
        wanted = {k: str(v) for k, v in paper["resources"][rule].items()}
        if rule in MODEL_RULES:
            wanted["cpus_per_task"] = str(paper["threads"])
        partition = profile["set-resources"].get(rule, {}).get(
            "slurm_partition", profile["default-resources"]["slurm_partition"])
        wanted["slurm_partition"] = partition
        for job in dry_run[rule]:
            got = {k: job.get(k) for k in wanted}
            assert got == wanted, f"{rule}: {got} != {wanted}"
    assert paper["threads"] > 2, "the paper config should give model jobs more than 2 threads"


def test_light_rules_are_local(scratch: Path) -> None:
    """The light rules run on the submitting node (dry runs do not print it, so ask Snakemake)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

    with SnakemakeApi(OutputSettings()) as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(),
            config_settings=ConfigSettings(configfiles=[scratch / "config" / "paper.yaml"]),
            snakefile=scratch / "Snakefile", workdir=scratch)._workflow
        rules = {rule.name for rule in workflow.rules}
        local = set(workflow._localrules)
    assert CLUSTER_RULES | SHARING_RULES <= rules
    assert local == rules - CLUSTER_RULES - SHARING_RULES, f"local: {sorted(local)}, rules: {sorted(rules)}"
