"""The validate stage: generated showers against the held-out test split, judged against real-vs-real.

``python -m surrogate.validate --config C --dataset results/ingest/dataset.h5
--generated results/generate/events.h5 --out results/validate [--floors F] [--history H] [--threads N]``
and ``python -m surrogate.validate floors --config C --dataset results/ingest/dataset.h5 --out F``.

Steps:

1. The reference ("real") sample is the ``test`` split of the ingest file, loaded into RAM.
   It is split (seeded) into two disjoint halves A and B: every metric computed on A vs B is
   the real-vs-real *floor* the generated sample is judged against. The floors depend only on
   the dataset, the settings and the seed: ``floors`` computes them once per dataset (the
   workflow runs it beside training) and the stage reads them from ``--floors``, after checking
   that they belong to the same test split, settings and seed; without them (or when they do not
   match) the stage computes them itself, with the same results.
2. Condition bins = energy bins x |eta| bins x particle (``validate`` config; one energy bin per
   discrete incident energy when ingest found the energies discrete). The generated
   file's conditions are read whole (small); per bin, generated rows are subsampled to the
   real sample's proportions ("matched" sample). Its showers are then streamed in HDF5-chunk
   aligned blocks (in ``threads`` reader processes when > 1): every row is checked, every matched
   row's deposited energy feeds the response test, and a random condition-matched *feature
   subsample* (at most ``gen_test_ratio`` times the real sample: the distribution tests' power is
   set by the real sample) is turned into high-level features, whose truth modes the mode
   classifier predicts as the blocks arrive.
3. Tests, each reduced to one p-value and corrected together with Holm at ``alpha``:

   - direct p-values: KS per feature (overall and per bin), G-test of the predicted-mode
     fractions per bin (or k-means occupancy without truth labels), response mean and
     resolution per energy bin x particle (two-sided z with a tolerance margin);
   - floor-relative metrics (separation power, scaled W1, FPD, KPD, classifier AUCs, PRDC,
     diversity): the generated value is computed at the *same sample sizes* as the floor
     (A vs a generated subsample of |B| events) so the size-dependent biases cancel; the
     p-value is that of "worse than floor + margin" with the two errors in quadrature.

   A test passes when its Holm-adjusted p-value exceeds ``alpha``; the verdict is PASS when
   every test passes.

4. Held-out conditions (``ingest.holdout``, :mod:`surrogate.holdout`): with ``--unseen FILE``
   (events generated at the conditions of the ``unseen`` split) steps 1-3 run again with that split
   as the reference, its own floors (``floors --split unseen``) and its own Holm correction; the
   summary holds the result under ``unseen``, the verdict needs both, and ``verdict_line`` says how
   each did. ``--extrapolation FILE`` does the same for the ``extrapolation`` split, reported under
   its key and in its own page section, outside the verdict.

Outputs (atomic): ``summary.json``, ``report.html`` (self-contained), ``plots/*.png`` (drawn in a
separate process while the tests run, when ``threads > 1``) and the resolved ``config.yaml``.

Modules (``python -m surrogate.validate`` is the command line):

- :mod:`~surrogate.validation.samples`: the real test split and the generated file, matched to its
  conditions and streamed (:class:`RealSample`, :class:`GeneratedSample`, :func:`load_real`,
  :func:`load_generated`, :class:`ValidateError`);
- :mod:`~surrogate.validation.binning`: the condition bins (:class:`Binning`);
- :mod:`~surrogate.validation.modes`: the truth-mode classifier (:class:`ModeClassifier`);
- :mod:`~surrogate.validation.context`: every random draw and the floors cache, the families' inputs;
- :mod:`~surrogate.validation.families`: the test families, a registry (:data:`FAMILIES`);
- :mod:`~surrogate.validation.verdict`: one test (:class:`Test`), its p-value, Holm's correction;
- :mod:`~surrogate.validation.suite`: :func:`evaluate`, every family run (in threads);
- :mod:`~surrogate.validation.floors`: the real-vs-real floors, their identity and file;
- :mod:`~surrogate.validation.processes`: the reader and plotting processes;
- :mod:`~surrogate.validation.scoreboard`: the headline numbers of a summary (:func:`headline`);
- :mod:`~surrogate.validation.html`: ``report.html``, the scoreboard first;
- :mod:`~surrogate.validation.stage`: :func:`run` and the command line (:func:`main`).
"""

from surrogate.validation.binning import Binning
from surrogate.validation.families import FAMILIES, USED_METRICS
from surrogate.validation.floors import FLOORS_FORMAT, compute_floors
from surrogate.validation.modes import ModeClassifier
from surrogate.validation.samples import (
    GeneratedSample,
    RealSample,
    ValidateError,
    load_generated,
    load_real,
    match_rows,
)
from surrogate.validation.scoreboard import headline
from surrogate.validation.stage import main, run
from surrogate.validation.suite import evaluate
from surrogate.validation.verdict import Test, apply_holm

__all__ = [
    "FAMILIES",
    "USED_METRICS",
    "FLOORS_FORMAT",
    "ValidateError",
    "RealSample",
    "GeneratedSample",
    "Binning",
    "ModeClassifier",
    "Test",
    "load_real",
    "load_generated",
    "match_rows",
    "evaluate",
    "apply_holm",
    "compute_floors",
    "headline",
    "run",
    "main",
]
