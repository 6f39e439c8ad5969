"""Cluster submission through profiles/slurm/, against a real single-node SLURM cluster.

Run by `make test-cluster` (workflow/scripts/slurm_cluster.sh test), which starts the cluster, sets
SLURM_CONF and EMSEDIT_CLUSTER_STATE, runs `pytest -m cluster tests/cluster` and stops the cluster.
Without a running cluster these tests fail (they never pass without having submitted a job); the
normal `make test` deselects them (`-m "not cluster"`).

What runs (environment variables, all optional):
  CLUSTER_WORKFLOW   project (default): the project's tiny workflow, `--configfile .test/config.yaml`,
                     run in a fresh copy of the working tree (tracked + untracked, not ignored files);
                     mini: the throwaway workflow in tests/cluster/mini/ (only when asked for).
  CLUSTER_SMK_ARGS   replaces the workflow arguments above (e.g. "--configfile .test/config.yaml -j 2").
  CLUSTER_FAIL_ARGS  extra arguments that make exactly one job fail, e.g. "--config fail=b" (the mini
                     default). Unset for the project workflow: then a test-only `srun` wrapper
                     (tests/cluster/shim/srun, put first on PATH) fails the first SLURM job of
                     CLUSTER_FAIL_RULE (default: the cluster rule with the most jobs).
  CLUSTER_FAIL_RULE  the rule expected to fail (mini default: cell).
  CLUSTER_PROFILE    production profile dir (default profiles/slurm; the mini workflow falls back to
                     tests/cluster/mini/profile while profiles/slurm/config.yaml does not exist).
  CLUSTER_RUN_TIMEOUT  seconds per Snakemake run (default 900).
  CLUSTER_ACCOUNTING_WAIT  seconds, after a run, for the cluster to record a final state for every
                     job Snakemake submitted (default 60); the test fails when it does not.

The scenario, in one fresh working directory:
  1. a run in which one job fails (with --keep-going): Snakemake exits non-zero, names the failed
     rule and its SLURM job id; SLURM records that job as FAILED and every other job as COMPLETED;
  2. a rerun without the failure: SLURM gets exactly the jobs a dry run says are missing (counted
     as new SLURM job ids, per rule), fewer than the whole workflow, and all complete; over the two
     runs every cluster rule of the workflow ran as a completed SLURM job;
  3. one more run submits nothing.
A JSON summary (job ids per run, timings) is written to $EMSEDIT_CLUSTER_STATE/summary.json.
Each run happens once per module in a fixture (failing_run -> rerun -> third_run, each depending on
the one before), so every test can also be run alone (it brings about the runs it needs).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
    "BOOT_FAIL", "DEADLINE", "PREEMPTED", "REVOKED",
}
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (.*?)\)\.?$", re.M)
JOB_HEADER = re.compile(r"^(local)?(?:rule|checkpoint) (\w+):\s*$", re.M)

# seconds to wait for the cluster's records of a run's jobs to reach a final state
ACCOUNTING_WAIT = float(os.environ.get("CLUSTER_ACCOUNTING_WAIT", "60"))


# --- helpers ---------------------------------------------------------------------------------


def _settings() -> dict:
    workflow = os.environ.get("CLUSTER_WORKFLOW", "project")
    if workflow not in ("project", "mini"):
        pytest.fail(f"CLUSTER_WORKFLOW must be 'project' or 'mini', not {workflow!r}")
    profile = Path(os.environ.get("EMSEDIT_CLUSTER_PROFILE", REPO / "profiles" / "slurm"))
    if not (profile / "config.yaml").is_file() and not (profile / "profile.yaml").is_file():
        pytest.fail(f"no SLURM profile at {profile} (config.yaml missing)")
    overlay = os.environ.get("EMSEDIT_CLUSTER_OVERLAY")
    if not overlay or not Path(overlay, "config.yaml").is_file():
        pytest.fail("no test overlay profile (EMSEDIT_CLUSTER_OVERLAY): start the cluster with "
                    "workflow/scripts/slurm_cluster.sh, which writes it")
    if workflow == "project":
        args = os.environ.get("CLUSTER_SMK_ARGS", "--directory .test --configfile .test/config.yaml")
        if "CLUSTER_SMK_ARGS" not in os.environ and not (REPO / ".test" / "config.yaml").is_file():
            pytest.fail(
                "the project's tiny workflow config .test/config.yaml does not exist yet; "
                "run with CLUSTER_WORKFLOW=mini to test the cluster machinery alone"
            )
        fail_args = os.environ.get("CLUSTER_FAIL_ARGS", "")
        fail_rule = os.environ.get("CLUSTER_FAIL_RULE", "")
        targets = os.environ.get("CLUSTER_TARGETS", "auto")
    else:
        args = os.environ.get("CLUSTER_SMK_ARGS", "")
        fail_args = os.environ.get("CLUSTER_FAIL_ARGS", "--config fail=b")
        fail_rule = os.environ.get("CLUSTER_FAIL_RULE", "cell")
        targets = os.environ.get("CLUSTER_TARGETS", "all")
    return {
        "workflow": workflow,
        "profile": profile.resolve(),
        "overlay": Path(overlay).resolve(),
        "args": shlex.split(args),
        "fail_args": shlex.split(fail_args),
        "fail_rule": fail_rule,
        "targets": targets,
        "cells": int(os.environ.get("CLUSTER_CELLS", "2")),
        "local_rules": (set(os.environ["CLUSTER_LOCAL_RULES"].split()) if "CLUSTER_LOCAL_RULES" in os.environ
                        else _declared_local_rules() if workflow == "project" else {"all"}),
        "timeout": int(os.environ.get("CLUSTER_RUN_TIMEOUT", "900")),
    }


def _declared_local_rules() -> set[str]:
    """The project's `localrules` (and `all`), as Snakemake itself reads them from the Snakefile."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

    with SnakemakeApi(OutputSettings()) as api:
        workflow = api.workflow(resource_settings=ResourceSettings(),
                                config_settings=ConfigSettings(configfiles=[REPO / ".test" / "config.yaml"]),
                                snakefile=REPO / "Snakefile", workdir=REPO / ".test")._workflow
        return set(workflow._localrules) | {"all"}


def _copy_tree(dest: Path) -> None:
    """Copy the working tree as git sees it (tracked + untracked, minus ignored) into dest."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True,
    ).stdout.split(b"\0")
    for raw in files:
        if not raw:
            continue
        rel = raw.decode()
        src = REPO / rel
        if not src.is_file():  # deleted but still in the index
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def slurm_jobs() -> dict[str, dict]:
    """All jobs the test cluster knows: id -> {name, comment, state, exit}."""
    if os.environ.get("EMSEDIT_CLUSTER_ACCOUNTING", "1") == "1":
        cmd = ["sacct", "-X", "-n", "-P", "-a", "-S", "2000-01-01",
               "-o", "JobIDRaw,JobName,Comment,State,ExitCode"]
    else:  # the controller's own records (kept MinJobAge=300 s after the end)
        cmd = ["squeue", "--states=all", "-h", "-o", "%i|%j|%k|%T|%A"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout
    jobs = {}
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) < 5:
            continue
        jid, name, comment, state, code = parts[:5]
        jobs[jid] = {"name": name, "comment": comment, "state": state.split()[0], "exit": code}
    return jobs


def rule_of(job: dict) -> str:
    m = re.match(r"rule_(\w+?)(?:_wildcards_.*)?$", job["comment"])
    return m.group(1) if m else f"?{job['comment']}"


def new_jobs(before: set[str], expect: set[str], wait: float = ACCOUNTING_WAIT) -> dict[str, dict]:
    """Jobs that appeared since `before`, once every job of `expect` (the SLURM job ids Snakemake
    reported) is known to the cluster and every new job has a final state. Fails the test when that
    is not reached within `wait` seconds."""
    deadline = time.time() + wait
    while True:
        fresh = {j: v for j, v in slurm_jobs().items() if j not in before}
        unseen = expect - set(fresh)
        running = {j: v["state"] for j, v in fresh.items() if v["state"] not in FINAL_STATES}
        if not unseen and not running:
            return fresh
        if time.time() > deadline:
            pytest.fail(f"after {wait:.0f} s the cluster still lacks jobs {sorted(unseen)} and has jobs "
                        f"without a final state {running} (of the new jobs {sorted(fresh)})")
        time.sleep(1)


def assert_no_new_jobs(before: set[str], settle: float = 5) -> None:
    """No job appears on the cluster since `before`, watched for `settle` seconds (the accounting
    may show a job a moment after its submission)."""
    deadline = time.time() + settle
    while True:
        fresh = {j: v for j, v in slurm_jobs().items() if j not in before}
        assert not fresh, f"submitted again: {fresh}"
        if time.time() > deadline:
            return
        time.sleep(1)


class Workflow:
    def __init__(self, cfg: dict, workdir: Path, logdir: Path):
        self.cfg = cfg
        self.workdir = workdir
        self.logdir = logdir
        self.targets: list[str] = []
        self.full_plan: dict = {}  # the dry run of the whole scenario's jobs, set by the wf fixture

    def command(self, extra: list[str]) -> list[str]:
        # Targets first: options such as --configfile take several values and would swallow them.
        base = [str(SNAKEMAKE), *self.targets, "--profile", str(self.cfg["profile"]),
                "--profile", str(self.cfg["overlay"])]
        if self.cfg["workflow"] == "mini":
            base += ["--snakefile", str(self.workdir / "Snakefile")]
        return base + self.cfg["args"] + extra

    def run(self, label: str, extra: list[str], env_extra: dict | None = None) -> tuple[int, str, float]:
        env = dict(os.environ)
        env.update(env_extra or {})
        cmd = self.command(extra)
        log = self.logdir / f"{label}.log"
        t0 = time.time()
        with open(log, "w") as fh:
            fh.write("$ " + shlex.join(cmd) + "\n")
            fh.flush()
            proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=self.cfg["timeout"])
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)  # Snakemake then scancels its SLURM jobs
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                pytest.fail(f"{label}: Snakemake still running after {self.cfg['timeout']} s; see {log}")
        seconds = time.time() - t0
        return rc, log.read_text(), seconds

    def plan(self, label: str, extra: list[str] = ()) -> dict:
        """Dry run: the jobs that would run, per rule (cluster and local), and their outputs."""
        rc, out, _ = self.run(label, ["--dry-run", *extra])
        assert rc == 0, f"dry run failed (rc={rc}):\n{tail(out)}"
        local_ok = self.cfg["local_rules"]
        remote, local = collections.Counter(), collections.Counter()
        outputs = collections.defaultdict(list)
        for _, rule, body in job_blocks(out):
            (local if rule in local_ok else remote)[rule] += 1
            m = re.search(r"^\s+output: (.*)$", body, re.M)
            if m:
                outputs[rule].append([o.strip() for o in m.group(1).split(",")])
        return {"remote": remote, "local": local, "outputs": outputs}


def job_blocks(out: str):
    """(is_local, rule, body) for each job header that Snakemake printed."""
    heads = list(JOB_HEADER.finditer(out))
    for i, h in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(out)
        body = out[h.end():end].split("\n\n", 1)[0]
        yield bool(h.group(1)), h.group(2), body


def tail(text: str, n: int = 60) -> str:
    return "\n".join(text.splitlines()[-n:])


def submitted(out: str) -> dict[str, str]:
    """SLURM job id -> log path, from Snakemake's own output."""
    return {m.group(2): m.group(3) for m in SUBMITTED.finditer(out)}


EMBEDDED_LOG = re.compile(r"^Logfile .*:\n={40,}\n.*?^={40,}$", re.M | re.S)


def own_output(out: str) -> str:
    """Snakemake's output without the failed jobs' logs it prints (show-failed-logs): those hold
    the job step's own `localrule ...` lines from inside the SLURM job."""
    return EMBEDDED_LOG.sub("", out)


def ran_locally(out: str) -> collections.Counter:
    return collections.Counter(r for is_local, r in JOB_HEADER.findall(own_output(out)) if is_local)


@dataclasses.dataclass
class Run:
    """One Snakemake run against the cluster: exit status, output, the SLURM job ids Snakemake
    reported, and the cluster's record of every job that appeared during it (all in a final state)."""
    rc: int
    out: str
    ids: dict[str, str]
    jobs: dict[str, dict]
    seconds: float


def write_summary(summary: dict, label: str, run: Run) -> None:
    summary["runs"][label] = {
        "rc": run.rc,
        "seconds": round(run.seconds, 1),
        "jobs": {j: {"rule": rule_of(v), "state": v["state"], "exit": v["exit"]}
                 for j, v in sorted(run.jobs.items(), key=lambda kv: int(kv[0].split("_")[0]))},
    }
    state = os.environ.get("EMSEDIT_CLUSTER_STATE")
    if state:
        Path(state, "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def submit(wf: "Workflow", label: str, extra: list[str], env_extra: dict | None = None) -> Run:
    """Run Snakemake and wait until the cluster records a final state for every job it submitted."""
    before = set(slurm_jobs())
    rc, out, seconds = wf.run(label, extra, env_extra)
    ids = submitted(out)
    jobs = new_jobs(before, set(ids))
    return Run(rc, out, ids, jobs, seconds)


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def summary() -> dict:
    """The scenario's JSON summary (job ids per run, timings), written to
    $EMSEDIT_CLUSTER_STATE/summary.json as the runs happen."""
    return {"runs": {}}


@pytest.fixture(scope="module")
def wf(tmp_path_factory, summary) -> Workflow:
    if not os.environ.get("SLURM_CONF") or shutil.which("sbatch") is None:
        pytest.fail("no SLURM test cluster: run `make test-cluster` (workflow/scripts/slurm_cluster.sh test)")
    probe = subprocess.run(["sinfo", "-h", "-o", "%P %a %T"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0 or not probe.stdout.strip():
        pytest.fail(f"the SLURM test cluster does not answer: {probe.stderr.strip() or probe.stdout}")
    cfg = _settings()
    state = Path(os.environ.get("EMSEDIT_CLUSTER_STATE", tmp_path_factory.mktemp("cluster")))
    workdir = state / "work"
    logdir = state / "snakemake-logs"
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.rmtree(logdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    logdir.mkdir(parents=True)
    if cfg["workflow"] == "project":
        _copy_tree(workdir)
    else:
        shutil.copy2(HERE / "mini" / "Snakefile", workdir / "Snakefile")
    summary.update(workflow=cfg["workflow"], profile=str(cfg["profile"]),
                   args=cfg["args"], workdir=str(workdir), logs=str(logdir))
    w = Workflow(cfg, workdir, logdir)
    if cfg["targets"] == "auto":
        # CI budget: not the whole tiny grid but CLUSTER_CELLS jobs of the rule with the most jobs
        # (the experiment cells), with everything upstream of them.
        whole = w.plan("00-dry-run-whole-workflow")
        rule = cfg["fail_rule"] or max(whole["remote"].items(), key=lambda kv: kv[1])[0]
        cfg["fail_rule"] = rule  # the failure is injected into one of the picked jobs
        picked = whole["outputs"].get(rule, [])[: cfg["cells"]]
        assert picked, f"no outputs of rule {rule} in the dry run"
        w.targets = [o for outs in picked for o in outs]
        summary["whole_workflow_jobs"] = dict(whole["remote"] + whole["local"])
    elif cfg["targets"] != "all":
        w.targets = shlex.split(cfg["targets"])
    summary["targets"] = w.targets
    w.full_plan = w.plan("00-dry-run-full")
    assert sum(w.full_plan["remote"].values()) > 0, (
        "the dry run plans no cluster jobs at all (every rule local, or nothing to do in a fresh "
        f"copy?): {dict(w.full_plan['local'])}"
    )
    summary["planned_cluster_jobs"] = dict(w.full_plan["remote"])
    summary["planned_local_jobs"] = dict(w.full_plan["local"])
    return w


# --- the scenario: each run once per module, as fixtures; each test asks for the runs it needs ----


@pytest.fixture(scope="module")
def fail_setup(wf: Workflow, summary: dict) -> dict:
    """How the failing run makes exactly one job fail: the rule, and the srun wrapper's environment
    when the workflow has no switch for a failure."""
    cfg = wf.cfg
    env_extra = {}
    fail_rule = cfg["fail_rule"]
    if not cfg["fail_args"]:
        # No workflow switch for a failure: fail one SLURM job of a rule via the srun wrapper.
        if not fail_rule:
            fail_rule = max(wf.full_plan["remote"].items(), key=lambda kv: kv[1])[0]
        env_extra = {
            "PATH": f"{HERE / 'shim'}{os.pathsep}{os.environ['PATH']}",
            "CLUSTER_FAIL_RULE": fail_rule,
            "CLUSTER_FAIL_MARK": str(wf.workdir / ".cluster-test-failed-once"),
        }
    assert fail_rule, "CLUSTER_FAIL_RULE must name the rule that CLUSTER_FAIL_ARGS makes fail"
    summary["fail_rule"] = fail_rule
    summary["fail_by"] = shlex.join(cfg["fail_args"]) if cfg["fail_args"] else "tests/cluster/shim/srun"
    return {"rule": fail_rule, "env": env_extra}


@pytest.fixture(scope="module")
def failing_run(wf: Workflow, summary: dict, fail_setup: dict) -> Run:
    """1. The run in which one job fails (with --keep-going)."""
    run = submit(wf, "01-failing", ["--keep-going", *wf.cfg["fail_args"]], fail_setup["env"])
    write_summary(summary, "01-failing", run)
    return run


@pytest.fixture(scope="module")
def rerun(wf: Workflow, summary: dict, failing_run: Run) -> tuple[dict, Run]:
    """2. After the failing run: the dry run's plan of what is missing, then the rerun."""
    plan = wf.plan("02-dry-run-rerun")
    run = submit(wf, "03-rerun", [])
    write_summary(summary, "03-rerun", run)
    return plan, run


@pytest.fixture(scope="module")
def third_run(wf: Workflow, summary: dict, rerun: tuple[dict, Run]) -> tuple[Run, set[str]]:
    """3. One more run after the successful rerun; also the cluster's job ids before it."""
    before = set(slurm_jobs())
    rc, out, seconds = wf.run("04-nothing-to-do", [])
    run = Run(rc, out, submitted(out), {j: v for j, v in slurm_jobs().items() if j not in before}, seconds)
    write_summary(summary, "04-nothing-to-do", run)
    return run, before


def _assert_ran_on_slurm(wf: Workflow, out: str) -> None:
    unexpected_local = {r for r in ran_locally(out) if r not in wf.cfg["local_rules"]}
    assert not unexpected_local, (
        f"ran outside SLURM: {unexpected_local} (if the workflow makes them local on purpose, "
        "declare them in the Snakefile's localrules or set CLUSTER_LOCAL_RULES)"
    )


def test_failing_job_is_reported_failed(wf: Workflow, fail_setup: dict, failing_run: Run):
    fail_rule, (rc, out, ids, jobs) = fail_setup["rule"], (failing_run.rc, failing_run.out,
                                                           failing_run.ids, failing_run.jobs)
    assert rc != 0, f"Snakemake exited 0 although a job was meant to fail:\n{tail(out)}"
    assert ids, f"Snakemake submitted no SLURM job:\n{tail(out)}"
    assert set(ids) == set(jobs), (
        f"Snakemake's SLURM job ids {sorted(ids)} differ from the cluster's new jobs {sorted(jobs)}"
    )
    failed = {j: v for j, v in jobs.items() if v["state"] != "COMPLETED"}
    assert failed, f"no SLURM job failed; states: {jobs}\n{tail(out)}"
    # One job fails (its retries, if the profile asks for some, carry the same comment); every
    # other job submitted in this run completes.
    assert len({v["comment"] for v in failed.values()}) == 1, f"more than one job failed: {failed}"
    assert {rule_of(v) for v in failed.values()} == {fail_rule}, f"unexpected failures: {failed}"
    assert all(v["state"] == "FAILED" for v in failed.values()), f"expected state FAILED: {failed}"
    assert len(failed) < len(jobs), f"every job failed: {jobs}"
    assert f"Error in rule {fail_rule}" in out, tail(out)
    for j in failed:
        assert f"SLURM-job '{j}' failed" in out, f"failed SLURM job {j} not reported:\n{tail(out)}"
    _assert_ran_on_slurm(wf, out)


def test_rerun_submits_only_what_is_missing(wf: Workflow, failing_run: Run, rerun: tuple[dict, Run]):
    plan, run = rerun
    missing = plan["remote"]
    total = sum(wf.full_plan["remote"].values())
    assert 0 < sum(missing.values()) < total, (
        f"after the failing run the dry run plans {dict(missing)} of {total} cluster jobs"
    )
    assert run.rc == 0, f"rerun failed (rc={run.rc}):\n{tail(run.out)}"
    assert set(run.ids) == set(run.jobs), (
        f"Snakemake's job ids {sorted(run.ids)} != cluster's new jobs {sorted(run.jobs)}"
    )
    per_rule = collections.Counter(rule_of(v) for v in run.jobs.values())
    assert per_rule == missing, f"rerun submitted {dict(per_rule)}, the dry run said {dict(missing)}"
    bad = {j: v for j, v in run.jobs.items() if v["state"] != "COMPLETED"}
    assert not bad, f"rerun jobs not COMPLETED: {bad}"
    _assert_ran_on_slurm(wf, run.out)

    # Over both runs, every cluster job of the workflow ran as a completed SLURM job.
    completed = collections.Counter(
        rule_of(v) for v in [*failing_run.jobs.values(), *run.jobs.values()] if v["state"] == "COMPLETED"
    )
    assert completed == wf.full_plan["remote"], (
        f"completed SLURM jobs per rule {dict(completed)} != planned {dict(wf.full_plan['remote'])}"
    )


def test_third_run_submits_nothing(rerun: tuple[dict, Run], third_run: tuple[Run, set[str]]):
    assert rerun[1].rc == 0, f"the rerun before this run failed:\n{tail(rerun[1].out)}"
    run, before = third_run
    assert run.rc == 0, tail(run.out)
    assert not run.ids, f"Snakemake submitted SLURM jobs again: {run.ids}"
    assert "Nothing to be done" in run.out, tail(run.out)
    assert_no_new_jobs(before)
