"""What a model outputs when exported: its own outputs, its hidden states instead of its task
head (``--outputs hidden``), or a pooled sentence embedding (``--pooling mean|cls``).

Why a graph edit at export time rather than another adapter: every family's builder records
which value is the hidden state ``transformers`` calls ``last_hidden_state`` (after the final
norm and projection) and which is the pooler's output (``graph.info["hidden"]``,
``["pooler"]``), so one checkpoint with a head also serves embedding use. A transform that
rewrites those values (convert-ln-to-rms folds the final norm's γ/β into the head; fold re-bases
the stream) drops the record (``Graph.forget_hidden``) and says why, so a converted model's internal
values are never passed off as the original's hidden state.

Pooling follows sentence-transformers: ``mean`` averages the hidden states over the tokens the
``attention_mask`` keeps (``Σ m·h / max(Σ m, 1e-9)``), ``cls`` takes the first token;
``normalize`` divides by the L2 norm (``max(‖x‖, 1e-12)``). The output is
``sentence_embedding``, beside ``last_hidden_state``.
"""

from __future__ import annotations

from normtool.errors import NormtoolError
from normtool.graph import Graph, Op
from normtool.model import Model

OUTPUTS = ("model", "hidden")
POOLINGS = ("mean", "cls")


def _keep(graph: Graph, outputs: list[str]) -> None:
    """Make ``outputs`` the graph's outputs and drop every op they do not need."""
    needed, ops = set(outputs), []
    for op in reversed(graph.ops):
        if op.output in needed:
            ops.append(op)
            needed.update(op.inputs)
    graph.ops = ops[::-1]
    graph.outputs = list(outputs)
    graph.inputs = [i for i in graph.inputs if i.name in needed]
    graph.reindex()
    graph.prune()


def _rename(graph: Graph, value: str, name: str) -> None:
    """Value ``value`` (an op's output) is called ``name`` from now on."""
    if value == name:
        return
    for op in graph.ops:
        if op.output == value:
            op.output = name
        op.inputs = tuple(name if v == value else v for v in op.inputs)
    graph.outputs = [name if v == value else v for v in graph.outputs]
    graph.value_spaces[name] = graph.value_spaces.pop(value)
    graph.reindex()


def hidden_states(graph: Graph, where: object = None) -> Graph:
    """A copy of ``graph`` whose outputs are ``last_hidden_state`` and, where the model has a
    pooler, ``pooler_output``; NormtoolError where the graph does not record them."""
    hidden = graph.info.get("hidden")
    if hidden is None:
        why = graph.info.get("hidden_lost") or f"the {graph.family} graph does not record them"
        raise NormtoolError(f"no hidden states to export: {why}", where)
    pooler = graph.info.get("pooler")
    g = graph.copy()
    _keep(g, [hidden] + ([pooler] if pooler else []))
    _rename(g, hidden, "last_hidden_state")
    g.info["hidden"] = "last_hidden_state"
    if pooler:
        _rename(g, pooler, "pooler_output")
        g.info["pooler"] = "pooler_output"
    g.validate()
    return g


def sentence_embedding(graph: Graph, pooling: str, normalize: bool, where: object = None) -> Graph:
    """``hidden_states(graph)`` plus ``sentence_embedding``: the hidden states pooled
    (``mean`` over the attention mask, or the ``cls`` token), optionally L2-normalised."""
    g = hidden_states(graph, where)
    mask = next((i.name for i in g.inputs if i.kind == "mask"), None)
    if pooling == "mean" and mask is None:
        raise NormtoolError("--pooling mean needs a token model with an attention_mask", where)
    space = g.value_spaces["last_hidden_state"]
    if pooling == "mean":
        pooled = Op("pool.mean", "masked_mean", ("last_hidden_state", mask), "pool.mean")
    else:
        pooled = Op("pool.cls", "select", ("last_hidden_state",), "pool.cls", {}, {"index": 0})
    g.ops.append(pooled)
    g.value_spaces[pooled.output] = space
    value = pooled.output
    if normalize:
        g.ops.append(Op("pool.normalize", "l2norm", (value,), "pool.normalize"))
        g.value_spaces["pool.normalize"] = space
        value = "pool.normalize"
    g.outputs = ["last_hidden_state", value]
    _rename(g, value, "sentence_embedding")
    g.validate()
    return g


def check_choices(output: str, pooling: str | None, normalize: bool) -> None:
    """Refuse flag values that name no choice (before anything is read)."""
    if output not in OUTPUTS:
        raise NormtoolError(f"--outputs {output!r}: use {' or '.join(OUTPUTS)}")
    if pooling is not None and pooling not in POOLINGS:
        raise NormtoolError(f"--pooling {pooling!r}: use {' or '.join(POOLINGS)}")
    if normalize and pooling is None:
        raise NormtoolError("--normalize needs --pooling mean or cls")


def select_outputs(
    model: Model, output: str = "model", pooling: str | None = None, normalize: bool = False
) -> Model:
    """``model`` with the outputs asked for (``export``'s ``--outputs``, ``--pooling``,
    ``--normalize``); the model itself when nothing changes."""
    where = model.checkpoint.path if model.checkpoint else None
    check_choices(output, pooling, normalize)
    if pooling is not None:
        graph = sentence_embedding(model.graph, pooling, normalize, where)
    elif output == "hidden":
        graph = hidden_states(model.graph, where)
    else:
        return model
    overrides = {k: v for k, v in model.overrides.items() if k in graph.tensors}
    return Model(graph, model.checkpoint, overrides, model.history, model.assumptions)
