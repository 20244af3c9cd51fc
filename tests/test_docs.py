"""The documentation site (mkdocs.yml and docs/): it builds with --strict, it loads nothing from
the network, and its command-line page is the one the parser renders now.

The site's tools come with the `docs` extra (pip install -e '.[docs]'). Without them the build
tests are skipped, except under CI=true, where a missing tool fails them.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CLI_MD = REPO / "docs" / "cli.md"
CLI_REFERENCE = REPO / "docs" / "cli_reference.py"
# The modules the build imports: MkDocs, the Material theme, mkdocstrings and its Python handler.
DOCS_TOOLS = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")


def missing_docs_tools() -> list[str]:
    missing = []
    for name in DOCS_TOOLS:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # its parent package is missing
            found = False
        if not found:
            missing.append(name)
    return missing


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """The site built by `python -m mkdocs build --strict` from the repository's root."""
    missing = missing_docs_tools()
    if missing:
        why = (f"the docs tools are not installed ({', '.join(missing)}): "
               "pip install -e '.[docs]'")
        if os.environ.get("CI") == "true":
            pytest.fail(why)
        pytest.skip(why)
    out = tmp_path_factory.mktemp("docs") / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's notice about its future
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return built, out


@pytest.mark.slow  # builds the site (mkdocs, about 5 s)
def test_the_site_builds_with_strict_so_a_broken_link_or_missing_page_fails(site):
    built, out = site
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stderr[-4000:]}"
    assert (out / "index.html").is_file()


class _Resources(HTMLParser):
    """The URLs a page loads by itself: scripts, style sheets and other links, images, frames."""

    LOADS = {"script": "src", "link": "href", "img": "src", "iframe": "src", "source": "src"}

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        name = self.LOADS.get(tag)
        value = dict(attrs).get(name) if name else None
        if value:
            self.urls.append(value)


@pytest.mark.slow  # builds the site (mkdocs, about 5 s)
def test_the_built_site_loads_nothing_from_the_network(site):
    built, out = site
    assert built.returncode == 0, "the site did not build (see the strict build's test)"
    pages = sorted(out.rglob("*.html"))
    assert pages
    remote = []
    for page in pages:
        parser = _Resources()
        parser.feed(page.read_text(encoding="utf-8"))
        remote += [f"{page.relative_to(out)}: {url}" for url in parser.urls
                   if url.strip().lower().startswith(("http://", "https://", "//"))]
    assert not remote, "pages that load from the network:\n" + "\n".join(remote[:20])


def _cli_reference():
    spec = importlib.util.spec_from_file_location("cli_reference", CLI_REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_page_is_what_the_parser_renders_now():
    rendered = _cli_reference().render()
    assert CLI_MD.read_text(encoding="utf-8") == rendered, (
        "docs/cli.md differs from what vaelab's parser gives: run `python docs/cli_reference.py`"
        " and commit docs/cli.md")


def test_every_command_of_the_cli_has_its_section_in_the_cli_page():
    import argparse

    from vaelab.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    text = CLI_MD.read_text(encoding="utf-8")
    missing = [name for name in sub.choices if f"\n## vaelab {name}\n" not in text]
    assert sub.choices and not missing, (
        f"docs/cli.md has no section for {', '.join(missing)}: run `python docs/cli_reference.py`")


@pytest.mark.slow  # starts Chromium
def test_the_built_site_loads_offline_in_a_browser_and_its_navigation_works(site, tmp_path):
    from conftest import chromium_browser
    from selenium.webdriver.common.by import By

    built, out = site
    assert built.returncode == 0, built.stderr[-4000:]
    driver = chromium_browser(tmp_path)  # skips, saying why, where there is no browser
    try:
        driver.get((out / "index.html").as_uri())
        assert driver.title.startswith("vaelab")
        link = next(a for a in driver.find_elements(By.CSS_SELECTOR, "nav a.md-nav__link")
                    if a.get_attribute("href").endswith("evaluation.html"))
        driver.execute_script("arguments[0].click();", link)  # the drawer may hide it
        assert driver.current_url.endswith("evaluation.html")
        assert driver.find_element(By.TAG_NAME, "h1").text == "Evaluation"
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe  # nothing failed to load
    finally:
        driver.quit()


# Phrases that tell of how the project was made rather than what it does.
TELL_TALE = ("against the targets", "happened to", "was lent", "for want of", "measured here",
             "this session", "when this project began", "the single path", "was not available",
             "were not available", "no gpu was", "at the time of writing", "ran here", "took here",
             "not at hand", "was at hand")


def product_texts() -> list[Path]:
    """The README, the docs pages, the results files and the package's source."""
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")),
            *sorted((REPO / "benchmarks" / "results").glob("*.md")),
            *sorted((REPO / "vaelab").rglob("*.py"))]


def test_the_product_texts_speak_of_the_product_only():
    found = [f"{path.relative_to(REPO)}: {phrase!r}" for path in product_texts()
             for phrase in TELL_TALE if phrase in " ".join(path.read_text().lower().split())]
    assert not found, found


@pytest.mark.slow  # builds the site (mkdocs, about 5 s)
def test_formulas_show_no_escapes_and_the_api_pages_no_stray_links(site):
    built, out = site
    assert built.returncode == 0, "the site did not build (see the strict build's test)"
    models = (out / "models.html").read_text(encoding="utf-8")
    assert "sum_l log p(x|z_l) + KL(q(z|x) || N(0, I))" in models
    for page in sorted(out.rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        assert "\\frac" not in text and "\\|" not in text, page.name
    evaluation = (out / "api" / "evaluation.html").read_text(encoding="utf-8")
    assert 'href="terms"' not in evaluation
