"""``report.html``: the validation summary as one self-contained page (plots inlined as PNG)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from surrogate.validation.scoreboard import headline

__all__ = ["render", "scoreboard"]


def _fmt(x: Any) -> str:
    return "" if x is None else (f"{x:.4g}" if isinstance(x, float) else html.escape(str(x)))


def _family_overview(rows: list[dict[str, Any]]) -> str:
    """Table rows: tests and failed tests per family (the first part of a test's name)."""
    families: dict[str, list[int]] = {}
    for r in rows:
        fam = families.setdefault(r["name"].split("/")[0], [0, 0])
        fam[0] += 1
        fam[1] += not r["passed"]
    return "".join(
        f"<tr class='{'bad' if f else 'ok'}'><td>{html.escape(k)}</td><td>{n}</td><td>{f}</td></tr>"
        for k, (n, f) in sorted(families.items())
    )


def scoreboard(summary: dict[str, Any]) -> str:
    """The headline table (:func:`~surrogate.validation.scoreboard.headline`): each number against its
    floor and threshold, its row green when it passes, red when it fails."""
    cells = []
    for r in headline(summary):
        if r["name"] == "verdict":
            value = html.escape(str(summary.get("verdict")))
        elif r["total"] is not None:
            value = f"{_fmt(r['value'])} of {_fmt(r['total'])}"
        else:
            value = _fmt(r["value"])
        result = {True: "pass", False: "FAIL", None: ""}[r["passed"]]
        css = {True: "pass", False: "fail", None: "info"}[r["passed"]]
        numbers = "".join(f"<td>{_fmt(r[c])}</td>" for c in ("error", "floor", "threshold"))
        cells.append(
            f"<tr class='{css}'><td>{html.escape(r['label'])}</td><td>{value}</td>{numbers}<td>{result}</td></tr>"
        )
    head = "".join(f"<th>{c}</th>" for c in ("", "value", "error", "floor", "threshold", "result"))
    return f"<table class='scoreboard'><tr>{head}</tr>{''.join(cells)}</table>"


#: Headings of the held-out sections (:mod:`surrogate.holdout`), in page order.
HELDOUT_SECTIONS = {
    "unseen": "Conditions never seen in training",
    "extrapolation": "Extrapolation beyond the trained range (informational: not in the verdict)",
}


def _tests_table(rows: list[dict[str, Any]]) -> str:
    cols = ("name", "value", "error", "floor", "threshold", "pvalue_holm", "passed")
    body = "\n".join(
        "<tr class='{}'>{}</tr>".format("ok" if r["passed"] else "bad", "".join(f"<td>{_fmt(r[c])}</td>" for c in cols))
        for r in rows
    )
    return f"<table><tr>{''.join(f'<th>{c}</th>' for c in cols)}</tr>{body}</table>"


def _images(plots: list[Path]) -> str:
    return "\n".join(
        f"<h3>{html.escape(p.stem)}</h3><img alt='{html.escape(p.stem)}' src='data:image/png;base64,"
        f"{base64.b64encode(p.read_bytes()).decode()}'>"
        for p in plots
    )


def _heldout_section(split: str, part: dict[str, Any], plots: list[Path]) -> str:
    """One held-out split: its regions, verdict, scoreboard, families, plots and tests."""
    rows = sorted(part["metrics"], key=lambda r: (r["passed"], r["pvalue_holm"] or 0.0))
    regions = "".join(
        f"<li>{html.escape(r['name'])}: E {_fmt(r['energy_gev'][0])}-{_fmt(r['energy_gev'][1]) or 'inf'} GeV"
        + (f", |eta| {_fmt(r['eta'][0])}-{_fmt(r['eta'][1]) or 'inf'}" if r.get("eta") else "")
        + (f", pdg {', '.join(map(str, r['particles']))}" if r.get("particles") else "")
        + "</li>"
        for r in part.get("regions", [])
    )
    n_fail = sum(not r["passed"] for r in rows)
    return f"""<h2 id="{split}">{html.escape(HELDOUT_SECTIONS.get(split, split))}:
<span class="{part["verdict"]}">{part["verdict"]}</span></h2>
<p>Events of these regions never reached train, val or test; the generator interpolates (or extrapolates) to
them. Same test families as above, against the {html.escape(split)} split and its own real-vs-real floors,
Holm-corrected on their own: {len(rows)} tests, {n_fail} failed. Generated events in file:
{part["generated_events_in_file"]}, condition-matched: {part["generated_events_matched"]}; real events:
{part["real_events"]}.</p><ul>{regions}</ul>
<h3>Scoreboard ({html.escape(split)})</h3>{scoreboard(part)}
<h3>Test families ({html.escape(split)})</h3><table><tr><th>family</th><th>tests</th><th>failed</th></tr>
{_family_overview(rows)}</table>
<h3>Plots ({html.escape(split)})</h3>{_images(plots)}
<h3>Tests ({html.escape(split)}, failed first)</h3>{_tests_table(rows)}
"""


def render(summary: dict[str, Any], plots: list[Path]) -> str:
    """The page for ``summary`` (as written to summary.json) with the PNG files ``plots`` inlined
    (those in ``plots/<split>/`` go to the section of that held-out split)."""
    heldout = [k for k in HELDOUT_SECTIONS if k in summary]
    own = {k: [p for p in plots if p.parent.name == k] for k in heldout}
    plots = [p for p in plots if not any(p in v for v in own.values())]
    rows = sorted(summary["metrics"], key=lambda r: (r["passed"], r["pvalue_holm"] or 0.0))
    imgs = _images(plots)
    n_fail = sum(not r["passed"] for r in rows)
    sizes = html.escape(json.dumps(summary["subsample"], indent=1))
    overview = _family_overview(rows)
    line = f"<p><b>{html.escape(summary['verdict_line'])}</b></p>\n" if "verdict_line" in summary else ""
    seen = {**summary, "verdict": summary["verdicts"]["seen"]} if "verdicts" in summary else summary
    title = "<h2>Seen conditions (the test split)</h2>\n" if heldout else ""
    pre = line + title
    sections = "".join(_heldout_section(k, summary[k], own[k]) for k in heldout)
    return f"""<!DOCTYPE html><html><head><meta charset="utf-8"><title>Validation: {summary["verdict"]}</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:2px 8px;border-bottom:1px solid #ddd;font-size:90%}}
.bad{{background:#fdd}} .ok{{}} img{{max-width:100%}} .PASS{{color:green}} .FAIL{{color:#b00}}
.scoreboard .pass{{background:#dfd}} .scoreboard .fail{{background:#fdd}} .scoreboard td:first-child{{font-weight:bold}}
</style></head><body>
<h1>Validation verdict: <span class="{summary["verdict"]}">{summary["verdict"]}</span></h1>
{pre}<p>{len(rows)} tests, {n_fail} failed (Holm-corrected at alpha = {summary["alpha"]}). Generated events in file:
{summary["generated_events_in_file"]}, condition-matched: {summary["generated_events_matched"]}; real test events:
{summary["real_events"]}.</p>
<h2>Scoreboard</h2>{scoreboard(seen)}
<h2>Test families</h2><table><tr><th>family</th><th>tests</th><th>failed</th></tr>{overview}</table>
<h2>Subsample sizes</h2><pre>{sizes}</pre>
<h2>Plots</h2>{imgs}
<h2>Tests (failed first)</h2>{_tests_table(rows)}{sections}</body></html>
"""
