"""Export stage: the generator as one ONNX graph, raw conditions in and showers in MeV out.

``python -m surrogate.export --config C --generator results/train/generator.pt --out results/export/generator.onnx``

The graph is the whole path of the generate stage (:func:`surrogate.generate.forward_batches`),
so a C++ framework (Athena, a Geant4 fast-simulation model) needs no Python and no copy of our
preprocessing:

    z (N, z_dim) float32, incident_energy (N, 1) float32 MeV, incident_eta (N, 1) float32,
    incident_pdg (N, 1) int32  ->  showers (N, n_voxels) float32 MeV

Inside: the condition preprocessing (log E and η scaled to [-1, 1] over the trained ranges, in
float64 as :meth:`surrogate.preprocess.Preprocessor.transform_conditions` does; the one-hot
particle code), the generator with its layered head and response template, the symmetry
transform, the inverse voxel transform and the readout threshold. The batch size is dynamic; the
opset is fixed (:data:`OPSET`).

Randomness: the graph is deterministic. The only random choice of the generator, the orientation
of the ``rotate``/``rotate_reflect`` symmetry, is already a function of the latent (its last
component through the normal CDF), so it is an explicit input: ``z`` must be standard normal,
one independent row per event.

What the graph cannot check, the file states: ``metadata_props`` hold the geometry and voxel
order, units, trained condition ranges and particles, the generator's sha256, the input and
output names and the format version (:data:`FORMAT_VERSION`); :class:`OnnxShowerModel` is the
Python wrapper that refuses or warns on bad conditions exactly as the generate stage does.

Exporter: PyTorch's TorchScript exporter (``dynamo=False``) at opset 17, with ONNX translations of
the two ops it lacks (``logaddexp``, ``searchsorted``). Measured on the trained default generator:
it exports in ~1 s and its graph matches PyTorch to 4e-6. The torch.export-based exporter
(onnxscript 0.7.2, opset 18, ``optimize=True``) took ~8.5 s, needs onnxscript, and its graph had
lost the ``- epsilon`` (1e-8) of the inverse voxel transform (relative errors up to 1 near the
threshold at 1 TeV). Opset 17 is read by every ONNX Runtime since 1.11 (2022), so frameworks
pinned to older releases load the file. The TorchScript exporter is deprecated upstream: with
torch pinned (2.13.0) it is here; a torch upgrade that removes it needs the other exporter and
this module's parity tests to pass with it.
Before the file is written the stage runs it in ONNX Runtime on a small sample and refuses to
write a graph that does not match PyTorch (:data:`PARITY_RTOL`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import surrogate
from surrogate.config import parse_stage_args, stage_parser
from surrogate.io import atomic_path, sha256_file, write_json

__all__ = [
    "ExportError",
    "FORMAT_VERSION",
    "OPSET",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "PARITY_RTOL",
    "ShowerGraph",
    "export_onnx",
    "compare",
    "OnnxShowerModel",
    "run",
    "main",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of the exported file's interface (inputs, outputs, metadata keys)
OPSET = 17
INPUT_NAMES = ("z", "incident_energy", "incident_eta", "incident_pdg")
OUTPUT_NAMES = ("showers",)
PARITY_RTOL = 1e-5  # ONNX Runtime vs PyTorch, relative, on every voxel above the threshold (at least; see parity_rtol)
PARITY_FLOOR_FACTOR = 2.0  # ... or this many times PyTorch's own difference between batch 1 and the whole batch
VOXEL_ORDER = (
    "CaloChallenge order: active layers in increasing layer id; within a layer, angular bin major and "
    "radial bin fastest, so column = layer offset + alpha_bin * n_r + r_bin (see 'layers')"
)


class ExportError(ValueError):
    """A generator that cannot be exported, or an exported file this code cannot use, named in the message."""


# --------------------------------------------------------------------------- the graph


class ShowerGraph(nn.Module):
    """(z (N, z_dim), E (N, 1) MeV, η (N, 1), PDG (N, 1) int32) -> showers (N, V) float32 MeV.

    The generate stage's path as one module, for export: the same float64 condition transform as
    :meth:`Preprocessor.transform_conditions`, the generator, the same float32 inverse transform
    as :meth:`Preprocessor.inverse_showers`, and voxels below ``threshold_mev`` (or NaN) zeroed.
    An unknown PDG code gets an all-zero one-hot row (graphs cannot raise): callers check the
    code against the file's ``particles`` metadata, as :class:`OnnxShowerModel` does.
    """

    def __init__(self, generator: nn.Module, pre: Any, threshold_mev: float = 0.0) -> None:
        super().__init__()
        self.generator = generator
        self.z_dim = int(generator.z_dim)
        lo, hi = (float(np.log(v)) for v in pre.energy_range_mev)
        self.log_e_lo, self.log_e_span = lo, max(hi - lo, 1e-12)
        self.eta = pre.eta_range is not None
        self.eta_lo, self.eta_span = (
            (float(pre.eta_range[0]), max(float(pre.eta_range[1]) - float(pre.eta_range[0]), 1e-12))
            if self.eta
            else (0.0, 1.0)
        )
        self.one_hot = len(pre.particles) > 1
        self.register_buffer("codes", torch.tensor([list(pre.particles) or [0]], dtype=torch.int32))
        self.register_buffer("mean", torch.as_tensor(np.asarray(pre.mean, dtype=np.float32)))
        self.register_buffer("std", torch.as_tensor(np.asarray(pre.std, dtype=np.float32)))
        self.transform = str(pre.voxel_transform)
        # the constants as numpy's float32 arithmetic rounds them in inverse_showers
        self.epsilon = float(np.float32(pre.epsilon))
        self.empty = float(np.float32(pre.epsilon) * 1e-3)
        self.alpha = float(np.float32(pre.logit_alpha))
        self.alpha_span = float(np.float32(1) - 2 * np.float32(pre.logit_alpha))
        self.threshold = float(np.float32(threshold_mev))

    def conditions(self, energy: torch.Tensor, eta: torch.Tensor, pdg: torch.Tensor) -> torch.Tensor:
        """(N, C) float32 network conditions from raw ones (float64 arithmetic, as in preprocessing)."""
        cols = [(2.0 * (torch.log(energy.double()) - self.log_e_lo) / self.log_e_span - 1.0).float()]
        if self.eta:
            cols.append((2.0 * (eta.double() - self.eta_lo) / self.eta_span - 1.0).float())
        if self.one_hot:
            cols.append((pdg.to(torch.int32) == self.codes).float())
        return torch.cat(cols, dim=1)

    def forward(self, z: torch.Tensor, energy: torch.Tensor, eta: torch.Tensor, pdg: torch.Tensor) -> torch.Tensor:
        x = self.generator(z, self.conditions(energy, eta, pdg)).float()
        y = torch.clamp(x * self.std + self.mean, -80.0, 80.0)
        if self.transform == "log":
            u = torch.exp(y) - self.epsilon
        else:
            u = (1.0 / (1.0 + torch.exp(-y)) - self.alpha) / self.alpha_span
        # a scalar 0 (broadcast), not zeros_like: no (N, V) tensor of zeros to fill in the graph
        u = torch.where(u > self.empty, u, 0.0)
        showers = u * energy
        return torch.where(showers >= self.threshold, showers, 0.0)


def _logaddexp(g: Any, a: Any, b: Any) -> Any:
    # max(a, b) + log1p(exp(-|a - b|)), the formula of torch's CPU kernel. ONNX has no Log1p; Log(1 + t)
    # is off by at most one float32 ulp of 1 (6e-8 in log space), far below the rounding of the sum it
    # is added to. (ONNX's Softplus is the same function, but in ONNX Runtime 1.30 it took a third of the
    # whole graph's time: it is not vectorised.)
    t = g.op("Exp", g.op("Neg", g.op("Abs", g.op("Sub", a, b))))
    one = g.op("Constant", value_t=torch.tensor(1.0, dtype=torch.float32))
    return g.op("Add", g.op("Max", a, b), g.op("Log", g.op("Add", one, t)))


def _searchsorted(g: Any, sorted_seq: Any, values: Any, *args: Any) -> Any:
    # the template's use: 1-D ascending knots (K,), values (B,), side 'left': index = #knots < value
    # (other options are not translated; the parity tests would catch a template that used them)
    axis0, axis1 = (g.op("Constant", value_t=torch.tensor([a])) for a in (0, 1))
    less = g.op("Less", g.op("Unsqueeze", sorted_seq, axis0), g.op("Unsqueeze", values, axis1))  # (B, K)
    return g.op("ReduceSum", g.op("Cast", less, to_i=7), axis1, keepdims_i=0)  # int64 (B,)


@contextlib.contextmanager
def _symbolics() -> Iterator[None]:
    """ONNX translations of the two ops the TorchScript exporter lacks, registered for one export."""
    registered = {"aten::logaddexp": _logaddexp, "aten::searchsorted": _searchsorted}
    for name, fn in registered.items():
        torch.onnx.register_custom_op_symbolic(name, fn, OPSET)
    try:
        yield
    finally:
        for name in registered:
            torch.onnx.unregister_custom_op_symbolic(name, OPSET)


def _example_inputs(graph: ShowerGraph, pre: Any, n: int = 2) -> tuple[torch.Tensor, ...]:
    lo, hi = pre.energy_range_mev
    energy = torch.full((n, 1), float(np.sqrt(lo * hi)))
    eta = torch.full((n, 1), 0.5 * sum(pre.eta_range) if pre.eta_range else 0.0)
    pdg = torch.full((n, 1), int(pre.particles[0]) if pre.particles else 0, dtype=torch.int32)
    return torch.zeros(n, graph.z_dim), energy, eta, pdg


def export_onnx(graph: ShowerGraph, pre: Any, metadata: dict[str, str]) -> bytes:
    """Serialised ONNX model of ``graph`` (opset :data:`OPSET`, dynamic batch) with ``metadata`` as metadata_props."""
    import onnx

    buffer = io.BytesIO()
    dynamic = {name: {0: "batch"} for name in (*INPUT_NAMES, *OUTPUT_NAMES)}
    with _symbolics(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export (see the module
        # docstring for why it is used), and its tracer notes that the layer sizes and the number
        # of orientations become constants, which they are (fixed by the checkpoint).
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(
            graph.eval(),
            _example_inputs(graph, pre),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic,
            do_constant_folding=True,
        )
    model = onnx.load_from_string(buffer.getvalue())
    # an input the model does not use (eta without an eta condition, the code with one particle) is
    # dropped by the tracer; C++ callers always pass all four, so declare it again (ONNX allows unused inputs)
    present = {i.name for i in model.graph.input}
    for name, value in zip(INPUT_NAMES, _example_inputs(graph, pre), strict=True):
        if name not in present:
            elem = onnx.TensorProto.INT32 if value.dtype == torch.int32 else onnx.TensorProto.FLOAT
            shape = ["batch", *value.shape[1:]]
            model.graph.input.insert(INPUT_NAMES.index(name), onnx.helper.make_tensor_value_info(name, elem, shape))
    model.doc_string = (
        "Calorimeter shower surrogate: z (N, z_dim) standard normal, incident_energy (N, 1) MeV, incident_eta (N, 1), "
        "incident_pdg (N, 1) int32 -> showers (N, n_voxels) MeV. See metadata_props."
    )
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def metadata_for(meta: dict[str, Any], pre: Any, geometry: Any, threshold_mev: float, sha256: str) -> dict[str, str]:
    """``metadata_props`` (all strings; lists and tables as JSON) of the exported file."""
    mcfg = meta["model_config"]
    layers, offset = [], 0
    for layer in geometry.active_layers:
        layers.append({"id": layer.id, "n_r": layer.n_r, "n_alpha": layer.n_alpha, "offset": offset})
        offset += layer.n_voxels
    inputs = [
        {"name": "z", "dtype": "float32", "shape": ["N", int(mcfg["z_dim"])], "unit": "1 (standard normal)"},
        {"name": "incident_energy", "dtype": "float32", "shape": ["N", 1], "unit": "MeV"},
        {"name": "incident_eta", "dtype": "float32", "shape": ["N", 1], "unit": "1 (pseudorapidity)"},
        {"name": "incident_pdg", "dtype": "int32", "shape": ["N", 1], "unit": "PDG Monte Carlo code"},
    ]
    outputs = [{"name": "showers", "dtype": "float32", "shape": ["N", geometry.n_voxels], "unit": "MeV"}]
    symmetry = mcfg.get("symmetry", "none")
    return {
        "format_version": str(FORMAT_VERSION),
        "producer": f"surrogate {surrogate.__version__}",
        "opset": str(OPSET),
        "inputs": json.dumps(inputs),
        "outputs": json.dumps(outputs),
        "units": json.dumps({d["name"]: d["unit"] for d in inputs + outputs}),
        "z_dim": str(int(mcfg["z_dim"])),
        "n_voxels": str(geometry.n_voxels),
        "geometry_name": geometry.name,
        "voxel_order": VOXEL_ORDER,
        "layers": json.dumps(layers),
        "geometry": json.dumps(geometry.to_dict(), sort_keys=True),
        "energy_range_mev": json.dumps(list(pre.energy_range_mev)),
        "eta_range": json.dumps(None if pre.eta_range is None else list(pre.eta_range)),
        "particles": json.dumps(list(pre.particles)),
        "condition_names": json.dumps(list(meta.get("condition_names", pre.condition_names))),
        "readout_threshold_mev": repr(float(threshold_mev)),
        "symmetry": symmetry
        + (
            ": each shower's orientation about its axis is a function of z[:, -1] (normal CDF), so z must be "
            "standard normal"
            if symmetry != "none"
            else ""
        ),
        "generator_sha256": sha256,
        "generator_step": str(int(meta.get("step", -1))),
        "extrapolation": "outside energy_range_mev / eta_range the generator extrapolates (surrogate.generate warns); "
        "a PDG code not in 'particles' is an error (the graph gives it an all-zero particle one-hot); "
        "with 'particles' empty (trained without codes) or one code, the graph ignores incident_pdg",
    }


# --------------------------------------------------------------------------- parity


def compare(reference: np.ndarray, other: np.ndarray, threshold_mev: float, rtol: float = PARITY_RTOL) -> dict:
    """Agreement of two shower arrays (N, V) MeV: relative difference where both are above threshold, zero sets.

    A voxel whose reference value lies within ``rtol`` of the threshold can land on either side
    of it under float32 rounding; such voxels are counted (``near_threshold``) and are the only
    ones allowed to differ in being zero. ``ok``: max relative difference <= ``rtol`` and no other
    zero-set difference.
    """
    ref, oth = np.asarray(reference, np.float32), np.asarray(other, np.float32)
    if ref.shape != oth.shape:
        raise ExportError(f"compare: shapes {ref.shape} and {oth.shape} differ")
    both = (ref > 0) & (oth > 0)
    rel = np.abs(oth[both].astype(np.float64) - ref[both]) / ref[both] if both.any() else np.zeros(1)
    flipped = (ref > 0) != (oth > 0)
    value = np.maximum(ref, oth)
    near = flipped & (value <= np.float64(threshold_mev) * (1 + rtol)) & (threshold_mev > 0)
    return {
        "voxels": int(ref.size),
        "voxels_above_threshold": int(both.sum()),
        "max_rel_diff": float(rel.max()),
        "p99_rel_diff": float(np.quantile(rel, 0.99)),
        "zero_set_differences": int(flipped.sum()),
        "near_threshold": int(near.sum()),
        "ok": bool(rel.max() <= rtol and flipped.sum() == near.sum()),
    }


def parity_rtol(torch_floor: float) -> float:
    """The parity tolerance for a graph whose PyTorch reference differs from itself by ``torch_floor``
    (max relative difference between batch 1 and one whole batch: float32 sums in another order).

    ONNX Runtime orders its sums differently again, so it cannot be asked to agree better than PyTorch
    agrees with itself: a wider model (the 6,480-voxel per-layer generator: 1.5e-5) crosses 1e-5 by
    rounding alone. A translation error (a dropped term, a wrong axis) is orders of magnitude above both.
    """
    return max(PARITY_RTOL, PARITY_FLOOR_FACTOR * float(torch_floor))


def parity_sample(pre: Any, n: int, seed: int, z_dim: int) -> dict[str, np.ndarray]:
    """``n`` events for a parity check: each particle in turn in blocks of four events, one at each end of the
    trained energy range and two log-uniform in it."""
    rng = np.random.default_rng(seed)
    lo, hi = pre.energy_range_mev
    energy = np.exp(rng.uniform(np.log(lo), np.log(hi), n))
    energy[0::4], energy[1::4] = lo, hi
    eta = rng.uniform(*pre.eta_range, n) if pre.eta_range else np.zeros(n)
    particles = np.asarray(list(pre.particles) or [0], dtype=np.int32)
    return {
        "z": rng.standard_normal((n, z_dim)).astype(np.float32),
        "incident_energy": energy.astype(np.float32).reshape(-1, 1),
        "incident_eta": eta.astype(np.float32).reshape(-1, 1),
        "incident_pdg": particles[np.arange(n) // 4 % len(particles)].reshape(-1, 1),
    }


def _session(model: str | Path | bytes, threads: int = 1) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(int(threads), 0)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: ORT's warnings go to stderr, not to our log
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- the wrapper


class OnnxShowerModel:
    """An exported file in ONNX Runtime, with the generate stage's checks on the conditions.

    ``model(z, energies, eta, pdg)`` -> showers (N, V) float32 MeV; ``model.sample(energies, eta,
    pdg, seed)`` draws z itself. ``eta`` may be None for a generator trained without η, ``pdg`` for one
    trained on one particle or without codes (plain CaloChallenge files: energies alone then).
    Conditions are checked by :func:`surrogate.generate.check_conditions`
    against the ranges in the file: an unknown particle or a non-physical value raises
    :class:`surrogate.generate.GenerateError`, conditions outside the trained range warn (or raise
    with ``extrapolation="error"``), word for word as the generate stage. A file of another
    :data:`FORMAT_VERSION` is refused with :class:`ExportError`.
    """

    def __init__(self, path: str | Path, *, threads: int = 0, extrapolation: str = "warn") -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise ExportError(f"{self.path}: ONNX model not found (run the export stage)")
        try:
            self.session = _session(self.path, threads)
        except Exception as exc:  # ORT raises its own exception types
            raise ExportError(f"{self.path}: not a readable ONNX model ({exc})") from exc
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        version = self.metadata.get("format_version")
        if version is None:
            raise ExportError(f"{self.path}: no 'format_version' in its metadata (not a surrogate export)")
        if version != str(FORMAT_VERSION):
            raise ExportError(
                f"{self.path}: ONNX model format_version {version}, this code reads {FORMAT_VERSION} "
                "(export the generator again with this version)"
            )
        if extrapolation not in ("warn", "error"):
            raise ExportError(f"extrapolation must be 'warn' or 'error', got {extrapolation!r}")
        self.extrapolation = extrapolation
        self.z_dim = int(self.metadata["z_dim"])
        self.n_voxels = int(self.metadata["n_voxels"])
        eta_range = json.loads(self.metadata["eta_range"])
        self.ranges = _Ranges(
            tuple(json.loads(self.metadata["energy_range_mev"])),
            None if eta_range is None else tuple(eta_range),
            tuple(json.loads(self.metadata["particles"])),
        )

    def __call__(
        self, z: np.ndarray, energies: np.ndarray, eta: np.ndarray | None = None, pdg: np.ndarray | None = None
    ) -> np.ndarray:
        from surrogate.generate import Conditions, check_conditions, default_particle

        z = np.ascontiguousarray(z, dtype=np.float32)
        n = len(z)
        if z.ndim != 2 or z.shape[1] != self.z_dim:
            raise ExportError(f"{self.path}: z has shape {z.shape}, the model takes (N, {self.z_dim})")
        if eta is None:
            if self.ranges.eta_range is not None:
                raise ExportError(f"{self.path}: the generator was trained with eta as a condition; give eta")
            eta = np.zeros((n, 1), dtype=np.float32)  # an input of the graph that it does not use
        if pdg is None:
            code = default_particle(self.ranges.particles)
            if code is None:
                raise ExportError(
                    f"{self.path}: the generator was trained on particles {list(self.ranges.particles)}; give pdg"
                )
            pdg = np.full((n, 1), code, dtype=np.int32)
        cols = {}
        for name, value, dtype in (("energies", energies, np.float32), ("eta", eta, np.float32), ("pdg", pdg, None)):
            arr = np.asarray(value).reshape(-1, 1)
            if len(arr) != n:
                raise ExportError(f"{self.path}: {name} has {len(arr)} rows but z has {n}")
            cols[name] = arr.astype(dtype) if dtype is not None else arr
        raw_pdg = cols["pdg"].astype(np.float64)
        bad = np.flatnonzero(raw_pdg[:, 0] != np.round(raw_pdg[:, 0]))
        if len(bad):
            raise ExportError(f"{self.path}: pdg row {bad[0]} is {raw_pdg[bad[0], 0]!r}, not a PDG code")
        cond = Conditions(cols["energies"], cols["eta"], raw_pdg.astype(np.int32))
        check_conditions(cond, self.ranges, self.extrapolation, "onnx")
        feeds = {"z": z, "incident_energy": cond.energies, "incident_eta": cond.eta, "incident_pdg": cond.pdg}
        return self.session.run(None, feeds)[0]

    def sample(
        self, energies: np.ndarray, eta: np.ndarray | None = None, pdg: np.ndarray | None = None, seed: int = 0
    ) -> np.ndarray:
        """Showers for the conditions (``eta``, ``pdg``: None as in :meth:`__call__`) with z drawn from
        ``numpy.random.default_rng(seed)``."""
        n = len(np.asarray(energies).reshape(-1))
        z = np.random.default_rng(seed).standard_normal((n, self.z_dim)).astype(np.float32)
        return self(z, energies, eta, pdg)


class _Ranges:
    """What :func:`surrogate.generate.check_conditions` reads of a Preprocessor."""

    def __init__(self, energy_range_mev: tuple, eta_range: tuple | None, particles: tuple) -> None:
        self.energy_range_mev, self.eta_range, self.particles = energy_range_mev, eta_range, particles


# --------------------------------------------------------------------------- stage


def run(
    cfg: dict[str, Any],
    generator_path: str | Path,
    out: str | Path,
    *,
    dataset: str | Path | None = "results/ingest/dataset.h5",
    threads: int = 1,
    check_events: int = 512,
) -> dict[str, Any]:
    """Export ``generator_path`` to ``out`` (atomically) and write ``out`` with suffix ``.json`` (a summary).

    The readout threshold is the generate stage's (:func:`surrogate.generate.stage_threshold`).
    Before writing, the graph runs in ONNX Runtime on ``check_events`` events (both ends of the
    energy range, every particle) against PyTorch; a mismatch beyond :data:`PARITY_RTOL` is an
    ExportError and nothing is written. Returns the summary.
    """
    from surrogate.generate import stage_threshold
    from surrogate.geometry import Geometry
    from surrogate.models import ModelError, load_generator
    from surrogate.preprocess import Preprocessor

    generator_path, out = Path(generator_path), Path(out)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(int(threads), 1))
    try:
        try:
            G, meta = load_generator(generator_path, torch.device("cpu"))
        except ModelError as exc:
            raise ExportError(str(exc)) from exc
        pre = Preprocessor.from_dict(meta["preprocessing"])
        geometry = Geometry.from_dict(meta["geometry"])
        threshold = stage_threshold(cfg, dataset)
        graph = ShowerGraph(G, pre, threshold).eval()
        metadata = metadata_for(meta, pre, geometry, threshold, sha256_file(generator_path))

        t0 = time.perf_counter()
        blob = export_onnx(graph, pre, metadata)
        export_seconds = time.perf_counter() - t0

        feeds = parity_sample(pre, check_events, int(cfg.get("seed", 0)), graph.z_dim)
        inputs = [torch.from_numpy(feeds[k]) for k in INPUT_NAMES]
        with torch.inference_mode():
            expected = graph(*inputs).numpy()
            one_by_one = np.concatenate([graph(*(x[i : i + 1] for x in inputs)).numpy() for i in range(len(expected))])
        floor = compare(expected, one_by_one, threshold)
        rtol = parity_rtol(floor["max_rel_diff"])
        got = _session(blob, threads).run(None, feeds)[0]
        check = {
            **compare(expected, got, threshold, rtol),
            "rtol": rtol,
            "torch_batch1_max_rel_diff": floor["max_rel_diff"],
        }
        if not check["ok"]:
            raise ExportError(
                f"{out}: the ONNX graph does not reproduce the generator {generator_path} (max relative difference "
                f"{check['max_rel_diff']:.3g} > {rtol:.3g}, or {check['zero_set_differences']} voxels zeroed "
                f"differently; PyTorch differs from itself by {floor['max_rel_diff']:.3g}); nothing written"
            )
        with atomic_path(out) as tmp:
            tmp.write_bytes(blob)
    finally:
        torch.set_num_threads(previous_threads)
    summary = {
        "out": str(out),
        "format_version": FORMAT_VERSION,
        "opset": OPSET,
        "bytes": len(blob),
        "sha256": sha256_file(out),
        "generator": str(generator_path),
        "generator_sha256": metadata["generator_sha256"],
        "readout_threshold_mev": threshold,
        "export_seconds": export_seconds,
        "inputs": list(INPUT_NAMES),
        "outputs": list(OUTPUT_NAMES),
        "check": {"events": check_events, **check},
    }
    write_json(out.with_suffix(".json"), summary)
    log.info(
        "wrote %s: opset %d, %.2f MB, exported in %.1f s; ONNX Runtime vs PyTorch on %d events: max relative "
        "difference %.2g above the %.4g MeV threshold (tolerance %.2g; PyTorch batch 1 vs batch: %.2g)",
        out,
        OPSET,
        len(blob) / 1e6,
        export_seconds,
        check_events,
        check["max_rel_diff"],
        threshold,
        check["rtol"],
        check["torch_batch1_max_rel_diff"],
    )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = stage_parser(
        "python -m surrogate.export",
        "Export the generator as one ONNX graph (raw conditions and latents in, showers in MeV out) for C++ "
        "frameworks through ONNX Runtime.",
    )
    parser.add_argument("--generator", required=True, help="checkpoint, e.g. results/train/generator.pt")
    parser.add_argument("--out", required=True, help="ONNX file, e.g. results/export/generator.onnx")
    parser.add_argument(
        "--dataset",
        default="results/ingest/dataset.h5",
        help="ingest output, read for the readout threshold as the generate stage does (default: %(default)s)",
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the export check (default: 1)")
    args, cfg = parse_stage_args(parser, argv)
    try:
        run(cfg, args.generator, args.out, dataset=args.dataset, threads=args.threads)
    except ExportError as exc:
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
