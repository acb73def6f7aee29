"""MkDocs hooks: the rule pages come from one source, initdoctor/pages/<CODE>.md.

`initdoctor explain CODE` prints the same files in the terminal. Here each one becomes the generated
page rules/<CODE>.md, and the table in rules/index.md is written from the code table in
initdoctor/codes.py. The build fails when a code has no page, a page has no code, or a rule page is
missing from the nav, so the site cannot drift from the package.

codes.py is loaded by path so that building the docs does not import torch.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = os.path.join(ROOT, "initdoctor", "pages")
TABLE_MARKER = "<!-- codes-table -->"


def _codes() -> dict:
    name = "_initdoctor_docs_codes"
    if name not in sys.modules:
        path = os.path.join(ROOT, "initdoctor", "codes.py")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[name].CODES


def _nav_paths(nav) -> set[str]:
    out: set[str] = set()
    if isinstance(nav, str):
        out.add(nav)
    elif isinstance(nav, list):
        for item in nav:
            out |= _nav_paths(item)
    elif isinstance(nav, dict):
        for value in nav.values():
            out |= _nav_paths(value)
    return out


def on_files(files, config):
    codes = _codes()
    pages = {name[:-3] for name in os.listdir(PAGES) if name.endswith(".md")}
    if set(codes) - pages:
        raise PluginError(f"no page in initdoctor/pages for: {', '.join(sorted(set(codes) - pages))}")
    if pages - set(codes):
        extra = ", ".join(sorted(pages - set(codes)))
        raise PluginError(f"pages without a code in initdoctor/codes.py: {extra}")
    in_nav = _nav_paths(config["nav"])
    missing = [c for c in codes if f"rules/{c}.md" not in in_nav]
    if config["nav"] and missing:
        raise PluginError(f"rule pages missing from the nav in mkdocs.yml: {', '.join(missing)}")
    for code in codes:
        with open(os.path.join(PAGES, f"{code}.md"), encoding="utf-8") as fh:
            content = fh.read()
        files.append(File.generated(config, f"rules/{code}.md", content=content))
    return files


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri != "rules/index.md" or TABLE_MARKER not in markdown:
        return markdown
    rows = ["| code | name | fires when | fix |", "|---|---|---|---|"]
    for c in _codes().values():
        rows.append(f"| [{c.code}]({c.code}.md) | `{c.name}` | {c.summary} | {c.fix_title} |")
    return markdown.replace(TABLE_MARKER, "\n".join(rows))
