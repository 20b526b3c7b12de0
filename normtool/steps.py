"""The steps ``normtool run`` chains: a pass named on the command line, with its options.

Syntax: ``NAME[:KEY=VALUE[:KEY=VALUE…]]``, a bare ``KEY`` meaning ``KEY=true`` — e.g.
``convert-ln-to-rms:compressed``, ``fold:only=un,batchnorm``,
``loki-head:metric=tree.json:labels=labels.txt``. Why this form: each step keeps the options
its own command has, under the same names, in one shell word, so a chain reads like the
commands it replaces and needs no quoting; the order of the words is the order of the passes.

A step kind is a row of ``STEPS``: its options (and which of them name files the run reads),
how it makes its pass for a model, and the suffix it adds to the default output name. A new
pass becomes chainable with one row here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from normtool.errors import NormtoolError
from normtool.loki.head import LokiHead
from normtool.loki.metric_files import load_label_space
from normtool.model import Model
from normtool.passes.fold import SELECTORS
from normtool.passes.ln_to_rms import ConvertLnToRms
from normtool.passes.rewrite import Pass
from normtool.passes.rms_gain import fold_pass
from normtool.passes.rotate import KINDS, Rotate

Options = Mapping[str, str]


@dataclass(frozen=True)
class StepKind:
    """One chainable pass: ``options`` (name → help), ``files`` (options naming input files),
    ``make(options, model)`` its pass, ``suffix(options)`` its part of the default output name."""

    name: str
    options: Mapping[str, str]
    make: Callable[[Options, Model], Pass]
    suffix: Callable[[Options], str]
    files: tuple[str, ...] = ()


def _flag(opts: Options, key: str) -> bool:
    value = opts.get(key, "false").lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise NormtoolError(f"option {key}={value!r}: expected true or false")
    return value in ("true", "1", "yes")


def _fold(opts: Options, model: Model) -> Pass:
    only = opts.get("only")
    return fold_pass(
        None if only is None else tuple(k.strip() for k in only.split(",") if k.strip())
    )


def _rotate(opts: Options, model: Model) -> Pass:
    try:
        seed = int(opts.get("seed", "0"))
    except ValueError:
        raise NormtoolError(f"option seed={opts['seed']!r}: expected an integer") from None
    calib = Path(opts["calib"]) if "calib" in opts else None
    return Rotate(opts.get("kind", "hadamard"), seed, calib)


def _loki(opts: Options, model: Model) -> Pass:
    if "metric" not in opts:
        raise NormtoolError("loki-head needs metric=FILE")
    labels = Path(opts["labels"]) if "labels" in opts else None
    observed = Path(opts["observed"]) if "observed" in opts else None
    graph = model.graph
    k = graph.spaces[graph.value_spaces["logits"]].size if "logits" in graph.value_spaces else 0
    space = load_label_space(
        Path(opts["metric"]), opts.get("metric-kind", "auto"), labels, observed, k
    )
    return LokiHead(space, {"metric": opts["metric"], "metric_kind": space.metric.kind})


STEPS: dict[str, StepKind] = {
    s.name: s
    for s in (
        StepKind(
            "convert-ln-to-rms",
            {"compressed": "CRMSNorm: drop the stream's last coordinate"},
            lambda o, m: ConvertLnToRms(_flag(o, "compressed")),
            lambda o: "crms" if _flag(o, "compressed") else "rms",
        ),
        StepKind(
            "fold",
            {"only": f"comma-separated kinds to fold: {', '.join(SELECTORS)} (all); or rms-gain"},
            _fold,
            lambda o: "folded",
        ),
        StepKind(
            "rotate",
            {
                "kind": f"the orthogonal matrix: {', '.join(KINDS)} (hadamard)",
                "seed": "its seed (0)",
                "calib": "data file of inputs for pca (as barrier --data)",
            },
            _rotate,
            lambda o: "rot",
            files=("calib",),
        ),
        StepKind(
            "loki-head",
            {
                "metric": "label metric file (as loki-head --metric)",
                "labels": "the N labels, one per line",
                "observed": "line i: the label of model output i",
                "metric-kind": "how to read the metric (auto)",
            },
            _loki,
            lambda o: "loki",
            files=("metric", "labels", "observed"),
        ),
    )
}


@dataclass(frozen=True)
class Step:
    """One parsed step word."""

    kind: StepKind
    options: dict[str, str]

    @property
    def files(self) -> list[Path]:
        return [Path(self.options[k]) for k in self.kind.files if k in self.options]


def parse(word: str) -> Step:
    """``NAME[:KEY=VALUE…]`` → Step; NormtoolError naming the known steps or options."""
    name, *parts = word.split(":")
    kind = STEPS.get(name)
    if kind is None:
        raise NormtoolError(f"unknown step {name!r}; steps: {', '.join(STEPS)}")
    options: dict[str, str] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if key not in kind.options:
            known = ", ".join(kind.options) or "none"
            raise NormtoolError(f"step {name}: unknown option {key!r} (options: {known})")
        if key in options:
            raise NormtoolError(f"step {name}: option {key!r} given twice")
        options[key] = value if sep else "true"
    return Step(kind, options)
