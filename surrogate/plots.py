"""Validation plots (matplotlib, Agg backend): every function writes one PNG atomically and returns its path.

Inputs are the in-memory samples of :mod:`surrogate.validate` (feature matrices (N, F) with
their column names, energies in MeV) and the ``info`` dict its ``evaluate`` returns; the stage
draws them in a separate process while its tests run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator  # noqa: E402

from surrogate.io import atomic_path  # noqa: E402

__all__ = ["feature_histograms", "response_plot", "mode_plot", "layer_plot", "training_curves", "ready"]

log = logging.getLogger(__name__)

REAL, GEN = "#333333", "#d62728"
#: Tick labels as plain numbers ("100", "0.01"): matplotlib's default log labels are typeset as math, slowly.
_PLAIN = FuncFormatter(lambda v, _: f"{v:g}")


def _save(fig: Any, path: Path, close: bool = True) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    if close:
        plt.close(fig)
    return path


def _unit(feature: str) -> str:
    """Axis unit of a :mod:`surrogate.features` name (energies in MeV, positions in mm)."""
    if feature == "E_dep" or feature.startswith("E_layer_"):
        return " [MeV]"
    return " [mm]" if feature.startswith(("centre_", "width_")) else ""


def _feature_edges(r: np.ndarray, g: np.ndarray, bins: int) -> tuple[np.ndarray, bool]:
    """Histogram edges covering the central 99% of both samples; log-spaced (and True) for a
    non-negative feature (not a fraction) whose positive values span more than two decades, as energies do."""
    pos_r, pos_g = r[r > 0], g[g > 0]
    # at least 5% of positive values: a layer that most showers never reach still gets a log axis
    if r.min() >= 0 and g.min() >= 0 and len(pos_r) > 0.05 * len(r) and len(pos_g) > 0:
        lo = min(np.quantile(pos_r, 0.005), np.quantile(pos_g, 0.005))
        hi = max(np.quantile(pos_r, 0.995), np.quantile(pos_g, 0.995))
        if hi > 100 * lo and hi > 1.0:  # fractions (at most 1) stay on a linear axis
            return np.geomspace(lo, hi, bins + 1), True
    lo = min(np.quantile(r, 0.005), np.quantile(g, 0.005))
    hi = max(np.quantile(r, 0.995), np.quantile(g, 0.995))
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, bins + 1), False


class _HistogramCell:
    """One feature's panel: unit-area histograms of both samples above a gen/real ratio panel.

    Built once and refilled for every page (:meth:`show`): creating axes and their tick objects was
    two thirds of a page's drawing time, for the 100+ axes of the feature pages. Few ticks and
    texts for the same reason: the histogram has no x ticks (the ratio panel below carries them;
    no shared axis, whose locator would be shared too), a text instead of a title, plain log tick
    labels (the default ones are typeset as math), no log minor ticks.
    """

    def __init__(self, fig: Any, spec: Any, legend: bool, ylabel: bool) -> None:
        cell = spec.subgridspec(2, 1, height_ratios=[3, 1], hspace=0.06)
        self.ax, self.rax = fig.add_subplot(cell[0]), fig.add_subplot(cell[1])
        ax, rax = self.ax, self.rax
        self.real = ax.stairs([0.0], [0.0, 1.0], color=REAL, label="real", lw=1.2)
        self.gen = ax.stairs([0.0], [0.0, 1.0], color=GEN, label="generated", lw=1.2)
        self.title = ax.text(0.5, 1.02, "", transform=ax.transAxes, ha="center", va="bottom", fontsize=9)
        self.note = ax.text(0.02, 0.97, "", transform=ax.transAxes, fontsize=6, va="top")
        self.bars = rax.vlines([], [], [], color=GEN, lw=0.7)
        (self.points,) = rax.plot([], [], ".", ms=3, color=GEN)
        rax.axhline(1.0, color=REAL, lw=0.7)
        ax.tick_params(labelsize=7)
        ax.set_xticks([])
        ax.yaxis.set_major_locator(MaxNLocator(3))
        if legend:
            ax.legend(fontsize=7, loc="upper right")
        rax.set_ylim(0.5, 1.5)
        rax.set_yticks([0.5, 1.0, 1.5])
        rax.tick_params(labelsize=7)
        if ylabel:
            rax.set_ylabel("gen/real", fontsize=7)

    def show(self, name: str, r: np.ndarray, g: np.ndarray, bins: int) -> None:
        edges, logx = _feature_edges(r, g, bins)
        rr, gg = (r[r > 0], g[g > 0]) if logx else (r, g)
        hr, _ = np.histogram(np.clip(rr, edges[0], edges[-1]), edges)
        hg, _ = np.histogram(np.clip(gg, edges[0], edges[-1]), edges)
        width = np.diff(np.log10(edges) if logx else edges)
        dr, dg = hr / max(hr.sum(), 1) / width, hg / max(hg.sum(), 1) / width
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(hr > 0, dg / dr, np.nan)
            err = ratio * np.sqrt(1 / np.maximum(hr, 1) + 1 / np.maximum(hg, 1))
        centres = np.sqrt(edges[1:] * edges[:-1]) if logx else 0.5 * (edges[1:] + edges[:-1])
        self.real.set_data(dr, edges)
        self.gen.set_data(dg, edges)
        self.title.set_text(name + _unit(name))
        zr, zg = np.mean(r <= 0), np.mean(g <= 0)
        self.note.set_text(f"zero: real {zr:.1%}, gen {zg:.1%}" if logx and (zr > 0 or zg > 0) else "")
        lo, hi = np.clip(ratio - err, 0.5, 1.5), np.clip(ratio + err, 0.5, 1.5)
        self.bars.set_segments(np.stack([np.column_stack([centres, lo]), np.column_stack([centres, hi])], axis=1))
        self.points.set_data(centres, np.clip(ratio, 0.52, 1.48))
        for a in (self.ax, self.rax):
            a.set_visible(True)
            a.set_xscale("log" if logx else "linear")
            a.set_xlim(edges[0], edges[-1])
        self.ax.set_xticks([])
        self.ax.set_xticks([], minor=True)
        self.ax.set_ylim(0, 1.25 * max(dr.max(), dg.max(), 1e-12))
        self.ax.yaxis.set_major_locator(MaxNLocator(3))
        self.ax.set_ylabel("density per decade" if logx else "density", fontsize=7)
        if logx:
            self.rax.xaxis.set_major_locator(LogLocator(numticks=4))
            self.rax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            self.rax.xaxis.set_minor_locator(NullLocator())
        else:
            self.rax.xaxis.set_major_locator(MaxNLocator(4))

    def hide(self) -> None:
        self.ax.set_visible(False)
        self.rax.set_visible(False)


def feature_histograms(
    out_dir: Path, real: np.ndarray, gen: np.ndarray, names: list[str], bins: int, per_page: int = 16
) -> list[Path]:
    """Unit-area histograms of every feature, real vs generated, with gen/real ratio panels (``per_page`` per PNG).

    Bins span the central 99% of both samples (outliers fill the end bins); features whose positive
    values cover more than two decades (energies) get log-spaced bins on a log axis, and their share of
    events at zero is written in the panel.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    ncol = 4
    figures: dict[int, tuple[Any, list[_HistogramCell]]] = {}  # one figure per row count, refilled page by page
    paths = []
    try:
        for page, start in enumerate(range(0, len(names), per_page)):
            cols = names[start : start + per_page]
            nrow = -(-len(cols) // ncol)
            if nrow not in figures:
                fig = plt.figure(figsize=(4.2 * ncol, 3.4 * nrow))
                outer = fig.add_gridspec(nrow, ncol, hspace=0.3, wspace=0.28)
                figures[nrow] = (
                    fig,
                    [
                        _HistogramCell(fig, outer[i // ncol, i % ncol], i == 0, i % ncol == 0)
                        for i in range(nrow * ncol)
                    ],
                )
                fig.subplots_adjust(left=0.05, right=0.98, top=0.96, bottom=0.05)
            fig, cells = figures[nrow]
            for i, cell in enumerate(cells):
                if i < len(cols):
                    j = names.index(cols[i])
                    cell.show(cols[i], real[:, j], gen[:, j], bins)
                else:
                    cell.hide()
            paths.append(_save(fig, out_dir / f"features_{page:02d}.png", close=False))
    finally:
        for fig, _ in figures.values():
            plt.close(fig)
    return paths


def response_plot(out_dir: Path, response: dict[str, Any]) -> Path:
    """Mean E_dep/E_inc and relative resolution vs incident energy, per particle, real vs generated."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for k, pdg in enumerate(sorted({v["pdg"] for v in response.values()})):
        items = sorted((v for v in response.values() if v["pdg"] == pdg), key=lambda v: v["energy_gev"])
        e = np.array([v["energy_gev"] for v in items])
        name, fmt = items[0].get("particle", f"pdg{pdg}"), ("o-", "s--", "^:")[k % 3]
        for ax, key in ((a1, "mean"), (a2, "resolution")):
            for who, colour, dx in (("real", REAL, 0.97), ("gen", GEN, 1.03)):
                y = [v["value"][f"{who}_{key}"] for v in items]
                dy = [v["error"][f"{who}_{key}"] for v in items]
                ax.errorbar(e * dx, y, yerr=dy, fmt=fmt, color=colour, ms=4, label=f"{who} {name}")
    discrete = all(v.get("discrete", False) for v in response.values())
    a1.set_ylabel("mean E_dep / E_inc")
    a2.set_ylabel("resolution std/mean of E_dep / E_inc")
    for ax in (a1, a2):
        ax.set_xscale("log")
        ax.set_xlabel("incident energy [GeV]" if discrete else "incident energy (median of bin) [GeV]")
        ax.legend(fontsize=7)
        ax.xaxis.set_major_formatter(_PLAIN)
    # fixed margins, not tight_layout(), which lays every text out once more (a third of a small figure's time)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.96, wspace=0.25)
    return _save(fig, out_dir / "response.png")


def mode_plot(out_dir: Path, modes: dict[str, Any], energy_labels: list[str], eta_labels: list[str]) -> Path | None:
    """Predicted-mode fractions vs energy bin and vs |eta| bin, real (solid) and generated (dashed)."""
    bins = {k: v for k, v in modes.get("bins", {}).items() if k != "all"}
    if not bins:
        return None
    names = modes["names"] or [str(i) for i in range(len(next(iter(bins.values()))["real"]))]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for ax, key, labels in ((axes[0], "ebin", energy_labels), (axes[1], "etabin", eta_labels)):
        counts = {}
        for who in ("real", "gen"):
            counts[who] = np.zeros((len(labels), len(names)))
            for v in bins.values():
                counts[who][v[key]] += v[who][: len(names)]
        for who, style in (("real", "-o"), ("gen", "--s")):
            frac = counts[who] / np.maximum(counts[who].sum(axis=1, keepdims=True), 1)
            for m, name in enumerate(names):
                # a mode the real data have is drawn for both samples: a generator missing it shows a line at 0
                if counts["real"][:, m].sum() > 0 or counts["gen"][:, m].sum() > 0:
                    ax.plot(range(len(labels)), frac[:, m], style, color=f"C{m}", ms=4, label=f"{name} ({who})")
        # many bins (one per discrete energy): labels turned so that they do not overlap
        many = len(labels) > 6
        ax.set_xticks(range(len(labels)), labels, fontsize=7 if many else 8, rotation=60 if many else 0)
        ax.set_ylabel("fraction of events (predicted mode)")
    axes[0].set_xlabel("incident energy bin")
    axes[1].set_xlabel("|eta| bin")
    axes[1].legend(
        fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        title="solid: real, dashed: generated",
        title_fontsize=7,
    )
    fig.subplots_adjust(left=0.06, right=0.78, bottom=0.24 if len(energy_labels) > 6 else 0.13, top=0.96, wspace=0.22)
    return _save(fig, out_dir / "modes.png")


def layer_plot(
    out_dir: Path, real: Any, gen: Any, names: list[str], particle_labels: dict[int, str] | None = None
) -> Path:
    """Mean shower per active layer: mean E_layer / E_inc per particle, real vs generated, with a ratio panel.

    ``real``/``gen`` carry ``features`` (N, F) with columns ``names``, ``energy`` (N,) MeV and ``pdg`` (N,);
    ``particle_labels`` names a code in the legend (default ``pdg <code>``).
    """
    cols = [n for n in names if n.startswith("E_layer_")]
    idx = [names.index(n) for n in cols]
    x = np.arange(len(cols))
    fig, (ax, rax) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    for k, pdg in enumerate(sorted(set(np.unique(real.pdg).tolist()))):
        stats = []
        for s in (real, gen):
            sel = s.pdg == pdg
            frac = s.features[:, idx][sel] / s.energy[sel, None]
            stats.append((frac.mean(0), frac.std(0) / np.sqrt(max(sel.sum(), 1))))
        (mr, er), (mg, eg) = stats
        mark, colour = "os^v"[k % 4], f"C{k}"
        name = (particle_labels or {}).get(pdg, f"pdg {pdg}")
        ax.errorbar(x - 0.1, mr, yerr=er, fmt=mark, color=colour, mfc="none", ms=6, label=f"real, {name}")
        ax.errorbar(x + 0.1, mg, yerr=eg, fmt=mark, color=colour, ms=5, label=f"generated, {name}")
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = mg / mr
            err = ratio * np.hypot(er / mr, eg / mg)
        rax.errorbar(x + 0.1 * (2 * k - 1), ratio, yerr=err, fmt=mark, color=colour, ms=4)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_PLAIN)
    ax.set_ylabel("mean E_layer / E_inc")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("mean shower per layer (open: real, filled: generated)", fontsize=10)
    rax.axhline(1.0, color=REAL, lw=0.7)
    rax.set_ylim(0.8, 1.2)
    rax.set_ylabel("gen/real")
    rax.set_xticks(x, [c.removeprefix("E_layer_") for c in cols])
    rax.set_xlabel("layer id")
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.1, top=0.94, hspace=0.08)
    return _save(fig, out_dir / "mean_shower_per_layer.png")


def training_curves(out_dir: Path, history: str | Path) -> Path | None:
    """Every numeric scalar of ``history.jsonl`` against its ``step`` (up to 8 panels)."""
    rows = []
    for line in Path(history).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            log.warning("%s: skipping a line that is not JSON", history)
    rows = [r for r in rows if isinstance(r, dict) and "step" in r]
    keys = sorted({k for r in rows for k, v in r.items() if k != "step" and isinstance(v, int | float)})[:8]
    if not keys:
        return None
    nrow, ncol = -(-len(keys) // 4), min(4, len(keys))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 3 * nrow), squeeze=False)
    for ax, k in zip(axes.flat, keys, strict=False):
        pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), int | float)]
        ax.plot(*zip(*pts, strict=True), "o-", lw=0.8, ms=2)  # markers: a short run may log a single point
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in axes.flat[len(keys) :]:
        ax.set_visible(False)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.14 / nrow, top=1 - 0.08 / nrow, wspace=0.3, hspace=0.45)
    return _save(fig, out_dir / "training_curves.png")


def ready() -> None:
    """No-op: a process calls it to import this module (and matplotlib) before the real work arrives."""
