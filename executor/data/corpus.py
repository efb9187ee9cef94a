"""The embedded default corpus: text every Python installation carries, so the main job
runs on a fresh machine with no data and no download.

* ``code``: the standard library's own ``*.py`` sources (tests, idlelib and site-packages
  left out), in sorted path order;
* ``english``: the language reference topics of ``pydoc_data/topics.py``, split into
  paragraph groups of at least ``min_chars`` characters.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

_SKIP_DIRS = {"test", "tests", "idle_test", "idlelib", "site-packages", "__pycache__",
              "lib2to3", "turtledemo"}
_MAX_FILE_BYTES = 400_000  # a few generated tables are larger; they are not representative


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def code_documents(max_docs: int) -> list[str]:
    root = stdlib_root()
    docs: list[str] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if _SKIP_DIRS.intersection(rel) or path.stat().st_size > _MAX_FILE_BYTES:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append(text)
        if len(docs) >= max_docs:
            break
    return docs


def english_documents(max_docs: int, min_chars: int = 1000) -> list[str]:
    from pydoc_data.topics import topics

    docs: list[str] = []
    for key in sorted(topics):
        current: list[str] = []
        size = 0
        for para in topics[key].split("\n\n"):
            current.append(para)
            size += len(para) + 2
            if size >= min_chars:
                docs.append("\n\n".join(current))
                current, size = [], 0
        if current and "".join(current).strip():
            docs.append("\n\n".join(current))
    return docs[:max_docs]


def default_corpus(max_docs_per_domain: int) -> dict[str, list[str]]:
    return {
        "code": code_documents(max_docs_per_domain),
        "english": english_documents(max_docs_per_domain),
    }


def corpus_fingerprint() -> str:
    """Identifies this interpreter's corpus (it changes with the Python version)."""
    return f"py{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
