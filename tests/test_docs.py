"""The documentation's evidence exists: every `results/...` file that a markdown file cites is in the repository."""
import itertools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITED = re.compile(r"results/[A-Za-z0-9_.{},*\-/]+")


def _expand(path: str):
    """`a_{1,2}gpu.log` -> a_1gpu.log, a_2gpu.log (the shell's brace expansion, as the docs write families)."""
    parts = re.split(r"(\{[^}]*\})", path)
    choices = [p[1:-1].split(",") if p.startswith("{") else [p] for p in parts]
    return ["".join(c) for c in itertools.product(*choices)]


def cited_paths():
    for md in [ROOT / "README.md", *sorted((ROOT / "benchmarks").glob("*.md")), *sorted((ROOT / "docs").glob("*.md"))]:
        for match in CITED.finditer(md.read_text()):
            cited = match.group(0).rstrip(".,")
            for path in _expand(cited):
                yield md, path


def test_every_cited_result_exists():
    missing = []
    for md, path in cited_paths():
        base = ROOT / "benchmarks" / path
        found = list(base.parent.glob(base.name)) if "*" in path else [base] if base.exists() else []
        if not found:
            missing.append(f"{md.relative_to(ROOT)}: {path}")
    assert not missing, "cited but not in benchmarks/results:\n" + "\n".join(missing)


def test_brace_families_expand():
    assert _expand("results/ddp_{1,2}gpu_h200.log") == ["results/ddp_1gpu_h200.log", "results/ddp_2gpu_h200.log"]
