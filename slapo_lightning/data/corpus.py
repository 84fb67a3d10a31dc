"""Where training text comes from, and how it is split into train and validation documents.

The default corpus is the standard library of the running interpreter: it is on every machine,
needs no network and is large enough to train a tiny model. Everything here is deterministic so
that a resumed run, another rank or a test sees exactly the same documents.
"""
from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from ..errors import RecipeError


@dataclass(frozen=True)
class Document:
    """One text file (or dataset row): ``name`` identifies it for the split and the cache key."""

    name: str
    text: str


def stdlib_files() -> list[Path]:
    """The top-level ``*.py`` files of the running interpreter's standard library, sorted."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def expand_paths(paths: list[str], file_glob: str) -> list[Path]:
    """Files named by ``paths``: each a file, a directory (searched with ``file_glob``) or a glob."""
    files: set[Path] = set()
    for entry in paths:
        expanded = os.path.expanduser(str(entry))
        if glob.has_magic(expanded):
            matches = [Path(m) for m in glob.glob(expanded, recursive=True) if Path(m).is_file()]
            if not matches:
                raise RecipeError(f"data.paths: glob {entry!r} matches no file")
            files.update(matches)
        elif Path(expanded).is_dir():
            matches = [m for m in Path(expanded).glob(file_glob) if m.is_file()]
            if not matches:
                raise RecipeError(f"data.paths: directory {entry!r} has no file matching data.file_glob={file_glob!r}")
            files.update(matches)
        elif Path(expanded).is_file():
            files.add(Path(expanded))
        else:
            raise RecipeError(f"data.paths: {entry!r} does not exist (give files, directories or globs)")
    return sorted(files)


def read_files(files: list[Path], max_chars: int | None, max_files: int | None) -> list[Document]:
    """Read ``files`` in order until ``max_files`` files or ``max_chars`` characters (the last one truncated).

    Documents are named by their path relative to the files' common folder, so that the split and
    the tokenizer cache key do not depend on where the corpus sits on this machine.
    """
    docs: list[Document] = []
    total = 0
    root = Path(os.path.commonpath(files)) if len(files) > 1 else files[0].parent if files else Path()
    for path in files[:max_files]:
        text = path.read_text(encoding="utf-8", errors="replace")
        if max_chars is not None:
            text = text[: max_chars - total]
        if text:
            docs.append(Document(path.relative_to(root).as_posix(), text))
            total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    return docs


def read_hf_dataset(name: str, split: str, text_field: str, max_chars: int | None) -> list[Document]:
    """Rows of a Hugging Face dataset (needs the optional ``datasets`` package and the network)."""
    try:
        import datasets
    except ImportError as exc:
        raise RecipeError("data.hf_dataset needs the 'datasets' package: pip install datasets") from exc
    rows = datasets.load_dataset(name, split=split, streaming=True)
    docs: list[Document] = []
    total = 0
    for index, row in enumerate(rows):
        text = row[text_field][: None if max_chars is None else max_chars - total]
        docs.append(Document(f"{name}/{split}/{index}", text))
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    return docs


def load_documents(
    paths: list[str] | None = None,
    file_glob: str = "**/*.txt",
    hf_dataset: str | None = None,
    hf_split: str = "train",
    hf_text_field: str = "text",
    max_chars: int | None = None,
    max_files: int | None = None,
) -> list[Document]:
    """The corpus: a Hugging Face dataset if named, else ``paths``, else the standard library."""
    if hf_dataset:
        docs = read_hf_dataset(hf_dataset, hf_split, hf_text_field, max_chars)
    else:
        files = stdlib_files() if not paths else expand_paths(list(paths), file_glob)
        docs = read_files(files, max_chars, max_files)
    if len(docs) < 2:
        raise RecipeError(f"data: the corpus has {len(docs)} non-empty document(s); at least 2 are needed for a train/val split")
    return docs


def _split_rank(doc: Document) -> str:
    return hashlib.sha1(doc.name.encode()).hexdigest()


def split_documents(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Deterministic document-level split: validation takes documents in hash order of their names
    until it holds ``val_fraction`` of the characters (at least one document each side).

    Hashing names rather than taking the last files keeps the split stable when the corpus grows
    and spreads validation over the whole corpus instead of its alphabetical tail.
    """
    if not 0.0 < val_fraction < 1.0:
        raise RecipeError(f"data.val_fraction={val_fraction} must be between 0 and 1 (exclusive)")
    target = val_fraction * sum(len(d.text) for d in docs)
    val_names: set[str] = set()
    chars = 0
    for doc in sorted(docs, key=_split_rank):
        if val_names and chars >= target:
            break
        if len(val_names) == len(docs) - 1:
            break
        val_names.add(doc.name)
        chars += len(doc.text)
    train = [d for d in docs if d.name not in val_names]
    val = [d for d in docs if d.name in val_names]
    return train, val


def corpus_fingerprint(docs: list[Document]) -> str:
    """A hash of the documents' names and contents (part of the tokenizer cache key)."""
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(doc.name.encode())
        digest.update(b"\0")
        digest.update(doc.text.encode("utf-8", errors="replace"))
        digest.update(b"\0")
    return digest.hexdigest()
