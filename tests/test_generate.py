"""Generate stage: determinism, shard independence, condition sources, refusals, join, kill-and-rerun."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from surrogate import generate
from surrogate.config import load_config
from surrogate.generate import GenerateError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config.yaml"
N_TEST = 64  # rows of the tiny test split


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_dataset(path: Path, cfg: dict, n: int):
    """An ingest-format file with a tiny test split (synthetic showers) and the Preprocessor fitted to it."""
    from surrogate.preprocess import Preprocessor

    rng = np.random.default_rng(0)
    energies = np.exp(rng.uniform(np.log(1e3), np.log(1e5), size=(n, 1))).astype(np.float32)
    eta = rng.uniform(0, 1.5, size=(n, 1)).astype(np.float32)
    pdg = rng.choice(np.array([22, 211], dtype=np.int32), size=(n, 1))
    frac = rng.gamma(0.3, 1.0, size=(n, 533)) * (rng.random((n, 533)) < 0.5) / 300
    showers = (frac * energies).astype(np.float32)
    pre = Preprocessor.fit(showers, energies, eta, pdg, cfg["preprocess"], [22, 211])
    with h5py.File(path, "w") as f:
        g = f.create_group("test")
        g["showers"], g["incident_energies"], g["incident_eta"], g["incident_pdg"] = showers, energies, eta, pdg
        g["conditions"] = pre.transform_conditions(energies, eta, pdg)
        f.attrs["preprocessing"] = json.dumps(pre.to_dict())
    return path, pre


def tiny_checkpoint(path: Path, cfg: dict, pre) -> Path:
    """A tiny generator checkpoint in the train stage's format (random weights), read by the real loader."""
    from surrogate.geometry import from_config
    from surrogate.models import FORMAT_VERSION, Generator, ModelConfig

    geometry = from_config(cfg)
    torch.manual_seed(0)
    mc = ModelConfig(n_voxels=geometry.n_voxels, cond_dim=len(pre.condition_names), z_dim=8, g_width=32, g_depth=1)
    torch.save(
        {
            "format_version": FORMAT_VERSION,
            "model_config": mc.to_dict(),
            "ema_state_dict": Generator(mc).state_dict(),
            "preprocessing": pre.to_dict(),
            "condition_names": pre.condition_names,
            "geometry": geometry.to_dict(),
            "step": 0,
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny dataset.h5 (test split only is read) and a tiny generator checkpoint in the real format."""
    d = tmp_path_factory.mktemp("generate")
    cfg = load_config(
        CONFIG,
        [
            "generate.batch_size=48",
            "generate.output.chunk_events=16",
            "generate.queue_batches=2",
            "generate.events=150",
            "generate.threads=1",
        ],
    )
    dataset, pre = tiny_dataset(d / "dataset.h5", cfg, N_TEST)
    ckpt = tiny_checkpoint(d / "generator.pt", cfg, pre)
    return {"dir": d, "cfg": cfg, "dataset": dataset, "ckpt": ckpt}


def _run(env, out, **kw):
    kw.setdefault("dataset", env["dataset"])
    kw.setdefault("progress", False)
    return generate.run(kw.pop("cfg", env["cfg"]), env["ckpt"], out, **kw)


def test_output_format_and_determinism(env):
    a, b = env["dir"] / "a.h5", env["dir"] / "b.h5"
    _run(env, a, seed=7)
    _run(env, b, seed=7)
    assert _sha(a) == _sha(b), "same checkpoint + seed must give identical bytes"
    with h5py.File(a, "r") as f:
        assert f["showers"].shape == (150, 533) and f["showers"].dtype == np.float32
        assert f["incident_energies"].shape == (150, 1) and f["incident_energies"].dtype == np.float32
        assert f["incident_eta"].dtype == np.float32 and f["incident_pdg"].dtype == np.int32
        assert f.attrs["seed"] == 7 and f.attrs["shard"] == 0 and f.attrs["shards"] == 1
        assert f.attrs["generator_sha256"] == hashlib.sha256(Path(env["ckpt"]).read_bytes()).hexdigest()
        assert f.attrs["package_version"]
        showers = f["showers"][()]
        thr = f.attrs["readout_threshold_mev"]
        assert f["showers"].compression == env["cfg"]["generate"]["output"]["compression"]
    assert np.all(showers >= 0) and not np.any((showers > 0) & (showers < thr))
    assert showers.sum() > 0
    c = env["dir"] / "c.h5"
    _run(env, c, seed=8)
    with h5py.File(a, "r") as fa, h5py.File(c, "r") as fc:
        assert not np.array_equal(fa["showers"][()], fc["showers"][()]), "a different seed must change events"


def test_batches_stay_within_max_batch_bytes_in_whole_chunks(env, tmp_path, monkeypatch):
    """A batch of generate.batch_size rows over MAX_BATCH_BYTES of showers shrinks to fit, then to whole chunks."""
    monkeypatch.setattr(generate, "MAX_BATCH_BYTES", 40 * 533 * 4)  # 40 rows of the default geometry
    out = tmp_path / "small.h5"
    summary = _run(env, out, seed=7)  # batch_size 48 -> 40 rows -> 32 (two chunks of 16)
    assert summary["batch_size"] == 32 and summary["events"] == 150
    with h5py.File(out, "r") as f:
        assert f["showers"].chunks == (16, 533) and f["showers"].shape == (150, 533)
        assert np.all(np.isfinite(f["showers"][()]))
    monkeypatch.undo()
    assert _run(env, tmp_path / "full.h5", seed=7)["batch_size"] == 48  # within the bound: as configured


def test_shards_are_independent_and_join_reads_as_one(env, tmp_path):
    k = 3
    shards = [tmp_path / f"shard-{i}.h5" for i in range(k)]
    for i, p in enumerate(shards):
        _run(env, p, seed=11, shard=i, shards=k)
    # shard 1 alone, in a fresh directory, equals shard 1 of the full run
    alone = tmp_path / "alone" / "shard-1.h5"
    _run(env, alone, seed=11, shard=1, shards=k)
    assert _sha(alone) == _sha(shards[1])
    sizes = [h5py.File(p, "r")["showers"].shape[0] for p in shards]
    assert sizes == [50, 50, 50]

    out = tmp_path / "joined" / "events.h5"
    generate.join(list(reversed(shards)), out)  # any order
    again = tmp_path / "joined" / "again.h5"
    generate.join(shards, again)
    assert _sha(again) == _sha(out), "joining the same shards must give the same bytes"
    parts = [h5py.File(p, "r")["showers"][()] for p in shards]
    assert not np.array_equal(parts[0], parts[1]), "shards must draw different latents"
    # the virtual dataset resolves the shards relative to its own folder, from any working directory
    code = (
        "import h5py, numpy as np, sys; f = h5py.File(sys.argv[1], 'r'); s = f['showers'][()]; "
        "print(s.shape[0], float(s.sum()), f['incident_pdg'].shape[0])"
    )
    res = subprocess.run([sys.executable, "-c", code, str(out)], cwd="/", capture_output=True, text=True, check=True)
    n, total, n_pdg = res.stdout.split()
    assert int(n) == 150 and int(n_pdg) == 150
    with h5py.File(out, "r") as f:
        assert f["showers"].is_virtual
        np.testing.assert_array_equal(f["showers"][()], np.concatenate(parts))
        assert f.attrs["events_total"] == 150
    np.testing.assert_allclose(float(total), np.concatenate(parts).astype(np.float64).sum(), rtol=1e-6)


def test_join_refuses_incomplete_or_mixed_shards(env, tmp_path):
    shards = [tmp_path / f"shard-{i}.h5" for i in range(2)]
    for i, p in enumerate(shards):
        _run(env, p, seed=3, shard=i, shards=2, events=20)
    with pytest.raises(GenerateError, match="expected shards 0..1"):
        generate.join(shards[:1], tmp_path / "events.h5")
    other = tmp_path / "other" / "shard-1.h5"
    _run(env, other, seed=4, shard=1, shards=2, events=20)
    with pytest.raises(GenerateError, match="seed"):
        generate.join([shards[0], other], tmp_path / "events.h5")
    assert not (tmp_path / "events.h5").exists()


def test_condition_sources(env, tmp_path):
    cfg = env["cfg"]
    # test split (default): every condition is a row of the test split
    out = tmp_path / "test.h5"
    _run(env, out, events=40)
    with h5py.File(env["dataset"], "r") as f:
        test = [f[f"test/{k}"][:, 0] for k in ("incident_energies", "incident_eta", "incident_pdg")]
        rows = {(float(e), float(h), int(p)) for e, h, p in zip(*test, strict=True)}
    with h5py.File(out, "r") as f:
        got = zip(f["incident_energies"][:, 0], f["incident_eta"][:, 0], f["incident_pdg"][:, 0], strict=True)
        assert all((float(e), float(h), int(p)) in rows for e, h, p in got)
        assert f.attrs["condition_source"] == "test"

    # range: inside the configured box, both particles present
    rcfg = load_config(CONFIG, ["generate.conditions.source=range", "generate.conditions.range.energy_gev=[2, 50]"])
    rcfg["generate"].update({k: cfg["generate"][k] for k in ("batch_size", "output", "threads")})
    out = tmp_path / "range.h5"
    _run(env, out, cfg=rcfg, events=60, dataset=None)
    with h5py.File(out, "r") as f:
        e = f["incident_energies"][:, 0]
        assert e.min() >= 2000 * (1 - 1e-6) and e.max() <= 50000 * (1 + 1e-6)
        assert set(np.unique(f["incident_pdg"][()])) == {22, 211}

    # grid: the product, cycled in order
    gcfg = load_config(
        CONFIG,
        [
            "generate.conditions.source=grid",
            "generate.conditions.grid.energies_gev=[5, 20]",
            "generate.conditions.grid.eta=[0.1]",
            "generate.conditions.grid.particles=[22, 211]",
        ],
    )
    gcfg["generate"].update({k: cfg["generate"][k] for k in ("batch_size", "output", "threads")})
    out = tmp_path / "grid.h5"
    _run(env, out, cfg=gcfg, events=10, dataset=None)
    with h5py.File(out, "r") as f:
        assert list(f["incident_energies"][:4, 0]) == [5000, 20000, 5000, 20000]
        assert list(f["incident_pdg"][:4, 0]) == [22, 22, 211, 211]
        assert list(f["incident_pdg"][4:8, 0]) == [22, 22, 211, 211]

    # user file: rows in order (tiled), shards take consecutive rows
    cond = tmp_path / "cond.h5"
    with h5py.File(cond, "w") as f:
        f["incident_energies"] = np.array([3000.0, 7000.0, 90000.0], dtype=np.float64)  # (N,) accepted
        f["incident_eta"] = np.array([[0.1], [0.5], [1.0]], dtype=np.float32)
        f["incident_pdg"] = np.array([[22], [211], [22]], dtype=np.int64)
    out = tmp_path / "file.h5"
    _run(env, out, events=5, shard=1, shards=2, conditions_file=cond)  # global events 3, 4
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f["incident_energies"][:, 0], [3000.0, 7000.0])
        np.testing.assert_array_equal(f["incident_pdg"][:, 0], [22, 211])
        assert f.attrs["condition_source"] == "file:cond.h5"
    out = tmp_path / "file-all.h5"
    _run(env, out, conditions_file=cond)  # no event count: one event per row
    with h5py.File(out, "r") as f:
        np.testing.assert_array_equal(f["incident_energies"][:, 0], [3000.0, 7000.0, 90000.0])


def _write(path: Path, **cols) -> Path:
    with h5py.File(path, "w") as f:
        for k, v in cols.items():
            f[k] = np.asarray(v)
    return path


@pytest.mark.parametrize(
    ("cols", "match"),
    [
        ({"incident_eta": [[0.1]]}, "no dataset 'incident_energies'"),
        ({"incident_energies": [[1e4], [2e4]], "incident_pdg": [[22]]}, "has 1 rows but 'incident_energies' has 2"),
        ({"incident_energies": [[1e4]], "incident_pdg": [[13]]}, "row 0 has particle 13"),
        ({"incident_energies": [[1e4], [-5.0]], "incident_pdg": [[22], [22]]}, "row 1 has incident energy"),
        ({"incident_energies": [[1e4], [np.nan]], "incident_pdg": [[22], [22]]}, "row 1 has incident energy"),
        ({"incident_energies": [[1e4, 2e4]], "incident_pdg": [[22]]}, r"shape \(1, 2\)"),
        ({"incident_energies": [[1e4]]}, "no dataset 'incident_pdg'"),
        ({"incident_energies": [[1e4]], "incident_pdg": [[22.5]]}, "not a PDG code"),
    ],
)
def test_bad_condition_files_are_refused(env, tmp_path, cols, match):
    bad = _write(tmp_path / "bad.h5", **cols)
    out = tmp_path / "out.h5"
    with pytest.raises(GenerateError, match=match) as err:
        _run(env, out, events=4, conditions_file=bad)
    assert "bad.h5" in str(err.value) or "conditions (file:bad.h5)" in str(err.value)
    assert not out.exists()


def test_not_hdf5_and_extrapolation(env, tmp_path, caplog):
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    with pytest.raises(GenerateError, match="cannot open as HDF5"):
        _run(env, tmp_path / "o.h5", events=4, conditions_file=junk)
    far = _write(tmp_path / "far.h5", incident_energies=[[1e4], [1e8]], incident_pdg=[[22], [211]])
    out = tmp_path / "warn.h5"
    with caplog.at_level("WARNING", logger="surrogate.generate"):
        _run(env, out, events=2, conditions_file=far)
    assert out.exists() and "outside the trained range" in caplog.text
    cfg = load_config(CONFIG, ["generate.extrapolation=error"])
    with pytest.raises(GenerateError, match="extrapolation: error"):
        _run(env, tmp_path / "err.h5", cfg=cfg, events=2, conditions_file=far)


def test_cli_help_and_join_cli(env, tmp_path):
    with pytest.raises(SystemExit) as ex:
        generate.main(["--help"])
    assert ex.value.code == 0
    with pytest.raises(SystemExit) as ex:
        generate.main(["join", "--help"])
    assert ex.value.code == 0


def test_kill_mid_write_leaves_no_file_and_rerun_succeeds(env, tmp_path):
    out = tmp_path / "shard-0.h5"
    cmd = [
        sys.executable,
        "-m",
        "surrogate.generate",
        "--config",
        str(CONFIG),
        "--generator",
        str(env["ckpt"]),
        "--out",
        str(out),
        "--dataset",
        str(env["dataset"]),
        "--events",
        "12000",
        "--seed",
        "5",
        "--threads",
        "1",
        "--set",
        "generate.batch_size=64",
        "--set",
        "generate.queue_batches=1",
        # slowest filter: the writer is mid-file for a while
        "--set",
        "generate.output.compression=gzip",
        "--set",
        "generate.output.gzip_level=9",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        tmp = []
        while time.monotonic() < deadline and proc.poll() is None:
            tmp = [p for p in tmp_path.glob(".shard-0.h5.*.tmp") if p.stat().st_size > 200_000]
            if tmp:
                break
            time.sleep(0.02)
        assert tmp and proc.poll() is None, "the CLI finished before it could be killed mid-write"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists(), "a killed shard must leave no file at the output path"
    assert tmp[0].exists(), "kill -9 leaves its temporary behind"
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert not list(tmp_path.glob(".shard-0.h5.*.tmp")), "the rerun removes the killed writer's temporary"
    with h5py.File(out, "r") as f:
        assert f["showers"].shape == (12000, 533)
        assert json.loads(f.attrs["geometry"])
