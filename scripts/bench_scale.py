"""Peak memory and wall time of the transforms on a GPT-2-XL-shaped fp16 checkpoint (issue 8).

Generates, in a temporary folder (never committed):

* two GPT-2-XL-shaped fp16 Hugging Face folders (48 layers, d = 1600, 25 heads, vocab 50257;
  ``config.json`` + ``model-0000k-of-0000n.safetensors`` shards + index, ~3.1 GB each), seeded
  random weights;
* one normtool_transformer of the same shape with Unified Normalization (Pre-UN, fp16, untied
  head), the model ``fold`` applies to.

Then runs each command under ``/usr/bin/time -v`` (Debian's ``time`` package) and reports its
peak RSS and wall time: ``python -c "import torch"`` (the baseline), a plain load-and-save of
the sharded checkpoint with ``safetensors`` (everything in memory: the reference for wall time),
``normtool convert-ln-to-rms``, ``normtool fold``, ``normtool merge --method average`` of the two
GPT-2 folders. Each output is deleted after its measurement, so the disk never holds more than
the inputs plus one output (~13 GB).

The position table has ``--positions`` rows (default 64, GPT-2-XL has 1024; 0.1% of the
parameters): the transforms' self-checks run the whole model on full-length random sequences
in float64, which at 1024 tokens would take hours on a small CPU machine. Weight streaming —
what this benchmark measures — does not depend on it; activation memory does (see the notes
the script prints).

Usage: ``python scripts/bench_scale.py [--workdir DIR] [--json out.json] [--markdown out.md]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # devkit, shared with the tests, lives at the repository root
from devkit.factories import gpt2_shapes
from devkit.proc import TIME, time_v
from normtool.io.safetensors_format import write_stream

NEED_BYTES = 20 * 10**9
SHARD_BYTES = 10**9
XL = {"layers": 48, "d_model": 1600, "heads": 25, "vocab": 50257}
RESID_WRITERS = ("attn.o.weight", "mlp.fc2.weight", "c_proj.weight")
FOLD_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


# ---- checkpoints ---------------------------------------------------------------------------
def _init(
    name: str, shape: tuple[int, ...], g: torch.Generator, layers: int, dtype: torch.dtype
) -> torch.Tensor:
    """GPT-2-style initial values: N(0, 0.02) weights, N(0, 0.02/√(2·layers)) for the layers
    writing into the residual stream (GPT-2's own scaling: without it a deep random Pre-UN
    stack, whose norms do not normalise at inference, grows exponentially with depth), small
    biases, norm gains near 1, positive running variances (UN)."""
    leaf = name.rsplit(".", 1)[-1]
    n = math.prod(shape)
    if leaf == "running_var":
        t = torch.rand(n, generator=g) + 0.5
    elif leaf == "num_batches_tracked":
        return torch.zeros(shape, dtype=torch.int64)
    elif len(shape) == 1 and leaf == "weight":
        t = 1 + 0.1 * torch.randn(n, generator=g)
    elif len(shape) == 1:
        t = 0.02 * torch.randn(n, generator=g)
    else:
        std = 0.02 / math.sqrt(2 * layers) if name.endswith(RESID_WRITERS) else 0.02
        t = std * torch.randn(n, generator=g)
    return t.reshape(shape).to(dtype)


def _write_sharded(
    folder: Path, shapes: dict[str, tuple[int, ...]], layers: int, seed: int
) -> None:
    """HF layout: shards of at most SHARD_BYTES, an index, tensors generated one at a time."""
    g = torch.Generator().manual_seed(seed)
    names = list(shapes)
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        b = 2 * math.prod(shapes[n])
        if shards[-1] and size + b > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += b
    weight_map = {}
    for i, keys in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        specs = [(k, torch.float16, shapes[k]) for k in keys]
        with (folder / fname).open("wb") as f:
            write_stream(
                f, specs, lambda k: _init(k, shapes[k], g, layers, torch.float16), {"format": "pt"}
            )
        weight_map.update(dict.fromkeys(keys, fname))
    total = sum(2 * math.prod(s) for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_gpt2(folder: Path, shape: dict, positions: int, seed: int) -> Path:
    folder.mkdir(parents=True)
    config, shapes = gpt2_shapes(
        n_layer=shape["layers"],
        n_embd=shape["d_model"],
        n_head=shape["heads"],
        vocab_size=shape["vocab"],
        n_positions=positions,
        dtype="float16",
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    _write_sharded(folder, shapes, shape["layers"], seed)
    return folder


def make_un_transformer(
    path: Path, shape: dict, positions: int, seed: int, dtype: torch.dtype
) -> Path:
    from normtool.nn.save import CONFIG_KEY
    from normtool.nn.transformer import ReferenceTransformer, transformer_config

    cfg = transformer_config(
        vocab_size=shape["vocab"],
        max_len=positions,
        d_model=shape["d_model"],
        heads=shape["heads"],
        layers=shape["layers"],
        d_ff=4 * shape["d_model"],
        norm="un",
        act="gelu_tanh",
    )
    with torch.device("meta"):
        model = ReferenceTransformer(cfg)
    state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    dtypes = {k: torch.int64 if "num_batches" in k else dtype for k in state}
    g = torch.Generator().manual_seed(seed)
    specs = [(k, dtypes[k], shapes[k]) for k in shapes]
    with path.open("wb") as f:
        meta = {CONFIG_KEY: json.dumps(cfg)}
        write_stream(f, specs, lambda k: _init(k, shapes[k], g, shape["layers"], dtypes[k]), meta)
    return path


# ---- measuring -----------------------------------------------------------------------------
def measure(label: str, argv: list[str], log: Path) -> dict:
    """Run ``argv`` under ``/usr/bin/time -v``; peak RSS (MiB) and wall time (s)."""
    print(f"[{time.strftime('%H:%M:%S')}] {label}: {' '.join(argv)}", flush=True)
    r = time_v(argv, env={**os.environ, "CI": "1"})
    log.write_text(r.stdout + "\n---- stderr ----\n" + r.stderr)
    res = {
        "label": label,
        "command": " ".join(
            "python" if x == sys.executable else "<script>" if "\n" in x else x for x in argv
        ),
        "exit": r.returncode,
        "peak_rss_mib": r.peak_rss_kib / 1024 if r.peak_rss_kib is not None else None,
        "wall_s": round(r.wall_s, 1),
    }
    if r.returncode != 0:
        tail = [x for x in r.stderr.splitlines() if not x.startswith("\t")][-3:]
        res["error"] = " | ".join(tail)
    print(f"    -> {res}", flush=True)
    return res


PLAIN = """
import json, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
src, out = Path(sys.argv[1]), sys.argv[2]
index = json.loads((src / "model.safetensors.index.json").read_text())
state = {}
for shard in sorted(set(index["weight_map"].values())):
    state.update(load_file(src / shard))
save_file(state, out, metadata={"format": "pt"})
"""


def _rm(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def _versions() -> dict:
    import safetensors
    import transformers

    import normtool

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "normtool": normtool.__version__,
    }


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
        mem_gib = f"{int(mem) / 2**20:.0f} GiB RAM"
    except OSError:
        mem_gib = "? RAM"
    return f"{cpu}, {os.cpu_count()} cores, {mem_gib}, {platform.system()} {platform.release()}"


def markdown(doc: dict) -> str:
    base = doc["baseline_rss_mib"]
    plain = next((r for r in doc["runs"] if r["label"] == "plain load+save"), None)
    rows = [
        "| run | peak RSS (MiB) | above `import torch` (MiB) | wall (s) | vs plain load+save | exit |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in doc["runs"]:
        above = r["peak_rss_mib"] - base if r["peak_rss_mib"] is not None else float("nan")
        ratio = f"{r['wall_s'] / plain['wall_s']:.1f}×" if plain and plain["wall_s"] else ""
        rows.append(
            f"| {r['label']} | {r['peak_rss_mib']:.0f} | {above:+.0f} | {r['wall_s']:.1f} | "
            f"{ratio} | {r['exit']} |"
        )
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=None, help="where to generate (temp dir)")
    ap.add_argument("--positions", type=int, default=64)
    ap.add_argument("--only", default="", help="comma-separated: plain,convert,fold,merge")
    ap.add_argument("--fold-dtype", choices=["fp16", "fp32"], default="fp32")
    for k, v in XL.items():  # smaller shapes only to smoke-test this script
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=v)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--markdown", type=Path, default=None, help="write the table here")
    args = ap.parse_args()
    shape = {k: getattr(args, k) for k in XL}
    if not Path(TIME).exists():
        print(f"{TIME} is missing: install Debian's 'time' package (apt-get install time)")
        return 1
    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if free < NEED_BYTES:
        print(
            f"Sorry: {parent} has {free / 1e9:.1f} GB free; this benchmark needs about "
            f"{NEED_BYTES / 1e9:.0f} GB (three ~3.1 GB checkpoints and one output at a time). "
            "Point --workdir at a roomier disk."
        )
        return 1
    work = Path(tempfile.mkdtemp(prefix="normtool-scale-", dir=parent))
    logs = work / "logs"
    logs.mkdir()
    py = sys.executable
    runs = []
    try:
        t0 = time.time()
        a, b = work / "gpt2xl-a", work / "gpt2xl-b"
        if not args.only or set(args.only.split(",")) - {"fold"}:
            make_gpt2(a, shape, args.positions, seed=0)
            make_gpt2(b, shape, args.positions, seed=1)
        un = make_un_transformer(
            work / "xl-un.safetensors", shape, args.positions, 2, FOLD_DTYPES[args.fold_dtype]
        )
        gen_s = time.time() - t0
        size = sum(f.stat().st_size for f in a.glob("*.safetensors"))
        print(f"generated in {gen_s:.0f} s; each GPT-2 folder {size / 1e9:.2f} GB", flush=True)
        base = measure("python -c 'import torch'", [py, "-c", "import torch"], logs / "base")
        jobs = [
            ("plain load+save", [py, "-c", PLAIN, str(a), str(work / "plain.safetensors")]),
            (
                "convert-ln-to-rms",
                [
                    py,
                    "-m",
                    "normtool",
                    "convert-ln-to-rms",
                    str(a),
                    "-o",
                    str(work / "rms.safetensors"),
                ],
            ),
            (
                "fold (Pre-UN)",
                [py, "-m", "normtool", "fold", str(un), "-o", str(work / "fold.safetensors")],
            ),
            (
                "merge --method average",
                [
                    py,
                    "-m",
                    "normtool",
                    "merge",
                    str(a),
                    str(b),
                    "--method",
                    "average",
                    "-o",
                    str(work / "merged"),
                ],
            ),
        ]
        for label, argv in jobs:
            if args.only and not any(label.startswith(o) for o in args.only.split(",")):
                continue
            runs.append(measure(label, argv, logs / label.split()[0]))
            for out in ("plain.safetensors", "rms.safetensors", "fold.safetensors", "merged"):
                _rm(work / out)
        doc = {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": _machine(),
            "versions": _versions(),
            "shape": {
                **shape,
                "positions": args.positions,
                "dtype": "fp16",
                "fold_dtype": args.fold_dtype,
                "gpt2_bytes": size,
                "un_bytes": un.stat().st_size,
            },
            "generate_s": round(gen_s, 1),
            "baseline_rss_mib": base["peak_rss_mib"],
            "runs": runs,
        }
        table = markdown(doc)
        print(table)
        print(json.dumps(doc, indent=2))
        if args.json:
            args.json.write_text(json.dumps(doc, indent=2) + "\n")
        if args.markdown:
            args.markdown.write_text(table + "\n")
        for r in runs:
            if r["exit"] != 0:
                print(f"{r['label']} failed; log kept in {logs}")
                return 1
    finally:
        if all(r["exit"] == 0 for r in runs):
            shutil.rmtree(work, ignore_errors=True)
        else:
            for p in work.iterdir():
                if p.name != "logs":
                    _rm(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
