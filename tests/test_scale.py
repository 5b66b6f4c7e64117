"""Scale: the memory budget (chunked, compressed ingest; the shuffled-chunk training reader; streamed
validation) and the per_layer model, whose parameters grow slower than the voxels."""

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from surrogate import generate, ingest, memory
from surrogate.config import load_config
from surrogate.data import ShuffledChunks, read_rows
from surrogate.geometry import from_config, load_xml
from surrogate.models import ModelConfig, build_models, count_parameters, load_generator
from surrogate.preprocess import Preprocessor
from surrogate.train import model_parts, train_steps
from surrogate.validation.samples import load_splits

ROOT = Path(__file__).resolve().parents[1]
XML = ROOT.parent / "shared" / "calochallenge"
N = 1500
TINY_GB = 0.002  # 2 MiB: every split of the test files is "too big"
CHUNK_ROWS = 40  # showers chunk of a streamed test file (memory.CHUNK_BYTES patched to it)


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _showers(rng: np.random.Generator, n: int, v: int, energies: np.ndarray) -> np.ndarray:
    return (rng.gamma(0.5, 1.0, (n, v)) * (rng.random((n, v)) < 0.3) * energies / v).astype(np.float32)


def _write_input(path: Path, cfg: dict, n: int = N, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    v = from_config(cfg).n_voxels
    energies = np.exp(rng.uniform(np.log(1e3), np.log(1e6), (n, 1))).astype(np.float32)
    with h5py.File(path, "w") as f:
        f["incident_energies"] = energies
        f["showers"] = _showers(rng, n, v, energies)
        f["incident_eta"] = rng.uniform(0, 1.5, (n, 1)).astype(np.float32)
        f["incident_pdg"] = rng.choice(np.array([22, 211], np.int32), (n, 1))
    return path


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> dict:
    """One input ingested twice: within the default budget (held whole) and above a tiny one (streamed)."""
    d = tmp_path_factory.mktemp("scale")
    cfg = load_config(ROOT / "config.yaml", ["ingest.chunk_events=300"])
    raw = _write_input(d / "raw.h5", cfg)
    ingest.run(cfg, [raw], d / "whole", progress=False)
    small = load_config(ROOT / "config.yaml", ["ingest.chunk_events=300", f"memory_gb={TINY_GB}"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(memory, "CHUNK_BYTES", CHUNK_ROWS * 4 * from_config(cfg).n_voxels)
        manifest = ingest.run(small, [raw], d / "streamed", progress=False)
    return {
        "dir": d,
        "cfg": cfg,
        "small": small,
        "whole": d / "whole/dataset.h5",
        "streamed": d / "streamed/dataset.h5",
        "manifest": manifest,
    }


# --------------------------------------------------------------------------- ingest


def test_ingest_writes_chunked_and_compressed_above_the_budget(ingested):
    """Above memory_gb the showers are lzf chunks of whole rows (the unit the other stages read); the
    contents are the same as those of the file written within the budget."""
    with h5py.File(ingested["whole"]) as w, h5py.File(ingested["streamed"]) as s:
        assert w["train/showers"].compression is None and w["train/showers"].chunks[0] == len(w["train/showers"])
        assert s["train/showers"].compression == "lzf"
        assert s["train/showers"].chunks == (CHUNK_ROWS, w["train/showers"].shape[1])
        for split in ("train", "val", "test"):
            for key in ("showers", "incident_energies", "incident_pdg", "conditions", "source_row"):
                assert np.array_equal(w[split][key][()], s[split][key][()]), f"{split}/{key}"
        # the voxel statistics are sums over other read steps: equal to float rounding
        pw, ps = (json.loads(x.attrs["preprocessing"]) for x in (w, s))
        assert np.allclose(pw["mean"], ps["mean"], rtol=1e-6) and np.allclose(pw["std"], ps["std"], rtol=1e-6)
    storage = ingested["manifest"]["showers_storage"]
    assert storage["compression"] == "lzf" and storage["chunk_rows"] == CHUNK_ROWS


def test_ingest_read_steps_shrink_with_the_budget():
    cfg = load_config(ROOT / "config.yaml", ["memory_gb=0.5"])
    assert memory.rows_within(4 * 40500, ingest.READ_SHARE, cfg) == int(0.5 * memory.GIB / 64) // (4 * 40500)
    assert memory.rows_within(4 * 533, ingest.READ_SHARE, load_config(ROOT / "config.yaml")) > 10000  # default: as set


# --------------------------------------------------------------------------- the training reader


def _reader(ingested, window: int = 3, seed: int = 7) -> ShuffledChunks:
    path = ingested["streamed"]
    with h5py.File(path) as f:
        pre = Preprocessor.from_dict(json.loads(f.attrs["preprocessing"]))
        cond = f["train/conditions"][()]
    return ShuffledChunks(path, "train", pre, cond, window=window, seed=seed)


def test_reader_serves_every_row_once_per_epoch_in_the_in_memory_bytes(ingested):
    """One epoch of batches (sizes that do not divide the split, crossing windows) holds every train row
    exactly once, each row's network-space values the same bytes as transforming the whole split."""
    reader = _reader(ingested)
    try:
        n = len(reader)
        got_rows, got_x, got_c = [], [], []
        while sum(map(len, got_rows)) < n:
            rows, x, c = reader.take_rows(min(97, n - sum(map(len, got_rows))))
            got_rows.append(rows), got_x.append(x), got_c.append(c)
        rows = np.concatenate(got_rows)
        assert np.array_equal(np.sort(rows), np.arange(n))
        assert not np.array_equal(rows, np.arange(n))  # shuffled
        with h5py.File(ingested["streamed"]) as f:  # the in-memory path on the same file
            pre = Preprocessor.from_dict(json.loads(f.attrs["preprocessing"]))
            whole = pre.transform_showers(f["train/showers"][()], f["train/incident_energies"][()])
            cond = f["train/conditions"][()]
        assert np.concatenate(got_x).tobytes() == whole[rows].tobytes()
        assert np.array_equal(np.concatenate(got_c), cond[rows])
        # the next epoch: every row again, in another order
        second, _, _ = reader.take_rows(n)
        assert np.array_equal(np.sort(second), np.arange(n)) and not np.array_equal(second, rows)
    finally:
        reader.close()


def test_reader_is_reproducible_and_seekable(ingested):
    a, b, c = _reader(ingested), _reader(ingested), _reader(ingested, seed=8)
    try:
        first = np.concatenate([a.take_rows(64)[0] for _ in range(40)])  # more than one epoch
        assert np.array_equal(first, np.concatenate([b.take_rows(64)[0] for _ in range(40)]))
        assert not np.array_equal(first[:200], c.take_rows(200)[0])  # another seed, another order
        b.seek(1000)  # a resume: the stream continues exactly
        assert np.array_equal(b.take_rows(600)[0], first[1000:1600])
    finally:
        for r in (a, b, c):
            r.close()


def test_reader_shuffles_within_a_window_of_random_chunks(ingested):
    """The first window holds 4 chunks of a random order (not the file's first 4), and a batch of one
    chunk's size mixes rows of several of them."""
    reader = _reader(ingested, window=4)
    try:
        windows, starts = reader._windows(0)
        rows, _, _ = reader.take_rows(int(starts[1]))
        assert np.array_equal(np.unique(rows // CHUNK_ROWS), np.sort(windows[0]))
        assert not np.array_equal(np.sort(windows[0]), np.arange(4))
        assert len(np.unique(rows[:CHUNK_ROWS] // CHUNK_ROWS)) >= 3
    finally:
        reader.close()


def test_read_rows_matches_fancy_indexing(ingested):
    with h5py.File(ingested["streamed"]) as f:
        ds = f["test/showers"]
        rows = np.array([0, 3, CHUNK_ROWS - 1, CHUNK_ROWS, 2 * CHUNK_ROWS + 5, len(ds) - 1])
        assert np.array_equal(read_rows(ds, rows), ds[()][rows])


@pytest.mark.slow
def test_training_streams_above_the_budget_and_resumes_exactly(ingested, tmp_path, caplog):
    """With the split above memory_gb, training reads it in shuffled chunks; 6 steps straight and 3 + 3
    (a resume, the reader seeking to where the step count left it) give the same generator."""
    from surrogate.train import run

    steps = [
        "train.batch_size=32",
        "train.eval_every=3",
        "train.eval_events=100",
        "train.checkpoint_every=3",
        "train.log_every=3",
        "train.precision=fp32",
        "train.generator.width=32",
        "train.critic.width=32",
        f"memory_gb={TINY_GB}",
    ]
    cfg6 = load_config(ROOT / "config.yaml", [*steps, "train.steps=6"])
    cfg3 = load_config(ROOT / "config.yaml", [*steps, "train.steps=3"])
    with caplog.at_level("INFO"):
        run(cfg6, ingested["streamed"], tmp_path / "a", threads=1, progress=False)
    assert "train split streamed" in caplog.text
    run(cfg3, ingested["streamed"], tmp_path / "b", threads=1, progress=False)
    run(cfg6, ingested["streamed"], tmp_path / "b", threads=1, progress=False)
    a = torch.load(tmp_path / "a/state/checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b/state/checkpoint.pt", weights_only=True)
    for key in ("G", "D"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), f"{key}.{name}"


# --------------------------------------------------------------------------- validation


def test_validation_streams_the_real_split_with_the_same_features(ingested):
    """Above the budget the real split is read in blocks: the same features bit for bit, the showers of
    a seeded subset of rows kept, and the digest of all of them."""
    settings = ingested["cfg"]["validate"]
    whole, _, _ = load_splits(ingested["whole"], settings, "test")
    streamed, _, _ = load_splits(ingested["whole"], settings, "test", budget=1000, seed=3)
    assert streamed.shower_rows is not None and whole.shower_rows is None
    assert streamed.features.tobytes() == whole.features.tobytes()
    assert np.array_equal(streamed.showers, whole.showers[streamed.shower_rows])
    assert streamed.showers_sha256 == hashlib.sha256(whole.showers.tobytes()).digest()
    half = np.arange(0, len(whole.energy), 2)
    kept = np.intersect1d(half, streamed.shower_rows)
    assert np.array_equal(streamed.voxels_of(half), whole.showers[kept])
    assert streamed.n_voxel_rows(half) == len(kept) and whole.n_voxel_rows(half) == len(half)
    assert np.array_equal(whole.voxels_of(half, np.array([1, 5])), whole.showers[half][:, [1, 5]])


def test_validation_reads_joined_shards_in_whole_chunks(ingested, tmp_path):
    """The joined file is a virtual dataset (no chunks of its own): blocks follow the shards' chunks."""
    from surrogate.validation.samples import _source_chunk_rows

    paths = []
    for i in range(2):
        p = tmp_path / f"shard-{i}.h5"
        with h5py.File(p, "w") as f:
            f.create_dataset("showers", data=np.zeros((100, 4), np.float32), chunks=(25, 4))
            for k in ("incident_energies", "incident_eta", "incident_pdg"):
                f[k] = np.ones((100, 1), np.float32 if k != "incident_pdg" else np.int32)
            for k, v in {"format_version": 1, "generator_sha256": "x", "seed": 1, "shards": 2, "events_total": 200,
                         "package_version": "0", "precision": "fp32", "geometry": "{}", "condition_names": "[]",
                         "shard": i, "first_event": 100 * i}.items():  # fmt: skip
                f.attrs[k] = v
        paths.append(p)
    generate.join(paths, tmp_path / "events.h5")
    with h5py.File(tmp_path / "events.h5") as f:
        assert f["showers"].chunks is None
        assert _source_chunk_rows(tmp_path / "events.h5", f["showers"]) == 25


# --------------------------------------------------------------------------- generate


def test_generate_writes_whole_chunks_within_the_budget(tmp_path):
    """A batch cut by memory_gb is a whole number of HDF5 chunks (no chunk is compressed twice), and a
    chunk of a wide shower stays within MAX_CHUNK_BYTES."""
    assert generate._chunk_rows(1024, 4 * 533) == 1024
    assert generate._chunk_rows(1024, 4 * 40500) == generate.MAX_CHUNK_BYTES // (4 * 40500) == 103
    assert generate._chunk_rows(1024, 4 * 6480, batch_size=300) == 300


# --------------------------------------------------------------------------- the per_layer model


def _parts(geometry, structure: str, cfg=None, n: int = 64):
    """(ModelConfig, head, physics) for ``geometry`` from synthetic showers (one particle, no eta)."""
    cfg = cfg or load_config(ROOT / "config.yaml")
    train = {**cfg["train"]}
    train["generator"] = {**train["generator"], "structure": structure}
    train["critic"] = {**train["critic"], "structure": structure}
    rng = np.random.default_rng(0)
    e = np.exp(rng.uniform(np.log(1e3), np.log(1e6), (n, 1))).astype(np.float32)
    showers = _showers(rng, n, geometry.n_voxels, e)
    pre = Preprocessor.fit(showers, e, None, np.full((n, 1), 11), cfg["preprocess"], [11])
    return model_parts(train, pre, geometry, showers, e, 0.01, np.full((n, 1), 11)), pre, showers, e


@pytest.fixture(scope="module")
def ds_geometries():
    return {name: load_xml(XML / f"binning_dataset_{name}.xml") for name in ("2", "3")}


def test_per_layer_parameters_grow_slower_than_the_voxels(ds_geometries):
    """From 6,480 to 40,500 voxels (x6.25) the per_layer generator and critic grow by less than 1.5x;
    dense ones grow with the voxels (10 M parameters at 40,500)."""
    counts = {}
    for name, geometry in ds_geometries.items():
        for structure in ("per_layer", "dense"):
            (mcfg, head, physics), *_ = _parts(geometry, structure)
            torch.manual_seed(0)
            G, D = build_models(mcfg, head, physics)
            counts[name, structure] = (count_parameters(G), count_parameters(D))
    for i in range(2):
        assert counts["3", "per_layer"][i] < 1.5 * counts["2", "per_layer"][i]
        assert counts["3", "dense"][i] > 5 * counts["2", "dense"][i] > 5e6
        assert counts["3", "per_layer"][i] < counts["3", "dense"][i] / 20


def test_per_layer_model_trains_and_its_config_round_trips(ds_geometries):
    """At 6,480 voxels: G (B, V), D (B,), finite training steps with the penalty's double backward; the
    ModelConfig survives its dict (a checkpoint) and names the layer shapes."""
    from surrogate.train import LoopSettings, TrainState

    (mcfg, head, physics), pre, showers, e = _parts(ds_geometries["2"], "per_layer")
    assert mcfg.g_structure == mcfg.d_structure == "per_layer" and len(mcfg.layer_shapes) == 45
    assert ModelConfig.from_dict(json.loads(json.dumps(mcfg.to_dict()))) == mcfg
    settings = LoopSettings(batch_size=16, n_critic=2, lr_g=1e-3, lr_d=1e-3, precision="fp32")
    state = TrainState(mcfg, settings, torch.device("cpu"), seed=0, head=head, physics=physics)
    x = torch.from_numpy(pre.transform_showers(showers, e))
    c = torch.from_numpy(pre.transform_conditions(e, None, np.full((len(e), 1), 11)))
    out = state.G(torch.randn(5, mcfg.z_dim), c[:5])
    assert out.shape == (5, 6480) and torch.isfinite(out).all()
    assert state.D(x[:6], c[:6]).shape == (6,)
    metrics = train_steps(state, x, c, 2)
    assert all(np.isfinite(v) for v in metrics.values())


def test_layer_decoder_puts_each_layer_in_its_columns():
    """With layers of several shapes (the default binning), the per_layer generator's voxel logits of a
    layer are its shape's map of that layer's code, in that layer's columns."""
    from surrogate.models import LayerDecoder

    geometry = from_config(load_config(ROOT / "config.yaml"))
    shapes = tuple((layer.n_alpha, layer.n_r) for layer in geometry.active_layers)
    torch.manual_seed(0)
    dec = LayerDecoder(16, shapes, 8)
    h = torch.randn(3, 16)
    out = dec(h)
    f = dec.proj(h).unsqueeze(1) * (1 + dec.gamma) + dec.beta
    g = torch.nn.functional.leaky_relu(dec.mix(torch.nn.functional.leaky_relu(f, 0.2)), 0.2)
    distinct = list(dict.fromkeys(shapes))
    for layer, (shape, cols) in enumerate(zip(shapes, geometry.layer_slices.values(), strict=True)):
        expected = dec.maps[distinct.index(shape)](g[:, layer])
        assert torch.allclose(out[:, cols], expected), layer


def test_default_model_is_unchanged():
    """The default (dense) generator and critic are built exactly as before the structure option: the
    same parameter names, shapes and initial values (sha256 from the code before it), and a
    ModelConfig dict without the new keys, so a default checkpoint keeps its bytes."""
    from surrogate.simulate import simulate_events

    cfg = load_config(ROOT / "config.yaml")
    ref = simulate_events(300, cfg, np.random.SeedSequence(5))
    pre = Preprocessor.fit(
        ref["showers"], ref["incident_energies"], ref["incident_eta"], ref["incident_pdg"], cfg["preprocess"],
        cfg["ingest"]["particles"],
    )  # fmt: skip
    mcfg, head, physics = model_parts(
        cfg["train"], pre, from_config(cfg), ref["showers"], ref["incident_energies"], 0.01, ref["incident_pdg"]
    )
    torch.manual_seed(0)
    G, D = build_models(mcfg, head, physics)

    def digest(m: torch.nn.Module) -> str:
        h = hashlib.sha256()
        for name, p in m.named_parameters():
            h.update(name.encode())
            h.update(p.detach().numpy().tobytes())
        return h.hexdigest()

    assert digest(G) == "3ea1b485879a086735acf36a1749efcb13e4758938e1d9b34643614d7cbf57c9"
    assert digest(D) == "726b520e0bb3e39abdf232ff4843408cd973724767c1baeba3691cb3195c5e91"
    assert sorted(mcfg.to_dict()) == [
        "cond_dim", "conditioning", "critic_layernorm", "critic_pack", "critic_physics_knots",
        "critic_physics_weight", "critic_shape_weight", "critic_threshold", "d_depth", "d_width", "g_depth",
        "g_width", "minibatch_std", "n_voxels", "output", "spectral_norm", "symmetry", "template_knots", "z_dim",
    ]  # fmt: skip


@pytest.mark.slow
def test_per_layer_generator_exports_to_onnx(ds_geometries, tmp_path):
    """The export stage's graph of a per_layer generator at 6,480 voxels runs in ONNX Runtime at any batch
    size and matches PyTorch (the stage refuses to write it otherwise)."""
    from surrogate import export
    from surrogate.models import FORMAT_VERSION, Generator

    geometry = ds_geometries["2"]
    (mcfg, head, _), pre, _, _ = _parts(geometry, "per_layer")
    torch.manual_seed(0)
    path = tmp_path / "generator.pt"
    torch.save(
        {
            "format_version": FORMAT_VERSION,
            "model_config": mcfg.to_dict(),
            "ema_state_dict": Generator(mcfg, head).state_dict(),
            "preprocessing": pre.to_dict(),
            "condition_names": pre.condition_names,
            "geometry": geometry.to_dict(),
            "step": 0,
        },
        path,
    )
    G, _ = load_generator(path)
    assert G.cfg == mcfg
    cfg = load_config(ROOT / "config.yaml", ["generate.threshold_mev=0.01"])
    summary = export.run(cfg, path, tmp_path / "g.onnx", dataset=None, check_events=64)
    assert summary["check"]["ok"]
    model = export.OnnxShowerModel(tmp_path / "g.onnx")
    e = np.full((7, 1), 5e4, np.float32)
    assert model.sample(e, np.zeros((7, 1), np.float32), np.full((7, 1), 11, np.int32)).shape == (7, 6480)
