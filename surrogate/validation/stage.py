"""The validate stage: :func:`run` (inputs in, ``summary.json``, ``report.html`` and plots out) and
the command line, ``python -m surrogate.validate [floors] ...``."""

from __future__ import annotations

import concurrent.futures as cf
import functools
import json
import logging
import time
import types
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from surrogate import memory
from surrogate.config import dump_config, parse_stage_args, stage_parser
from surrogate.features import FeaturesError
from surrogate.holdout import HoldoutError, canonical, check_same, regions_from_config, split_names
from surrogate.io import atomic_path, write_json
from surrogate.validation import html, processes
from surrogate.validation.binning import Binning
from surrogate.validation.context import seeds
from surrogate.validation.floors import compute_floors, fill_floors, floor_identity, read_floors
from surrogate.validation.modes import mode_classifier, sklearn_threads
from surrogate.validation.samples import (
    GeneratedSample,
    GeneratedStream,
    RealSample,
    ValidateError,
    load_generated,
    load_splits,
)
from surrogate.validation.suite import evaluate
from surrogate.validation.verdict import Test, apply_holm

__all__ = ["run", "main"]

log = logging.getLogger(__name__)

#: The held-out splits the stage can validate besides the test split (:mod:`surrogate.holdout`).
HELDOUT = ("unseen", "extrapolation")


def _plain(s: RealSample | GeneratedSample) -> types.SimpleNamespace:
    """What the layer plot needs of a sample (features, energy, pdg), without the rest, to send it to a process."""
    return types.SimpleNamespace(features=s.features, energy=s.energy, pdg=s.pdg)


def _real_side(
    state: dict[str, Any],
    dataset: str | Path,
    settings: dict[str, Any],
    seed: int,
    floors_path: str | Path | None,
    split: str = "test",
    budget: int | None = None,
) -> tuple[RealSample, RealSample | None, Binning, dict[str, Any], str]:
    """The real samples (streamed above ``budget`` bytes) and the floors (kept in ``state``, read from
    ``floors_path`` when they match), and where the floors come from: "reused", the file, or "computed
    here" (computed later)."""
    if "real" not in state:
        state["real"], state["train"], state["binning"] = load_splits(dataset, settings, split, budget, seed)
    real, train, binning = state["real"], state["train"], state["binning"]
    floors = state.setdefault("floors", {})
    source = "reused" if floors else "computed here"
    if not floors and floors_path is not None:
        loaded = read_floors(Path(floors_path), floor_identity(real, train, binning, settings, seed))
        if loaded is not None:
            floors.update(loaded)
            source = str(floors_path)
    return real, train, binning, floors, source


def _plot_hook(plotter: processes.Plotter | None, plots: Path, binning: Binning) -> Callable[[str, dict], None]:
    """``on_family`` for :func:`evaluate`: submits a family's plot as soon as its numbers are there."""

    def plot(family: str, part: dict[str, Any]) -> None:
        if plotter is not None and family == "response" and part["response"]:
            plotter.submit("response_plot", plots, part["response"])
        if plotter is not None and family == "mode coverage":
            plotter.submit("mode_plot", plots, part["modes"], *binning.axis_labels())

    return plot


def _summary(
    tests: list[Test],
    info: dict[str, Any],
    gen: GeneratedSample,
    n_real: int,
    floors_source: str,
    alpha: float,
    binning: Binning,
) -> dict[str, Any]:
    """The contents of ``summary.json`` (``seconds.total`` is filled in by the caller)."""
    apply_holm(tests, alpha)
    failed = [t.name for t in tests if not t.passed]
    return {
        "verdict": "PASS" if all(t.passed for t in tests) else "FAIL",
        "alpha": alpha,
        "n_tests": len(tests),
        "n_failed": len(failed),
        "failed": failed,
        "real_events": n_real,
        "generated_events_in_file": gen.rows_in_file,
        "generated_events_matched": len(gen.all_energy),
        "generated_events_features": len(gen.energy),
        "generated_events_unknown_particle": gen.rows_dropped_unmatched,
        "reader_processes": gen.reader_processes,
        "floors": floors_source,
        "subsample": info["subsample"],
        "binning": binning.to_dict(),
        "bins_used": info["bins_used"],
        "mode_method": info["modes"]["method"],
        "seconds": {
            "total": None,
            "read_generated": gen.read_seconds,
            "features_generated": gen.feature_seconds,
            "stream_generated": gen.stream_seconds,
            **info["seconds"],
        },
        "metrics": [t.as_dict() for t in tests],
    }


def run(
    cfg: dict[str, Any],
    dataset: str | Path,
    generated: str | Path,
    out: str | Path,
    history: str | Path | None = None,
    threads: int | None = None,
    plots: bool = True,
    reuse: dict[Any, Any] | None = None,
    floors_path: str | Path | None = None,
    heldout: dict[str, str | Path] | None = None,
    heldout_floors: dict[str, str | Path] | None = None,
) -> dict[str, Any]:
    """Validate ``generated`` against the test split of ``dataset``; write the outputs in ``out``.

    ``heldout``: {split: generated file} for the held-out splits of ``dataset`` (``unseen``,
    ``extrapolation``: :mod:`surrogate.holdout`), each generated at its split's conditions. They are
    validated the same way, against their own split, with their own floors (``heldout_floors``
    {split: floors file}, else computed here) and Holm correction, and reported under their own
    key of the summary: ``unseen`` enters the verdict, ``extrapolation`` is informational.

    ``floors_path``: the real-vs-real floors written by :func:`compute_floors` for this dataset,
    settings and seed; used when they match, else (logged) computed here, with the same results.

    With ``threads > 1`` that many reader processes and one plotting process are started the
    "spawn" way, which imports the calling script again: call ``run`` from a script under
    ``if __name__ == "__main__":`` (if a process fails, its work is done in this one, with the same
    results, only slower).

    ``reuse``: an (initially empty) dict kept by a caller that validates several generated files
    against the same dataset in one process; the real samples and every real-vs-real floor are
    stored in it under the dataset's identity (path, size, mtime), the seed and the settings, and
    reused. Results are the same as without it.

    Returns the summary dict (also written to ``out/summary.json``).
    """
    settings = cfg["validate"]
    threads = threads or settings["threads"]
    out = Path(out)
    t_start = time.perf_counter()
    seed = int(cfg["seed"])
    try:
        stat = Path(dataset).stat()
    except OSError as exc:
        raise ValidateError(f"{dataset}: cannot read the dataset ({exc})") from exc
    identity = (
        str(Path(dataset).resolve()),
        stat.st_size,
        stat.st_mtime_ns,
        seed,
        json.dumps(settings, sort_keys=True),
    )
    state = {} if reuse is None else reuse.setdefault(identity, {})
    # the processes first: they start (and import) while the real splits load
    procs = _Processes(
        processes.start_readers(threads) if threads > 1 else None,
        processes.Plotter(separate=threads > 1) if plots else None,
    )
    heldout = {s: heldout[s] for s in HELDOUT if s in (heldout or {})} | dict(heldout or {})  # in page order
    try:
        expected = _check_holdout(cfg, dataset, heldout)
        summary, plot_paths = _validate(cfg, state, dataset, generated, out, history, threads, procs, floors_path)
        for split, path in heldout.items():
            # in this process: the held-out files are small beside the main one, the readers are stopped
            sub_state = {} if reuse is None else reuse.setdefault((*identity, split), {})
            sub_procs = _Processes(None, processes.Plotter(separate=False) if plots else None)
            try:
                part, part_plots = _validate(
                    cfg,
                    sub_state,
                    dataset,
                    path,
                    out,
                    None,
                    threads,
                    sub_procs,
                    (heldout_floors or {}).get(split),
                    split=split,
                )
            finally:
                sub_procs.close()
            part["regions"] = [r.to_dict() for r in expected if r.split == split]
            part["informational"] = split == "extrapolation"
            summary[split] = part
            plot_paths += part_plots
        if heldout:
            _verdicts(summary, list(heldout))
    finally:  # on an error too: no process is left behind
        procs.close()
    summary["seconds"]["total"] = time.perf_counter() - t_start
    dump_config(cfg, out / "config.yaml")  # the resolved configuration beside the outputs
    write_json(out / "summary.json", summary)
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(html.render(summary, plot_paths))
    failed = summary["failed"]
    log.info(
        "verdict %s: %d of %d tests failed%s",
        summary["verdict"],
        len(failed),
        summary["n_tests"],
        f" (first: {', '.join(failed[:5])})" if failed else "",
    )
    if "verdict_line" in summary:
        log.info("%s", summary["verdict_line"])
    return summary


def _check_holdout(cfg: dict[str, Any], dataset: str | Path, heldout: dict[str, str | Path]) -> tuple:
    """The config's held-out regions, after checking that ``dataset`` and every held-out generated file
    hold out the same ones (else the "unseen" events may have been trained on)."""
    import h5py

    try:
        regions = regions_from_config(cfg)
    except HoldoutError as exc:
        raise ValidateError(str(exc)) from exc
    expected = canonical(regions)
    try:
        with h5py.File(dataset, "r") as f:
            stored = f.attrs.get("holdout")
    except OSError as exc:
        raise ValidateError(f"{dataset}: cannot open as HDF5 ({exc})") from exc
    check_same(stored, expected, str(dataset), "the config (ingest.holdout)", ValidateError)
    for split, path in heldout.items():
        if split not in split_names(regions):
            raise ValidateError(
                f"{path}: given for split {split!r}, but ingest.holdout has no region of that kind "
                f"(held-out splits: {list(split_names(regions)) or 'none'})"
            )
        try:
            with h5py.File(path, "r") as f:
                stored = f.attrs.get("holdout")
                source = f.attrs.get("condition_source")
        except OSError as exc:
            raise ValidateError(f"{path}: cannot open as HDF5 ({exc})") from exc
        check_same(stored, expected, f"the generator of {path}", "the config (ingest.holdout)", ValidateError)
        if source is not None and str(source) != split:
            raise ValidateError(f"{path}: generated at the conditions of {source!r}, expected {split!r} (--split)")
    for split in split_names(regions):
        if split not in heldout:
            log.warning(
                "ingest.holdout fills the split %r, but no events generated at its conditions were given "
                "(--%s FILE): it is not validated, and the verdict covers the seen conditions only",
                split,
                split,
            )
    return regions


def _verdicts(summary: dict[str, Any], splits: list[str]) -> None:
    """With held-out splits: ``verdict`` becomes seen and unseen together, ``verdicts`` and
    ``verdict_line`` say how each did (extrapolation informational, outside the verdict)."""
    verdicts = {"seen": summary["verdict"]}
    parts = [f"seen conditions: {summary['verdict']} ({summary['n_failed']} of {summary['n_tests']} tests failed)"]
    for split in splits:
        part = summary[split]
        verdicts[split] = part["verdict"]
        what = "conditions never seen in training" if split == "unseen" else "extrapolation (informational)"
        parts.append(f"{what}: {part['verdict']} ({part['n_failed']} of {part['n_tests']} tests failed)")
    judged = [v for k, v in verdicts.items() if k != "extrapolation"]
    summary["verdict"] = "PASS" if all(v == "PASS" for v in judged) else "FAIL"
    summary["verdicts"] = verdicts
    summary["verdict_line"] = f"verdict {summary['verdict']}: " + "; ".join(parts)


@dataclass
class _Processes:
    """The stage's reader pool and plotter (either None when not used); :meth:`close` stops them."""

    readers: cf.ProcessPoolExecutor | None
    plotter: processes.Plotter | None

    def close(self) -> None:
        if self.readers is not None:
            self.readers.shutdown(wait=True, cancel_futures=True)
            self.readers = None
        if self.plotter is not None:
            self.plotter.close()


def _collect(
    stream: GeneratedStream,
    procs: _Processes,
    labeller: Callable[..., np.ndarray] | None,
    reread: Callable[..., GeneratedSample],
) -> GeneratedSample:
    """The streamed generated sample, or, if a reader process died (killed, out of memory),
    ``reread(labeller=labeller)`` in this process (same results); the readers are stopped either way."""
    try:
        gen = stream.collect(labeller)
    except BrokenProcessPool as exc:
        log.warning("a reader process failed (%s); reading %s in this process", exc, stream.path)
        procs.readers.shutdown(wait=False, cancel_futures=True)
        procs.readers = None
        gen = reread(labeller=labeller)
    if procs.readers is not None:  # done with them: stopped before the tests
        procs.readers.shutdown(wait=True)
        procs.readers = None
    return gen


def _validate(
    cfg: dict[str, Any],
    state: dict[str, Any],
    dataset: str | Path,
    generated: str | Path,
    out: Path,
    history: str | Path | None,
    threads: int,
    procs: _Processes,
    floors_path: str | Path | None,
    split: str = "test",
) -> tuple[dict[str, Any], list[Path]]:
    """The body of :func:`run` while its processes run: the summary (tests Holm-corrected) and the plots
    (a held-out ``split``'s in ``plots/<split>/``)."""
    plotter = procs.plotter
    settings, sub = cfg["validate"], cfg["validate"]["subsample"]
    _, s_match, s_eval = seeds(int(cfg["seed"]), 3)
    budget = memory.budget_bytes(cfg)
    real, train, binning, floors, floors_source = _real_side(
        state, dataset, settings, s_eval, floors_path, split, budget
    )
    plot_dir = out / "plots" if split == "test" else out / "plots" / split
    if plotter is not None and history is not None:
        plotter.submit("training_curves", plot_dir, history)
    n_real = len(real.energy)
    gen_args = (generated, real.geometry, real.names, binning, binning.index(real.energy, real.eta, real.pdg))
    gen_kw = {
        "cap": settings["max_generated_events"],
        # a reader's block (and its copies while checked and turned into features) within a share of the budget
        "chunk_events": min(settings["chunk_events"], memory.rows_within(4 * real.geometry.n_voxels, 1 / 64, cfg)),
        "feature_events": min(sub["gen_test_events"], sub["gen_test_ratio"] * n_real),
        "voxel_events": sub["voxel_classifier_events"],
    }
    stream = GeneratedStream(
        *gen_args, **gen_kw, rng=np.random.default_rng(s_match), pool=procs.readers, workers=threads
    )
    # OpenMP (HistGradientBoosting, k-means) gets its own thread count: spinning OpenMP workers on
    # shared, oversubscribed cores made the classifier fits 4x slower with 2 threads than with 1.
    with sklearn_threads(settings["sklearn_threads"]):
        t0 = time.perf_counter()
        # while the readers work: the floors (unless read) and the mode classifier
        if not floors:
            fill_floors(real, train, binning, settings, s_eval, floors)
            log.info("real-vs-real floors computed in %.1f s", time.perf_counter() - t0)
        clf = mode_classifier(floors, train, settings, s_eval, binning.particles)
        labeller = None if clf is None else clf.predict
        reread = functools.partial(load_generated, *gen_args, **gen_kw, rng=np.random.default_rng(s_match))
        gen = _collect(stream, procs, labeller, reread)
        log.info(
            "generated: %d events in file, %d matched to the real conditions, %d with features",
            gen.rows_in_file,
            len(gen.all_energy),
            len(gen.energy),
        )
        if plotter is not None:  # drawn there while the tests run here
            plotter.submit(
                "feature_histograms", plot_dir, real.features, gen.features, real.names, settings["hist_bins"]
            )
            plotter.submit("layer_plot", plot_dir, _plain(real), _plain(gen), real.names, binning.names)
        # the plotting process keeps a core busy meanwhile: one test thread waits for it to finish
        tests, info = evaluate(
            real,
            gen,
            train,
            binning,
            settings,
            s_eval,
            floors,
            threads=threads,
            on_family=_plot_hook(plotter, plot_dir, binning),
            busy_until=None if plotter is None else plotter.drain,
        )
    plot_paths: list[Path] = []
    if plotter is not None:
        t0 = time.perf_counter()
        plot_paths = sorted(plotter.paths(), key=processes.plot_rank)
        info["seconds"]["plots (waited)"] = time.perf_counter() - t0
    return _summary(tests, info, gen, n_real, floors_source, settings["alpha"], binning), plot_paths


def _floors_main(argv: list[str]) -> int:
    parser = stage_parser(
        "python -m surrogate.validate floors",
        "Compute the real-vs-real floors of a dataset's test split, for --floors of the stage.",
    )
    parser.add_argument("--dataset", required=True, help="ingest output HDF5 (its 'test' group is the reference)")
    parser.add_argument("--out", required=True, help="output JSON, e.g. results/validate/floors.json")
    parser.add_argument("--threads", type=int, default=None, help="threads (default: validate.threads)")
    parser.add_argument(
        "--split", default="test", help="the reference split: test, or a held-out one (unseen, extrapolation)"
    )
    args, cfg = parse_stage_args(parser, argv)
    from surrogate.metrics import MetricError

    try:
        compute_floors(cfg, args.dataset, args.out, args.threads, split=args.split)
    except (ValidateError, MetricError, FeaturesError) as exc:
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; exit 0 unless the input is unusable or (with fail_pipeline) the verdict is FAIL."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["floors"]:
        return _floors_main(argv[1:])
    parser = stage_parser(
        "python -m surrogate.validate",
        "Validate generated showers against the test split. `python -m surrogate.validate floors "
        "--help` computes the real-vs-real floors once per dataset.",
    )
    parser.add_argument("--dataset", required=True, help="ingest output HDF5 (its 'test' group is the reference)")
    parser.add_argument("--generated", required=True, help="generated events HDF5 (generate stage output)")
    parser.add_argument("--out", required=True, help="output folder (summary.json, report.html, plots/)")
    parser.add_argument(
        "--floors",
        default=None,
        help="floors JSON from `validate floors` (default: computed here; also when it does not match)",
    )
    parser.add_argument("--history", default=None, help="training history.jsonl for the training-curve plot")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="reader processes for the generated file (default: validate.threads); above 1, "
        "plots are drawn in one more process",
    )
    for split in HELDOUT:
        parser.add_argument(
            f"--{split}",
            default=None,
            metavar="FILE",
            help=f"events generated at the conditions of the held-out split {split!r} (generate --split {split}); "
            "validated against it, reported under its own key"
            + (" (informational, outside the verdict)" if split == "extrapolation" else ""),
        )
        parser.add_argument(f"--{split}-floors", default=None, metavar="FILE", help=f"floors of the {split} split")
    args, cfg = parse_stage_args(parser, argv)
    history = args.history if args.history and Path(args.history).exists() else None
    from surrogate.metrics import MetricError

    heldout = {s: getattr(args, s) for s in HELDOUT if getattr(args, s)}
    heldout_floors = {s: getattr(args, f"{s}_floors") for s in HELDOUT if getattr(args, f"{s}_floors")}
    try:
        summary = run(
            cfg,
            args.dataset,
            args.generated,
            args.out,
            history=history,
            threads=args.threads,
            floors_path=args.floors,
            heldout=heldout,
            heldout_floors=heldout_floors,
        )
    except (ValidateError, MetricError, FeaturesError) as exc:
        parser.exit(1, f"{parser.prog}: error: {exc}\n")
    if summary["verdict"] == "FAIL" and cfg["validate"]["fail_pipeline"]:
        return 1
    return 0
