"""Options and helpers shared by the command functions (the thin CLI layer only)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from tqdm import tqdm

from normtool import runner, selfcheck
from normtool.arch.family import Assumption
from normtool.load import load_model
from normtool.model import Model

T = TypeVar("T")


@dataclass
class _State:
    debug: bool = False
    quiet: bool = False


STATE = _State()

ArchOpt = Annotated[
    str | None, typer.Option("--arch", help="Architecture family (overrides detection).")
]
HeadsOpt = Annotated[
    int | None, typer.Option("--heads", help="Attention heads, where the checkpoint lacks them.")
]
ActOpt = Annotated[
    str | None, typer.Option("--act", help="MLP activation: relu (default), gelu, tanh, silu.")
]
PnGroupsOpt = Annotated[
    int | None,
    typer.Option(
        "--pn-groups",
        help="PowerNorm group count, where the checkpoint lacks it (default: the head count, "
        "stated as an assumption).",
    ),
]
EpsOpt = Annotated[
    float | None,
    typer.Option(
        "--eps",
        help="Norm eps, where the checkpoint lacks it (timm-style ViT, timm/torchvision CNN "
        "state dicts; default: the family's, stated as an assumption).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
NoVerifyOpt = Annotated[
    bool, typer.Option("--no-verify", help="Skip the fp64/fp32 self-check before writing.")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
OutOpt = Annotated[Path | None, typer.Option("-o", "--output", help="Output path.")]
MaxShardOpt = Annotated[
    str,
    typer.Option(
        "--max-shard-size",
        help="Write normtool outputs larger than this as Hugging Face shards + index "
        "(bytes, or e.g. 500MB, 5GB).",
    ),
]
PathArg = Annotated[Path, typer.Argument(help="Checkpoint file or Hugging Face model folder.")]
TimeLimitOpt = Annotated[
    float | None,
    typer.Option(
        "--time-limit",
        help="Stop an ONNX Runtime call (one inference) running longer than this many seconds "
        "(exit 2; default 600).",
    ),
]
MemoryLimitOpt = Annotated[
    str | None,
    typer.Option(
        "--memory-limit",
        help="ONNX Runtime's working memory, all models together (not weights), e.g. 4GB, "
        "512MB: a larger declared or requested allocation is refused (exit 2; default 4GB). "
        "verify also holds one batch of a checkpoint's inputs and activations to it.",
    ),
]


def memory_limit_bytes(memory_limit: str | None) -> int | None:
    """``--memory-limit`` in bytes (None when not given); NormtoolError for anything else."""
    from normtool.errors import NormtoolError
    from normtool.io.writer import parse_size

    if memory_limit is None:
        return None
    try:
        return parse_size(memory_limit)
    except NormtoolError as e:
        raise NormtoolError(
            f"--memory-limit {memory_limit!r}: expected bytes or a size like 4GB, 512MB, 2GiB"
        ) from e


def bound_onnx_runs(time_limit: float | None, memory_limit: str | None) -> None:
    """Apply ``--time-limit``/``--memory-limit`` to the ONNX Runtime sessions made after this."""
    from normtool.runtime import ort  # onnxruntime: paid only by commands that run ONNX

    memory = memory_limit_bytes(memory_limit)
    memory = ort.DEFAULT_MEMORY_LIMIT if memory is None else memory
    ort.set_limits(ort.DEFAULT_TIME_LIMIT if time_limit is None else time_limit, memory)


def load(
    path: Path,
    arch: str | None,
    heads: int | None,
    act: str | None = None,
    pn_groups: int | None = None,
    eps: float | None = None,
) -> Model:
    return load_model(path, arch=arch, heads=heads, act=act, pn_groups=pn_groups, eps=eps)


def assumed(*models: Model) -> list[dict[str, Any]]:
    """The models' assumptions for the payload's ``assumptions`` (``emit`` states them), each
    naming its file."""
    return [
        {"file": str(m.checkpoint.path) if m.checkpoint else None, **a.to_dict()}
        for m in models
        for a in m.assumptions
    ]


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A tqdm bar on a terminal; silent with --quiet, in CI, or when stderr is not a terminal."""
    off = STATE.quiet or bool(os.environ.get("CI")) or not sys.stderr.isatty()
    yield from tqdm(items, desc=desc, total=total, disable=off, leave=False)


def emit(
    as_json: bool, payload: dict[str, Any], lines: Iterable[str], announce: bool = True
) -> None:
    """Print either the JSON payload or the human lines (never both); first, unless
    ``announce`` is false, one stderr line per entry of ``payload["assumptions"]``.

    Why here: a command states its assumptions with its result, ``--quiet`` or not (a warning
    that the result may compute another function, not progress); a command that fails before
    it has a result prints only its one error line.
    """
    for a in payload.get("assumptions", ()) if announce else ():
        stated = Assumption(a["what"], a["value"], a["why"])
        print(f"normtool: assuming {stated.line()} for {a['file']}", file=sys.stderr)
    if as_json:
        print(json.dumps(payload, indent=2, default=str))
    else:
        for line in lines:
            print(line)


def default_output(path: Path, suffix: str) -> Path:
    """``<stem><suffix>`` beside the input (for a folder: beside the folder)."""
    stem = path.name if path.is_dir() else path.stem
    return path.parent / f"{stem}{suffix}"


def report(path: Path, res: runner.Result, model: Model) -> tuple[dict[str, Any], list[str]]:
    """``emit``'s payload and lines for a run of the runner: one pass's own fields at the top
    level (the single-transform commands' JSON), a chain's under ``steps``; the achieved errors
    and the assumptions either way."""
    rws = res.planned.rewrites
    errors = res.errors
    fields = [{k: _plain(v) for k, v in rw.report.items()} for rw in rws]
    payload: dict[str, Any] = {"input": str(path), "output": str(res.output)}
    lines = [f"{path} -> {res.output}"]
    if len(rws) == 1:
        payload.update(fields[0])
        payload["summary"] = rws[0].summary
        lines += [f"  {rws[0].summary}", *(f"  {line}" for line in rws[0].lines)]
    else:
        payload["steps"] = [
            {"transform": rw.transform, "params": rw.params, "summary": rw.summary, **f}
            for rw, f in zip(rws, fields, strict=True)
        ]
        for rw in rws:
            lines += [f"  {rw.transform}: {rw.summary}", *(f"    {line}" for line in rw.lines)]
    payload.update(verified=errors is not None, errors=errors, assumptions=assumed(model))
    if errors is None:
        lines.append("  not verified (--no-verify)")
    else:
        lines.append("  verified: " + selfcheck.summary(errors))
    return payload, lines


def _plain(value: Any) -> Any:
    """A pass's report value for JSON: dataclass records (what fold folded, skipped…) as dicts."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
