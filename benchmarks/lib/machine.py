"""What the benchmarks say about the machine they ran on."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vaelab.sampling import native_bf16

REPO = Path(__file__).resolve().parents[2]  # the checkout the benchmarks belong to
RESULTS = REPO / "benchmarks" / "results"  # where the tables and their figures are kept


def cpu_description() -> str:
    """The CPU's model name plus what its name hides: the vector extensions that
    set vaelab's speed. Two hosts both called "AMD EPYC" here differ by 2x."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        return "unknown CPU"
    flags = set(fields.get("flags", "").split())
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    if native_bf16(torch.device("cpu")):  # the test that picks the evaluation's precision
        vector += " with bf16"
    family = (
        f"family {fields['cpu family']} model {fields['model']}" if "cpu family" in fields else ""
    )
    return (
        f"{fields.get('model name', 'unknown CPU')} ({', '.join(x for x in (family, vector) if x)})"
    )


def hardware() -> str:
    """The CPU, torch's threads and the PyTorch version, as the result tables name them."""
    threads = torch.get_num_threads()
    return f"{cpu_description()}, {threads} thread{'s' if threads > 1 else ''}, PyTorch {torch.__version__}"


def cpu_and_torch() -> str:
    """The CPU and the PyTorch version, for tables whose rows name their own thread counts."""
    return f"{cpu_description()}, PyTorch {torch.__version__}"


def write_results(out: Path | None, name: str, report: dict, table: str) -> None:
    """Write out/name.json (the figures) and out/name.md (the table), and print the table (only
    print it without out)."""
    if out is None:
        print(table)
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(table)
    print(table)
