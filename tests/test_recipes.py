"""The shared recipe engine: names, versions, precision and row blocks.

Expected values are written with plain torch on the stored tensors, not with the engine.
"""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from normtool.graph import Graph, Source, Space, TensorSpec
from normtool.io.store import open_checkpoint
from normtool.model import Model, RowBlocks
from normtool.passes import recipes
from normtool.passes.recipes import Ctx, Engine, Recipe


def _model(tmp_path, rows: int = 10) -> tuple[Model, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    sd = {"w": torch.randn(rows, 3, generator=g), "s": torch.rand(3, generator=g) + 0.5}
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    graph = Graph(
        family="test",
        inputs=[],
        outputs=[],
        ops=[],
        spaces={"a": Space("a", rows, "hidden"), "b": Space("b", 3, "hidden")},
        tensors={
            "w": TensorSpec((rows, 3), ("a", "b"), Source("w")),
            "s": TensorSpec((3,), ("b",), Source("s")),
        },
        value_spaces={},
    )
    return Model(graph, open_checkpoint(path)), sd


def _scaled(src: str, ctx: Ctx) -> torch.Tensor:
    return ctx.get(src).to(ctx.work) * ctx.get("s", False).to(ctx.work)


def test_a_recipe_reading_its_own_name_reads_the_source(tmp_path):
    model, sd = _model(tmp_path)
    e = Engine(model)
    e.put("w", Recipe((10, 3), "F32", lambda c: _scaled("w", c), rows_from="w"))
    assert torch.equal(e.tensor("w", exact=False), sd["w"] * sd["s"])


def test_versions_compose_unrounded(tmp_path):
    """A second rewrite of ``w`` reads the first through ``current``: w·s·s, in float64 when
    exact (no float32 rounding in between), in the stored dtype otherwise."""
    model, sd = _model(tmp_path)
    e = Engine(model)
    e.put("w", Recipe((10, 3), "F32", lambda c: _scaled("w", c), "w", precision="f64"))
    first = e.current("w")
    assert first != "w"
    e.put("w", Recipe((10, 3), "F32", lambda c: _scaled(first, c), "w", precision="f64"))
    want = sd["w"].double() * sd["s"].double() ** 2
    assert torch.equal(e.tensor("w", exact=True), want)
    assert torch.equal(e.tensor("w", exact=False), want.float())


def test_large_separable_tensors_stream_in_row_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(recipes, "BLOCK_ROWS", 4)
    model, sd = _model(tmp_path)
    e = Engine(model)
    read: list[tuple[int, int]] = []
    get_rows = model.checkpoint.get_rows
    model.checkpoint.get_rows = lambda k, a, b: read.append((a, b)) or get_rows(k, a, b)
    e.put("w", Recipe((10, 3), "F32", lambda c: _scaled("w", c), rows_from="w"))
    lazy = e.model(model.graph, exact=False).overrides["w"]
    assert isinstance(lazy, RowBlocks)
    blocks = list(lazy.blocks())
    assert [len(b) for b in blocks] == [4, 4, 2] and read == [(0, 4), (4, 8), (8, 12)]
    assert torch.equal(torch.cat(blocks), sd["w"] * sd["s"])
    # not row-separable: computed whole, never in blocks
    e.put("w", Recipe((10, 3), "F32", lambda c: _scaled("w", c)))
    assert not isinstance(e.model(model.graph, exact=False).overrides["w"], RowBlocks)


def test_float32_arithmetic_only_where_the_recipe_allows(tmp_path):
    model, _ = _model(tmp_path)
    seen = []

    def spy(c: Ctx) -> torch.Tensor:
        seen.append(c.work)
        return c.get("w")

    e = Engine(model)
    e.put("w", Recipe((10, 3), "F32", spy))
    e.tensor("w", exact=False)
    e.tensor("w", exact=True)
    e.put("w", Recipe((10, 3), "F32", spy, precision="f64"))
    e.tensor("w", exact=False)
    assert seen == [torch.float32, torch.float64, torch.float64]
