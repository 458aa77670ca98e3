"""Render the reproduction report as Markdown and as one self-contained HTML file (figures inlined)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, (list, tuple)):
        items = [_fmt(v) for v in x[:8]]
        return "[" + ", ".join(items) + (", …" if len(x) > 8 else "") + "]"
    if isinstance(x, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in x.items())
    return str(x)


def _header(meta: dict) -> list[str]:
    v = ", ".join(f"{k} {val}" for k, val in meta["versions"].items())
    return [
        f"- command: `{meta['command']}`",
        f"- size: {meta['size']}, device: {meta['device']}, backend: {meta['backend']}, base seed: {meta['seed']}",
        f"- machine: {meta['machine']}",
        f"- versions: {v}",
        f"- date: {meta['date']}",
    ]


VERDICTS = ("reproduced", "not reproduced", "contradicted")


def ran_on(execution: dict) -> str:
    """One line from an experiment's ``execution`` record (see ``Context.execution``)."""
    engine = execution.get("engine")
    if engine not in ("mirrorsym.sweep", "jobs"):
        return f"in-process loops on {execution.get('device', '?')}"
    what = "mirrorsym.sweep" if engine == "mirrorsym.sweep" else "independent jobs (own training loops)"
    return f"{what}, {execution['n_runs']} runs, backend {execution['backend']}, device {execution['device']}"


def _split(claims: list[dict]) -> tuple[list[dict], list[dict]]:
    return [c for c in claims if c["kind"] == "finding"], [c for c in claims if c["kind"] == "check"]


def _headline(claims: list[dict]) -> str:
    findings, checks = _split(claims)
    n_ok = sum(c["passed"] for c in checks)
    counts = ", ".join(f"{sum(c['verdict'] == v for c in findings)} {v}" for v in VERDICTS)
    return f"{len(findings)} finding{'' if len(findings) == 1 else 's'}: {counts}. {n_ok}/{len(checks)} checks passed."


def _interval(c: dict) -> str:
    """The mean of a finding's statistic and its 95 % interval, or why there is none."""
    if c["mean"] is None:
        return "no usable value"
    if c["ci95"] is None:
        return f"{_fmt(c['mean'])} (1 seed: no interval)"
    lo, hi = c["ci95"]
    return f"{_fmt(c['mean'])} [{_fmt(lo)}, {_fmt(hi)}]"


_RULES = ("Verdicts: each finding states, before the run, a statistic e (one value per seed) and a threshold; "
          "**reproduced** when the 95 % t-interval of the mean of e lies on the predicted side of the "
          "threshold, **contradicted** when it lies on the other side of the contradiction bound, **not "
          "reproduced** otherwise (with one seed the single value decides; there is no interval). Findings "
          "never fail the command; checks (identities) must pass.")


def write_markdown(out: Path, sections: list[dict], claims: list[dict], meta: dict) -> Path:
    findings, checks = _split(claims)

    def cell(x) -> str:  # a "|" inside a cell (e.g. |Δβ|) would split the Markdown table
        return (x if isinstance(x, str) else _fmt(x)).replace("|", "\\|")

    lines = ["# mirrorsym: reproduction of “Symmetry Induces Structure and Constraint of Learning”", "",
             *_header(meta), "", f"**{_headline(claims)}**", ""]
    if findings:
        lines += ["## Findings", "", "| experiment | finding | verdict | seeds | mean of e [95 % CI] |",
                  "|---|---|---|---|---|"]
        for c in findings:
            verdict = c["verdict"] if c["verdict"] == "reproduced" else f"**{c['verdict']}**"
            lines.append(f"| {cell(c['experiment'])} | {cell(c['claim'])} | {verdict} | {c['seeds']} | "
                         f"{cell(_interval(c))} |")
        lines += ["", _RULES, ""]
    lines += ["## Checks", "", "| experiment | check | predicted | measured | passed | seconds |",
              "|---|---|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {cell(c['experiment'])} | {cell(c['claim'])} | {cell(c['predicted'])} | "
                     f"{cell(c['measured'])} | {'yes' if c['passed'] else '**NO**'} | {c['seconds']:.1f} |")
    if findings:
        lines += ["", "## Findings in detail", "", "| experiment | finding | predicted | measured | rule |",
                  "|---|---|---|---|---|"]
        for c in findings:
            lines.append(f"| {cell(c['experiment'])} | {cell(c['claim'])} | {cell(c['predicted'])} | "
                         f"{cell(c['measured'])} | {cell(c['rule'])} |")
    for sec in sections:
        lines += ["", f"## {sec['name']}: {sec['title']}", ""]
        if sec.get("execution"):
            lines += [f"*Ran on: {ran_on(sec['execution'])}.*", ""]
        if sec["doc"]:
            lines += [sec["doc"], ""]
        for fig in sec["figures"]:
            lines.append(f"![{fig.stem}]({fig.relative_to(out).as_posix()})")
        if sec["error"]:
            lines += ["", "```", sec["error"].strip(), "```"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.3em .5em;vertical-align:top}
.ok{color:#176f2c;font-weight:bold}.bad{color:#b00020;font-weight:bold}.meh{color:#8a5a00;font-weight:bold}
img{max-width:100%;margin:.5em 0}pre{background:#f6f6f6;padding:.5em;overflow-x:auto}code{background:#f2f2f2}
.rule{font-size:.85em;color:#555}"""

_VERDICT_CLASS = {"reproduced": "ok", "not reproduced": "meh", "contradicted": "bad"}


def write_html(out: Path, sections: list[dict], claims: list[dict], meta: dict) -> Path:
    e = html.escape
    findings, checks = _split(claims)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>mirrorsym reproduction</title>"
             f"<style>{_CSS}</style></head><body>",
             "<h1>mirrorsym: reproduction of “Symmetry Induces Structure and Constraint of Learning”</h1><ul>"]
    parts += [f"<li>{e(line[2:]).replace('`', '')}</li>" for line in _header(meta)]
    parts.append(f"</ul><p><b>{e(_headline(claims))}</b></p>")
    if findings:
        parts.append("<h2>Findings</h2><table><tr><th>experiment</th><th>finding</th><th>verdict</th>"
                     "<th>seeds</th><th>mean of e [95 % CI]</th></tr>")
        for c in findings:
            v = f"<span class='{_VERDICT_CLASS[c['verdict']]}'>{e(c['verdict'])}</span>"
            parts.append(f"<tr><td>{e(c['experiment'])}</td><td>{e(c['claim'])}</td><td>{v}</td>"
                         f"<td>{c['seeds']}</td><td>{e(_interval(c))}</td></tr>")
        parts.append(f"</table><p class='rule'>{e(_RULES).replace('**', '')}</p>")
    parts.append("<h2>Checks</h2><table><tr><th>experiment</th><th>check</th><th>predicted</th><th>measured</th>"
                 "<th>passed</th><th>seconds</th></tr>")
    for c in checks:
        ok = "<span class='ok'>yes</span>" if c["passed"] else "<span class='bad'>NO</span>"
        parts.append(f"<tr><td>{e(c['experiment'])}</td><td>{e(c['claim'])}</td><td>{e(_fmt(c['predicted']))}</td>"
                     f"<td>{e(_fmt(c['measured']))}</td><td>{ok}</td><td>{c['seconds']:.1f}</td></tr>")
    parts.append("</table>")
    if findings:
        parts.append("<h2>Findings in detail</h2><table><tr><th>experiment</th><th>finding</th><th>predicted</th>"
                     "<th>measured</th><th>rule</th></tr>")
        for c in findings:
            parts.append(f"<tr><td>{e(c['experiment'])}</td><td>{e(c['claim'])}</td>"
                         f"<td>{e(_fmt(c['predicted']))}</td><td>{e(_fmt(c['measured']))}</td>"
                         f"<td class='rule'>{e(c['rule'])}</td></tr>")
        parts.append("</table>")
    for sec in sections:
        parts.append(f"<h2 id='{e(sec['name'])}'>{e(sec['name'])}: {e(sec['title'])}</h2>")
        if sec.get("execution"):
            parts.append(f"<p class='rule'>Ran on: {e(ran_on(sec['execution']))}.</p>")
        if sec["doc"]:
            parts.append("".join(f"<p>{e(p)}</p>" for p in sec["doc"].split("\n\n")))
        for fig in sec["figures"]:
            data = base64.b64encode(Path(fig).read_bytes()).decode()
            parts.append(f"<img alt='{e(fig.stem)}' src='data:image/png;base64,{data}'>")
        if sec["error"]:
            parts.append(f"<pre>{e(sec['error'])}</pre>")
    parts.append("<h2>claims.json</h2><pre>" + e(json.dumps(claims, indent=1)[:20000]) + "</pre></body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts))
    return path


def write_report(out: Path, sections: list[dict], claims: list[dict], meta: dict) -> tuple[Path, Path]:
    return write_markdown(out, sections, claims, meta), write_html(out, sections, claims, meta)
