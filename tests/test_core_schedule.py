"""Schedule tree addressing, selection and the primitive registry."""
from __future__ import annotations

import pytest
from torch import nn

import slapo_lightning as slapo
import tiny_models


def test_tree_mirrors_named_children_and_addresses_module_list_items():
    model = tiny_models.bert()
    sch = slapo.create_schedule(model)
    attention = sch["bert.encoder.layer.0.attention"]
    assert attention.mod is model.bert.encoder.layer[0].attention
    assert attention.path == "bert.encoder.layer.0.attention" and attention.name == "attention"
    assert attention.parent.path == "bert.encoder.layer.0"
    assert set(attention.child) == {"self", "output"}
    assert attention["self"].mod is model.bert.encoder.layer[0].attention.self


def test_unknown_path_is_a_key_error_naming_the_closest_paths():
    sch = slapo.create_schedule(tiny_models.bert())
    with pytest.raises(KeyError) as info:
        sch["bert.encoder.layer.0.atention"]
    assert isinstance(info.value, slapo.ScheduleError)
    assert "bert.encoder.layer.0.attention" in str(info.value)


def test_select_by_glob_regex_and_class_in_module_order():
    model = tiny_models.bert()
    sch = slapo.create_schedule(model)
    by_glob = [s.path for s in sch.select("bert.encoder.layer.*.attention")]
    assert by_glob == [f"bert.encoder.layer.{i}.attention" for i in range(tiny_models.LAYERS)]
    assert [s.path for s in sch.select("**.attention.self")] == [p + ".self" for p in by_glob]
    assert [s.path for s in sch.select(r"re:bert\.encoder\.layer\.\d+\.attention")] == by_glob
    cls = type(model.bert.encoder.layer[0].attention)
    assert [s.path for s in sch.select(cls)] == by_glob
    assert [s.path for s in sch.select(f"class:{cls.__module__}.{cls.__name__}")] == by_glob
    assert sch.select("bert.nothing.*") == []


def test_select_the_no_split_layers_and_by_class_name_glob():
    sch = slapo.create_schedule(tiny_models.gpt2())
    assert [s.path for s in sch.select("no_split:")] == ["transformer.h.0", "transformer.h.1"]
    assert [s.path for s in sch.select("classname:GPT2*tention")] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert [s.path for s in sch["transformer"].select("no_split:")] == ["transformer.h.0", "transformer.h.1"]
    assert slapo.create_schedule(nn.Linear(2, 2)).select("no_split:") == []
    with pytest.raises(slapo.ScheduleError, match="takes nothing after the colon"):
        sch.select("no_split:h")


def test_primitives_are_registered_and_extensible():
    assert {"trace", "find", "replace", "decompose", "fuse", "checkpoint"} <= set(slapo.list_primitives())

    def tag(sch, label):
        sch.mod.slapo_label = label
        return label

    slapo.register_primitive("tag_for_test", tag, overwrite=True)
    sch = slapo.create_schedule(nn.Sequential(nn.Linear(2, 2)))
    assert sch["0"].tag_for_test("x") == "x" and sch.mod[0].slapo_label == "x"
    with pytest.raises(AttributeError, match="primitives: .*trace"):
        sch.no_such_primitive
