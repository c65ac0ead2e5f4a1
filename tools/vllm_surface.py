"""Check the vLLM pieces vllm-doge relies on (vllm_doge/surface.py) against a vLLM source tree.

    python -m tools.vllm_surface /path/to/vllm-0.34.0/     # the directory that contains vllm/
    python -m tools.vllm_surface --installed               # the installed vLLM's source, and the running one

Static (ast only): nothing is imported from the tree and no GPU is needed, so an unpacked sdist or wheel of
any vLLM can be checked. Prints one row per piece and exits 1 if a required piece is missing or changed
(with --platform gpu, CPU-only pieces do not count).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from vllm_doge import surface


def source_version(root: Path) -> str:
    path = root / "vllm" / "_version.py"
    found = re.search(r"__version__\s*=\s*(?:version\s*=\s*)?['\"]([^'\"]+)", path.read_text()) if path.is_file() else None
    return found.group(1) if found else "unknown"


def table(results, *, counts_for) -> str:
    rows = [("status", "vLLM piece", "needed", "for", "detail")]
    for r in results:
        status = r.status if r.need.required else f"{r.status} (optional)"
        if r.failed and not counts_for(r.need):
            status += " (not counted)"
        rows.append((status, r.need.label, r.need.where, r.need.feature, r.detail))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3]
                     + (f"  [{row[4]}]" if row[4] else ""))
        if i == 0:
            lines.append("-" * (sum(widths) + 40))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", type=Path, help="directory that contains the vllm/ package")
    parser.add_argument("--installed", action="store_true", help="check the installed vLLM (source and import)")
    parser.add_argument("--platform", choices=("any", "cpu", "gpu"), default="any",
                        help="gpu: CPU-only pieces do not count towards the exit status (default: all count)")
    args = parser.parse_args(argv)
    if args.installed == (args.root is not None):
        parser.error("give a source directory or --installed")
    root = surface._installed_tree().root if args.installed else args.root
    counts_for = (lambda need: need.where != surface.CPU) if args.platform == "gpu" else (lambda need: True)
    results = surface.check_source(root)
    failed = [r for r in results if r.failed and r.need.required and counts_for(r.need)]
    print(f"vLLM {source_version(root)} source at {root}: {len(results)} pieces, "
          f"{sum(not r.failed for r in results)} ok, {sum(r.failed for r in results)} missing or changed")
    print(table(results, counts_for=counts_for))
    if args.installed:
        runtime = surface.check_installed(platform_is_cpu=True)
        bad = [r for r in runtime if r.failed]
        print(f"\nrunning vLLM: {len(runtime)} pieces checked by import, {len(bad)} missing or changed")
        for r in bad:
            print(f"  {r.status}: {r.need.label}: {r.detail}")
        failed += [r for r in bad if r.need.required]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
