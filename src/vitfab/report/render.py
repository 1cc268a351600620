"""report.md, report.html and summary.json of a main-job run, from the run's own numbers.

The Markdown is the one source of the text; the HTML is rendered from it (headings, paragraphs,
lists, tables, images, code), so the two never disagree.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any, Sequence

from ..files import read_json, write_json_atomic, write_text_atomic


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _num(v: float | None, fmt: str = "{:.2f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def _m(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f}M"


def ablation_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    out = ["| configuration | top-1 % | macro-F1 | escape % | overkill % | params | GMACs | img/s | speedup | "
           "p50 ms | p99 ms | J/img | peak MiB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"**{r['name']}** (chosen)" if r.get("chosen") else r["name"]
        joules = _num(r.get("joules_per_img"), "{:.4f}") if r.get("joules_per_img") is not None else "unavailable"
        out.append(f"| {name} | {_pct(r['accuracy'])} | {_num(r['macro_f1'], '{:.3f}')} | {_pct(r.get('escape_rate'))} "
                   f"| {_pct(r.get('overkill_rate'))} | {_m(r['params'])} | {r['gmacs']:.3f} | {r['img_per_s']:.1f} | "
                   f"{_num(r['speedup'])}x | {r['latency_ms_p50']:.2f} | {r['latency_ms_p99']:.2f} | {joules} | "
                   f"{_num(r.get('peak_memory_mb'), '{:.0f}')} |")
    return out


def render_markdown(s: dict[str, Any], candidates: Sequence[dict[str, Any]], images: dict[str, str]) -> str:
    res = s["stage_results"]
    dev, cfg, ch = s["device"], s["config"], s["chosen"]
    rows = s["ablation"]
    base = s["baseline"] or {}
    data = res.get("data", {})
    L = [f"# vitfab report: {Path(s['run']).name}", ""]
    L += [f"Device: **{dev['name']}** ({dev['type']}), {dev['threads']} threads, torch {dev['torch']}; training "
          f"mixed precision: {dev['train_amp']}. Every number below was measured in this run.", ""]
    imgs = data.get("images", {})
    L += [f"Data: `{data.get('data')}`{' (synthetic X-ray package defects)' if data.get('synthetic') else ''}: "
          f"{len(data.get('classes', []))} classes, {imgs.get('train')} train / {imgs.get('val')} val / "
          f"{imgs.get('test')} test images at {cfg['img_size']} px, patch {cfg['patch_size']} "
          f"(scale `{cfg['scale']}`).", ""]
    met = s.get("requirement_met")
    L += [f"Requirement: {s.get('requirement')}. Objective: {s['objective']}. "
          f"Met: **{'yes' if met else 'NO (the most accurate candidate is reported)'}**.", ""]
    if res.get("joint", {}).get("baseline_warning"):
        L += [f"**Warning:** {res['joint']['baseline_warning']}.", ""]
    L += ["## Chosen configuration", ""]
    test = ch.get("test") or {}
    chosen_row = next((r for r in rows if r.get("chosen")), None)
    rates = "" if test.get("escape_rate") is None else (
        f", escape {_pct(test.get('escape_rate'))} %, overkill {_pct(test.get('overkill_rate'))} %")
    L += [f"- architecture: `{ch.get('arch')}` ({ch.get('model')}), {_m(ch.get('params'))} params, "
          f"{_num(ch.get('gmacs'), '{:.3f}')} GMACs with merging",
          f"- ToMe: `{ch.get('tome') or 'none'}` (r per layer {ch.get('r_per_layer') or []})",
          f"- precision: {ch.get('precision')}",
          f"- validation top-1 {_pct(ch.get('val_top1'))} %; test top-1 {_pct(test.get('top1'))} %, macro-F1 "
          f"{_num(test.get('macro_f1'), '{:.3f}')}{rates}"]
    if chosen_row and base:
        L.append(f"- against the DeiT-B/16 fp32 baseline: {chosen_row['speedup']:.2f}x throughput, "
                 f"{base['params'] / chosen_row['params']:.1f}x fewer params, "
                 f"{base['gmacs'] / chosen_row['gmacs']:.1f}x fewer GMACs, test top-1 "
                 f"{100 * (chosen_row['accuracy'] - base['accuracy']):+.2f} points")
    L += [f"- checkpoint: `{ch.get('checkpoint')}` (ToMe schedule and precision recorded); run it with "
          f"`vitfab predict --checkpoint {ch.get('checkpoint')} --input DIR --out preds.csv`", ""]
    L += ["## Ablation (test split)", ""]
    if rows:
        r0 = rows[0]
        L += [f"img/s at batch {r0['batch_size']}, latency at batch 1, {r0['img_size']} px, all rows interleaved in "
              f"one run (median of the repeats). Axis settings are the chosen configuration's where it uses the "
              f"axis, otherwise the default (ToMe `{res.get('ablation', {}).get('default_tome')}`).", ""]
        L += ablation_table(rows) + [""]
        notes = {r.get("energy_note") for r in rows if r.get("joules_per_img") is None and r.get("energy_note")}
        notes |= {r.get("escape_note") for r in rows if r.get("escape_note")}
        L += [f"- {n}" for n in sorted(notes)] + ([""] if notes else [])
    at = s.get("at_224")
    if at:
        L += ["## At 224 px (speed only)", "",
              "The chosen architecture, ToMe schedule and precision at 224 px / patch 16 with random weights, against "
              "DeiT-B/16 fp32 at 224 px, interleaved (throughput does not depend on the weights; no accuracy is "
              "claimed at this size).", "",
              "| configuration | params | GMACs | img/s | p50 ms |", "|---|---|---|---|---|"]
        L += [f"| {r['name']} | {_m(r['params'])} | {r['gmacs']:.3f} | {r['img_per_s']:.1f} | {r['latency_ms_p50']:.2f} |"
              for r in at["rows"]]
        L += ["", f"Speedup {at['speedup']:.1f}x, {at['params_reduction']:.1f}x fewer params, "
                  f"{at['macs_reduction']:.1f}x fewer GMACs.", ""]
    dep = s.get("deploy")
    if dep and dep.get("error"):
        L += ["## Deployment", "", f"Export failed: {dep['error']}. The chosen checkpoint above still runs with "
              f"`vitfab predict --checkpoint`.", ""]
    elif dep:
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in dep["parity_max_abs_diff"].items())
        L += ["## Deployment", "",
              f"`{dep['folder']}`: safetensors + meta.json, TorchScript, ONNX (opset 17, dynamic batch, ToMe's matching "
              f"and merges in the graph). Max |logit difference| against PyTorch fp32: {diffs}. Run it with "
              f"`vitfab predict --model {dep['folder']} --runtime onnxruntime --input DIR --out preds.csv`, compare "
              f"runtimes with `vitfab bench --checkpoint {dep['folder']} --tome-r recorded --vs runtime=onnxruntime`.",
              ""]
    joint = res.get("joint", {})
    L += ["## Joint search (validation split)", ""]
    ok = [c for c in candidates if c.get("accuracy") is not None and c.get("img_per_s")]
    L += [f"{len(candidates)} configurations ({len(ok)} measured): models "
          f"{sorted({c['model'] for c in candidates})} x ToMe {joint.get('schedules')} x precision "
          f"{joint.get('precisions')}. Baseline validation top-1 {_pct(joint.get('baseline_val_top1'))} %, "
          f"threshold {_pct(joint.get('threshold'))} %.", ""]
    L += ["| configuration | val top-1 % | GMACs | img/s | p50 ms | front |", "|---|---|---|---|---|---|"]
    front = set(joint.get("front", []))
    rank = {"latency": lambda c: c["latency_ms"], "energy": lambda c: c.get("joules_per_img") or float("inf")}.get(
        s["objective"], lambda c: -c["img_per_s"])
    shown = sorted(ok, key=rank)[:15]  # best on the objective first; the choice always listed
    shown += [c for c in ok if c["key"] == joint.get("chosen", {}).get("key") and c not in shown]
    for c in shown:
        L.append(f"| {c['key']} | {_pct(c['accuracy'])} | {c['gmacs']:.3f} | {c['img_per_s']:.1f} | "
                 f"{c['latency_ms']:.2f} | {'yes' if c['key'] in front else ''} |")
    errs = [c for c in candidates if c.get("error")]
    L += [""] + [f"- not measured: {c['key']}: {c['error']}" for c in errs] + ([""] if errs else [])
    L += ["## Stages, budget and what was cut", ""]
    b = s["budget"]
    limit = "none" if b["seconds"] is None else f"{b['seconds'] / 60:.1f} min"
    L += [f"Budget: {limit}; stage wall times (s): " + ", ".join(f"{k} {v}" for k, v in s["stages"].items()) + ".",
          ""]
    L += [f"- cut: {c}" for c in b["cuts"]] or ["- nothing was cut"]
    L += [""]
    L += ["## Figures", ""] + [f"![{k}]({v})" for k, v in images.items()] + [""]
    return "\n".join(L)


_INLINE = [(re.compile(r"\*\*(.+?)\*\*"), r"<b>\1</b>"), (re.compile(r"`(.+?)`"), r"<code>\1</code>")]


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    for pat, rep in _INLINE:
        out = pat.sub(rep, out)
    return out


def markdown_to_html(md: str, title: str) -> str:
    """The subset of Markdown the report uses: #-headings, paragraphs, '- ' lists, pipe tables, images."""
    body, lines, i = [], md.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            table = []
            while i < len(lines) and lines[i].startswith("|"):
                table.append([cell.strip() for cell in lines[i].strip("|").split("|")])
                i += 1
            i -= 1
            head, rows = table[0], [r for r in table[1:] if not all(set(c) <= set("-: ") for c in r)]
            body.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
                        + "</table>")
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            i -= 1
            body.append("<ul>" + "".join(items) + "</ul>")
        elif m := re.fullmatch(r"!\[(.*?)\]\((.*?)\)", line.strip()):
            body.append(f'<p><img alt="{html.escape(m[1])}" src="{html.escape(m[2])}" style="max-width:100%"></p>')
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
        i += 1
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}code{background:#f3f3f3}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(run_root: str | Path, summary: dict[str, Any], progress: bool = False) -> list[Path]:
    """Figures, report.md, report.html in ``run/report``; summary.json in the run folder."""
    from ..data.split import Split
    from ..models import load_model
    from .plots import plot_pareto, plot_speedup, plot_tome_merges

    root = Path(run_root)
    out = root / "report"
    out.mkdir(parents=True, exist_ok=True)
    res = summary["stage_results"]
    joint = res.get("joint", {})
    candidates = read_json(joint["candidates"]) if joint.get("candidates") else []
    rows = summary["ablation"]
    files = [plot_pareto(candidates, joint.get("front", []), joint.get("chosen", {}).get("key"), rows,
                         out / "pareto.png", joint.get("threshold"), summary["objective"])]
    if rows:
        files.append(plot_speedup(rows, out / "speedup.png"))
    chosen = summary["chosen"]
    if chosen.get("checkpoint"):
        model = load_model(chosen["checkpoint"])
        files.append(plot_tome_merges(model, Split.load(root / "split.json"), chosen.get("tome"),
                                      out / "tome_merges.png"))
    confusion = out / "confusion_chosen.png"
    if confusion.is_file():
        files.append(confusion)
    images = {f.stem: f.name for f in files}
    md = render_markdown(summary, candidates, images)
    write_text_atomic(out / "report.md", md)
    write_text_atomic(out / "report.html", markdown_to_html(md, f"vitfab report {root.name}"))
    write_json_atomic(root / "summary.json", summary)
    return files + [out / "report.md", out / "report.html", root / "summary.json"]
