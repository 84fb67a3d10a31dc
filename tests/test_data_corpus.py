"""Corpus loading and the deterministic train/validation split."""
from __future__ import annotations

import random

import pytest

from slapo_lightning.data.corpus import Document, expand_paths, load_documents, split_documents, stdlib_files
from slapo_lightning.errors import RecipeError


def make_docs(n: int = 40) -> list[Document]:
    return [Document(f"doc{i:03d}.txt", "x" * (100 + 37 * i)) for i in range(n)]


def test_split_is_deterministic_and_independent_of_order():
    docs = make_docs()
    train, val = split_documents(docs, 0.1)
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    train2, val2 = split_documents(shuffled, 0.1)
    assert {d.name for d in val} == {d.name for d in val2}
    assert {d.name for d in train} == {d.name for d in train2}
    assert not {d.name for d in train} & {d.name for d in val}
    assert len(train) + len(val) == len(docs)


def test_split_takes_about_the_asked_fraction_of_characters():
    docs = make_docs()
    _, val = split_documents(docs, 0.1)
    share = sum(len(d.text) for d in val) / sum(len(d.text) for d in docs)
    assert 0.1 <= share < 0.2


def test_split_keeps_a_document_on_each_side():
    docs = make_docs(2)
    train, val = split_documents(docs, 0.99)
    assert len(train) == 1 and len(val) == 1


def test_split_rejects_a_bad_fraction():
    with pytest.raises(RecipeError, match="val_fraction"):
        split_documents(make_docs(), 1.0)


def test_default_corpus_is_the_stdlib_capped_by_characters():
    docs = load_documents(max_chars=50_000)
    assert sum(len(d.text) for d in docs) == 50_000
    assert [d.name for d in docs] == [p.name for p in stdlib_files()[: len(docs)]]


def test_paths_accept_files_directories_and_globs(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("beta")
    (tmp_path / "c.md").write_text("gamma")
    assert [p.name for p in expand_paths([str(tmp_path)], "**/*.txt")] == ["a.txt", "b.txt"]
    assert [p.name for p in expand_paths([str(tmp_path / "*.md")], "**/*.txt")] == ["c.md"]
    assert [p.name for p in expand_paths([str(tmp_path / "a.txt")], "**/*.txt")] == ["a.txt"]
    docs = load_documents([str(tmp_path)], file_glob="**/*")
    assert [d.name for d in docs] == ["a.txt", "c.md", "sub/b.txt"]


@pytest.mark.parametrize("entry, message", [("missing.txt", "does not exist"), ("*.nothing", "matches no file")])
def test_missing_paths_are_named(tmp_path, entry, message):
    with pytest.raises(RecipeError, match=message):
        expand_paths([str(tmp_path / entry)], "**/*.txt")


def test_a_corpus_needs_two_documents(tmp_path):
    (tmp_path / "only.txt").write_text("one document")
    with pytest.raises(RecipeError, match="at least 2"):
        load_documents([str(tmp_path)])
