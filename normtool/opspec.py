"""One spec per op kind: what an op of that kind takes, what it may carry, and what the passes may
assume about it.

Why one table: what a kind allows was spread over the graph's param table, the executor's and the
emitter's dicts, an output-rank table and a private set in every pass, so a new kind took about
eight edits that only one test noticed. Here a kind is one ``OpSpec`` row; validation, the
executor, the emitter and the passes query its fields and traits instead of keeping sets.

Layering: this module sits beside ``normtool.graph`` at the bottom (no torch, no onnx). A kind's
torch function and ONNX emitter live in ``normtool.runtime.torch_exec`` and
``normtool.runtime.onnx_emit`` as the functions named ``_<kind>``; each of those modules binds
them with ``implementations`` when it is imported, which raises naming any kind of this table
without one — so a row without its implementations fails at import, in every test, not only
in the one that happens to use it. Adding a kind: one row here, ``_<kind>`` in both runtime
modules, a test.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Rank = Callable[[list[int]], int]
#: What an op pins for merge's permutations (``normtool.merge.groups``): ``groups``: with
#: ``groups > 1`` it treats channel groups of its input separately; ``grouped_map``: with
#: ``groups > 1`` it maps channel groups of one space to another; ``input``: its input's channels
#: have positions of their own within each head (rotary pairs): whole heads may move, channels
#: within a head may not.
Pins = Literal["", "groups", "grouped_map", "input"]


def _first(r: list[int]) -> int:
    return r[0]


def _const(n: int) -> Rank:
    return lambda r: n


#: Positions per batch row of an op's output from its attributes and its input's positions (a
#: token sequence's length, an image's H·W): what ``verify`` bounds one batch's memory by.
Positions = Callable[[Mapping[str, Any], int], int]


def _same(attrs: Mapping[str, Any], n: int) -> int:
    return n


def _one(attrs: Mapping[str, Any], n: int) -> int:
    return 1


def _strided(*names: str) -> Positions:
    """Positions after a stride (the first of ``names`` set): ``⌈n / stride²⌉``."""

    def positions(attrs: Mapping[str, Any], n: int) -> int:
        step = next((int(attrs[k]) for k in names if attrs.get(k)), 1)
        return -(-n // (step * step))

    return positions


@dataclass(frozen=True)
class OpSpec:
    """One op kind. ``inputs``: how many values it reads; ``required``/``optional``: its param
    roles; ``optional_inputs``: how many more values it may read after those (attention's
    padding mask); ``rank``: its output's rank from its inputs' ranks; ``attrs``: attributes it cannot
    run without; ``eps_attrs``: attributes that must be finite numbers > 0; ``int_attrs``:
    integer attributes and their least value (absent ones take the executor's default).

    Traits (what the passes ask instead of keeping their own sets of kinds):

    * ``norm``: it normalises (inspect lists it; fold and convert look for it);
    * ``token_stats``: it normalises with each token's own statistics (layer/RMS norms);
    * ``affine_at_inference``: at inference it is a per-channel affine map ``s ⊙ x + t`` (fold
      removes it);
    * ``absorbs_affine``: a layer mixing channels by weights that can absorb a per-channel map on
      its input or output (fold);
    * ``commutes_affine``: a per-channel affine map on its input may move to its output:
      ``always``, or ``positive`` (only for a positive scale: a max);
    * ``carries_stream``: the residual stream flows through it with its mean kept (sums,
      prepending a token, picking one: convert-ln-to-rms);
    * ``writes_stream``: its weights produce what it writes into the stream, so they can be
      centred (convert-ln-to-rms);
    * ``shape_only``: it reads only its input's shape, and its value is the same for every item
      of the batch (position tables: broadcast ``[1, T, C]``);
    * ``picks_tokens``: it passes its input's channels on unchanged, for some tokens;
    * ``size_free``: on a ``[B, C, H, W]`` map it works at any height and width;
    * ``skip_fusable``: ONNX Runtime has a Skip*Normalization kernel taking the residual add
      before it;
    * ``pins``: what it forbids merge to permute (``Pins``);
    * ``positions``: its output's positions per batch row (``Positions``), and ``scores``: it
      makes a ``heads × n × n`` score matrix — what ``verify`` estimates memory from.
    """

    kind: str
    inputs: int
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    rank: Rank = _first
    attrs: tuple[str, ...] = ()
    eps_attrs: tuple[str, ...] = ()
    int_attrs: Mapping[str, int] = field(default_factory=dict)
    norm: bool = False
    token_stats: bool = False
    affine_at_inference: bool = False
    absorbs_affine: bool = False
    commutes_affine: Literal["", "always", "positive"] = ""
    carries_stream: bool = False
    writes_stream: bool = False
    shape_only: bool = False
    picks_tokens: bool = False
    size_free: bool = False
    skip_fusable: bool = False
    pins: Pins = ""
    positions: Positions = _same
    scores: bool = False
    optional_inputs: int = 0

    @property
    def roles(self) -> tuple[str, ...]:
        return self.required + self.optional


_CONV_INTS = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1}

_TABLE = (
    OpSpec("embed", 1, ("weight",), rank=lambda r: r[0] + 1, writes_stream=True),
    OpSpec(
        "positions",
        1,
        ("weight",),
        rank=_const(3),
        int_attrs={"offset": 0},
        writes_stream=True,
        shape_only=True,
    ),
    OpSpec(
        "id_positions",
        1,
        ("weight",),
        rank=lambda r: r[0] + 1,
        attrs=("pad",),
        int_attrs={"pad": 0},
        writes_stream=True,
    ),
    OpSpec(
        "row",
        1,
        ("weight",),
        rank=_const(3),
        int_attrs={"index": 0},
        writes_stream=True,
        shape_only=True,
        positions=_one,
    ),
    OpSpec(
        "patch_embed",
        1,
        ("weight",),
        ("bias",),
        rank=_const(3),
        attrs=("patch",),
        int_attrs={"patch": 1},
        writes_stream=True,
        positions=_strided("patch"),
    ),
    OpSpec(
        "mask_positions",
        1,
        ("weight",),
        rank=lambda r: r[0] + 1,
        attrs=("offset",),
        int_attrs={"offset": 1},
        writes_stream=True,
    ),
    OpSpec("cls_concat", 1, ("token",), carries_stream=True, positions=lambda a, n: n + 1),
    OpSpec("add", 2, rank=max, carries_stream=True, size_free=True),
    OpSpec("mul", 2, rank=max, size_free=True),
    OpSpec("mean", 2, rank=max),
    OpSpec("linear", 1, ("weight",), ("bias",), writes_stream=True, absorbs_affine=True),
    OpSpec(
        "layernorm",
        1,
        (),
        ("weight", "bias"),
        eps_attrs=("eps",),
        norm=True,
        token_stats=True,
        skip_fusable=True,
    ),
    OpSpec(
        "layernorm2d",
        1,
        (),
        ("weight", "bias"),
        eps_attrs=("eps",),
        norm=True,
        token_stats=True,
        size_free=True,
    ),
    OpSpec(
        "rmsnorm",
        1,
        (),
        ("weight",),
        eps_attrs=("eps",),
        norm=True,
        token_stats=True,
        skip_fusable=True,
    ),
    OpSpec("crmsnorm", 1, (), ("weight",), eps_attrs=("eps",), norm=True, token_stats=True),
    OpSpec(
        "group_rmsnorm",
        1,
        attrs=("groups",),
        eps_attrs=("eps",),
        norm=True,
        token_stats=True,
        pins="groups",
    ),
    OpSpec(
        "unorm",
        1,
        ("weight", "bias", "running_var"),
        eps_attrs=("eps",),
        norm=True,
        affine_at_inference=True,
        size_free=True,
    ),
    OpSpec(
        "powernorm",
        1,
        ("weight", "bias", "running_phi"),
        attrs=("groups",),
        eps_attrs=("eps", "gs_eps"),
        norm=True,
        affine_at_inference=True,
        pins="groups",
    ),
    OpSpec(
        "batchnorm",
        1,
        ("weight", "bias", "running_mean", "running_var"),
        eps_attrs=("eps",),
        norm=True,
        affine_at_inference=True,
        size_free=True,
    ),
    OpSpec("affine", 1, ("scale",), ("shift",), size_free=True),
    OpSpec("act", 1, attrs=("fn",), size_free=True),
    OpSpec(
        "attention",
        3,
        attrs=("heads",),
        int_attrs={"kv_heads": 1, "window": 0},
        optional_inputs=1,
        scores=True,
    ),
    OpSpec(
        "select",
        1,
        rank=lambda r: r[0] - 1,
        int_attrs={"index": 0},
        commutes_affine="always",
        carries_stream=True,
        picks_tokens=True,
        positions=_one,
    ),
    OpSpec(
        "pick_token",
        2,
        rank=lambda r: r[0] - 1,
        attrs=("eos",),
        picks_tokens=True,
        positions=_one,
    ),
    OpSpec(
        "conv2d",
        1,
        ("weight",),
        ("bias",),
        int_attrs=_CONV_INTS,
        writes_stream=True,
        absorbs_affine=True,
        size_free=True,
        pins="grouped_map",
        positions=_strided("stride"),
    ),
    OpSpec(
        "ws_conv2d",
        1,
        ("weight",),
        ("bias",),
        attrs=("variant", "eps"),
        int_attrs=_CONV_INTS,
        size_free=True,
        pins="grouped_map",
        positions=_strided("stride"),
    ),
    OpSpec(
        "maxpool2d",
        1,
        attrs=("kernel",),
        int_attrs={"kernel": 1, "stride": 1, "padding": 0},
        commutes_affine="positive",
        size_free=True,
        positions=_strided("stride", "kernel"),
    ),
    OpSpec("global_avgpool", 1, rank=_const(2), commutes_affine="always", positions=_one),
    OpSpec("softcap", 1, attrs=("cap",), eps_attrs=("cap",)),
    OpSpec("head_rmsnorm", 1, (), ("weight",), attrs=("heads",), eps_attrs=("eps",), pins="input"),
    OpSpec("masked_mean", 2, rank=lambda r: r[0] - 1, positions=_one),
    OpSpec("l2norm", 1),
    OpSpec("loki", 1, ("d2",), rank=_const(1), positions=_one),
    OpSpec("rope", 1, attrs=("heads",), pins="input"),
)

#: Every op kind, by name.
SPECS: Mapping[str, OpSpec] = {s.kind: s for s in _TABLE}


def kinds(trait: str, value: Any = True) -> frozenset[str]:
    """The kinds whose ``trait`` equals ``value`` (for messages and sets that list kinds)."""
    return frozenset(k for k, s in SPECS.items() if getattr(s, trait) == value)


def implementations(namespace: Mapping[str, Any], what: str) -> dict[str, Callable[..., Any]]:
    """``{kind: namespace['_<kind>']}`` for every kind; RuntimeError naming the kinds without
    one (a runtime module calls this on import, so a missing implementation cannot go unseen)."""
    missing = [k for k in SPECS if not callable(namespace.get(f"_{k}"))]
    if missing:
        raise RuntimeError(f"no {what} for op kinds {missing}")
    return {k: namespace[f"_{k}"] for k in SPECS}
