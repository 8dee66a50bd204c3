"""The documentation agrees with the code: the parameter table of docs/guides/cli.md is the one
Config declares, and every docs/ link of the README and the site's nav points at a page (and
heading) that exists. Fast, offline: no mkdocs needed (`mkdocs build --strict` in .ci/run
checks the site itself)."""
from __future__ import annotations

import importlib.util
import re
from dataclasses import fields
from pathlib import Path

from clr_mlflow.app.config import Config

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_mlproject", REPO / "scripts" / "gen_mlproject.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _slug(heading: str) -> str:
    """The anchor Python-Markdown's toc gives a heading (markdown.extensions.toc.slugify)."""
    text = re.sub(r"[`*]", "", heading)
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # no headings inside code
    return {_slug(m) for m in re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M)}


def test_the_parameter_table_is_what_config_declares():
    gen = _generator()
    text = gen.DOCS.read_text()
    assert text == gen.with_params_table(text), \
        "docs/guides/cli.md's parameter table is out of date: run python scripts/gen_mlproject.py"
    table = text.split(gen.BEGIN, 1)[1].split(gen.END, 1)[0]
    names = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    assert names == [f.name for f in fields(Config)]


def test_readme_docs_links_resolve():
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\((docs/[^)\s]+)\)", readme)
    assert len(links) >= 8, links
    for link in links:
        path, _, anchor = link.partition("#")
        assert (REPO / path).is_file(), f"README links to {path}, which does not exist"
        if anchor and path.endswith(".md"):
            assert anchor in _anchors(REPO / path), f"README links to {link}: no such heading"


def test_every_page_in_the_nav_exists():
    nav = (REPO / "mkdocs.yml").read_text().split("\nnav:", 1)[1].split("\n\n", 1)[0]
    pages = re.findall(r":\s+(\S+\.md)\s*$", nav, flags=re.M)
    assert "guides/cli.md" in pages and "reference.md" in pages
    missing = [p for p in pages if not (DOCS / p).is_file()]
    assert not missing, f"mkdocs.yml's nav names pages that do not exist: {missing}"


def test_readme_quickstart_is_the_commands_ci_runs():
    readme = (REPO / "README.md").read_text()
    quick = readme.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(quick) == 2 and "mlflow run ." in quick[0]
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert quick[1] == ci[-1] == 'pip install -e ".[test]" && pytest'
