"""MkDocs hook: the measured results, read where they are kept.

The tables that the benchmarks write live in benchmarks/results/, outside docs/. This hook adds
those files to the site under results/, beside results/index.md, which includes their tables
(pymdownx.snippets): each table has one copy, the benchmark's own, and the links inside it
(to a figure, or to another result file) resolve on the site as they do in the repository.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files, InclusionLevel

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
KINDS = (".md", ".png")


def on_config(config):
    # The snippets' paths are relative to the repository's root, wherever mkdocs is run from.
    snippets = config.mdx_configs.get("pymdownx.snippets")
    if snippets is not None:
        snippets["base_path"] = [str(ROOT)]
    return config


def on_files(files: Files, config) -> Files:
    for path in sorted(RESULTS.rglob("*")):  # a row's figure may sit in its records' folder
        if path.suffix in KINDS and path.is_file():
            name = path.relative_to(RESULTS).as_posix()
            files.append(File.generated(config, f"results/{name}", abs_src_path=str(path),
                                        inclusion=InclusionLevel.NOT_IN_NAV))
    return files
