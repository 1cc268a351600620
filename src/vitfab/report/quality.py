"""The report's inspection-requirement part: operating points, escape and overkill with their
bounds, the escape-vs-overkill curves, calibration, and the comparison to the best reference."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..evaluate.accuracy import METRIC_NAMES
from .plots import pyplot, save_png
from .summary import QualityInfo, Summary

KIND_COLOURS = {"chosen": "#d62728", "baseline": "#444444", "reference": "#2ca02c"}


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def operating_line(t: dict[str, Any]) -> str:
    """One model's test rates at its operating point, with counts and 95 % upper bounds."""
    return (f"at the operating point (pass where p_good >= {t['threshold']:.4f}, temperature {t['temperature']:.3f}): "
            f"test escape {_pct(t['escape_rate'])} % ({t['escapes']}/{t['n_defective']}, 95 % upper bound "
            f"{_pct(t['escape_upper'])} %), overkill {_pct(t['overkill_rate'])} % ({t['flagged_good']}/{t['n_good']}, "
            f"upper bound {_pct(t['overkill_upper'])} %)")


def comparison_line(c: dict[str, Any]) -> str:
    """The chosen model minus the best reference on test, with its bootstrap interval and verdict."""
    return (f"chosen - {c['reference']} (test {METRIC_NAMES.get(c['metric'], c['metric'])}): "
            f"{100 * c['difference']:+.2f} points, paired bootstrap 95 % interval {100 * c['low']:+.2f} .. "
            f"{100 * c['high']:+.2f} ({c['resamples']} resamples of the test images): {c['verdict']}")


def calibration_line(cal: dict[str, Any]) -> str:
    return (f"calibration of the chosen model on test: expected calibration error {cal['before']['ece']:.3f} before, "
            f"{cal['after']['ece']:.3f} after temperature scaling (T = {cal['after']['temperature']:.3f}, fitted on "
            f"validation)")


def quality_lines(s: Summary) -> list[str]:
    """The chosen model's test rates at its operating point and the comparison, for the terminal."""
    out = [f"chosen {operating_line(s.chosen.test.operating)}"] if s.chosen.test.operating else []
    return out + ([comparison_line(s.quality.comparison)] if s.quality and s.quality.comparison else [])


def quality_section(s: Summary) -> list[str]:
    q = s.quality
    if q is None:
        return []
    L = ["## Inspection requirement and confidence", ""]
    if q.ceilings:
        L += [f"Good (passable) classes: {', '.join(q.good_classes)}; every other class is a defect. Ceilings: "
              f"{q.ceilings}. Each model's operating point is a temperature (least validation NLL) and a threshold on "
              f"p_good (the summed probability of the good classes) with the least validation overkill that meets "
              f"the escape ceiling and the recall floors, fitted on the outputs of the precision it runs in. Test "
              f"rates are measured once at that point; bounds are exact one-sided 95 % Clopper-Pearson upper bounds.",
              "", "| model | temperature | threshold | val escape % | val overkill % | ceilings met on val | "
                  "test escape % (k/n) | upper bound % | test overkill % (k/n) | upper bound % |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for r in q.rows:
            op, t = r.operating, r.test
            if not op:
                continue
            L.append(f"| {r.label} | {op['temperature']:.3f} | {op['threshold']:.4f} | {_pct(op['escape_rate'])} | "
                     f"{_pct(op['overkill_rate'])} | {'yes' if op['met'] else 'no'} | {_pct(t['escape_rate'])} "
                     f"({t['escapes']}/{t['n_defective']}) | {_pct(t['escape_upper'])} | {_pct(t['overkill_rate'])} "
                     f"({t['flagged_good']}/{t['n_good']}) | {_pct(t['overkill_upper'])} |")
        L.append("")
        L += [f"- {r.label}: {r.operating['shortfall']}" for r in q.rows if r.operating and r.operating["shortfall"]]
        ch, ref = q.row("chosen"), q.row("reference")
        if ch and ref and ch.operating and ref.operating:
            L.append(f"- overkill at the escape ceiling, chosen vs {ref.label}: validation "
                     f"{_pct(ch.operating['overkill_rate'])} % vs {_pct(ref.operating['overkill_rate'])} %, test "
                     f"{_pct(ch.test['overkill_rate'])} % vs {_pct(ref.test['overkill_rate'])} %")
        if q.escape_claim:
            c = q.escape_claim
            L.append(f"- a claim of escape <= {100 * c['max_escape']:g} % at 95 % confidence needs at least "
                     f"{c['images_needed']} defective test images without an escape; this test split has "
                     f"{c['n_defective_test']}")
        L.append("")
    else:
        L += ["No class of this data set may pass (none is named good/normal/ok; `--good-class` names them), so "
              "there is no escape, overkill or operating point.", ""]
    if q.comparison:
        L += [f"**{comparison_line(q.comparison)[0].upper() + comparison_line(q.comparison)[1:]}**.", ""]
    return L + [calibration_line(q.calibration)[0].upper() + calibration_line(q.calibration)[1:] + ".", ""]


def plot_escape_overkill(q: QualityInfo, path: Path) -> Path:
    """Test escape against overkill over a threshold sweep, each model's operating point marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for r in q.rows:
        if not r.curve:
            continue
        colour = KIND_COLOURS.get(r.kind, "#1f77b4")
        ax.plot([100 * v for v in r.curve["overkill"]], [100 * v for v in r.curve["escape"]], "-", c=colour,
                lw=1.3, label=r.label)
        t = r.test
        if t["overkill_rate"] is not None and t["escape_rate"] is not None:
            ax.scatter([100 * t["overkill_rate"]], [100 * t["escape_rate"]], s=90, zorder=4, edgecolors="k",
                       marker="*" if r.kind == "chosen" else "o", c=colour, linewidths=0.5)
    ceilings = q.rows[0].operating["ceilings"] if q.rows and q.rows[0].operating else None
    if ceilings:
        if ceilings["max_escape"] is not None:
            ax.axhline(100 * ceilings["max_escape"], ls="--", c="#888888", lw=1, label="escape ceiling")
        ax.axvline(100 * ceilings["max_overkill"], ls=":", c="#888888", lw=1, label="overkill ceiling")
    ax.set_xlabel("overkill: good images flagged (%)")
    ax.set_ylabel("escape: defective images passed (%)")
    ax.set_title("test split: threshold sweep; markers = operating points fitted on validation", fontsize=9)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def plot_reliability(q: QualityInfo, path: Path) -> Path:
    """The chosen model's reliability diagram on test, before and after temperature scaling."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ":", c="#888888", lw=1)
    for key, colour in (("before", "#9aa7b1"), ("after", "#d62728")):
        c = q.calibration[key]
        bins = c["bins"]
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "-o", c=colour, ms=4,
                label=f"{key} (T = {c['temperature']:.2f}): ECE {c['ece']:.3f}")
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("chosen model, test split: reliability", fontsize=9)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def quality_plots(q: QualityInfo, out: Path) -> list[Path]:
    files = [plot_reliability(q, out / "reliability.png")]
    if any(r.curve for r in q.rows):
        files.insert(0, plot_escape_overkill(q, out / "escape_overkill.png"))
    return files
