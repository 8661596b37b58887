#!/usr/bin/env python3
"""docs-check: the README stays short and every relative link in the docs resolves.

- README.md may have at most 300 lines (the budget is 250; past 300 this fails).
- Every relative link in README.md and docs/*.md names a file or folder that exists,
  and a `#fragment` names a heading of the target (GitHub's anchor rules).
Run by `make lint`.
"""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
MAX_README_LINES = 300
LINK = re.compile(r"\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*```")


def anchors(path):
    """GitHub's heading anchors of a Markdown file."""
    seen = {}
    out = set()
    in_fence = False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        m = re.match(r"^(#{1,6})\s+(.*)$", line)
        if in_fence or not m:
            continue
        text = re.sub(r"[`*_]", "", m.group(2).strip()).lower()
        slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path):
    in_fence = False
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        for target in LINK.findall(line):
            yield no, target


def check(path):
    problems = []
    for no, target in links(path):
        if re.match(r"^[a-z]+:", target):
            continue
        file_part, _, frag = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{no}"
        if not dest.exists():
            problems.append(f"{where}: link to {target}: no such file")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            problems.append(f"{where}: link to {target}: no heading with that anchor")
    return problems


def main():
    problems = []
    readme = ROOT / "README.md"
    n = len(readme.read_text().splitlines())
    if n > MAX_README_LINES:
        problems.append(f"README.md has {n} lines (at most {MAX_README_LINES}; aim for 250): move reference text to docs/")
    for path in [readme, *sorted((ROOT / "docs").glob("*.md"))]:
        problems.extend(check(path))
    for p in problems:
        print(f"docs-check: {p}")
    if problems:
        sys.exit(1)
    print(f"docs-check: README.md {n} lines; links in README.md and docs/ resolve")


if __name__ == "__main__":
    main()
