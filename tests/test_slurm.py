"""The DAG on a real SLURM cluster (marker `slurm`, `make test-slurm`).

A one-node cluster started by workflow/profiles/slurm/local-cluster.sh runs the tiny workflow through
`--executor slurm` with workflow/profiles/slurm-ci; its outputs are compared with a local run of the same seed;
a generate shard is cancelled mid-run and Snakemake's retry resubmits it; the cluster's stop leaves nothing
running. Where no cluster can be set up (not root, no apt-get, packages not installable) those tests skip with
the script's reason. The checks of the profiles and of the script's refusal run in `make test`.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from test_workflow import snakemake, snakemake_argv, snakemake_env, tiny_workflow

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "workflow" / "profiles" / "slurm" / "local-cluster.sh"
PROFILES = ROOT / "workflow" / "profiles"
CI_PROFILE = ("--workflow-profile", "workflow/profiles/slurm-ci")
SLURM_CONF = Path("/etc/slurm/slurm.conf")
UNAVAILABLE = 3  # local-cluster.sh: no cluster can be set up here
SHARDS = ("results/generate/shard-0.h5", "results/generate/shard-1.h5")
# byte for byte the same as the local run; the simulator's file records its CPU time per event, so it is compared
# dataset by dataset without that one
SAME_BYTES = ("results/ingest/dataset.h5", "results/train/generator.pt", *SHARDS)
MEASURED = {"truth/cpu_seconds"}
# every rule of the default DAG but `all` is a SLURM job
SLURM_RULES = {
    "simulate",
    "ingest",
    "train",
    "validate_floors",
    "generate_shard",
    "generate",
    "export",
    "validate",
    "report",
}
SUBMITTED = re.compile(r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: (.+?)\)\.")


def _cluster(command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER), command], capture_output=True, text=True, env=env, timeout=600)


def _jobs(env: dict[str, str]) -> dict[str, dict[str, str]]:
    """Every job slurmctld still knows (finished ones for MinJobAge): id -> state, partition, comment, name."""
    out = subprocess.run(
        ["squeue", "--states=all", "--noheader", "--format=%i|%T|%P|%k|%j"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    keys = ("state", "partition", "comment", "name")
    return {row[0]: dict(zip(keys, row[1:], strict=True)) for row in (line.split("|") for line in out.stdout.split())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Cluster:
    env: dict[str, str]  # the environment that names its state directory
    state: Path
    pids: dict[str, int]  # the daemons local-cluster.sh started: slurmctld, slurmd and munged (if it started one)
    conf_before: bytes | None  # /etc/slurm/slurm.conf before the start (None: there was none)


@dataclass
class SlurmRun:
    work: Path
    log: str  # Snakemake's output
    jobs: dict[str, dict[str, str]]  # squeue right after the run


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running one-node cluster; stopped when the module ends, whatever happened (the Makefile's trap stops
    it too, should pytest itself die)."""
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.skip("snakemake-executor-plugin-slurm is not installed (`make test-slurm` installs .[slurm])")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SURROGATE_SLURM_DIR": str(state)}
    conf_before = SLURM_CONF.read_bytes() if SLURM_CONF.exists() else None
    if _cluster("status", env).returncode == 0:
        pytest.fail("a local cluster is already up: stop it first (workflow/profiles/slurm/local-cluster.sh stop)")
    try:
        start = _cluster("start", env)
        if start.returncode == UNAVAILABLE:
            pytest.skip(f"no SLURM cluster here: {start.stderr.strip().splitlines()[-1]}")
        assert start.returncode == 0, start.stdout + start.stderr
        run = state / "run"
        pids = {p.stem: int(p.read_text()) for p in run.glob("*.pid") if p.stem in ("slurmctld", "slurmd", "munged")}
        assert {"slurmctld", "slurmd"} <= set(pids), pids
        yield Cluster(env, state, pids, conf_before)
    finally:
        _cluster("stop", env)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> Path:
    """The same tiny workflow and seed, run locally up to the generated shards (after the SLURM run, not beside
    it: on 2 cores two trainings side by side run many times slower)."""
    work = tiny_workflow(tmp_path_factory.mktemp("local-run"), log_model=False)
    out = snakemake(work, targets=SHARDS)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    return work


@pytest.fixture(scope="module")
def slurm_run(cluster, tmp_path_factory) -> SlurmRun:
    """The whole tiny DAG through the SLURM executor (the MLflow model is logged by test_workflow's run, not
    here: it is a third of the report's time)."""
    work = tiny_workflow(tmp_path_factory.mktemp("slurm-run"), log_model=False)
    out = snakemake(work, runner=CI_PROFILE, timeout=1800)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    return SlurmRun(work, log, _jobs(cluster.env))


def _datasets(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def _assert_same_outputs(work: Path, reference: Path, paths: tuple[str, ...]) -> None:
    differ = [p for p in paths if (work / p).read_bytes() != (reference / p).read_bytes()]
    assert not differ, f"not the same bytes as the local run: {differ}"


@pytest.mark.slurm
def test_every_rule_ran_as_a_slurm_job(slurm_run):
    """Each job of the DAG but `all` was submitted with sbatch, ran in its partition and completed; its SLURM log
    (named by job id) is there."""
    rules = set(re.findall(r"^rule (\w+):", slurm_run.log, re.M))
    assert rules == SLURM_RULES
    assert set(re.findall(r"^localrule (\w+):", slurm_run.log, re.M)) == {"all"}
    run_id = re.search(r"SLURM run ID: (\S+)", slurm_run.log).group(1)
    submitted = SUBMITTED.findall(slurm_run.log)
    assert len(submitted) == len(SLURM_RULES) + 1  # two generate shards
    for _, job_id, log in submitted:
        job = slurm_run.jobs[job_id]
        assert job["state"] == "COMPLETED" and job["name"] == run_id, (job_id, job)
        rule = re.match(r"rule_(\w+?)(_wildcards_.*)?$", job["comment"]).group(1)
        assert job["partition"] == ("gpu" if rule in ("train", "generate_shard") else "cpu"), (rule, job)
        assert Path(log).name == f"{job_id}.log" and Path(log).stat().st_size > 0
    shards = sorted(j["comment"] for j in slurm_run.jobs.values() if j["comment"].startswith("rule_generate_shard"))
    assert shards == ["rule_generate_shard_wildcards_0", "rule_generate_shard_wildcards_1"]


@pytest.mark.slurm
def test_outputs_equal_local_run(slurm_run, local_run):
    """Same seed, same bytes: the dataset, the generator and both shards; the simulated sample equal but for its
    measured CPU times."""
    _assert_same_outputs(slurm_run.work, local_run, SAME_BYTES)
    path = "data/raw/reference.h5"
    with h5py.File(slurm_run.work / path) as a, h5py.File(local_run / path) as b:
        names = _datasets(a)
        assert "showers" in names and names == _datasets(b)
        differ = [n for n in names if n not in MEASURED and not np.array_equal(a[n][()], b[n][()])]
        assert not differ, f"{path}: datasets differ from the local run: {differ}"
        attrs = [{k: json.loads(v) if k == "config" else v for k, v in f.attrs.items()} for f in (a, b)]
        for record in attrs:  # the config it was made with: the same but for the MLflow store in each work dir
            record["config"].pop("report")
        assert attrs[0] == attrs[1]


@pytest.mark.slurm
def test_mlflow_run_exists(slurm_run):
    from mlflow.tracking import MlflowClient

    record = json.loads((slurm_run.work / "results/report/mlflow_run.json").read_text())
    run = MlflowClient(record["tracking_uri"]).get_run(record["run_id"])
    summary = json.loads((slurm_run.work / "results/validate/summary.json").read_text())
    assert run.info.status == "FINISHED"
    assert run.data.tags["validation.verdict"] == summary["verdict"]


@pytest.mark.slurm
def test_cancelled_shard_is_resubmitted(cluster, slurm_run, local_run, tmp_path):
    """`scancel` of generate shard 0 while it runs: the job fails as CANCELLED, Snakemake's retry (the profile's
    `retries: 1`) submits it again, and the shard comes out as in an undisturbed run."""
    work = tmp_path / "w"
    shutil.copytree(slurm_run.work, work, symlinks=True)
    shard_log = work / "results/logs/generate-0.log"
    started = time.time()
    output = tmp_path / "snakemake.out"
    with output.open("w") as sink:
        argv = snakemake_argv("--forcerun", "generate_shard", runner=CI_PROFILE, targets=SHARDS[:1])
        proc = subprocess.Popen(argv, cwd=work, stdout=sink, stderr=subprocess.STDOUT, env=snakemake_env())
    cancelled = None
    try:
        while cancelled is None and proc.poll() is None and time.time() - started < 600:
            running = [
                i
                for i, j in _jobs(cluster.env).items()
                if j["comment"] == "rule_generate_shard_wildcards_0" and j["state"] == "RUNNING"
            ]
            # the job's shell has started the stage (it rewrote the stage's log): cancel it mid-run
            if running and shard_log.exists() and shard_log.stat().st_mtime > started:
                subprocess.run(["scancel", running[0]], env=cluster.env, check=True)
                cancelled = running[0]
            time.sleep(0.1)
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = output.read_text()
    assert cancelled is not None, "shard 0 was not seen running: nothing was cancelled"
    assert proc.returncode == 0, log[-5000:]
    shard0 = {i: j["state"] for i, j in _jobs(cluster.env).items() if j["comment"] == "rule_generate_shard_wildcards_0"}
    assert shard0[cancelled] == "CANCELLED", shard0
    assert [s for i, s in shard0.items() if int(i) > int(cancelled)] == ["COMPLETED"], shard0
    assert f"SLURM-job '{cancelled}' failed" in log
    _assert_same_outputs(work, local_run, SHARDS[:1])


@pytest.mark.slurm
def test_stop_leaves_nothing_running(cluster):
    """Runs last: the cluster's stop ends every daemon it started and every job step, and restores
    /etc/slurm/slurm.conf as it was."""
    stop = _cluster("stop", cluster.env)
    assert stop.returncode == 0, stop.stderr
    deadline = time.time() + 5
    while any(_alive(p) for p in cluster.pids.values()) and time.time() < deadline:
        time.sleep(0.1)  # a killed daemon is reaped by init a moment later
    assert not [n for n, p in cluster.pids.items() if _alive(p)]
    steps = subprocess.run(["pgrep", "-x", "slurmstepd"], capture_output=True, text=True)
    assert steps.stdout == "", f"job steps left running: {steps.stdout}"
    assert _cluster("status", cluster.env).returncode == 1
    after = SLURM_CONF.read_bytes() if SLURM_CONF.exists() else None
    assert after == cluster.conf_before


# ---- without a cluster (make test) ----


def _rules() -> dict[str, str]:
    """Rule name -> its source in workflow/rules/*.smk."""
    text = "\n".join(p.read_text() for p in sorted((ROOT / "workflow" / "rules").glob("*.smk")))
    return dict(re.findall(r"^rule (\w+):\n((?:[ \t]+.*\n|\n)*)", text, re.M))


def test_profiles_cover_every_rule():
    """On a cluster `threads: 32` ("as many as --cores allows") is 32 CPUs per job and a rule's `gpu=1` is
    `sbatch --gpus=1`: both profiles set the threads of such rules, and the real one sends GPU jobs to its GPU
    partition while the CI one asks for no GPU."""
    real = yaml.safe_load((PROFILES / "slurm" / "config.yaml").read_text())
    ci = yaml.safe_load((PROFILES / "slurm-ci" / "config.yaml").read_text())
    rules = _rules()
    many = {r for r, body in rules.items() if re.search(r"threads: *32", body)}
    gpu = {r for r, body in rules.items() if re.search(r"gpu=1", body)}
    assert many >= {"train", "validate"} and gpu >= {"train", "generate_shard"}
    for profile in (real, ci):
        assert many <= set(profile["set-threads"])
        assert profile["slurm-status-command"] == "squeue"
        assert profile["default-resources"]["mem_mb"] > 0
    for rule in gpu:
        assert real["set-resources"][rule]["slurm_partition"] == "gpu" and real["set-resources"][rule]["gpu"] >= 1
        assert ci["set-resources"][rule]["gpu"] == 0, rule
    assert real["set-resources"]["train"]["slurm_partition"] == "gpu"


def test_ci_profile_differs_from_the_real_one_only_where_the_node_does():
    """What the SLURM test runs is the shipped profile but for GPUs, threads, sizes and the status interval."""
    real = yaml.safe_load((PROFILES / "slurm" / "config.yaml").read_text())
    ci = yaml.safe_load((PROFILES / "slurm-ci" / "config.yaml").read_text())
    may_differ = {"jobs", "latency-wait", "slurm-init-seconds-before-status-checks", "slurm-keep-successful-logs"}
    sized = {"runtime", "mem_mb", "gpu"}

    def shape(profile):
        top = {k: v for k, v in profile.items() if k not in may_differ | {"set-resources", "default-resources"}}
        top["set-threads"] = set(profile["set-threads"])
        resources = {"default": profile["default-resources"], **profile["set-resources"]}
        return top, {r: {k: v for k, v in res.items() if k not in sized} for r, res in resources.items()}

    assert shape(ci) == shape(real)
    assert max(ci["set-threads"].values()) <= 2
    assert not any(res.get("gpu") for res in ci["set-resources"].values())


def test_start_without_root_is_unavailable(tmp_path):
    """Not root: start refuses with exit status 3 and says why (the SLURM tests then skip), touching nothing."""
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root and runuser, to run the script as another user")
    before = SLURM_CONF.read_bytes() if SLURM_CONF.exists() else None
    out = subprocess.run(  # the script on stdin: the checkout need not be readable by nobody
        ["runuser", "-u", "nobody", "--", "bash", "-s", "start"],
        input=CLUSTER.read_text(),
        capture_output=True,
        text=True,
        env={**os.environ, "SURROGATE_SLURM_DIR": str(tmp_path / "slurm")},
        timeout=60,
    )
    assert out.returncode == UNAVAILABLE, out.stderr
    assert "unavailable: needs root" in out.stderr
    assert not (tmp_path / "slurm").exists()
    assert (SLURM_CONF.read_bytes() if SLURM_CONF.exists() else None) == before
