"""The Starlette app: each route reads the config file (or the run's files) afresh, so the CLI and the UI
can be used side by side. Forms post plain urlencoded bodies (no multipart library needed)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qsl

from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.ui import pages, project, runs

STATIC = Path(__file__).parent / "static"


async def form_of(request: Request) -> dict[str, str]:
    return dict(parse_qsl((await request.body()).decode("utf-8"), keep_blank_values=True))


def make_app(projects: Path, middleware=()) -> Starlette:
    projects = projects.resolve()

    def config_path(name: str) -> Path:
        path = projects / f"{name}.toml"
        if not project.NAME.match(name) or not path.is_file():
            raise UserError(f"no project '{name}' in {projects}")
        return path

    def names() -> list[str]:
        return sorted(p.stem for p in projects.glob("*.toml")) if projects.is_dir() else []

    def concepts_of(path: Path, doc) -> list[dict]:
        base = path.parent
        out = []
        for table in doc.get("concepts", []):
            folder = (base / str(table.get("folder", ""))).expanduser()
            images, count = project.images(folder, table.get("caption_ext", ".txt"))
            out.append({"table": table, "images": images, "count": count, "path": folder})
        return out

    def project_page(name: str, errors: dict | None = None, form: dict | None = None, status: int = 200):
        path = config_path(name)
        doc = project.read(path)
        html = pages.project(name, doc, project.family(path), concepts_of(path, doc), errors or {}, form)
        return HTMLResponse(html, status_code=status)

    def refused(e: UserError) -> dict:
        return {project.error_key(str(e)): str(e)}

    async def home(request: Request):
        return HTMLResponse(pages.home(names(), str(projects), {}, {}))

    async def new(request: Request):
        form = await form_of(request)
        try:
            await run_in_threadpool(project.new_project, projects, form.get("name", ""), form.get("model.path", ""),
                                    form.get("concepts[0].folder", ""))
        except UserError as e:
            key = "name" if str(e).startswith("project") else project.error_key(str(e))
            return HTMLResponse(pages.home(names(), str(projects), {key: str(e)}, form), status_code=400)
        return RedirectResponse(f"/p/{form['name']}", status_code=303)

    async def show(request: Request):
        return await run_in_threadpool(project_page, request.path_params["name"])

    async def settings(request: Request):
        name, form = request.path_params["name"], await form_of(request)
        path = config_path(name)
        doc = project.read(path)
        try:
            project.apply_settings(doc, form)
            await run_in_threadpool(project.save, path, doc)
        except UserError as e:
            return await run_in_threadpool(project_page, name, refused(e), form, 400)
        return RedirectResponse(f"/p/{name}", status_code=303)

    async def add_concept(request: Request):
        name, form = request.path_params["name"], await form_of(request)
        path = config_path(name)
        doc = project.read(path)
        try:
            project.add_concept(doc, form.get("folder", ""), form.get("type", "standard"), form.get("repeats", "1"),
                                form.get("loss_weight", "1"))
            await run_in_threadpool(project.save, path, doc)
        except UserError as e:
            return await run_in_threadpool(project_page, name, refused(e), None, 400)
        return RedirectResponse(f"/p/{name}", status_code=303)

    def image_of(name: str, index: int, image: str) -> tuple[Path, dict]:
        path = config_path(name)
        concepts = concepts_of(path, project.read(path))
        if not 0 <= index < len(concepts):
            raise UserError(f"no concept {index}")
        if Path(image).name != image or not (concepts[index]["path"] / image).is_file():
            raise UserError(f"no image '{image}' in concept {index}")
        return concepts[index]["path"] / image, concepts[index]["table"]

    async def caption(request: Request):
        name, form = request.path_params["name"], await form_of(request)
        image, table = image_of(name, int(form.get("concept", "-1")), form.get("image", ""))
        project.write_caption(image, table.get("caption_ext", ".txt"), form.get("text", ""))
        return RedirectResponse(f"/p/{name}#concept-{form.get('concept')}", status_code=303)

    def thumbnail(name: str, index: int, image: str) -> bytes:
        path, _ = image_of(name, index, image)
        with Image.open(path) as im:
            im.thumbnail((160, 160))
            buffer = io.BytesIO()
            im.convert("RGB").save(buffer, "PNG")
        return buffer.getvalue()

    async def thumb(request: Request):
        p = request.path_params
        data = await run_in_threadpool(thumbnail, p["name"], int(p["index"]), p["image"])
        return Response(data, media_type="image/png")

    def runs_page(name: str, old: str | None, new: str | None) -> str:
        path = config_path(name)
        try:
            cfg = load_config(path)
        except UserError as e:
            return pages.layout(f"{name}: runs", f'<div class="error">error: {pages.e(e)}</div>', project=name)
        previous = runs.previous_runs(cfg)
        for r in previous:  # each earlier run's settings against the run in the output folder
            r["diff"] = runs.settings_diff(cfg, f"{runs.PREVIOUS}/{r['name']}", runs.CURRENT)
        # by default the newest earlier run against the current one; without one, the current run against
        # the config file as it is now (what was changed since)
        old = old or (f"{runs.PREVIOUS}/{previous[0]['name']}" if previous else runs.CURRENT)
        new = new or (runs.CURRENT if old != runs.CURRENT else runs.NOW)
        try:
            diff = runs.settings_diff(cfg, old, new)
        except UserError as e:
            diff = f"error: {e}"
        compare = {"names": runs.run_names(cfg), "old": old, "new": new, "diff": diff}
        return pages.runs(name, runs.jobs(projects, path), runs.progress(cfg), previous, compare)

    async def runs_route(request: Request):
        q = request.query_params
        return HTMLResponse(await run_in_threadpool(runs_page, request.path_params["name"], q.get("old"), q.get("new")))

    async def start(request: Request):
        name = request.path_params["name"]
        runs.start(projects, config_path(name))
        return RedirectResponse(f"/p/{name}/runs", status_code=303)

    async def stop(request: Request):
        name = request.path_params["name"]
        runs.stop(projects, request.path_params["job"])
        return RedirectResponse(f"/p/{name}/runs", status_code=303)

    def progress_of(name: str) -> dict:
        path = config_path(name)
        cfg = load_config(path)
        p = runs.progress(cfg)
        return {"html": pages.progress_html(name, p), "jobs": runs.jobs(projects, path), **p}

    async def progress(request: Request):
        return JSONResponse(await run_in_threadpool(progress_of, request.path_params["name"]))

    async def run_file(request: Request):
        cfg = load_config(config_path(request.path_params["name"]))
        path = runs.run_file(cfg, request.path_params["file"])
        return FileResponse(path) if path else Response("not found", status_code=404)

    def cli(name: str, *args: str) -> tuple[int, str, str]:
        """A cache command as the user runs it: the same locks, checks and messages."""
        p = subprocess.run([sys.executable, "-m", "pipeline", "cache", *args, "--config", str(config_path(name))],
                           capture_output=True, text=True)
        error = next((line for line in reversed(p.stderr.splitlines()) if line.startswith("error: ")), "")
        return p.returncode, p.stdout, error

    # each action's command line and the options its form may add (checkboxes named as the options)
    actions = {"verify": (("verify",), ("--repair", "--rehash")),
               "prune-dry": (("prune", "--dry-run"), ("--keep-dtypes", "--all-configs")),
               "prune": (("prune",), ("--keep-dtypes", "--all-configs"))}

    def cache_page(name: str, action: str = "", form: dict | None = None) -> str:
        output = message = ""
        if action:
            args, options = actions[action]
            args = (*args, *(o for o in options if (form or {}).get(o[2:])))
            _, output, message = cli(name, *args)
            output = f"$ python -m pipeline cache {' '.join(args)} --config {config_path(name)}\n{output}"
        rc, out, error = cli(name, "status", "--json")
        status = json.loads(out) if rc == 0 else None
        return pages.cache(name, status, message or error, output)

    async def cache_route(request: Request):
        return HTMLResponse(await run_in_threadpool(cache_page, request.path_params["name"]))

    async def cache_action(request: Request):
        action = request.path_params["action"]
        if action not in actions:
            return Response("not found", status_code=404)
        form = await form_of(request)
        return HTMLResponse(await run_in_threadpool(cache_page, request.path_params["name"], action, form))

    async def user_error(request: Request, exc: UserError):
        return HTMLResponse(pages.layout("error", f'<div class="error">error: {pages.e(exc)}</div>'), status_code=404)

    routes = [
        Route("/", home), Route("/new", new, methods=["POST"]),
        Route("/p/{name}", show), Route("/p/{name}/settings", settings, methods=["POST"]),
        Route("/p/{name}/concept", add_concept, methods=["POST"]),
        Route("/p/{name}/caption", caption, methods=["POST"]),
        Route("/p/{name}/thumb/{index:int}/{image}", thumb),
        Route("/p/{name}/runs", runs_route), Route("/p/{name}/start", start, methods=["POST"]),
        Route("/p/{name}/stop/{job}", stop, methods=["POST"]),
        Route("/p/{name}/progress", progress), Route("/p/{name}/file/{file:path}", run_file),
        Route("/p/{name}/cache", cache_route), Route("/p/{name}/cache/{action}", cache_action, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    return Starlette(routes=routes, middleware=list(middleware), exception_handlers={UserError: user_error})
