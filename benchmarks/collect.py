"""Gather the per-area result notes in benchmarks/results/*.md into BENCHMARKS.md.

Run: python benchmarks/collect.py
"""

from pathlib import Path

ROOT = Path(__file__).parents[1]
ORDER = ["linalg", "gram", "curvature", "kfac", "taylor", "optim", "pinn", "symmetry", "spectral_optim"]

HEADER = """# Benchmarks

Every benchmark is a script in `benchmarks/` that measures curvkit against a named baseline in
the same run and reports ratios (ours / baseline; below 1 means curvkit is faster or smaller).
Each section below is the note written next to its results (`benchmarks/results/<area>.md`,
with the raw JSON and figures beside it): the machine, the exact command, the date, the table,
and every target of its issue, met or missed. Regenerate this page with
`python benchmarks/collect.py`; run the benchmarks with `curvkit bench [NAME ...]`.

**Caveat on the CPU numbers of 2026-11-28.** They were measured on the 2-core development
machine while several other benchmark and test jobs ran on the same cores (load average 8–12),
so absolute times are inflated and noisy; the ratios, measured interleaved in the same run, are
the numbers to read.
"""


def _demote_headings(markdown: str) -> str:
    """Add one ``#`` to every heading outside code fences: a note's title becomes a section."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        out.append("#" + line if line.startswith("#") and not fenced else line)
    return "\n".join(out)


def main() -> None:
    notes = {p.stem: p for p in (ROOT / "benchmarks" / "results").glob("*.md")}
    names = [n for n in ORDER if n in notes] + sorted(set(notes) - set(ORDER))
    parts = [HEADER]
    for name in names:
        text = notes[name].read_text().strip()
        parts.append(_demote_headings(text))
    (ROOT / "BENCHMARKS.md").write_text("\n\n".join(parts) + "\n")
    print(f"wrote BENCHMARKS.md from {len(names)} notes: {', '.join(names)}")


if __name__ == "__main__":
    main()
