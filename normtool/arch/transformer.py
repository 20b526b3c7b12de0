"""Transformer families as data: one generic graph builder driven by per-family layouts.

Why data: GPT-2, OPT, ViT, BERT, timm ViTs and normtool's own transformer share one structure
(embeddings → blocks of attention + MLP with norms → optional final norm → head) and differ in
names, storage and a few switches. Each family is a JSON layout in ``arch/families/`` (weight
name templates with ``{i}``, config keys, fused/transposed storage, tied names, norm placement);
this module turns a layout plus a checkpoint into the canonical graph (names in
``normtool.graph``'s docstring and COMMON naming: ``tok_emb``, ``blocks.{i}.attn.q``…).

Layout keys
-----------
``detect``      ``architectures`` / ``model_type`` matched against the config, or (no config)
                ``keys`` that must all exist; ``refused``: architectures of the family that are
                recognised only to be refused, with the reason (CLIPModel).
``settings``    each a constant or ``{"config": key, "default": v, "map": {...}, "nonzero": b}``:
                heads, layers, eps, stat_eps (UN/PowerNorm/BatchNorm eps), pn_groups (PowerNorm's
                group count; the head count when absent), act, tie, placement (pre|post),
                parallel, parallel_norm2 (Pre-LN parallel blocks whose MLP branch reads norm2,
                GPT-NeoX; else both branches read norm1), causal, norm (a kind, or ``auto``: recognised from buffers), classify
                (head on token 0), pos_offset, pos_pad (RoBERTa: positions counted over the
                tokens that are not this padding id, from it + 1), positions (``table``: rows
                0..T−1; ``ids``: a ``position_ids`` input; ``mask``: counted over the attention
                mask, as OPT does), eos and eos_argmax (the EOS id CLIP's text tower pools at;
                the id for which it pools the largest id instead), affine (every norm stores its
                weight and bias: a missing one is refused, not read as 1 and 0; off for
                normtool's models, whose norms may be weightless). ``"assumed": why`` marks a
                setting the files usually do not record (timm's eps, PowerNorm's groups): unless
                the config has its key, the value is an assumption — stated to the user and
                recorded — and the matching flag (``--eps``, ``--pn-groups``) replaces it. A flag
                that contradicts a recorded value is refused.
``require``     config values the builder supports (anything else is refused by name).
``embed``       ``tok``/``pos``/``type`` tensor keys, ``norm`` and ``project_in`` prefixes; or for
                images ``patch`` (conv prefix, bias optional), ``cls``, ``dist`` (DeiT's
                distillation token, after the class token), ``pos``.
``block``       prefixes with ``{i}``: norm1, norm2, q/k/v or fused ``qkv``, o, fc1, fc2;
                ``conv1d``: linears stored ``[in, out]`` (GPT-2); ``qkv_per_head``: the fused
                ``qkv`` holds each head's q, k, v together (GPT-NeoX); ``scale1``/``scale2``: keys of
                a per-channel layer scale on the attention / MLP branch (DINOv2).
``norm_f``, ``project_out``, ``head`` (``linear``, ``tied`` key, ``bias`` key when the head's
                bias is stored apart from it, ``pooler``, ``pooler_act``, an MLM ``transform``
                linear and ``transform_norm``). A head without ``linear`` is a base model's: the
                outputs are ``last_hidden_state`` and, with a pooler, ``pooler_output``; or with
                ``pool`` (``first`` token, or ``eos``: CLIP's text tower) and an optional
                ``pool_norm``, ``pooler_output`` is that token (normalised); with ``projection``
                (a linear's prefix) it is projected and output as ``projection_output``. ``distill``: a
                second classifier on token 1 whose logits are averaged with ``linear``'s
                (DeiT with teacher).
``optional``    parts used only when present; ``ignore``: key templates that are not weights.
``variants``    by config architecture (``BertForMaskedLM``, ``GPT2Model``…): the ``head``,
                ``optional`` parts and ``settings`` that differ from the common layout. The
                config's architecture chooses; without one, the first variant holding any of
                its ``keys`` (the one without ``keys`` otherwise). A config of this family
                naming an architecture no variant computes is refused: a base model must not
                gain an invented head, nor a head class lose its own.
``base_prefix`` the base model's key prefix (``transformer.``); checkpoints saved from the base
                model (as on the Hub: ``h.0.attn.c_attn.weight``) are read without it.

A linear prefix ``P`` means ``P.weight`` and, when stored, ``P.bias``. Every checkpoint tensor
must be described or ignored: an unexplained tensor means the layout does not fit (another
architecture, an unsupported variant) and is refused rather than silently dropped.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from normtool.arch.builder import GraphBuilder
from normtool.arch.family import BuildOptions, Family
from normtool.arch.hf_config import activation, model_config
from normtool.arch.rope_config import rope_attrs
from normtool.errors import NormtoolError
from normtool.graph import Graph, InputSpec, Op
from normtool.io.store import Checkpoint

LAYOUT_DIR = Path(__file__).parent / "families"

#: Detection order: configs are matched exactly; key-only detection (timm) comes last.
ORDER = (
    "normtool_transformer",
    "gpt2",
    "opt",
    "vit",
    "deit",
    "dinov2",
    "clip_vision",
    "clip_text",
    "bert",
    "distilbert",
    "roberta",
    "gpt_neox",
    "phi",
    "llama",
    "mistral",
    "qwen2",
    "gemma2",
    "gemma3_text",
    "timm_vit",
)

#: Config norm names → graph op kinds.
NORM_NAMES = {
    "layernorm": "layernorm",
    "rmsnorm": "rmsnorm",
    "crmsnorm": "crmsnorm",
    "powernorm": "powernorm",
    "un": "unorm",
    "unorm": "unorm",
    "batchnorm": "batchnorm",
}

#: Per norm kind: graph params (role → stored suffix, required?) and training buffers that
#: inference does not use (described, so they are not "unexplained", but not in the graph).
NORM_PARAMS: dict[str, tuple[tuple[tuple[str, bool], ...], tuple[str, ...]]] = {
    "layernorm": ((("weight", False), ("bias", False)), ()),
    "rmsnorm": ((("weight", False),), ()),
    "crmsnorm": ((("weight", False),), ()),
    "powernorm": ((("weight", True), ("bias", True), ("running_phi", True)), ("ema_gz", "iters")),
    "unorm": (
        (("weight", True), ("bias", True), ("running_var", True)),
        ("ema_gz", "iters", "buffer_x2", "buffer_gz", "skip_counter"),
    ),
    "batchnorm": (
        (("weight", True), ("bias", True), ("running_mean", True), ("running_var", True)),
        ("num_batches_tracked",),
    ),
}

#: Group-scaling eps of PowerNorm (fixed in the reference implementation).
GS_EPS = 1e-5


@cache
def layouts() -> dict[str, dict[str, Any]]:
    """Every family layout shipped in ``arch/families``, by name (each checked)."""
    read = {f.name: json.loads(f.read_text(encoding="utf-8")) for f in LAYOUT_DIR.glob("*.json")}
    named = {d["name"]: d for d in read.values()}
    out = {}
    for where, d in sorted(read.items()):
        d = _extended(named, d, where)
        check_layout(d, where)
        out[d["name"]] = d
    return out


def _extended(
    named: dict[str, dict[str, Any]], d: dict[str, Any], where: str, seen: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``d`` with what it ``extends`` (itself extended first): the other's keys, with
    ``settings``, ``require`` and ``block`` merged key by key and every other key of ``d``
    replacing the base's (Mistral and Qwen2 are Llama's layout under other names, with a
    setting or a requirement of their own; Gemma 3 is Gemma 2's with q/k norms)."""
    if "extends" not in d:
        return d
    base = named.get(d["extends"])
    if base is None or d["name"] in seen:
        raise ValueError(f"family layout {where}: extends {d['extends']!r}, unknown or a cycle")
    base = _extended(named, base, where, (*seen, d["name"]))
    merged = {**base, **{k: v for k, v in d.items() if k != "extends"}}
    for key in ("settings", "require", "block"):
        merged[key] = {**base.get(key, {}), **d.get(key, {})}
    return merged


_LAYOUT_KEYS = {
    "": {
        "name",
        "description",
        "base_prefix",
        "detect",
        "settings",
        "require",
        "embed",
        "block",
        "norm_f",
        "project_out",
        "head",
        "optional",
        "ignore",
        "variants",
        "extends",
    },
    "detect": {"architectures", "model_type", "keys", "refused"},
    "embed": {"tok", "pos", "type", "norm", "project_in", "patch", "cls", "dist"},
    "block": {
        "norm1",
        "norm2",
        "q",
        "k",
        "v",
        "qkv",
        "o",
        "gate",
        "fc1",
        "fc2",
        "conv1d",
        "qkv_per_head",
        "scale1",
        "scale2",
        "post1",
        "post2",
        "q_norm",
        "k_norm",
    },
    "head": {
        "linear",
        "tied",
        "bias",
        "pooler",
        "pooler_act",
        "transform",
        "transform_norm",
        "pool",
        "pool_norm",
        "distill",
        "projection",
        "projection_output",
    },
}
_VARIANT_KEYS = {"keys", "settings", "head", "optional"}
_SETTING_KEYS = {"config", "default", "map", "nonzero", "assumed"}


def check_layout(d: dict[str, Any], where: str) -> None:
    """Refuse a layout with unknown or missing keys: a typo in data must not be ignored."""
    problems = []
    for section, allowed in _LAYOUT_KEYS.items():
        part = d if not section else d.get(section, {})
        where_in = f"{section}." if section else ""
        problems += [f"unknown key {where_in}{k}" for k in sorted(set(part) - allowed)]
    for name, spec in d.get("settings", {}).items():
        if name not in Settings.__dataclass_fields__:
            problems.append(f"unknown setting {name}")
        elif isinstance(spec, dict) and (set(spec) - _SETTING_KEYS or "config" not in spec):
            problems.append(f"setting {name} needs 'config' and only {sorted(_SETTING_KEYS)}")
    block = d.get("block", {})
    needed = {"norm1", "o", "fc1", "fc2"} | ({"qkv"} if "qkv" in block else {"q", "k", "v"})
    problems += [f"block lacks {k}" for k in sorted(needed - set(block))]
    problems += [f"lacks {k}" for k in ("name", "description", "detect", "head") if k not in d]
    for name, v in d.get("variants", {}).items():
        problems += [f"unknown key variants.{name}.{k}" for k in sorted(set(v) - _VARIANT_KEYS)]
        unknown = sorted(set(v.get("head", {})) - _LAYOUT_KEYS["head"])
        problems += [f"unknown key variants.{name}.head.{k}" for k in unknown]
        if name not in d.get("detect", {}).get("architectures", ()):
            problems.append(f"variant {name} is not in detect.architectures")
    if "variants" in d and sum(not v.get("keys") for v in d["variants"].values()) != 1:
        problems.append("variants need exactly one without keys (the fallback)")
    if problems:
        raise ValueError(f"family layout {where}: " + "; ".join(problems))


# ---- settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    heads: int
    layers: int
    eps: float
    stat_eps: float
    pn_groups: int
    act: str
    tie: bool
    placement: str
    parallel: bool
    parallel_norm2: bool
    causal: bool
    norm: str
    classify: bool
    pos_offset: int
    pos_pad: int | None
    positions: str
    affine: bool
    eos: int
    eos_argmax: int | None
    kv_heads: int
    head_dim: int
    rope: bool
    window: int
    max_len: int
    window_pattern: int
    embed_scale: bool
    norm_offset: float
    attn_scalar: float | None
    attn_softcap: float | None
    logit_softcap: float | None


_DEFAULTS: dict[str, Any] = {
    "eps": 1e-5,
    "tie": False,
    "parallel": False,
    "parallel_norm2": False,
    "causal": False,
    "classify": False,
    "pos_offset": 0,
    "pos_pad": None,
    "positions": "table",
    "affine": False,
    "eos": -1,
    "eos_argmax": None,
    "kv_heads": None,
    "head_dim": None,
    "rope": False,
    "window": None,
    "max_len": 0,
    "window_pattern": 1,
    "embed_scale": False,
    "norm_offset": 0.0,
    "attn_scalar": None,
    "attn_softcap": None,
    "logit_softcap": None,
}

_MISSING = object()


def _setting(layout: dict, name: str, cfg: dict, ck: Checkpoint) -> Any:
    spec = layout["settings"].get(name, _DEFAULTS.get(name, _MISSING))
    if not isinstance(spec, dict):
        return spec
    value = cfg.get(spec["config"], spec.get("default", _MISSING))
    if value is _MISSING:
        return _MISSING
    if spec.get("nonzero"):
        return bool(value)
    if "map" in spec:
        key = str(value).lower() if isinstance(value, bool) else str(value)
        if key not in spec["map"]:
            raise NormtoolError(f"config {spec['config']}={value!r} is not supported", ck.path)
        return spec["map"][key]
    return value


def _assumed(layout: dict, ck: Checkpoint) -> dict[str, str]:
    """Setting name → why, for the settings marked ``assumed`` that the config does not record."""
    cfg = model_config(ck) or {}
    return {
        name: spec["assumed"]
        for name, spec in layout["settings"].items()
        if isinstance(spec, dict) and "assumed" in spec and spec["config"] not in cfg
    }


def _named(layout: dict, name: str) -> str:
    """How the user knows a setting: the config key it is read from, else its own name."""
    spec = layout["settings"].get(name)
    return f"config {spec['config']}" if isinstance(spec, dict) else name


def _count(value: Any, what: str, ck: Checkpoint) -> int:
    """A head or group count from a config (any JSON value): a positive integer, or refused.

    Why checked here: 0 divides by zero, -4 makes negative shapes, null or "x" fail deep in
    the executor — a config from a stranger must fail at the line that read it."""
    whole = isinstance(value, int | float) and not isinstance(value, bool)
    if not whole or not math.isfinite(value) or value != int(value) or value < 1:
        raise NormtoolError(f"{what} = {value!r} is not a positive integer", ck.path)
    return int(value)


def _check_eps(value: Any, what: str, ck: Checkpoint) -> None:
    """A norm's eps: a finite number above 0 (a negative one can make the variance plus eps
    zero or negative: NaN outputs), or refused."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise NormtoolError(f"{what} = {value!r} is not a finite number above 0", ck.path)


def _settings(layout: dict, ck: Checkpoint, opts: BuildOptions, block_count: int) -> Settings:
    cfg = model_config(ck) or {}
    for key, want in layout.get("require", {}).items():
        if key in cfg and cfg[key] != want:
            raise NormtoolError(
                f"config {key}={cfg[key]!r} is not supported by the {layout['name']} adapter "
                f"(needs {want!r})",
                ck.path,
            )
    s = {n: _setting(layout, n, cfg, ck) for n in Settings.__dataclass_fields__}
    heads = s["heads"]
    if heads is _MISSING:
        if opts.heads is None:
            raise NormtoolError(
                f"the {layout['name']} checkpoint does not say how many attention heads it has; "
                "pass --heads N",
                ck.path,
            )
        heads = opts.heads
    elif opts.heads is not None and opts.heads != heads:
        raise NormtoolError(f"--heads {opts.heads} contradicts the config's {heads}", ck.path)
    if s["layers"] is not _MISSING and s["layers"] != block_count:
        raise NormtoolError(
            f"config says {s['layers']} layers but the checkpoint has {block_count} blocks", ck.path
        )
    for name in ("act", "placement", "norm"):
        if s[name] is _MISSING:
            raise NormtoolError(f"config lacks {name!r}", ck.path)
    if s["stat_eps"] is _MISSING:
        s["stat_eps"] = s["eps"]
    if s["pn_groups"] is _MISSING:
        s["pn_groups"] = heads
    if s["kv_heads"] in (_MISSING, None):
        s["kv_heads"] = heads
    s["head_dim"] = 0 if s["head_dim"] in (_MISSING, None) else s["head_dim"]
    s["window"] = 0 if s["window"] in (_MISSING, None) else s["window"]
    if s["positions"] not in ("table", "ids", "mask"):
        raise NormtoolError(f"positions {s['positions']!r} is not table, ids or mask", ck.path)
    if s["placement"] not in ("pre", "post"):
        raise NormtoolError(f"norm placement {s['placement']!r} is not pre or post", ck.path)
    if s["norm"] != "auto" and s["norm"] not in NORM_NAMES:
        raise NormtoolError(f"norm {s['norm']!r} is not supported", ck.path)
    for name in ("eps", "stat_eps"):
        _check_eps(s[name], _named(layout, name), ck)
    for name in ("pos_pad", "eos"):
        if s[name] is not None and not (type(s[name]) is int and s[name] >= -1):
            raise NormtoolError(f"{_named(layout, name)} = {s[name]!r} is not a token id", ck.path)
    if s["eos"] == s["eos_argmax"]:  # CLIP's legacy configs: the pooled token is the largest id
        s["eos"] = -1
    return Settings(
        **{
            **s,
            "heads": _count(heads, _named(layout, "heads"), ck),
            "pn_groups": _count(s["pn_groups"], _named(layout, "pn_groups"), ck),
            "kv_heads": _count(s["kv_heads"], _named(layout, "kv_heads"), ck),
            "head_dim": s["head_dim"] and _count(s["head_dim"], _named(layout, "head_dim"), ck),
            "window": s["window"] and _count(s["window"], _named(layout, "window"), ck),
            "max_len": 0 if s["max_len"] is _MISSING else int(s["max_len"] or 0),
            "rope": bool(s["rope"]),
            "layers": block_count,
            "act": activation(str(s["act"]), ck),
            "tie": bool(s["tie"]),
            "parallel": bool(s["parallel"]),
            "parallel_norm2": bool(s["parallel_norm2"]) and bool(s["parallel"]),
            "causal": bool(s["causal"]),
        }
    )


# ---- detection -------------------------------------------------------------------------------


def _fill(template: str, i: int) -> str:
    return template.replace("{i}", str(i))


def detect(layout: dict, ck: Checkpoint) -> bool:
    """Config match (``architectures`` first, else ``model_type``); key match only for configs
    that name neither (no config, or timm's own ``config.json``)."""
    rule = layout["detect"]
    cfg = model_config(ck) or {}
    archs = cfg.get("architectures")
    if isinstance(archs, list) and archs:
        return any(
            a in rule.get("architectures", ()) or a in rule.get("refused", {}) for a in archs
        )
    if cfg.get("model_type") is not None:
        return cfg["model_type"] in rule.get("model_type", ())
    keys = rule.get("keys")
    return bool(keys) and all(_fill(k, 0) in ck for k in keys)


def _with_variant(layout: dict, ck: Checkpoint) -> dict:
    """``layout`` with the variant ``ck`` is merged in (see ``variants``), or NormtoolError for
    a config of this family that names an architecture the layout does not compute."""
    cfg = model_config(ck) or {}
    archs = cfg.get("architectures") if isinstance(cfg.get("architectures"), list) else []
    refused = layout["detect"].get("refused", {})
    for a in archs:
        if a in refused:
            raise NormtoolError(f"config architectures {archs}: {a} {refused[a]}", ck.path)
    known = layout["detect"].get("architectures", [])
    ours = cfg.get("model_type") in layout["detect"].get("model_type", ())
    if ours and archs and not set(archs) & set(known):
        raise NormtoolError(
            f"config architectures {archs}: the {layout['name']} adapter computes only "
            f"{', '.join(known)}; refusing rather than computing another model",
            ck.path,
        )
    variants = layout.get("variants")
    if not variants:
        return layout
    name = next((a for a in archs if a in variants), None)
    if name is None:
        keyed = (n for n, v in variants.items() if any(k in ck for k in v.get("keys", ())))
        name = next(keyed, None) or next(n for n, v in variants.items() if not v.get("keys"))
    v = variants[name]
    settings = {**layout.get("settings", {}), **v.get("settings", {})}
    rest = {k: x for k, x in v.items() if k not in ("keys", "settings")}
    return {**layout, **rest, "settings": settings, "variant": name}


def _block_count(layout: dict, ck: Checkpoint) -> int:
    probe = layout["block"]["o"] + ".weight"
    n = 0
    while _fill(probe, n) in ck:
        n += 1
    if n == 0:
        raise NormtoolError(
            f"no transformer blocks found (expected {_fill(probe, 0)!r} for {layout['name']})",
            ck.path,
        )
    return n


# ---- graph construction ----------------------------------------------------------------------


class _Build:
    """One graph build: the builder plus the layout, settings and keys described so far."""

    def __init__(self, layout: dict, ck: Checkpoint, s: Settings, opts: BuildOptions) -> None:
        self.layout, self.ck, self.s, self.opts = layout, ck, s, opts
        self.assumed = _assumed(layout, ck)
        self.b = GraphBuilder(layout["name"], ck)
        self.described: set[str] = set()
        self.ropes: dict[str, dict[str, Any]] = {}  # layer type → rope attrs
        self.mask: str | None = None  # the attention_mask input of token models

    def present(self, part: str, prefix: str | None) -> bool:
        """Whether an optional part (``project_in``, ``norm_f``…) is in the checkpoint."""
        if prefix is None:
            return False
        stored = self.ck.keys()
        here = any(k.startswith(prefix + ".") or k == prefix for k in stored)
        if not here and part not in self.layout.get("optional", ()):
            raise NormtoolError(
                f"expected tensors under {prefix!r} ({self.layout['name']} {part})", self.ck.path
            )
        return here

    def linear(
        self,
        name: str,
        x: str,
        prefix: str,
        out_space: str,
        in_space: str,
        conv1d: bool = False,
        part: tuple[int, int] | None = None,
        output: str | None = None,
    ) -> str:
        """A linear op ``name`` reading ``prefix.weight`` (``+ .bias`` when stored).

        ``conv1d``: stored ``[in, out]``; ``part=(j, n)``: the j-th of n equal slices along the
        output axis of a fused weight (q, k, v of ``c_attn`` / ``qkv``) — or, with the layout's
        ``qkv_per_head``, the j-th of n slices within each head's block (GPT-NeoX).
        """
        b, wk, bk = self.b, prefix + ".weight", prefix + ".bias"
        w_slice = b_slice = None
        if part is not None:
            j, n = part
            size = self.b.spaces[out_space].size
            rows = self.ck.shape(wk)[1 if conv1d else 0] if wk in self.ck else 0
            if rows != n * size:
                raise NormtoolError(
                    f"fused tensor {wk!r} should have {n}×{size} outputs", self.ck.path
                )
            if self.layout["block"].get("qkv_per_head"):
                dim = size // self.b.spaces[out_space].heads
                w_slice = (1 if conv1d else 0, j * dim, (j + 1) * dim, n * dim)
            else:
                w_slice = (1 if conv1d else 0, j * size, (j + 1) * size)
            b_slice = (0, *w_slice[1:])
        params = {
            "weight": b.tensor(
                f"{name}.weight", wk, (out_space, in_space), w_slice, transpose=conv1d
            )
        }
        if bk in self.ck:
            params["bias"] = b.tensor(f"{name}.bias", bk, (out_space,), b_slice)
        if output is None:
            return b.op("linear", name, [x], out_space, params)
        b.ops.append(Op(name, "linear", (x,), output, params))
        b.value_spaces[output] = out_space
        return output

    def norm(self, name: str, x: str, prefix: str) -> str:
        kind = self._norm_kind(prefix)
        roles, buffers = NORM_PARAMS[kind]
        params = {}
        for role, required in roles:
            key = f"{prefix}.{role}"
            if key in self.ck:
                params[role] = self.b.tensor(f"{name}.{role}", key, ("resid",), squeeze=True)
            elif required or self.s.affine:
                raise NormtoolError(f"expected tensor {key!r} is missing ({kind})", self.ck.path)
        self.described.update(f"{prefix}.{buf}" for buf in buffers)
        setting = "eps" if kind in _AFFINE_EPS else "stat_eps"
        eps = self.stated(setting, f"{kind} eps", "--eps", self.opts.eps)
        attrs: dict[str, Any] = {"eps": eps}
        if kind == "rmsnorm" and self.s.norm_offset:
            attrs["offset"] = self.s.norm_offset
        if kind == "powernorm":
            groups = self.stated(
                "pn_groups", "powernorm groups", "--pn-groups", self.opts.pn_groups
            )
            width = self.b.spaces["resid"].size
            if width % groups:
                raise NormtoolError(
                    f"powernorm groups {groups} do not divide the width {width} (--pn-groups)",
                    self.ck.path,
                )
            attrs.update(groups=groups, gs_eps=GS_EPS)
        return self.b.op(kind, name, [x], "resid", params, **attrs)

    def stated(self, setting: str, what: str, flag: str, given: float | None) -> Any:
        """The value of ``setting`` as used: the user's flag where the files do not record it,
        else the recorded one (a contradicting flag is refused); an unrecorded value the user
        did not give is recorded as an assumption."""
        value = getattr(self.s, setting)
        if given is None:
            if setting in self.assumed:
                self.opts.assume(what, value, self.assumed[setting])
            return value
        if setting not in self.assumed and given != value:
            raise NormtoolError(
                f"{flag} {given:g} contradicts the {what} {value:g} this "
                f"{self.layout['name']} checkpoint defines (config or architecture)",
                self.ck.path,
            )
        return given

    def _norm_kind(self, prefix: str) -> str:
        if self.s.norm != "auto":
            return NORM_NAMES[self.s.norm]
        has = {
            r
            for r in ("running_phi", "buffer_x2", "running_mean", "bias", "weight")
            if f"{prefix}.{r}" in self.ck
        }
        if "running_phi" in has:
            return "powernorm"
        if "buffer_x2" in has:
            return "unorm"
        if "running_mean" in has:
            return "batchnorm"
        if "bias" in has:
            return "layernorm"
        if "weight" in has:
            return "rmsnorm"
        raise NormtoolError(f"no norm parameters under {prefix!r}", self.ck.path)

    # ---- parts ---------------------------------------------------------------------------------
    def token_stem(self, e: dict) -> str:
        """Token, type and position embeddings. Inputs as ``transformers`` (and Optimum's
        exports) name them: ``input_ids``, ``attention_mask`` (read by every attention),
        ``token_type_ids`` where the family has a type table, ``position_ids`` where its
        positions are given (``positions: ids``, GPT-2); OPT counts them over the mask
        (``positions: mask``), the others number them 0..T−1 (``table``)."""
        b, ck, s = self.b, self.ck, self.s
        vocab, width = ck.shape(e["tok"]) if e["tok"] in ck else (0, 0)
        project_in = self.present("project_in", e.get("project_in"))
        emb_space = b.space("emb", width, "hidden") if project_in else "resid"
        first_pos = s.pos_offset if s.pos_pad is None else s.pos_pad + 1
        if "pos" in e:
            max_len = (ck.shape(e["pos"])[0] if e["pos"] in ck else 0) - first_pos
        else:  # rotary positions: the context the config states (0: unbounded)
            max_len = s.max_len
        ids = b.input(
            InputSpec("input_ids", "tokens", ("batch", "seq"), vocab=vocab, max_len=max_len),
            b.space("tokens", vocab, "input"),
        )
        self.mask = b.input(
            InputSpec("attention_mask", "mask", ("batch", "seq"), max_len=max_len),
            b.space("mask", 1, "input"),
        )
        scale = {"scale": math.sqrt(width)} if s.embed_scale else {}  # Gemma: √d
        x = b.op(
            "embed",
            "tok_emb",
            [ids],
            emb_space,
            {"weight": b.tensor("tok_emb.weight", e["tok"], (None, emb_space))},
            **scale,
        )
        if project_in:
            x = self.linear("project_in", x, e["project_in"], "resid", "emb")
        if "type" in e:
            types = ck.shape(e["type"])[0] if e["type"] in ck else 0
            type_ids = b.input(
                InputSpec("token_type_ids", "types", ("batch", "seq"), types, max_len),
                b.space("types", types, "input"),
            )
            weight = b.tensor("type_emb.weight", e["type"], (None, "resid"))
            t = b.op("embed", "type_emb", [type_ids], "resid", {"weight": weight})
            x = b.op("add", "type_add", [x, t], "resid")
        if "pos" in e:
            x = b.op("add", "pos_add", [x, self.positions(e, ids, max_len)], "resid")
        b.info.update(vocab=vocab, max_len=max_len)
        return x

    def positions(self, e: dict, ids: str, max_len: int) -> str:
        """The position embedding added to the tokens' (see ``token_stem``)."""
        b, s = self.b, self.s
        pos = {"weight": b.tensor("pos_emb.weight", e["pos"], (None, "resid"))}
        if s.pos_pad is not None:  # RoBERTa: positions counted over the non-padding tokens
            return b.op("id_positions", "pos_emb", [ids], "resid", pos, pad=s.pos_pad)
        if s.positions == "ids":
            if s.pos_offset:
                raise NormtoolError(
                    "position_ids with a position offset are not supported", self.ck.path
                )
            pos_ids = b.input(
                InputSpec("position_ids", "positions", ("batch", "seq"), max_len=max_len),
                b.space("position_ids", max_len, "input"),
            )
            return b.op("embed", "pos_emb", [pos_ids], "resid", pos)
        if s.positions == "mask":
            assert self.mask is not None
            return b.op("mask_positions", "pos_emb", [self.mask], "resid", pos, offset=s.pos_offset)
        return b.op("positions", "pos_emb", [ids], "resid", pos, offset=s.pos_offset)

    def image_stem(self, e: dict) -> str:
        b, ck = self.b, self.ck
        wk = e["patch"] + ".weight"
        if wk not in ck or len(ck.shape(wk)) != 4:
            raise NormtoolError(f"expected a 4-D patch conv weight {wk!r}", ck.path)
        _, chans, patch, patch_w = ck.shape(wk)
        tokens = math.prod(ck.shape(e["pos"])) // b.spaces["resid"].size if e["pos"] in ck else 0
        extra = 1 + ("dist" in e)  # the class token, and DeiT's distillation token
        grid = math.isqrt(max(tokens - extra, 0))
        if patch != patch_w or grid * grid != tokens - extra:
            raise NormtoolError(
                f"position table {e['pos']!r} does not fit a square grid of {patch}×{patch_w} "
                f"patches plus {extra} token(s)",
                ck.path,
            )
        size = grid * patch
        pixels = b.input(
            InputSpec("pixel_values", "pixels", ("batch", chans, size, size)),
            b.space("pixels", chans, "input"),
        )
        params = {"weight": b.tensor("patch_embed.weight", wk, ("resid", "pixels", None, None))}
        if e["patch"] + ".bias" in ck:  # CLIP's patch conv has none
            params["bias"] = b.tensor("patch_embed.bias", e["patch"] + ".bias", ("resid",))
        x = b.op("patch_embed", "patch_embed", [pixels], "resid", params, patch=patch)
        # [cls, dist, patches]: each cls_concat prepends its token
        for part in ("dist", "cls") if "dist" in e else ("cls",):
            token = b.tensor(f"{part}_token.token", e[part], ("resid",), squeeze=True)
            x = b.op("cls_concat", f"{part}_token", [x], "resid", {"token": token})
        pos = b.tensor("pos_emb.weight", e["pos"], (None, "resid"), squeeze=True)
        p = b.op("positions", "pos_emb", [x], "resid", {"weight": pos})
        x = b.op("add", "pos_add", [x, p], "resid")
        b.info.update(image_size=size, patch=patch, channels=chans)
        return x

    def block(self, i: int, x: str, d_ff: int) -> str:
        b, s = self.b, self.s
        t = {k: _fill(v, i) for k, v in self.layout["block"].items() if isinstance(v, str)}
        conv1d = bool(self.layout["block"].get("conv1d"))
        pre = f"blocks.{i}"
        x_in = x
        h = self.norm(f"{pre}.norm1", x, t["norm1"]) if s.placement == "pre" else x
        a = self.attention(i, h, t, conv1d)
        a = self.linear(f"{pre}.attn.o", a, t["o"], "resid", f"{pre}.vo", conv1d)
        a = self.layer_scale(f"{pre}.attn.scale", a, t.get("scale1"))
        if "post1" in t:  # Peri-LN (Gemma 2): the branch's output normalised too
            a = self.norm(f"{pre}.post_norm1", a, t["post1"])
        x = b.op("add", f"{pre}.resid1", [x, a], "resid")
        if s.placement == "post" and not s.parallel:
            x = self.norm(f"{pre}.norm1", x, t["norm1"])
        if not s.parallel:
            h = self.norm(f"{pre}.norm2", x, t["norm2"]) if s.placement == "pre" else x
        elif s.parallel_norm2:  # GPT-NeoX: the MLP branch has a norm of its own
            h = self.norm(f"{pre}.norm2", x_in, t["norm2"])
        f = self.mlp(pre, h, t, d_ff, conv1d)
        f = self.layer_scale(f"{pre}.mlp.scale", f, t.get("scale2"))
        if "post2" in t:
            f = self.norm(f"{pre}.post_norm2", f, t["post2"])
        x = b.op("add", f"{pre}.resid2", [x, f], "resid")
        if s.placement == "post":  # a parallel block has one norm, after the joint sum
            last = "norm1" if s.parallel else "norm2"
            x = self.norm(f"{pre}.{last}", x, t[last])
        return x

    def layer_scale(self, name: str, x: str, key: str | None) -> str:
        """DINOv2's layer scale: a branch's output times a stored per-channel ``lambda1``."""
        if key is None:
            return x
        scale = self.b.tensor(f"{name}.scale", key, ("resid",))
        return self.b.op("affine", name, [x], "resid", {"scale": scale})

    def attention(self, i: int, h: str, t: dict[str, str], conv1d: bool) -> str:
        """q/k/v projections (rotated when the family uses rotary embeddings) and attention.

        Spaces: ``{pre}.qk`` (queries and keys) and ``{pre}.vo`` (values and the output the
        ``o`` projection reads), ``heads`` heads each; with fewer kv heads (grouped-query) keys
        and values get spaces of their own, ``{pre}.k`` and ``{pre}.v``, of ``kv_heads`` heads.
        """
        b, s, pre = self.b, self.s, f"blocks.{i}"
        heads, kv = s.heads, s.kv_heads
        dim = s.head_dim or b.spaces["resid"].size // heads
        qk = b.space(f"{pre}.qk", heads * dim, "heads_qk", heads)
        vo = b.space(f"{pre}.vo", heads * dim, "heads_vo", heads)
        k_space, v_space = qk, vo
        if kv != heads:
            k_space = b.space(f"{pre}.k", kv * dim, "heads_qk", kv)
            v_space = b.space(f"{pre}.v", kv * dim, "heads_vo", kv)
        qkv = []
        for j, (role, space) in enumerate((("q", qk), ("k", k_space), ("v", v_space))):
            name = f"{pre}.attn.{role}"
            if "qkv" in t:
                qkv.append(self.linear(name, h, t["qkv"], space, "resid", conv1d, (j, 3)))
            else:
                qkv.append(self.linear(name, h, t[role], space, "resid", conv1d))
        for j, n, norm in ((0, heads, "q_norm"), (1, kv, "k_norm")):
            space = b.value_spaces[qkv[j]]
            if norm in t:  # Gemma 3: each q/k head RMS-normalised before the rotation
                qkv[j] = self.head_norm(f"{qkv[j]}.norm", qkv[j], t[norm], n)
            if s.rope:
                rope = self.rope(i)
                qkv[j] = b.op("rope", f"{qkv[j]}.rope", [qkv[j]], space, heads=n, **rope)
        attrs: dict[str, Any] = {"heads": heads, "causal": s.causal}
        if kv != heads:
            attrs["kv_heads"] = kv
        if s.window and self.sliding(i):
            attrs["window"] = s.window
        if s.attn_scalar:  # Gemma: scores scaled by query_pre_attn_scalar^-1/2, not head_dim's
            attrs["scale"] = s.attn_scalar**-0.5
        if s.attn_softcap:
            attrs["softcap"] = s.attn_softcap
        if self.mask is not None:
            qkv.append(self.mask)
        return b.op("attention", f"{pre}.attn", qkv, vo, **attrs)

    def rope(self, i: int) -> dict[str, Any]:
        """Block ``i``'s rotary attributes: those of its layer type (Gemma 3 rotates its
        sliding-window layers with a base of their own)."""
        kind = "sliding_attention" if self.s.window and self.sliding(i) else "full_attention"
        if kind not in self.ropes:
            self.ropes[kind] = rope_attrs(model_config(self.ck) or {}, self.ck, kind)
        return self.ropes[kind]

    def head_norm(self, name: str, x: str, prefix: str, heads: int) -> str:
        """A per-head RMSNorm whose ``[head_dim]`` gain every head shares (Gemma 3's q/k norms,
        stored as γ − 1 like its other norms: ``norm_offset``)."""
        width = self.b.spaces[self.b.value_spaces[x]].size
        weight = self.b.tensor(f"{name}.weight", prefix + ".weight", (None,))
        if self.ck.shape(prefix + ".weight") != (width // heads,):
            raise NormtoolError(
                f"{prefix}.weight should hold {width // heads} values", self.ck.path
            )
        eps = self.stated("eps", "rmsnorm eps", "--eps", self.opts.eps)
        attrs: dict[str, Any] = {"heads": heads, "eps": eps}
        if self.s.norm_offset:
            attrs["offset"] = self.s.norm_offset
        return self.b.op(
            "head_rmsnorm", name, [x], self.b.value_spaces[x], {"weight": weight}, **attrs
        )

    def sliding(self, i: int) -> bool:
        """Whether block ``i`` attends through the sliding window: the config's ``layer_types``
        where it has them, else every layer but each ``window_pattern``-th (Gemma 2: even
        layers slide; Mistral: pattern 1, every layer)."""
        types = (model_config(self.ck) or {}).get("layer_types")
        if isinstance(types, list) and len(types) == self.s.layers:
            return types[i] == "sliding_attention"
        return self.s.window_pattern == 1 or (i + 1) % self.s.window_pattern != 0

    def mlp(self, pre: str, h: str, t: dict[str, str], d_ff: int, conv1d: bool) -> str:
        """``fc2(act(fc1(h)))``, or gated (SwiGLU/GeGLU) ``fc2(act(gate(h)) ⊙ fc1(h))``."""
        b, s = self.b, self.s
        hid = b.space(f"{pre}.mlp", d_ff, "hidden")
        first = "gate" if "gate" in t else "fc1"
        f = self.linear(f"{pre}.mlp.{first}", h, t[first], hid, "resid", conv1d)
        f = b.op("act", f"{pre}.mlp.act", [f], hid, fn=s.act)
        if "gate" in t:
            up = self.linear(f"{pre}.mlp.fc1", h, t["fc1"], hid, "resid", conv1d)
            f = b.op("mul", f"{pre}.mlp.gated", [f, up], hid)
        return self.linear(f"{pre}.mlp.fc2", f, t["fc2"], "resid", hid, conv1d)

    def head(self, x: str) -> list[str]:
        """The final norm, projection and head; returns the graph's outputs."""
        b, s, lay = self.b, self.s, self.layout
        if self.present("norm_f", lay.get("norm_f")):
            x = self.norm("norm_f", x, lay["norm_f"])
        width = "resid"
        if self.present("project_out", lay.get("project_out")):
            width = "emb"
            x = self.linear("project_out", x, lay["project_out"], "emb", "resid")
        h = lay["head"]
        # what transformers' base model returns, recorded for export --outputs hidden
        b.info["hidden"] = x
        if "linear" not in h:  # a base model: its hidden states (and pooler) are the outputs
            outputs = [self.rename(x, "last_hidden_state")]
            b.info["hidden"] = outputs[0]
            if "pooler" in h and self.present("pooler", h["pooler"]):
                outputs.append(self.pooler(outputs[0], width, h, "pooler_output")[0])
            elif "pool" in h:
                outputs.append(self.pooled_token(outputs[0], width, h))
            if len(outputs) > 1:
                b.info["pooler"] = outputs[1]
            return outputs
        if "distill" in h:
            self.distilled_logits(x, width, h)
            return ["logits"]
        if "pooler" in h:
            self.present("pooler", h["pooler"])
            x, width = self.pooler(x, width, h, "pooler.act")
            b.info["pooler"] = x
        elif s.classify:
            x = b.op("select", "pool", [x], width, index=0)
        if "transform" in h:  # BERT's MLM head: dense → act → LayerNorm before the decoder
            x = self.linear("head.transform", x, h["transform"], width, width)
            x = b.op("act", "head.transform.act", [x], width, fn=s.act)
            x = self.norm("head.transform.norm", x, h["transform_norm"])
        self.logits(x, width, h, "logits" if s.classify or "pooler" in h else "vocab")
        return ["logits"]

    def distilled_logits(self, x: str, width: str, h: dict) -> None:
        """DeiT with teacher: the mean of the class token's head and the distillation token's
        (token 1) ``distill`` head."""
        b = self.b
        out = b.space("logits", self.ck.shape(h["linear"] + ".weight")[0], "output")
        cls = b.op("select", "pool", [x], width, index=0)
        dist = b.op("select", "pool.distill", [x], width, index=1)
        heads = [
            self.linear("head", cls, h["linear"], out, width),
            self.linear("head.distill", dist, h["distill"], out, width),
        ]
        b.op("mean", "logits", heads, out)

    def pooled_token(self, x: str, width: str, h: dict) -> str:
        """``pooler_output`` without a dense layer: the first token (DINOv2, CLIP's image
        tower, then its ``pool_norm``) or the EOS token (CLIP's text tower); with a
        ``projection`` (CLIP's ``*WithProjection``), that token projected, output under the
        name ``projection_output`` instead."""
        if h["pool"] == "eos":
            ids = self.b.inputs[0].name
            x = self.b.op("pick_token", "pool", [x, ids], width, eos=self.s.eos)
        else:
            x = self.b.op("select", "pool", [x], width, index=0)
        if "pool_norm" in h:
            x = self.norm("pool_norm", x, h["pool_norm"])
        if "projection" not in h:
            return self.rename(x, "pooler_output")
        key = h["projection"] + ".weight"
        if key not in self.ck:
            raise NormtoolError(f"expected tensor {key!r} is missing", self.ck.path)
        out = self.b.space("embeds", self.ck.shape(key)[0], "output")
        x = self.linear("projection", x, h["projection"], out, width)
        return self.rename(x, h["projection_output"])

    def rename(self, value: str, name: str) -> str:
        """Give ``value`` (the newest op's output, read by nothing yet) the output ``name``."""
        op = self.b.ops[-1]
        assert op.output == value and not self.b.value_spaces.get(name)
        op.output = name
        self.b.value_spaces[name] = self.b.value_spaces.pop(value)
        return name

    def pooler(self, x: str, width: str, h: dict, output: str) -> tuple[str, str]:
        """BERT's pooler: ``act(dense(x[:, 0]))``; returns its output value and space."""
        b, ck = self.b, self.ck
        pool_space = b.space("pooler", ck.shape(h["pooler"] + ".weight")[0], "hidden")
        x = b.op("select", "pool", [x], width, index=0)
        x = self.linear("pooler", x, h["pooler"], pool_space, width)
        b.ops.append(Op("pooler.act", "act", (x,), output, {}, {"fn": h["pooler_act"]}))
        b.value_spaces[output] = pool_space
        return output, pool_space

    def logits(self, x: str, width: str, h: dict, space: str) -> None:
        """The output linear ``head`` → ``logits``. When the config ties it, its weight is
        ``h["tied"]`` and its bias ``h["bias"]`` (where given), and any stored copies of them
        under the head's own names are not read; untied, those are its own tensors (BERT's
        ``cls.predictions.bias`` is then a parameter its forward does not use)."""
        b, ck = self.b, self.ck
        tied = self.s.tie and "tied" in h
        own = h["linear"]
        wk = h["tied"] if tied else own + ".weight"
        bk = h["bias"] if tied and "bias" in h else own + ".bias"
        for key in (wk, bk) if "bias" in h else (wk,):
            if key not in ck:
                raise NormtoolError(f"expected head tensor {key!r} is missing", ck.path)
        self.described.update({own + ".weight", own + ".bias", h.get("bias", wk)})
        out_space = b.space(space, ck.shape(wk)[0], "output")
        params = {"weight": b.tensor("head.weight", wk, (out_space, width))}
        if bk in ck:
            params["bias"] = b.tensor("head.bias", bk, (out_space,))
        if self.s.logit_softcap:  # Gemma 2: cap · tanh(logits / cap)
            x = b.op("linear", "head", [x], out_space, params)
            b.ops.append(
                Op("head.softcap", "softcap", (x,), "logits", {}, {"cap": self.s.logit_softcap})
            )
        else:
            b.ops.append(Op("head", "linear", (x,), "logits", params))
        b.value_spaces["logits"] = out_space
        b.info["tied_head"] = tied

    def check_described(self) -> None:
        """Refuse checkpoints with tensors this layout does not account for."""
        used = {spec.source.key for spec in self.b.tensors.values()} | self.described
        ignore = [_template_regex(t) for t in self.layout.get("ignore", ())]
        stored = self.ck.keys()
        extra = [k for k in stored if k not in used and not any(r.fullmatch(k) for r in ignore)]
        if extra:
            raise NormtoolError(
                f"{len(extra)} tensor(s) not part of the {self.layout['name']} layout "
                f"(e.g. {extra[0]!r}): an unsupported variant or another architecture "
                "(--arch NAME to choose)",
                self.ck.path,
            )


#: Norms whose eps comes from the ``eps`` setting; statistics-based norms use ``stat_eps``.
_AFFINE_EPS = frozenset({"layernorm", "rmsnorm", "crmsnorm"})


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{i}"), r"\d+"))


def _without_base_prefix(layout: dict, ck: Checkpoint) -> dict:
    """``layout`` with its base-model prefix dropped when the stored keys lack it and the
    unprefixed names fit (otherwise the full names, which make the clearer error message)."""
    prefix = layout.get("base_prefix")
    stored = ck.keys()
    if not prefix or any(k.startswith(prefix) for k in stored):
        return layout

    def strip(v: Any) -> Any:
        if isinstance(v, str):
            return v.removeprefix(prefix)
        if isinstance(v, list):
            return [strip(x) for x in v]
        if isinstance(v, dict):
            return {
                k: strip(x) if k not in ("detect", "settings", "require") else x
                for k, x in v.items()
            }
        return v

    stripped = strip(layout)
    return stripped if _fill(stripped["block"]["o"], 0) + ".weight" in ck else layout


def build(layout: dict, ck: Checkpoint, opts: BuildOptions) -> Graph:
    """The canonical graph of ``ck`` read through ``layout``."""
    layout = _without_base_prefix(_with_variant(layout, ck), ck)
    s = _settings(layout, ck, opts, _block_count(layout, ck))
    run = _Build(layout, ck, s, opts)
    b, e = run.b, layout["embed"]
    o_key = _fill(layout["block"]["o"], 0) + ".weight"
    conv1d = bool(layout["block"].get("conv1d"))
    d = ck.shape(o_key)[1 if conv1d else 0]
    if d % s.heads and not s.head_dim:
        raise NormtoolError(f"width {d} is not divisible by {s.heads} heads", ck.path)
    b.space("resid", d, "resid")
    fc1 = _fill(layout["block"]["fc1"], 0) + ".weight"
    if fc1 not in ck:
        raise NormtoolError(f"expected tensor {fc1!r} is missing", ck.path)
    d_ff = ck.shape(fc1)[0 if not conv1d else 1]
    x = run.image_stem(e) if "patch" in e else run.token_stem(e)
    if "norm" in e:
        x = run.norm("emb_norm", x, e["norm"])
    for i in range(s.layers):
        x = run.block(i, x, d_ff)
    outputs = run.head(x)
    run.check_described()
    norms = sorted({o.kind for o in b.ops if o.kind in NORM_PARAMS})
    b.info.update(
        layout=layout["name"],
        heads=s.heads,
        layers=s.layers,
        d_model=d,
        d_ff=d_ff,
        placement=s.placement,
        parallel=s.parallel,
        act=s.act,
        causal=s.causal,
        norm=",".join(norms),
        variant=layout.get("variant", layout["name"]),
        kv_heads=s.kv_heads,
        head_dim=s.head_dim or d // s.heads,
        gated="gate" in layout["block"],
        peri_norm="post1" in layout["block"],
    )
    if s.rope:
        ropes = list(run.ropes.values())
        b.info["rope"] = ropes[0] if len(ropes) == 1 else run.ropes
    return b.build(outputs)


def _family(layout: dict) -> Family:
    return Family(
        name=layout["name"],
        description=layout["description"],
        detect=lambda ck: detect(layout, ck),
        build=lambda ck, opts: build(layout, ck, opts),
    )


FAMILIES: list[Family] = [_family(layouts()[name]) for name in ORDER]
