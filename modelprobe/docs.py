"""The reference page of every claim kind, written from the kind itself, and the MkDocs hook that adds those
pages to the docs site at build time (`hooks: [modelprobe/docs.py]` in mkdocs.yml), so they are never stale.

A page holds the kind's docstring (the method), its controls and what each verdict means (the docstring's
`Controls:` and `Verdicts:` paragraphs), its skeleton as the example probe file, and its spec's JSON Schema as
field tables. Built-in and entry-point kinds are documented the same way; the README's example kind gets a
page too when no installed kind has its name. Imports no torch and no mkdocs at import time.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

from modelprobe.kinds import KINDS, ProbeKind, builtin_kinds

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("Controls", "Verdicts")
_EXAMPLE = re.compile(r"<!-- example-kind -->\n```python\n(.*?)```\n<!-- /example-kind -->", re.S)


def kind_skeleton(kind_name: str) -> str:
    """The commented example probe file of a kind (its `skeleton` class attribute); '' when it has none."""
    return _skeleton_of(KINDS[kind_name])


def _skeleton_of(cls: type[ProbeKind]) -> str:
    text = getattr(cls, "skeleton", None)
    return text if isinstance(text, str) else ""


def split_docstring(text: str) -> tuple[str, dict[str, str]]:
    """The method text, and the paragraphs that open with `Controls:` or `Verdicts:` (without the label)."""
    method, found = [], {}
    for para in re.split(r"\n\s*\n", text.strip()):
        label = next((s for s in SECTIONS if para.startswith(s + ":")), None)
        if label:
            own = para[len(label) + 1:].strip()
            found[label] = (found.get(label, "") + "\n\n" + own[:1].upper() + own[1:]).strip()
        else:
            method.append(para)
    return "\n\n".join(method), found


def kind_docstring(cls: type[ProbeKind]) -> str:
    """The module's docstring, then the class's own (a kind may write either or both)."""
    parts = [inspect.getdoc(sys.modules.get(cls.__module__)) or "",
             cls.__dict__.get("__doc__") and inspect.cleandoc(cls.__doc__) or ""]
    return "\n\n".join(p for p in parts if p)


# --- JSON Schema -> field tables -------

def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _anchor(name: str) -> str:
    return "field-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _type(s: dict) -> str:
    if "$ref" in s:
        name = _ref_name(s["$ref"])
        return f"[{name}](#{_anchor(name)})"
    if "const" in s:
        return f"`{json.dumps(s['const'])}`"
    if "enum" in s:
        return " or ".join(f"`{json.dumps(v)}`" for v in s["enum"])
    for key in ("anyOf", "oneOf", "allOf"):
        if key in s:
            kinds = [_type(x) for x in s[key] if x.get("type") != "null"]
            return " or ".join(dict.fromkeys(kinds)) or "null"
    t = s.get("type", "any")
    if t == "array":
        return f"list of {_type(s.get('items', {}))}"
    if t == "object" and isinstance(s.get("additionalProperties"), dict):
        return f"map of string to {_type(s['additionalProperties'])}"
    return {"integer": "int", "number": "number", "string": "string", "boolean": "bool"}.get(t, t)


_BOUNDS = (("minimum", "≥ {}"), ("exclusiveMinimum", "> {}"), ("maximum", "≤ {}"), ("exclusiveMaximum", "< {}"),
           ("minLength", "length ≥ {}"), ("maxLength", "length ≤ {}"), ("minItems", "≥ {} items"),
           ("maxItems", "≤ {} items"), ("minProperties", "≥ {} entries"), ("maxProperties", "≤ {} entries"),
           ("pattern", "matches `{}`"))


def _range(s: dict) -> str:
    out = [fmt.format(s[k]) for k, fmt in _BOUNDS if k in s]
    for key in ("anyOf", "oneOf"):
        out += [r for x in s.get(key, ()) if (r := _range(x))]
    return ", ".join(dict.fromkeys(out))


def _default(name: str, s: dict, required: list[str]) -> str:
    if name in required:
        return "required"
    if "default" in s:
        return "`null`" if s["default"] is None else f"`{json.dumps(s['default'], ensure_ascii=False)}`"
    return ""


def field_table(obj: dict) -> str:
    """One Markdown table row per property of a JSON Schema object."""
    required = obj.get("required", [])
    rows = ["| field | type | range | default | description |", "|---|---|---|---|---|"]
    for name, s in obj.get("properties", {}).items():
        cells = [f"`{name}`", _type(s), _range(s), _default(name, s, required), s.get("description", "")]
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(rows)


def _refs(s: Any) -> list[str]:
    if isinstance(s, dict):
        own = [_ref_name(s["$ref"])] if "$ref" in s else []
        return own + [r for v in s.values() for r in _refs(v)]
    if isinstance(s, list):
        return [r for v in s for r in _refs(v)]
    return []


def schema_tables(schema: dict, title: str) -> str:
    """The probe file's fields, then every object it refers to, in the order they are first reached."""
    defs = schema.get("$defs", {})
    out = [f"### {title}", "", field_table(schema)]
    order = list(dict.fromkeys(r for r in _refs(schema.get("properties", {})) if r in defs))
    for name in order:  # grows while it is walked: breadth first over the references
        d = defs[name]
        order.extend(r for r in dict.fromkeys(_refs(d)) if r in defs and r not in order)
        out += ["", f'### {name} {{#{_anchor(name)}}}', ""]
        if d.get("description"):
            out += [d["description"], ""]
        out.append(field_table(d) if "properties" in d else f"{_cell(_type(d))} {_cell(_range(d))}".strip())
    return "\n".join(out)


# --- the page -------

VERDICTS = ("Every claim is judged by one rule ([How verdicts are decided](../verdicts.md)): **pass** when the "
            "whole interval clears the threshold and the effect beats its control, **fail** when the interval "
            "misses the threshold or the effect does not beat its control, **inconclusive** when the interval "
            "straddles the threshold or the claim cannot be tested on this model (the reason is recorded).")


def _provenance(cls: type[ProbeKind], target: str | None) -> str:
    where = f"`{target}`" if target else f"`{cls.__module__}:{cls.__qualname__}`"
    if target is None:
        return f"The README's example kind ({where}), loaded from the README's code block."
    if builtin_kinds().get(cls.name) == target:
        return f"Built in: {where}."
    return f"Installed from the entry point group `modelprobe.kinds`: {where}."


def kind_page(cls: type[ProbeKind], target: str | None = None, notes: str = "") -> str:
    """The Markdown reference page of one kind class (`target`: its registry entry, None for the README's)."""
    method, sections = split_docstring(kind_docstring(cls))
    summary, _, body = method.partition("\n\n")
    summary = " ".join(summary.split()).removeprefix(f"{cls.name}: ")
    skeleton = _skeleton_of(cls)
    out = [f"# `{cls.name}`", "", f"**{summary.strip()}**", "", _provenance(cls, target), ""]
    if body:
        out += ["## Method", "", body, ""]
    out += ["## Controls", "", sections.get("Controls", "The kind's docstring names no control."), "",
            "## Verdicts", "", VERDICTS, ""]
    if "Verdicts" in sections:
        out += [sections["Verdicts"], ""]
    out += ["## Example probe file", ""]
    if skeleton:
        out += [f"`modelprobe new {cls.name} NAME` writes this file (and example data where none exists):", "",
                "```yaml", skeleton.rstrip("\n"), "```", ""]
    else:
        out += ["This kind ships no skeleton.", ""]
    schema = cls.Spec.model_json_schema(by_alias=True)
    out += ["## Fields", "", "Generated from the kind's JSON Schema (`modelprobe schema` writes the whole file).",
            "", schema_tables(schema, f"Probe file (`{cls.Spec.__name__}`)"), ""]
    if notes.strip():
        out += ["## Notes", "", notes.strip(), ""]
    return "\n".join(out)


def readme_example_kind(readme: Path = ROOT / "README.md") -> type[ProbeKind] | None:
    """The kind class of the README's example block, imported under its own module name, or None."""
    found = _EXAMPLE.search(readme.read_text()) if readme.is_file() else None
    if not found:
        return None
    name = "modelprobe_readme_example_kind"
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic resolves the annotations through sys.modules
    exec(compile(found.group(1), str(readme), "exec"), module.__dict__)  # noqa: S102 - our own README
    kinds = [v for v in vars(module).values()
             if isinstance(v, type) and issubclass(v, ProbeKind) and v is not ProbeKind and v.__module__ == name]
    return kinds[0] if kinds else None


def kind_pages(notes_dir: Path | None = None) -> dict[str, str]:
    """kind name -> page, for every registered kind and the README's example kind."""
    def notes(name: str) -> str:
        path = notes_dir / f"{name}.md" if notes_dir else None
        return path.read_text() if path and path.is_file() else ""

    targets = KINDS.targets()
    pages = {name: kind_page(KINDS[name], targets[name], notes(name)) for name in sorted(targets)}
    example = readme_example_kind()
    if example is not None and example.name not in pages:
        pages[example.name] = kind_page(example, None, notes(example.name))
    return pages


def kinds_index(pages: dict[str, str]) -> str:
    """The table of kinds: name and the first line of its docstring."""
    rows = ["| kind | claim |", "|---|---|"]
    for name, page in pages.items():
        summary = page.split("\n")[2].strip("*")
        rows.append(f"| [`{name}`]({name}.md) | {_cell(summary)} |")
    return "\n".join(rows)


# --- MkDocs hook -------

def on_files(files: Any, config: Any) -> Any:
    """Add `kinds/<name>.md` for every kind (and put them in the nav under `kinds/index.md`)."""
    from mkdocs.structure.files import File

    docs = Path(config["docs_dir"])
    pages = kind_pages(docs / "kinds" / "notes")
    for name, text in pages.items():
        files.append(File.generated(config, f"kinds/{name}.md", content=text))
    on_files.table = kinds_index(pages)  # type: ignore[attr-defined]
    kinds = ["kinds/index.md"] + [{name: f"kinds/{name}.md"} for name in pages]
    for i, item in enumerate(config["nav"] or []):  # the nav entry of kinds/index.md gets the pages below it
        if isinstance(item, dict) and list(item.values()) == ["kinds/index.md"]:
            config["nav"][i] = {next(iter(item)): kinds}
    return files


def readme_section(title: str, readme: Path = ROOT / "README.md") -> str:
    """The body of the README's `## title` section, its `docs/` links made relative to the docs folder."""
    text = readme.read_text()
    found = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    if not found:
        raise ValueError(f"README.md has no section '## {title}'")
    return re.sub(r"\]\(docs/", "](", found.group(1).strip()) + "\n"


def expand_markers(markdown: str, table: str = "") -> str:
    """Fill a page's markers: the kinds table, the README's example kind, a README section."""
    markdown = markdown.replace("<!-- kinds-table -->", table)
    if "<!-- example-kind-code -->" in markdown:
        found = _EXAMPLE.search((ROOT / "README.md").read_text())
        code = f"```python\n{found.group(1)}```\n" if found else "The README has no example kind.\n"
        markdown = markdown.replace("<!-- example-kind-code -->", code)
    return re.sub(r"<!-- readme-section: (.+?) -->", lambda m: readme_section(m.group(1)), markdown)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return expand_markers(markdown, getattr(on_files, "table", ""))


def main(argv: list[str] | None = None) -> int:
    """`python -m modelprobe.docs OUT_DIR`: write the kind pages as Markdown files (without MkDocs)."""
    out = Path((argv if argv is not None else sys.argv[1:] or ["site-kinds"])[0])
    out.mkdir(parents=True, exist_ok=True)
    pages = kind_pages(ROOT / "docs" / "kinds" / "notes")
    for name, text in pages.items():
        (out / f"{name}.md").write_text(text)
    print(f"{len(pages)} kind pages in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
