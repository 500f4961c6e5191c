"""A project is one config file: what the form shows is read from it, and what the form saves is written
back into it (tomlkit, so the user's comments and key order stay), only once load_config and the CLI's
path checks accept the new text. A refusal is the CLI's one-line message, placed beside the field whose
config key it names; the file is then left as it was and the form keeps what was typed."""

from __future__ import annotations

import re
from pathlib import Path

import tomlkit

from pipeline.atomic import replacing
from pipeline.config import HUB_ID, IMAGE_EXTS, check_output_dir, check_paths, load_config
from pipeline.errors import UserError

# The settings the form offers: config key, label, kind ("int", "float", "str", a tuple of choices, "lines")
SETTINGS = [
    ("data.resolution", "Resolution (px)", "int"),
    ("train.epochs", "Epochs", "int"),
    ("train.max_steps", "Max steps (0: all epochs)", "int"),
    ("optimizer.lr", "Learning rate", "float"),
    ("lora.rank", "LoRA rank", "int"),
    ("train.dtype", "Train dtype", ("bf16", "fp16", "fp32")),
    ("model.quantize", "Quantize", ("none", "int8", "fp8", "nf4")),
    ("cache.variants", "Variants per sample (K)", "int"),
    ("data.prior_ratio", "Prior ratio (0: as the data gives)", "float"),
    ("train.checkpoint_every", "Checkpoint every (steps)", "int"),
    ("validation.every", "Validate every (steps)", "int"),
    ("validation.prompts", "Validation prompts (one a line)", "lines"),
    ("train.output_dir", "Output folder", "str"),
    ("cache.dir", "Cache folder", "str"),
]
TYPES = {"standard": "standard", "prior": "prior (prior prediction)", "validation": "held-out validation",
         "validation-prior": "held-out prior (prior drift)"}
NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")

TEMPLATE = """# Written by the UI (python -m pipeline ui); the CLI reads it as any config:
#   python -m pipeline cache --config {name}.toml && python -m pipeline train --config {name}.toml

[model]
path = ""

[data]
resolution = 512

[cache]
dir = "cache"

[train]
output_dir = "output/{name}"
"""


def error_key(message: str) -> str:
    """The config key a CLI message names ("config key 'train.lr' ..." or "concepts[1].folder: ..."), for
    placing it beside its field; "" when it names none."""
    m = re.search(r"config keys? '([^']+)'", message)
    if m:
        return m.group(1)
    m = re.match(r"(?:[^ ]*\.toml: )?((?:model|data|cache|lora|optimizer|train|validation|concepts)[\w.\[\]]*):",
                 message)
    if m:
        return m.group(1)
    return "concepts" if "[[concepts]]" in message or "standard concept" in message else ""


def read(path: Path) -> tomlkit.TOMLDocument:
    return tomlkit.parse(path.read_text(encoding="utf-8-sig"))


def get(doc, key: str, default=""):
    table, _, name = key.partition(".")
    return doc.get(table, {}).get(name, default)


def _set(doc, key: str, value) -> None:
    table, _, name = key.partition(".")
    if table not in doc:
        doc[table] = tomlkit.table()
    doc[table][name] = value


def _parse(kind, text: str, key: str):
    """A form field's text as its TOML value; text that is not one is the CLI's message for that key."""
    text = text.strip()
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise UserError(f"config key '{key}' must be {kind}, got {text!r}") from None
    if kind == "lines":
        return [line.strip() for line in text.splitlines() if line.strip()]
    return text


def check(path: Path, text: str) -> None:
    """What the CLI checks before a stage starts (the file, then the folders): raises its UserError with
    `path` named, never the temporary the text was checked through."""
    with replacing(path, ".toml") as tmp:
        tmp.write_text(text, encoding="utf-8")
        try:
            cfg = load_config(tmp)
            check_paths(cfg)
            check_output_dir(cfg)
        except UserError as e:
            raise UserError(str(e).replace(str(tmp.resolve()), str(path)).replace(str(tmp), str(path))) from None


def save(path: Path, doc) -> None:
    """Write the document if the CLI would accept it, else raise the CLI's message and leave the file."""
    check(path, tomlkit.dumps(doc))  # check() renames the checked text over the file when it passes


def apply_settings(doc, form: dict[str, str]) -> None:
    _set(doc, "model.path", form.get("model.path", "").strip())
    for key, _, kind in SETTINGS:
        if key not in form:
            continue
        if not form[key].strip() and kind != "lines":  # left empty: the key's default (shown as the placeholder)
            table, _, name = key.partition(".")
            if name in doc.get(table, {}):
                del doc[table][name]
            continue
        _set(doc, key, _parse(kind if isinstance(kind, str) else "str", form[key], key))
    concepts = doc.get("concepts", [])
    for i, concept in enumerate(concepts):
        prefix = f"concepts[{i}]."
        if prefix + "folder" not in form:
            continue
        concept["folder"] = form[prefix + "folder"].strip()
        kind = form.get(prefix + "type", "standard")
        concept["type"] = "validation" if kind == "validation-prior" else kind
        if kind == "validation-prior":
            concept["prior"] = True
        elif "prior" in concept:
            del concept["prior"]
        concept["repeats"] = _parse("int", form.get(prefix + "repeats", "1"), prefix + "repeats")
        concept["loss_weight"] = _parse("float", form.get(prefix + "loss_weight", "1"), prefix + "loss_weight")
    for i in sorted((int(k[len("remove."):]) for k in form if k.startswith("remove.")), reverse=True):
        del concepts[i]


def add_concept(doc, folder: str, kind: str, repeats: str, loss_weight: str) -> None:
    if "concepts" not in doc:
        doc["concepts"] = tomlkit.aot()
    i = len(doc["concepts"])
    table = tomlkit.table()
    table["folder"] = folder.strip()
    table["type"] = "validation" if kind == "validation-prior" else kind
    if kind == "validation-prior":
        table["prior"] = True
    table["repeats"] = _parse("int", repeats or "1", f"concepts[{i}].repeats")
    table["loss_weight"] = _parse("float", loss_weight or "1", f"concepts[{i}].loss_weight")
    doc["concepts"].append(table)


def concept_type(concept) -> str:
    kind = concept.get("type", "standard")
    return "validation-prior" if kind == "validation" and concept.get("prior", False) else kind


def new_project(folder: Path, name: str, model: str, concept: str) -> Path:
    """A new config file folder/<name>.toml with its model and first (standard) concept, if the CLI accepts it."""
    if not NAME.match(name):
        raise UserError(f"project name {name!r}: use letters, digits, '.', '_' and '-'")
    path = folder / f"{name}.toml"
    if path.exists():
        raise UserError(f"project '{name}' exists already ({path})")
    doc = tomlkit.parse(TEMPLATE.format(name=name))
    doc["model"]["path"] = model.strip()
    add_concept(doc, concept, "standard", "1", "1")
    folder.mkdir(parents=True, exist_ok=True)
    save(path, doc)
    return path


def family(path: Path) -> str:
    """The model's family as the stages will detect it, or why it cannot be told yet."""
    try:
        cfg = load_config(path)
    except UserError as e:
        return f"unknown ({e})"
    if cfg.embedded is not None and not Path(cfg.model.path).exists():
        return f"{cfg.embedded.family} (built on first use: [embedded])"
    from pipeline.families.load import detect_family

    root = Path(cfg.model.path)
    if not root.exists() and HUB_ID.match(cfg.model.path):
        try:
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(cfg.model.path, local_files_only=True))
        except Exception:  # noqa: BLE001 - not downloaded: the cache stage fetches it and detects then
            return "hub model not downloaded yet: detected when the cache stage fetches it"
    try:
        return detect_family(root)
    except UserError as e:
        return f"unknown ({e})"


def images(folder: Path, caption_ext: str, limit: int = 60) -> tuple[list[dict], int]:
    """A concept folder's images (the first `limit`, by name) with their captions (None: no caption file)."""
    if not folder.is_dir():
        return [], 0
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    out = []
    for p in found[:limit]:
        caption = p.with_suffix(caption_ext)
        out.append({"name": p.name, "caption": caption.read_text(encoding="utf-8-sig").strip()
                    if caption.is_file() else None})
    return out, len(found)


def write_caption(image: Path, caption_ext: str, text: str) -> None:
    with replacing(image.with_suffix(caption_ext)) as tmp:
        tmp.write_text(text.strip() + "\n", encoding="utf-8")
