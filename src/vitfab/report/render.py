"""report.md and report.html of a main-job run, from its ``Summary`` alone.

The Markdown is the one source of the text; the HTML is markdown-it-py's rendering of it
(CommonMark with tables, raw HTML escaped), so the two never disagree.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

from markdown_it import MarkdownIt

from ..data.split import Split
from ..evaluate.accuracy import METRIC_NAMES
from ..files import write_text_atomic
from ..rundir import RunDir
from ..runtimes import load_model
from .plots import plot_pareto, plot_speedup, plot_tome_merges, plot_tome_schedule
from .quality import quality_plots
from .quality import operating_line as _operating_line
from .quality import quality_lines, quality_section
from .summary import AblationRecord, Summary, metric_of


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}"


def _num(v: float | None, fmt: str = "{:.2f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def _m(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f}M"


def ablation_table(rows: Sequence[AblationRecord]) -> list[str]:
    out = ["| configuration | top-1 % | macro-F1 | escape % (argmax) | overkill % (argmax) | params | GMACs | img/s | speedup | "
           "p50 ms | p99 ms | J/img | peak MiB |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"**{r.name}** (chosen)" if r.chosen else r.name
        joules = _num(r.joules_per_img, "{:.4f}") if r.joules_per_img is not None else "unavailable"
        out.append(f"| {name} | {_pct(r.accuracy)} | {_num(r.macro_f1, '{:.3f}')} | {_pct(r.escape_rate)} "
                   f"| {_pct(r.overkill_rate)} | {_m(r.params)} | {r.gmacs:.3f} | {r.img_per_s:.1f} | "
                   f"{_num(r.speedup)}x | {r.latency_ms_p50:.2f} | {r.latency_ms_p99:.2f} | {joules} | "
                   f"{_num(r.peak_memory_mb, '{:.0f}')} |")
    return out


def _header(s: Summary) -> list[str]:
    dev, d, j = s.device, s.data, s.joint
    L = [f"# vitfab report: {Path(s.run).name}", "",
         f"Device: **{dev.name}** ({dev.type}), {dev.threads} threads, torch {dev.torch}; training mixed precision: "
         f"{dev.train_amp}. Every number below was measured in this run.", "",
         *([f"Processes: **{dev.processes}** (torchrun): every training stage data-parallel over them (the ViTs' global "
            f"batch {dev.batch}, {dev.batch // dev.processes if dev.batch else '?'} per process, the learning rate of "
            f"one process), the validation passes of both searches shared out; every speed measured on rank 0's device "
            f"({dev.name}).", ""] if dev.processes > 1 else []),
         f"Data: `{d.data}`{' (synthetic X-ray package defects)' if d.synthetic else ''}: {len(d.classes)} classes, "
         f"{d.images.get('train')} train / {d.images.get('val')} val / {d.images.get('test')} test images at "
         f"{d.img_size} px, patch {d.patch_size} (scale `{d.scale}`).", "",
         f"Requirement: {j.requirement}"
         + (f"; at a calibrated operating point on validation: {j.ceilings}" if j.ceilings else "")
         + f". Objective: {s.objective}. Met: **{'yes' if j.requirement_met else 'NO'}**"
         + ("" if j.requirement_met else f" ({j.shortfall or 'no candidate meets the accuracy requirement'}; the "
                                         f"candidate reported is the most accurate of those meeting the ceilings, "
                                         f"else of all)") + ".", ""]
    if j.warning:
        L += [f"**Warning:** {j.warning}.", ""]
    L += [f"**{v}**" for v in s.verdicts] + ([""] if s.verdicts else [])
    return L


def _chosen(s: Summary) -> list[str]:
    ch, t = s.chosen, s.chosen.test
    rates = "" if t.escape_rate is None else (f", at the argmax class escape {_pct(t.escape_rate)} %, overkill "
                                              f"{_pct(t.overkill_rate)} %")
    L = ["## Chosen configuration", "",
         f"- architecture: `{ch.arch}` ({ch.model}), {_m(ch.params)} params, {ch.gmacs:.3f} GMACs with merging",
         f"- ToMe: `{ch.tome_name or ch.tome or 'none'}` (r per layer {ch.r_per_layer}"
         + (", searched per block: see the schedules below)" if ch.tome_name else ")"),
         f"- precision: {ch.precision}",
         f"- validation {METRIC_NAMES.get(s.joint.metric, s.joint.metric)} {_pct(ch.val)} %; test top-1 "
         f"{_pct(t.top1)} %, macro-F1 {t.macro_f1:.3f}, balanced accuracy {_pct(t.balanced_accuracy)} %{rates}"]
    if t.operating:
        L.append(f"- {_operating_line(t.operating)}")
    row, base = s.chosen_row, s.baseline
    if row and base:
        L.append(f"- against the DeiT-B/16 fp32 baseline, both at {row.img_size} px and with the weights tested "
                 f"here: **{row.speedup:.2f}x throughput** (the primary figure), {base.params / row.params:.1f}x "
                 f"fewer params, {base.gmacs / row.gmacs:.1f}x fewer GMACs, test top-1 "
                 f"{100 * (row.accuracy - base.accuracy):+.2f} points"
                 + (f"; at 224 px (random weights, speed only) {s.at_224.speedup:.1f}x" if s.at_224 else ""))
        if row.runtime != "torch":
            L.append(f"- deployed in {row.runtime} {row.precision} (the runtime it was chosen in; the same model in "
                     f"PyTorch is the ablation's row without '+ {row.runtime}')")
        dep = s.baseline_deployed
        if dep is not None and s.deployed_speedup:
            L.append(f"- against DeiT-B/16 deployed well, in its fastest runtime and precision without ToMe "
                     f"({dep.name}, test top-1 {_pct(dep.accuracy)} %): **{s.deployed_speedup:.2f}x throughput**")
    L += [f"- checkpoint: `{ch.checkpoint}` (ToMe schedule and precision recorded); run it with "
          f"`vitfab predict --checkpoint {ch.checkpoint} --input DIR --out preds.csv`", ""]
    return L


def _ablation(s: Summary) -> list[str]:
    rows = s.ablation
    if not rows:
        return []
    r0 = rows[0]
    L = ["## Ablation (test split)", "",
         f"img/s at batch {r0.batch_size}, latency at batch 1, {r0.img_size} px, all rows interleaved in one run "
         f"(median of the repeats). Axis settings are the chosen configuration's where it uses the axis, otherwise "
         f"the default (ToMe `{s.default_tome}`).", ""]
    L += ablation_table(rows) + [""]
    notes = {r.energy_note for r in rows if r.joules_per_img is None and r.energy_note}
    notes |= {r.escape_note for r in rows if r.escape_note}
    return L + [f"- {n}" for n in sorted(notes)] + ([""] if notes else [])


def _references(s: Summary) -> list[str]:
    if not s.references:
        return []
    name = METRIC_NAMES.get(s.joint.metric, s.joint.metric)
    rows = {r.name: r for r in s.ablation if r.kind == "reference"}
    L = ["## References", "",
         f"The models a user would otherwise train, on the same split: the reference recipe (AdamW lr 1e-3, weight "
         f"decay 0.05, cosine, label smoothing 0.1, flips and 90-degree rotations, mixed precision, batch 32; a ViT "
         f"keeps vitfab's small-data ViT settings), the epoch with the best validation value of the run's metric "
         f"kept, and at least "
         f"15 % of the budget each. The requirement is measured from {_source(s)}. Teacher of the ViTs: "
         f"{s.teaching.teacher or 'none'} (distillation: {s.teaching.distill}; {s.teaching.reason}). Patch embedding "
         f"of the supernet and its subnets: {s.embed} ({s.embed_reason}).", "",
         "Starting weights: " + "; ".join(f"{k}: {v}" for k, v in s.starts.items()) + ".", "",
         f"| reference | epochs | training s | budget s | val top-1 % | val macro-F1 | test {name} % | img/s |",
         "|---|---|---|---|---|---|---|---|"]
    for ref in s.references:
        row = rows.get(f"{ref.label} (reference)")
        test = None if row is None else metric_of(row, s.joint.metric)
        L.append(f"| {ref.label} (`{ref.name}`) | {ref.epochs} | {ref.seconds:.0f} | {_num(ref.budget_seconds, '{:.0f}')} "
                 f"| {_pct(ref.val_top1)} | {ref.val_macro_f1:.3f} | {_pct(test)} | "
                 f"{_num(None if row is None else row.img_per_s, '{:.1f}')} |")
    return L + [""]


def _source(s: Summary) -> str:
    src = s.joint.requirement_source
    return "the DeiT-B/16 baseline" if src == "baseline" else f"the reference {src}"


def _at_224(s: Summary) -> list[str]:
    at = s.at_224
    if not at:
        return []
    L = ["## At 224 px (speed only)", "",
         "The chosen architecture, ToMe schedule and precision at 224 px / patch 16 with random weights, against "
         "DeiT-B/16 fp32 at 224 px, interleaved (throughput does not depend on the weights; no accuracy is claimed "
         "at this size).", "", "| configuration | params | GMACs | img/s | p50 ms |", "|---|---|---|---|---|"]
    L += [f"| {r.name} | {_m(r.params)} | {r.gmacs:.3f} | {r.img_per_s:.1f} | {r.latency_ms_p50:.2f} |"
          for r in at.rows]
    return L + ["", f"Speedup {at.speedup:.1f}x, {at.params_reduction:.1f}x fewer params, "
                    f"{at.macs_reduction:.1f}x fewer GMACs.", ""]


def _deploy(s: Summary) -> list[str]:
    dep = s.deploy
    if dep is None:
        return []
    if dep.error:
        return ["## Deployment", "", f"Export failed: {dep.error}. The chosen checkpoint above still runs with "
                f"`vitfab predict --checkpoint`.", ""]
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in dep.parity_max_abs_diff.items())
    rt = s.joint.candidates and next((c.runtime for c in s.joint.candidates if c.chosen), "torch")
    rt = rt if rt and rt != "torch" else "onnxruntime"
    return ["## Deployment", "",
            f"`{dep.folder}`: safetensors + meta.json, TorchScript, ONNX (opset 17, dynamic batch, ToMe's matching and "
            f"merges in the graph), OpenVINO IR, and the chosen runtime's low-precision graph where it was chosen "
            f"(see deploy.json). Max |logit difference| against PyTorch fp32 on validation images: {diffs}. Run it "
            f"with `vitfab predict --model {dep.folder} --runtime {rt} --input DIR --out preds.csv`, compare runtimes "
            f"with `vitfab bench --checkpoint {dep.folder} --tome-r recorded --vs runtime={rt}`.", ""]


def _joint(s: Summary) -> list[str]:
    j = s.joint
    ok = [c for c in j.candidates if c.accuracy is not None and c.img_per_s]
    L = ["## Joint search (validation split)", "",
         f"{len(j.candidates)} configurations ({len(ok)} measured): models {sorted({c.model for c in j.candidates})} "
         f"x ToMe {j.schedules} x precision {j.precisions}. Validation {METRIC_NAMES.get(j.metric, j.metric)}: "
         f"baseline {_pct(j.baseline_val)} %"
         + "".join(f", {k} {_pct(v)} %" for k, v in j.reference_val.items())
         + f"; threshold {_pct(j.threshold)} % (from {_source(s)}).", "",
         f"| configuration | val {METRIC_NAMES.get(j.metric, j.metric)} % | escape / overkill % at its operating "
         f"point | GMACs | img/s | p50 ms | front |",
         "|---|---|---|---|---|---|---|"]
    rank = {"latency": lambda c: c.latency_ms, "energy": lambda c: c.joules_per_img or float("inf")}.get(
        s.objective, lambda c: -c.img_per_s)
    shown = sorted(ok, key=rank)[:15]  # best on the objective first; the choice always listed
    shown += [c for c in ok if c.chosen and c not in shown]
    L += [f"| {c.key} | {_pct(metric_of(c, j.metric))} | {_op_cell(c.operating)} | {c.gmacs:.3f} | "
          f"{c.img_per_s:.1f} | {c.latency_ms:.2f} | {'yes' if c.front else ('screened out' if c.screened_out else '')} |"
          for c in shown]
    errs = [c for c in j.candidates if c.error]
    L += [""] + [f"- not measured: {c.key}: {c.error}" for c in errs] + ([""] if errs else [])
    return L + _runtime_lines(j)


def _runtime_lines(j) -> list[str]:
    """What the runtime axis tried, screened out and left out."""
    axis = j.runtimes
    if not axis:
        return []
    out = sum(c.screened_out for c in j.candidates)
    L = [f"Runtimes searched: {', '.join(axis['used'])}."]
    if len(axis["used"]) > 1:
        L.append(f"Screened by the PyTorch pass: {', '.join(axis['screened']) or 'nothing'} went on to the other "
                 f"runtimes (converted, int8 calibrated on training images, scored on validation in the runtime) and "
                 f"were timed again with each runtime in a worker process of its own; {out} PyTorch configurations "
                 f"of the other pairs were timed in the screening pass only (not a choice; their img/s above is that "
                 f"pass's).")
    L += [f"- left out: {rt}: {why}" for rt, why in axis["skipped"].items()]
    return [" ".join(L[:2])] + L[2:] + [""]


def _budget(s: Summary) -> list[str]:
    b = s.budget
    limit = "none" if b.seconds is None else f"{b.seconds / 60:.1f} min"
    L = ["## Stages, budget and what was cut", "",
         f"Budget: {limit}; stage wall times (s): " + ", ".join(f"{k} {v}" for k, v in b.stage_seconds.items()) + ".",
         ""]
    return L + ([f"- cut: {c}" for c in b.cuts] or ["- nothing was cut"]) + [""]


def terminal_lines(s: Summary) -> list[str]:
    """What ``vitfab run`` prints at the end: the ablation, the requirement, the choice, the confidence."""
    ch, j, speedup = s.chosen, s.joint, s.primary_speedup
    L = [f"\nrun folder: {s.run}", *ablation_table(s.ablation)]
    if s.at_224:
        at = s.at_224
        L.append(f"at 224 px (random weights, speed only): {at.speedup:.1f}x DeiT-B/16 fp32, {at.params_reduction:.1f}x "
                 f"fewer params, {at.macs_reduction:.1f}x fewer GMACs")
    L.append(f"report: {Path(s.run) / 'report' / 'report.html'}; wall time: {s.wall_seconds_this_call:.0f} s")
    L.append(f"requirement: {j.requirement}" + (f"; {j.ceilings} at the operating point" if j.ceilings else "")
             + f" -> {'met' if s.requirement_met else 'NOT met'}" + (f" ({j.shortfall})" if j.shortfall else ""))
    name = METRIC_NAMES.get(j.metric, j.metric)
    head = "" if j.metric == "top1" else f"{name} {_pct(metric_of(ch.test, j.metric))} %, "
    tail = "" if j.metric == "macro_f1" else f", macro-F1 {ch.test.macro_f1:.3f}"
    L.append(f"chosen: {ch.arch} | ToMe {ch.tome or 'none'} | {ch.precision}: test {head}top-1 "
             f"{_pct(ch.test.top1)} %{tail}"
             + (f", {speedup:.1f}x DeiT-B/16 fp32 at {s.data.img_size} px" if speedup else ""))
    dep = s.baseline_deployed
    if dep is not None and s.deployed_speedup:
        L.append(f"against DeiT-B/16 in its fastest runtime and precision ({dep.name}): {s.deployed_speedup:.1f}x")
    return L + quality_lines(s) + [f"NOTE: {v}" for v in s.verdicts]


def _op_cell(op) -> str:
    if not op:
        return "n/a"
    return f"{_pct(op['escape_rate'])} / {_pct(op['overkill_rate'])}" + ("" if op["met"] else " (missed)")


def _schedules(s: Summary) -> list[str]:
    """The searched ToMe schedules (joint stage): per model and target, the r per block and the
    probe's loss against the constant r of the same target."""
    probes = (s.stage_results.get("joint") or {}).get("schedule_search") or []
    if not probes:
        return []
    L = ["## ToMe schedules searched per block", "",
         "Probe on training images: the loss added when one block alone merges r tokens; greedy allocation of "
         "each MACs target to the blocks where merging costs least per MAC saved; then mutation and crossover of "
         "the r vector (within the clip and the target), scored by the whole schedule's loss. The joint search "
         "measured each beside the constant r of its target.", "",
         "| model | target | r per block | probe loss | constant r's loss | schedules scored "
         "(greedy and constant r included) |",
         "|---|---|---|---|---|---|"]
    for p in probes:
        for x in p["schedules"]:
            r = "/".join(map(str, x["r_per_layer"])) + (" (= the constant r)" if x["is_fixed"] else "")
            L.append(f"| {p['model']} | {x['target']} | `{r}` | {x['loss']:.4f} | {x['fixed_loss']:.4f} | "
                     f"{x['evaluated'] + 2} |")
    return L + [""]


SECTIONS = (_header, _chosen, quality_section, _references, _ablation, _at_224, _deploy, _joint, _schedules, _budget)


def render_markdown(s: Summary, images: dict[str, str]) -> str:
    lines = [line for section in SECTIONS for line in section(s)]
    lines += ["## Figures", ""] + [f"![{k}]({v})" for k, v in images.items()] + [""]
    return "\n".join(lines)


STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
         "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;"
         "text-align:right}td:first-child,th:first-child{text-align:left}code{background:#f3f3f3}"
         "img{max-width:100%}")


def markdown_to_html(md: str, title: str) -> str:
    """A standalone HTML page of ``md`` (CommonMark + tables; raw HTML in the text is escaped)."""
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(md)
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n{body}</body></html>\n")


def write_report(run_root: str | Path, summary: Summary) -> list[Path]:
    """Figures, report.md, report.html in ``run/report``; summary.json in the run folder."""
    run = RunDir(Path(run_root))
    out = run.report_dir
    out.mkdir(parents=True, exist_ok=True)
    files = [plot_pareto(summary.joint.candidates, summary.ablation, out / "pareto.png", summary.joint.threshold,
                         summary.objective, summary.joint.metric)]
    if summary.ablation:
        files.append(plot_speedup(summary.ablation, out / "speedup.png"))
    if summary.quality:
        files += quality_plots(summary.quality, out)
    model = load_model(summary.chosen.checkpoint)
    files.append(plot_tome_merges(model, Split.load(run.split_path), summary.chosen.tome, out / "tome_merges.png"))
    if summary.chosen.tome:
        files.append(plot_tome_schedule(model, summary.chosen.tome, out / "tome_schedule.png",
                                        summary.chosen.tome_target))
    confusion = out / "confusion_chosen.png"
    if confusion.is_file():
        files.append(confusion)
    md = render_markdown(summary, {f.stem: f.name for f in files})
    write_text_atomic(out / "report.md", md)
    write_text_atomic(out / "report.html", markdown_to_html(md, f"vitfab report {run.root.name}"))
    summary.save(run.summary_path)
    return files + [out / "report.md", out / "report.html", run.summary_path]
