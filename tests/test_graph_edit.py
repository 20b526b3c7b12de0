"""The editable, indexed graph: producer/consumer indexes that stay right through edits,
``replace_uses``, ``remove_op``, ``prune`` and a cheap ``copy``."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normtool.graph import Graph, InputSpec, Op, Source, Space, TensorSpec
from normtool.runtime.torch_exec import run_graph


def _graph(n_ops: int, draw_kind, draw_input) -> Graph:
    """A chain-and-branches graph of width-4 features: acts, adds and linears, each reading
    values computed before it."""
    g = Graph("synthetic", [InputSpec("x", "features", ("batch", 4))], [], [], {}, {}, {})
    g.spaces["h"] = Space("h", 4, "hidden")
    g.value_spaces["x"] = "h"
    values = ["x"]
    for i in range(n_ops):
        kind = draw_kind()
        ins = tuple(draw_input(values) for _ in range(2 if kind == "add" else 1))
        params = {}
        if kind == "linear":
            params["weight"] = f"w{i}"
            g.tensors[f"w{i}"] = TensorSpec((4, 4), ("h", "h"), Source(f"w{i}"))
        attrs = {"fn": "relu"} if kind == "act" else {}
        g.ops.append(Op(f"op{i}", kind, ins, f"v{i}", params, attrs))
        g.value_spaces[f"v{i}"] = "h"
        values.append(f"v{i}")
    g.outputs = [values[-1]]
    return g


def _assert_index_right(g: Graph) -> None:
    """The indexed queries answer what a scan of the ops answers."""
    values = {i.name for i in g.inputs} | {v for o in g.ops for v in (*o.inputs, o.output)}
    for v in values:
        writers = [o for o in g.ops if o.output == v]
        assert g.producer(v) is (writers[0] if writers else None), v
        assert g.consumers(v) == [o for o in g.ops if v in o.inputs], v
    for o in g.ops:
        assert g.op(o.name) is o


@st.composite
def edited_graphs(draw):
    """A random graph, queried (so the index exists), then edited at random, checking the
    index after every edit."""
    kinds = st.sampled_from(["act", "add", "linear"])
    g = _graph(
        draw(st.integers(1, 12)),
        lambda: draw(kinds),
        lambda vs: draw(st.sampled_from(vs)),
    )
    _assert_index_right(g)
    for step in range(draw(st.integers(0, 6))):
        edit = draw(st.sampled_from(["replace", "bypass", "take_over", "append"]))
        values = ["x"] + [o.output for o in g.ops]
        single = [o for o in g.ops if len(o.inputs) == 1]
        if edit == "replace":
            g.replace_uses(draw(st.sampled_from(values)), draw(st.sampled_from(values)))
        elif edit == "bypass" and single:
            g.remove_op(draw(st.sampled_from(single)).name)
        elif edit == "take_over":
            ok = [
                o
                for o in single
                if g.producer(o.inputs[0]) not in (None, o)  # a replace can make o read itself
                and g.consumers(o.inputs[0]) == [o]
                and o.inputs[0] not in g.outputs
            ]
            if ok:
                g.remove_op(draw(st.sampled_from(ok)).name, keep="output")
        elif edit == "append":  # by hand: the index notices the list grew
            g.ops.append(Op(f"new{step}", "act", (values[-1],), f"n{step}", {}, {}))
        _assert_index_right(g)
    return g


@settings(max_examples=150, deadline=None)
@given(edited_graphs())
def test_indexes_stay_consistent_through_random_edits(g):
    _assert_index_right(g)


def test_remove_op_bypasses_or_hands_over_its_value():
    """``keep="input"``: readers and graph outputs read the removed op's input; ``"output"``:
    the sole producer of its input takes over its value's name; both drop the dead value's
    space, and a value someone else reads cannot be handed over."""
    g = _graph(3, iter(["linear", "act", "act"]).__next__, lambda vs: vs[-1])
    g.remove_op("op2")
    assert g.outputs == ["v1"] and "v2" not in g.value_spaces
    g.remove_op("op1", keep="output")
    assert g.op("op0").output == "v1" and g.outputs == ["v1"] and "v0" not in g.value_spaces
    g.validate()
    h = _graph(3, iter(["linear", "act", "add"]).__next__, lambda vs: vs[min(1, len(vs) - 1)])
    with pytest.raises(ValueError, match="not written for it alone"):
        h.remove_op("op1", keep="output")  # v0 is read by op2 too
    with pytest.raises(ValueError, match="2 inputs"):
        h.remove_op("op2")


def test_removing_an_identity_op_keeps_the_function():
    """An affine map with scale 1, removed, leaves every output as it was (exactly)."""
    g = _graph(2, iter(["linear", "linear"]).__next__, lambda vs: vs[-1])
    g.ops.insert(1, Op("id", "affine", ("v0",), "id", {"scale": "one"}))
    g.op("op1").inputs = ("id",)
    g.reindex()
    g.tensors["one"] = TensorSpec((4,), ("h",), Source("one"))
    g.value_spaces["id"] = "h"
    g.validate()
    w = {f"w{i}": torch.randn(4, 4, dtype=torch.float64) for i in range(2)} | {
        "one": torch.ones(4, dtype=torch.float64)
    }
    x = {"x": torch.randn(3, 4, dtype=torch.float64)}
    before = run_graph(g, w, x, dtype=torch.float64)["v1"]
    g.remove_op("id")
    g.prune()
    g.validate()
    assert "one" not in g.tensors
    assert torch.equal(run_graph(g, w, x, dtype=torch.float64)["v1"], before)


def test_prune_drops_unused_tensors_values_and_spaces():
    g = _graph(2, iter(["linear", "linear"]).__next__, lambda vs: vs[-1])
    g.tensors["orphan"] = TensorSpec((2,), ("lonely",), Source("orphan"))
    g.spaces["lonely"] = Space("lonely", 2, "hidden")
    g.spaces["unused"] = Space("unused", 3, "hidden")
    g.value_spaces["gone"] = "h"
    g.prune()
    assert set(g.tensors) == {"w0", "w1"}
    assert set(g.spaces) == {"h"}
    assert "gone" not in g.value_spaces and {"x", "v0", "v1"} <= set(g.value_spaces)


def test_copy_is_independent_and_shares_only_immutable_parts():
    g = _graph(3, iter(["linear", "act", "add"]).__next__, lambda vs: vs[-1])
    g.info["assumptions"] = [{"what": "eps"}]
    text = g.to_json()
    c = g.copy()
    assert c.to_json() == text
    assert c.spaces["h"] is g.spaces["h"]  # frozen: shared
    assert c.tensors["w0"].source is g.tensors["w0"].source
    c.op("op1").attrs["fn"] = "tanh"
    c.op("op0").params["bias"] = "b"
    c.remove_op("op1")
    c.tensors["w0"].dtype = "F16"
    c.info["assumptions"][0]["what"] = "groups"
    c.inputs[0].max_len = 9
    assert g.to_json() == text
    _assert_index_right(g)
    _assert_index_right(c)


def test_an_indexed_graph_serialises_as_before():
    """The index is no part of the graph's JSON (the stored format is unchanged)."""
    g = _graph(4, iter(["linear", "act", "add", "act"]).__next__, lambda vs: vs[-1])
    text = g.to_json()
    g.consumers("v0")
    assert g.to_json() == text and "_index" not in json.loads(text)
    assert Graph.from_json(text).to_json() == text
