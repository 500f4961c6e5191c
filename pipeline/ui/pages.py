"""The HTML of each page, as plain f-strings over escaped values: small pages with no build step."""

from __future__ import annotations

from html import escape
from urllib.parse import quote

from pipeline.config import field_default
from pipeline.ui.project import SETTINGS, TYPES, concept_type, get


def e(value) -> str:
    return escape("" if value is None else str(value), quote=True)


def layout(title: str, body: str, project: str = "") -> str:
    nav = (f'<a href="/p/{e(project)}">Project</a> <a href="/p/{e(project)}/runs">Runs</a> '
           f'<a href="/p/{e(project)}/cache">Cache</a>') if project else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{e(title)}</title>
<link rel="stylesheet" href="/static/ui.css"><script src="/static/ui.js" defer></script></head>
<body><header><a href="/">Projects</a> {nav} <strong>{e(title)}</strong></header><main>{body}</main></body></html>"""


def error_line(errors: dict, key: str) -> str:
    return f'<div class="error" data-key="{e(key)}">error: {e(errors[key])}</div>' if key in errors else ""


def home(projects: list[str], folder: str, errors: dict, form: dict) -> str:
    items = "".join(f'<li><a href="/p/{e(p)}">{e(p)}</a></li>' for p in projects) or "<li>none yet</li>"
    f = lambda k: e(form.get(k, ""))  # noqa: E731
    return layout("Projects", f"""
<p>Config files in <code>{e(folder)}</code>:</p><ul id="projects">{items}</ul>
<h2>New project</h2>
<form method="post" action="/new" class="grid">
<label>Name <input name="name" value="{f('name')}"></label>{error_line(errors, 'name')}
<label>Model folder or hub id <input name="model.path" value="{f('model.path')}"></label>{error_line(errors, 'model.path')}
<label>First concept folder (standard) <input name="concepts[0].folder" value="{f('concepts[0].folder')}"></label>
{error_line(errors, 'concepts[0].folder')}{error_line(errors, '')}
<button type="submit" id="create">Create</button></form>""")


def _field(key: str, label: str, kind, value, errors: dict) -> str:
    if isinstance(kind, tuple):
        options = "".join(f'<option{" selected" if value == o else ""}>{e(o)}</option>' for o in kind)
        control = f'<select name="{e(key)}">{options}</select>'
    elif kind == "lines":
        text = "\n".join(value) if isinstance(value, list) else value
        control = f'<textarea name="{e(key)}" rows="3">{e(text)}</textarea>'
    else:
        default = field_default(key)
        control = f'<input name="{e(key)}" value="{e(value)}" placeholder="{e(default)}">'
    return f'<label>{e(label)} {control}</label>{error_line(errors, key)}'


def project(name: str, doc, family: str, concepts: list[dict], errors: dict, form: dict | None) -> str:
    """doc: the TOML as saved; form: what was typed, when a save was refused (shown instead, so nothing is lost)."""
    value = (lambda k: form.get(k, "")) if form is not None else (lambda k: get(doc, k))
    fields = "".join(_field(k, label, kind, value(k), errors) for k, label, kind in SETTINGS)
    rows = []
    for i, c in enumerate(concepts):
        p = f"concepts[{i}]."
        v = (lambda k: form.get(p + k, "")) if form is not None else (lambda k: c["table"].get(k, {"repeats": 1, "loss_weight": 1.0}.get(k, "")))
        kind = form.get(p + "type", "") if form is not None else concept_type(c["table"])
        options = "".join(f'<option value="{t}"{" selected" if t == kind else ""}>{e(label)}</option>'
                          for t, label in TYPES.items())
        rows.append(f"""<tr class="concept"><td><input name="{p}folder" value="{e(v('folder'))}" size="40">
{error_line(errors, p + 'folder')}</td><td><select name="{p}type">{options}</select>{error_line(errors, p + 'type')}</td>
<td><input name="{p}repeats" value="{e(v('repeats'))}" size="4">{error_line(errors, p + 'repeats')}</td>
<td><input name="{p}loss_weight" value="{e(v('loss_weight'))}" size="5">{error_line(errors, p + 'loss_weight')}</td>
<td><label><input type="checkbox" name="remove.{i}"> remove</label></td></tr>""")
    table = ("<table><tr><th>Folder</th><th>Type</th><th>Repeats</th><th>Loss weight</th><th></th></tr>"
             + "".join(rows) + "</table>")
    galleries = "".join(_gallery(name, i, c) for i, c in enumerate(concepts))
    types = "".join(f'<option value="{t}">{e(label)}</option>' for t, label in TYPES.items())
    return layout(name, f"""
<form method="post" action="/p/{e(name)}/settings" id="settings">
{error_line(errors, '')}
<label>Model folder or hub id <input name="model.path" value="{e(value('model.path'))}" size="50"></label>
{error_line(errors, 'model.path')}{error_line(errors, 'model.family')}
<p>Family: <strong id="family">{e(family)}</strong></p>
<h2>Concepts</h2>{error_line(errors, 'concepts')}{table}
<h2>Settings</h2><div class="grid">{fields}</div>
<button type="submit" id="save">Save</button></form>
<h2>Add a concept</h2>
<form method="post" action="/p/{e(name)}/concept" id="add-concept" class="row">
<input name="folder" placeholder="folder" size="40"><select name="type">{types}</select>
<input name="repeats" value="1" size="4"><input name="loss_weight" value="1.0" size="5">
<button type="submit">Add</button></form>
<h2>Images</h2>{galleries}""", project=name)


def _gallery(name: str, i: int, c: dict) -> str:
    cells = []
    for image in c["images"]:
        missing = image["caption"] is None
        flag = '<span class="missing">no caption</span>' if missing else ""
        cells.append(f"""<figure class="thumb{' missing-caption' if missing else ''}">
<img src="/p/{e(name)}/thumb/{i}/{quote(image['name'])}" alt="{e(image['name'])}"><figcaption>{e(image['name'])} {flag}
<form method="post" action="/p/{e(name)}/caption" class="caption"><input type="hidden" name="concept" value="{i}">
<input type="hidden" name="image" value="{e(image['name'])}"><textarea name="text" rows="2">{e(image['caption'] or '')}</textarea>
<button type="submit">Save caption</button></form></figcaption></figure>""")
    more = f"<p>and {c['count'] - len(c['images'])} more</p>" if c["count"] > len(c["images"]) else ""
    return (f'<h3>{e(c["table"].get("folder", ""))} ({e(TYPES.get(concept_type(c["table"]), ""))}, {c["count"]} images)</h3>'
            f'<div class="gallery" data-concept="{i}">{"".join(cells)}</div>{more}')


def _diff(diff) -> str:
    """changed_keys' lines (or a one-line reason) as a list."""
    if isinstance(diff, str):
        return f'<ul class="diff"><li class="error">{e(diff)}</li></ul>'
    return '<ul class="diff">' + ("".join(f"<li><code>{e(line)}</code></li>" for line in diff)
                                  or "<li>the same settings</li>") + "</ul>"


def _compare(name: str, c: dict) -> str:
    def select(field: str) -> str:
        options = "".join(f'<option{" selected" if n == c[field] else ""}>{e(n)}</option>' for n in c["names"])
        return f'<select name="{field}" id="compare-{field}">{options}</select>'
    return (f'<form method="get" action="/p/{e(name)}/runs" id="compare" class="row">Settings of {select("old")} '
            f'against {select("new")} <button type="submit">Compare</button></form>'
            f'<div id="settings-diff">{_diff(c["diff"])}</div>')


def runs(name: str, jobs: list[dict], progress: dict, previous: list[dict], compare: dict) -> str:
    job_rows = "".join(
        f"""<tr class="job" data-job="{e(j['id'])}"><td>{e(j['id'])}</td>
<td class="state">{'running' if j['running'] else 'ended, exit ' + e(j.get('rc', '?'))}</td>
<td>{_stop(name, j)}</td><td><div class="message">{e(j.get('message', ''))}</div>
<pre class="notes">{e(j['notes'])}</pre><pre class="log">{e(j['log'])}</pre></td></tr>""" for j in jobs)
    prev = "".join(f"<li>{e(r['name'])}: {r['steps']} steps, LoRA {e(', '.join(r['loras']) or 'none')}, "
                   f"standard loss {_num(r['loss_standard'])}, prior loss {_num(r['loss_prior'])}; its settings against "
                   f"the current run's: {_diff(r['diff'])}</li>" for r in previous)
    return layout(f"{name}: runs", f"""
<form method="post" action="/p/{e(name)}/start" class="row"><button type="submit" id="start">Start (cache, then train)</button>
<span>A run of the same settings goes on from its newest checkpoint; a finished one has nothing to do.</span></form>
<h2>Progress</h2>
<div id="progress" data-url="/p/{e(name)}/progress" data-files="/p/{e(name)}/file/">{progress_html(name, progress)}</div>
<h2>Jobs started here</h2><table id="jobs">{job_rows}</table>
<h2>Earlier runs (previous/)</h2><ul id="previous">{prev or '<li>none</li>'}</ul>
<h2>Settings diff</h2>
<p>"config" is the config file as it is now, "current" the run in the output folder; each run's settings are
those it recorded (its LoRA file's metadata, else its newest checkpoint).</p>{_compare(name, compare)}""", project=name)


def _stop(name: str, job: dict) -> str:
    if not job["running"]:
        return ""
    return (f'<form method="post" action="/p/{e(name)}/stop/{e(job["id"])}">'
            f'<button type="submit" class="stop">Stop</button></form>')


def _num(x) -> str:
    return "-" if x is None else f"{x:.6g}"


def progress_html(name: str, p: dict) -> str:
    """The progress panel; ui.js fetches it anew every second while the page is open."""
    state = ("training" if p["training"] else "caching" if p["caching"] else "idle")
    eta = "-" if p["eta_seconds"] is None else f"{p['eta_seconds']} s"
    total = p["total"] if p["total"] is not None else "?"
    grids = "".join(
        f'<figure class="grid-image"><a href="/p/{e(name)}/file/{e(s["file"])}"><img src="/p/{e(name)}/file/{e(s["file"])}"'
        f' alt="{e(s["file"])}"></a><figcaption>{e(" | ".join(s["labels"]))}</figcaption></figure>'
        for s in reversed(p["samples"]))
    plot = f'<img class="plot" src="/p/{e(name)}/file/loss.png" alt="loss plot">' if p["plot"] else ""
    holder = p["training"] or p["caching"]
    return f"""<table class="numbers">
<tr><th>State</th><td id="state">{state}</td></tr>
<tr><th>Held by</th><td>{e(holder) or '-'}</td></tr>
<tr><th>Step</th><td id="step">{p['step']} / {total}</td></tr><tr><th>ETA</th><td>{eta}</td></tr>
<tr><th>Standard loss</th><td id="loss-standard">{_num(p['loss_standard'])}</td></tr>
<tr><th>Prior loss</th><td id="loss-prior">{_num(p['loss_prior'])}</td></tr>
<tr><th>Held-out loss</th><td>{_num(p['val_loss'])}</td></tr><tr><th>Prior drift</th><td id="drift">{_num(p['prior_drift'])}</td></tr>
<tr><th>LoRA</th><td id="lora">{'written' if p['lora'] else '-'}</td></tr></table>
{plot}<div class="samples">{grids}</div>"""


def cache(name: str, status: dict | None, message: str, output: str) -> str:
    rows = ""
    if status:
        rows = "".join(f"<tr><td>{e(kind)}</td><td>{k['needed']}</td><td>{k['present']}</td><td>{k['missing']}</td>"
                       f"<td>{k['other_configs']}</td><td>{k['stale']}</td><td>{k['bytes'] / 2**20:.1f}</td></tr>"
                       for kind, k in status["kinds"].items())
        rows = ("<table id=\"cache-status\"><tr><th>kind</th><th>needed</th><th>held</th><th>missing</th>"
                "<th>other configs</th><th>stale</th><th>MiB</th></tr>" + rows + "</table>"
                f"<p>cache {e(status['cache_dir'])}, train dtype {e(status['dtype'])}; priors cached for: "
                f"{e(', '.join(status['dtypes_with_priors']) or 'no dtype')}</p>")

    def box(option: str, label: str) -> str:
        return f'<label><input type="checkbox" name="{option}" id="{option}"> {e(label)}</label>'
    # one form per command; the prune form's two buttons run it with and without --dry-run
    verify = (f'<form method="post" action="/p/{e(name)}/cache/verify" class="row" id="verify-form">'
              f'{box("repair", "--repair: drop damaged entries and recompute them")}'
              f'{box("rehash", "--rehash: hash the model files again first")}'
              '<button type="submit" id="verify">Verify</button></form>')
    prune = (f'<form method="post" action="/p/{e(name)}/cache/prune" class="row" id="prune-form">'
             f'{box("keep-dtypes", "--keep-dtypes: keep the priors of other dtypes")}'
             f'{box("all-configs", "--all-configs: also what other configs use")}'
             f'<button type="submit" id="prune-dry" formaction="/p/{e(name)}/cache/prune-dry">Prune (dry run)</button>'
             '<button type="submit" id="prune">Prune</button></form>')
    return layout(f"{name}: cache", f"""{f'<div class="error">{e(message)}</div>' if message else ''}{rows}
{verify}{prune}<pre id="cache-output">{e(output)}</pre>""", project=name)
