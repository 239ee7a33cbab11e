#!/usr/bin/env python3
"""Checks the relative links of README.md and docs/*.md: every linked file exists, and every
#anchor into a Markdown page names one of its headings (GitHub's rule: lower case, spaces to
-, punctuation other than - and _ dropped). Links inside code blocks are not links.

    python3 scripts/maintainer/check_links.py [REPOSITORY_ROOT]
"""
import os
import re
import sys


def anchors(path):
    found = set()
    for line in open(path, encoding="utf-8"):
        m = re.match(r"#+\s+(.*)", line)
        if m:
            found.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return found


def main(root):
    os.chdir(root)
    pages = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir("docs") if f.endswith(".md"))
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", open(page, encoding="utf-8").read(), flags=re.S)
        for m in re.finditer(r"\]\(([^)\s]+)\)", text):
            link = m.group(1)
            if re.match(r"[a-z]+:", link):
                continue
            path, _, anchor = link.partition("#")
            target = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(target):
                broken.append(f"{page}: {link}: no such file")
            elif anchor and target.endswith(".md") and anchor not in anchors(target):
                broken.append(f"{page}: {link}: no heading #{anchor} in {target}")
    for b in broken:
        print(b)
    print(f"check_links: {len(pages)} pages, {len(broken)} broken links")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
