"""Export stage: the ONNX graph reproduces the generate stage's showers, carries its metadata, and the
Python wrapper refuses and warns as the generate stage does."""

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from surrogate import export, generate
from surrogate.config import load_config
from surrogate.export import ExportError, OnnxShowerModel
from surrogate.generate import Conditions, GenerateError
from surrogate.io import sha256_file

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config.yaml"


def tiny_export_checkpoint(path: Path, cfg: dict, particles: list[int], n: int = 400) -> tuple[Path, object]:
    """A generator checkpoint in the train stage's format with the config's architecture and random weights
    (preprocessing and response template fitted on synthetic showers), and its Preprocessor."""
    from surrogate.geometry import from_config
    from surrogate.models import FORMAT_VERSION, Generator
    from surrogate.preprocess import Preprocessor
    from surrogate.train import model_parts

    rng = np.random.default_rng(0)
    geometry = from_config(cfg)
    energies = np.exp(rng.uniform(np.log(1e3), np.log(1e6), size=(n, 1))).astype(np.float32)
    eta = rng.uniform(0, 1.5, size=(n, 1)).astype(np.float32)
    pdg = rng.choice(np.array(particles, dtype=np.int32), size=(n, 1))
    frac = rng.gamma(0.3, 1.0, size=(n, geometry.n_voxels)) * (rng.random((n, geometry.n_voxels)) < 0.5) / 300
    showers = (frac * energies).astype(np.float32)
    has_eta = cfg["ingest"]["datasets"]["incident_eta"] is not None
    pre = Preprocessor.fit(showers, energies, eta if has_eta else None, pdg, cfg["preprocess"], particles)
    mc, head, _ = model_parts(cfg["train"], pre, geometry, showers, energies, pdg=pdg)
    torch.manual_seed(0)
    torch.save(
        {
            "format_version": FORMAT_VERSION,
            "model_config": mc.to_dict(),
            "ema_state_dict": Generator(mc, head).state_dict(),
            "preprocessing": pre.to_dict(),
            "condition_names": pre.condition_names,
            "geometry": geometry.to_dict(),
            "step": 0,
        },
        path,
    )
    return path, pre


THRESHOLD_MEV = 1.0
NO_CRITIC_INPUTS = ["train.critic.physics_weight=0.0", "train.critic.shape_weight=0.0", "train.critic.threshold=false"]


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    """The default config's generator (layered head, response template, rotate_reflect symmetry, two
    particles, eta), random weights, exported once."""
    d = tmp_path_factory.mktemp("export")
    # a threshold that zeroes 30% of these random-weight showers' voxels (95% at 1 GeV, none at 1 TeV; the
    # simulator's 0.01 MeV zeroes almost none of them), so the zero sets are put to the test
    cfg = load_config(CONFIG, [*NO_CRITIC_INPUTS, f"generate.threshold_mev={THRESHOLD_MEV}"])
    ckpt, pre = tiny_export_checkpoint(d / "generator.pt", cfg, [22, 211])
    summary = export.run(cfg, ckpt, d / "generator.onnx", dataset=None)
    return {"dir": d, "cfg": cfg, "ckpt": ckpt, "pre": pre, "onnx": d / "generator.onnx", "summary": summary}


def _conditions(pre, n: int, seed: int) -> Conditions:
    """Photons and pions in alternating blocks of four events: in each block one at the lower and one at
    the upper edge of the trained energy range, two log-uniform in it."""
    rng = np.random.default_rng(seed)
    lo, hi = pre.energy_range_mev
    e = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
    e[0::4], e[1::4] = lo, hi
    pdg = np.where(np.arange(n) // 4 % 2 == 0, 22, 211).astype(np.int32)
    eta = rng.uniform(*pre.eta_range, n)
    return Conditions(e.astype(np.float32)[:, None], eta.astype(np.float32)[:, None], pdg[:, None])


def _latents(seed: int, n: int, z_dim: int, batch: int) -> np.ndarray:
    """The latents generate.forward_batches draws from a generator seeded with ``seed``, batch by batch."""
    gen = torch.Generator().manual_seed(seed)
    return np.concatenate([torch.randn((min(batch, n - s), z_dim), generator=gen).numpy() for s in range(0, n, batch)])


def test_parity_with_the_generate_stage(default):
    """10,000 events, same z and conditions: ONNX Runtime (CPU, fp32) at batch 1 and 4096 against PyTorch fp32
    through the generate stage's own forward pass (its default batch, 4096), relative difference <= 1e-5 on
    every voxel above the threshold and the same zeroed voxels. A voxel within 1e-5 of the threshold may
    land on either side of it under float32 rounding: only those may differ in being zero (counted)."""
    from surrogate.models import load_generator

    n, batch, seed = 10_000, 4096, 5
    G, meta = load_generator(default["ckpt"])
    pre = default["pre"]
    cond = _conditions(pre, n, seed=1)
    threshold = default["summary"]["readout_threshold_mev"]
    assert threshold == THRESHOLD_MEV
    torch.set_num_threads(1)
    reference = np.concatenate(
        [
            s
            for _, s in generate.forward_batches(
                G,
                pre,
                cond,
                batch_size=batch,
                device=torch.device("cpu"),
                precision="fp32",
                latent=torch.Generator().manual_seed(seed),
                threshold_mev=threshold,
            )
        ]
    )
    z = _latents(seed, n, G.z_dim, batch)
    model = OnnxShowerModel(default["onnx"], threads=1)
    feeds = {"z": z, "incident_energy": cond.energies, "incident_eta": cond.eta, "incident_pdg": cond.pdg}

    def ort(rows: slice) -> np.ndarray:
        return model.session.run(None, {k: v[rows] for k, v in feeds.items()})[0]

    for size in (4096, 1):
        got = np.concatenate([ort(slice(s, s + size)) for s in range(0, n, size)])
        check = export.compare(reference, got, threshold)
        assert 0.2 < check["voxels_above_threshold"] / check["voxels"] < 0.8, check
        assert check["max_rel_diff"] <= 1e-5, (size, check)
        assert check["zero_set_differences"] == check["near_threshold"], (size, check)
        assert check["near_threshold"] <= 1e-5 * check["voxels"], (size, check)
    # the comparison covered voxels above threshold at both ends of the range, for both particles
    rows = np.arange(n)
    for edge in (0, 1):  # rows 4k: lower edge, 4k + 1: upper edge
        for pdg in (22, 211):
            sel = (rows % 4 == edge) & (cond.pdg[:, 0] == pdg)
            assert sel.sum() > 1000 and (reference[sel] > 0).mean() > 0.01, (edge, pdg)


def test_metadata_and_graph_interface(default):
    model = onnx.load(str(default["onnx"]))
    meta = {p.key: p.value for p in model.metadata_props}
    pre = default["pre"]
    assert meta["format_version"] == str(export.FORMAT_VERSION)
    assert meta["generator_sha256"] == sha256_file(default["ckpt"])
    assert meta["geometry_name"] == default["cfg"]["geometry"]["name"] and "radial bin fastest" in meta["voxel_order"]
    layers = json.loads(meta["layers"])
    assert sum(layer["n_r"] * layer["n_alpha"] for layer in layers) == int(meta["n_voxels"]) == 533
    assert json.loads(meta["energy_range_mev"]) == list(pre.energy_range_mev)
    assert json.loads(meta["eta_range"]) == list(pre.eta_range)
    assert json.loads(meta["particles"]) == [22, 211]
    assert json.loads(meta["units"])["incident_energy"] == "MeV" and json.loads(meta["units"])["showers"] == "MeV"
    assert float(meta["readout_threshold_mev"]) == default["summary"]["readout_threshold_mev"]
    assert [d["name"] for d in json.loads(meta["inputs"])] == [i.name for i in model.graph.input]
    assert [i.name for i in model.graph.input] == list(export.INPUT_NAMES)
    assert [o.name for o in model.graph.output] == ["showers"]
    assert [op.version for op in model.opset_import if op.domain in ("", "ai.onnx")] == [export.OPSET]
    for value in (*model.graph.input, *model.graph.output):  # dynamic batch, fixed widths
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param and not dims[0].dim_value
        assert dims[1].dim_value > 0
    assert model.graph.input[3].type.tensor_type.elem_type == onnx.TensorProto.INT32
    summary = json.loads(default["onnx"].with_suffix(".json").read_text())
    assert summary["check"]["ok"] and summary["opset"] == export.OPSET and summary["bytes"] > 0


def test_export_is_deterministic(default, tmp_path):
    again = export.run(default["cfg"], default["ckpt"], tmp_path / "again.onnx", dataset=None)
    assert again["sha256"] == default["summary"]["sha256"]


def test_wrapper_warns_and_refuses_like_generate(default, caplog):
    model = OnnxShowerModel(default["onnx"])
    pre = default["pre"]
    lo, hi = pre.energy_range_mev
    inside = model.sample(np.array([[np.sqrt(lo * hi)]]), np.array([[0.3]]), np.array([[211]]), seed=1)
    assert inside.shape == (1, 533) and inside.dtype == np.float32 and (inside >= 0).all()

    outside = Conditions(np.array([[hi * 3]], np.float32), np.array([[0.3]], np.float32), np.array([[22]], np.int32))
    caplog.set_level(logging.WARNING)
    generate.check_conditions(outside, pre, "warn", "onnx")
    expected = [r.getMessage() for r in caplog.records]
    caplog.clear()
    model.sample(outside.energies, outside.eta, outside.pdg)
    assert [r.getMessage() for r in caplog.records] == expected and "outside the trained range" in expected[0]
    with pytest.raises(GenerateError, match="generate.extrapolation: error"):
        OnnxShowerModel(default["onnx"], extrapolation="error").sample(outside.energies, outside.eta, outside.pdg)
    eta_out = np.array([[pre.eta_range[1] + 1.0]])
    with pytest.raises(GenerateError, match="eta outside the trained range"):
        OnnxShowerModel(default["onnx"], extrapolation="error").sample(np.array([[1e4]]), eta_out, np.array([[22]]))
    with pytest.raises(GenerateError, match="has particle 11, which the generator was not trained on"):
        model.sample(np.array([[1e4]]), np.array([[0.3]]), np.array([[11]]))
    with pytest.raises(GenerateError, match="incident energy .* MeV, need > 0"):
        model.sample(np.array([[-1.0]]), np.array([[0.3]]), np.array([[22]]))
    with pytest.raises(ExportError, match=r"z has shape \(1, 3\)"):
        model(np.zeros((1, 3)), np.array([[1e4]]), np.array([[0.3]]), np.array([[22]]))
    # conditions the generator needs cannot be left out (a generator without them: tests/test_calochallenge.py)
    with pytest.raises(ExportError, match=r"trained on particles \[22, 211\]; give pdg"):
        model.sample(np.array([[1e4]]), np.array([[0.3]]))
    with pytest.raises(ExportError, match="trained with eta as a condition; give eta"):
        model.sample(np.array([[1e4]]), pdg=np.array([[22]]))


def test_other_format_version_is_refused(default, tmp_path):
    model = onnx.load(str(default["onnx"]))
    for p in model.metadata_props:
        if p.key == "format_version":
            p.value = "99"
    bad = tmp_path / "future.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(ExportError, match=rf"{bad}: ONNX model format_version 99, this code reads 1"):
        OnnxShowerModel(bad)
    del model.metadata_props[:]
    onnx.save(model, str(bad))
    with pytest.raises(ExportError, match="no 'format_version'"):
        OnnxShowerModel(bad)
    with pytest.raises(ExportError, match="not found"):
        OnnxShowerModel(tmp_path / "missing.onnx")


def test_parity_tolerance_follows_pytorch_own_rounding_but_catches_translation_errors():
    """The tolerance is 1e-5, or twice PyTorch's own batch-1-vs-batch difference when that is larger
    (wide models); an error of 1e-3 (a dropped epsilon, a mis-scaled voxel) fails at either."""
    assert export.parity_rtol(0.0) == export.PARITY_RTOL
    assert export.parity_rtol(1.5e-5) == pytest.approx(3e-5)
    rng = np.random.default_rng(0)
    ref = rng.gamma(1.0, 10.0, (64, 100)).astype(np.float32) + 2.0
    rounded = ref * (1 + rng.uniform(-2.5e-5, 2.5e-5, ref.shape)).astype(np.float32)
    assert not export.compare(ref, rounded, 1.0)["ok"]
    assert export.compare(ref, rounded, 1.0, export.parity_rtol(1.5e-5))["ok"]
    wrong = ref.copy()
    wrong[3, 7] *= 1 + 1e-3
    assert not export.compare(ref, wrong, 1.0, export.parity_rtol(1.5e-5))["ok"]


def test_mismatching_graph_writes_nothing(default, tmp_path, monkeypatch):
    """An export whose ONNX Runtime check fails leaves no file."""
    monkeypatch.setattr(
        export, "compare", lambda *a, **k: {"ok": False, "max_rel_diff": 1.0, "zero_set_differences": 3}
    )
    out = tmp_path / "generator.onnx"
    with pytest.raises(ExportError, match="does not reproduce the generator"):
        export.run(default["cfg"], default["ckpt"], out, dataset=None)
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_plain_generator_keeps_all_four_inputs(tmp_path):
    """One particle, no eta, linear output, logit transform, FiLM conditioning: the graph still takes the four
    inputs a C++ caller passes (unused ones declared) and matches PyTorch."""
    cfg = load_config(
        CONFIG,
        [
            *NO_CRITIC_INPUTS,
            "ingest.datasets.incident_eta=null",
            "train.generator.output=linear",
            "train.generator.symmetry=none",
            "train.generator.template_knots=0",
            "train.conditioning=film",
            "train.generator.width=32",
            "preprocess.voxel_transform=logit",
        ],
    )
    ckpt, pre = tiny_export_checkpoint(tmp_path / "generator.pt", cfg, [22])
    assert pre.condition_names == ["log_energy"]
    summary = export.run(cfg, ckpt, tmp_path / "g.onnx", dataset=None)
    assert summary["check"]["ok"] and summary["check"]["voxels_above_threshold"] > 0
    model = OnnxShowerModel(tmp_path / "g.onnx")
    assert [i.name for i in model.session.get_inputs()] == list(export.INPUT_NAMES)
    out = model.sample(np.array([[5e4], [5e4]]), np.array([[0.0], [9.0]]), np.array([[22], [22]]), seed=3)
    assert out.shape == (2, 533)
    z = np.random.default_rng(3).standard_normal((2, model.z_dim)).astype(np.float32)
    assert np.array_equal(out, model(z, np.array([[5e4], [5e4]]), np.zeros((2, 1)), np.array([[22], [22]])))


def test_cli(default, tmp_path):
    out = tmp_path / "cli" / "generator.onnx"
    code = export.main(
        [
            "--config",
            str(CONFIG),
            "--generator",
            str(default["ckpt"]),
            "--dataset",
            str(tmp_path / "absent.h5"),
            "--out",
            str(out),
        ]
    )
    assert code == 0 and out.exists() and out.with_suffix(".json").exists()
    with pytest.raises(SystemExit) as exc:
        export.main(["--config", str(CONFIG), "--generator", str(tmp_path / "none.pt"), "--out", str(out)])
    assert exc.value.code == 1
