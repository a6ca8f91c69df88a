#!/usr/bin/env python3
"""Builds the demo model's training corpus from Debian packages and the Rust book.

    apt-get update && apt-get install -y bible-kjv fortunes fortunes-min fortunes-de fortunes-es fortunes-it
    rustup component add rust-docs   # the Rust book, found through `rustc --print sysroot`
    python3 tools/build_demo_corpus.py --out /tmp/demo-corpus

Writes one UTF-8 text file per source into --out; documents (fortunes, book
chapters, Bible books) are separated by <|endoftext|>. Each source is capped at
a byte budget so the mix stays mostly English with three other languages and
three domains (scripture, quips/poems/jokes, programming prose). Standard
library only; the corpus is not committed (about 6 MB).
"""

import argparse
import html
import re
import subprocess
from pathlib import Path

EOT = "<|endoftext|>"


def rust_book() -> Path:
    """The Rust book shipped with the toolchain's rust-docs component (1.95.0 built the demo corpus)."""
    sysroot = subprocess.run(["rustc", "--print", "sysroot"], capture_output=True, text=True, check=True)
    return Path(sysroot.stdout.strip()) / "share/doc/rust/html/book"


# source name -> (byte budget)
BUDGETS = {
    "bible_kjv_en": 2_200_000,
    "fortunes_en": 1_600_000,
    "rust_book_en": 1_200_000,
    "fortunes_de": 500_000,
    "fortunes_es": 350_000,
    "fortunes_it": 350_000,
}


def package_files(pkg: str) -> list[Path]:
    out = subprocess.run(["dpkg", "-L", pkg], check=True, capture_output=True, text=True).stdout
    files = []
    for line in out.splitlines():
        p = Path(line)
        if "games/fortunes" in line and p.is_file() and p.suffix not in (".dat", ".u8") and "/off/" not in line:
            files.append(p)
    return sorted(files)


def fortunes(pkgs: list[str], exclude: frozenset[Path] | set[Path] = frozenset()) -> list[str]:
    docs = []
    for pkg in pkgs:
        for f in package_files(pkg):
            if f in exclude:
                continue
            text = f.read_bytes().decode("utf-8", errors="replace")
            docs += [d.strip("\n") for d in re.split(r"^%$", text, flags=re.M) if d.strip()]
    return docs


def bible() -> list[str]:
    text = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], check=True, capture_output=True, text=True).stdout
    books: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.match(r"^([1-3]?[A-Za-z]+)(\d+):(\d+) (.*)$", line)
        if m:
            books.setdefault(m.group(1), []).append(m.group(4).strip())
    return ["\n".join(verses) for verses in books.values()]


def rust_book() -> list[str]:
    docs = []
    for f in sorted(rust_book().glob("*.html")):
        if not re.match(r"(ch\d|appendix)", f.name):
            continue
        page = f.read_text(errors="replace")
        main = re.search(r"<main>(.*)</main>", page, flags=re.S)
        body = main.group(1) if main else page
        body = re.sub(r"<(script|style)[^>]*>.*?</\1>", "", body, flags=re.S)
        body = re.sub(r"</(p|h\d|li|pre|div|tr)>", "\n", body)
        body = re.sub(r"<[^>]+>", "", body)
        body = html.unescape(body)
        body = re.sub(r"\n{3,}", "\n\n", body).strip()
        docs.append(body)
    return docs


def write(out: Path, name: str, docs: list[str]) -> None:
    budget = BUDGETS[name]
    kept, size = [], 0
    for d in docs:
        n = len(d.encode()) + len(EOT)
        if size + n > budget:
            break
        kept.append(d)
        size += n
    (out / f"{name}.txt").write_text(EOT.join(kept) + EOT)
    print(f"{name}: {len(kept)} documents, {size} bytes")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    write(args.out, "bible_kjv_en", bible())
    # fortunes-it installs some files next to the English ones: keep languages apart.
    write(args.out, "fortunes_en", fortunes(["fortunes", "fortunes-min"], exclude=set(package_files("fortunes-it"))))
    write(args.out, "rust_book_en", rust_book())
    write(args.out, "fortunes_de", fortunes(["fortunes-de"]))
    write(args.out, "fortunes_es", fortunes(["fortunes-es"]))
    write(args.out, "fortunes_it", fortunes(["fortunes-it"]))


if __name__ == "__main__":
    main()
