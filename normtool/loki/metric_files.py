"""Read a label metric from a file and reject anything that is not a metric.

Formats (``--metric FILE``; ``--metric-kind`` overrides the choice made from the file):

* distance matrix — ``.npy`` (2-D, no names), ``.safetensors`` (tensor ``distances`` or the only
  tensor; names optional in the metadata key ``labels`` as a JSON list), ``.csv`` whose first row
  holds the N label names (each further row N numbers, optionally preceded by its own label);
* tree — ``.tsv`` lines ``child<TAB>parent`` (a line with only a child declares the root; blank
  lines and ``#`` comments ignored; an optional ``child<TAB>parent`` header), or ``.json``: an
  object mapping child to parent (``null`` for the root), a list of ``[child, parent]`` pairs, or
  nested ``{"name": ..., "children": [...]}``;
* label embeddings — ``.safetensors`` with a tensor ``embeddings``, or with ``--metric-kind
  embeddings`` a ``.npy`` array ``[n, dim]`` or ``.csv`` rows ``label,v1,...,vd``.

Matrices without names get the names ``"0" … "n-1"`` unless ``--labels`` names their rows.
Checks (each a NormtoolError naming the file, exit 2): square, finite, non-negative, zero
diagonal, symmetric to ``|d_ij − d_ji| ≤ 1e-9 + 1e-6·max(|d_ij|, |d_ji|)`` (text formats round);
trees must be a single rooted tree (``normtool.loki.tree``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from normtool.errors import NormtoolError
from normtool.io import reads
from normtool.io.safetensors_format import read_header
from normtool.loki.labels import LabelSpace, read_label_file, resolve_labels
from normtool.loki.metric import EmbeddingMetric, MatrixMetric, Metric, TreeMetric
from normtool.loki.tree import build_tree

KINDS = ("auto", "distances", "tree", "embeddings")
_ROW_CHUNK = 1024  # rows per step when checking a (possibly memory-mapped) matrix


def load_metric(path: Path, kind: str = "auto", names: list[str] | None = None) -> Metric:
    """Load and validate the metric in ``path``. ``names`` (from ``--labels``) names the points
    of a format that carries no names; it is ignored for formats that do."""
    if kind not in KINDS:
        raise NormtoolError(f"unknown metric kind {kind!r}; use one of {', '.join(KINDS)}")
    if not reads.note(path).is_file():
        raise NormtoolError("no such metric file", path)
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".json") and kind in ("auto", "tree"):
        edges = _tsv_edges(path) if suffix == ".tsv" else _json_edges(path)
        return TreeMetric(build_tree(edges, path))
    if suffix == ".npy" and kind != "tree":
        return _from_array(path, _read_npy(path), kind, None, names)
    if suffix == ".safetensors" and kind != "tree":
        return _from_safetensors(path, kind, names)
    if suffix == ".csv" and kind != "tree":
        return _from_csv(path, kind, names)
    raise NormtoolError(
        f"cannot read a {kind if kind != 'auto' else 'metric'} from a {suffix or 'suffix-less'} "
        "file: use .npy/.safetensors/.csv (distances, embeddings) or .tsv/.json (tree)",
        path,
    )


# ---- trees ---------------------------------------------------------------------------------
def _tsv_edges(path: Path) -> list[tuple[str, str | None]]:
    edges: list[tuple[str, str | None]] = []
    for n, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in line.split("\t")]
        if n == 1 and [f.lower() for f in fields] == ["child", "parent"]:
            continue
        if len(fields) > 2 or not fields[0]:
            raise NormtoolError(f"line {n}: expected 'child<TAB>parent', got {line!r}", path)
        edges.append((fields[0], fields[1] if len(fields) == 2 and fields[1] else None))
    return edges


def _json_edges(path: Path) -> list[tuple[str, str | None]]:
    def no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
        keys = [k for k, _ in pairs]
        dup = next((k for k in keys if keys.count(k) > 1), None)
        if dup is not None:
            raise NormtoolError(f"tree node {dup!r} is listed twice (two parents?)", path)
        return dict(pairs)

    try:
        data = json.loads(_read_text(path), object_pairs_hook=no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise NormtoolError(f"not valid JSON ({e})", path) from e
    except RecursionError as e:
        raise NormtoolError("JSON nested too deeply to read", path) from e
    if isinstance(data, dict) and "name" in data:
        return _nested_edges(data, path)
    if isinstance(data, dict):
        if not all(
            isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in data.items()
        ):
            raise NormtoolError("tree JSON object must map child names to parent names", path)
        return list(data.items())
    if isinstance(data, list) and all(
        isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) for e in data
    ):
        return [(c, p if isinstance(p, str) else None) for c, p in data]
    raise NormtoolError(
        'tree JSON must be {"child": "parent"}, [["child", "parent"], ...] or '
        '{"name": ..., "children": [...]}',
        path,
    )


def _nested_edges(root: dict, path: Path) -> list[tuple[str, str | None]]:
    edges: list[tuple[str, str | None]] = []
    stack: list[tuple[object, str | None]] = [(root, None)]
    while stack:  # iterative: nesting depth is the tree's depth
        node, par = stack.pop()
        if not isinstance(node, dict) or not isinstance(node.get("name"), str):
            raise NormtoolError('every nested tree node needs a string "name"', path)
        kids = node.get("children", [])
        if not isinstance(kids, list):
            raise NormtoolError(f'"children" of {node["name"]!r} must be a list', path)
        edges.append((node["name"], par))
        stack.extend((k, node["name"]) for k in reversed(kids))
    seen: set[str] = set()
    for child, _ in edges:
        if child in seen:
            raise NormtoolError(f"tree node {child!r} appears twice (two parents)", path)
        seen.add(child)
    return edges


# ---- arrays --------------------------------------------------------------------------------
def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise NormtoolError(f"not a readable .npy array ({e})", path) from e


def _from_safetensors(path: Path, kind: str, names: list[str] | None) -> Metric:
    from safetensors import safe_open

    entries, meta = read_header(path)
    if kind == "auto":
        kind = "embeddings" if "embeddings" in entries else "distances"
    key = kind if kind in entries else (next(iter(entries)) if len(entries) == 1 else None)
    if key is None:
        raise NormtoolError(
            f"expected a tensor named {kind!r} (or a single tensor); found {sorted(entries)}", path
        )
    stored = None
    if "labels" in meta:
        try:
            stored = json.loads(meta["labels"])
        except json.JSONDecodeError as e:
            raise NormtoolError(f"metadata 'labels' is not JSON ({e})", path) from e
        if not (isinstance(stored, list) and all(isinstance(s, str) for s in stored)):
            raise NormtoolError("metadata 'labels' must be a JSON list of strings", path)
    try:
        with safe_open(str(path), framework="pt") as f:
            array = f.get_tensor(key).double().numpy()
    except (RuntimeError, TypeError) as e:
        raise NormtoolError(f"cannot read tensor {key!r} as numbers ({e})", path) from e
    return _from_array(path, array, kind, stored, names)


def _from_csv(path: Path, kind: str, names: list[str] | None) -> Metric:
    rows = [r for r in csv.reader(_read_text(path).splitlines()) if any(c.strip() for c in r)]
    if not rows:
        raise NormtoolError("CSV file is empty", path)
    if kind == "embeddings":
        if rows[0] and rows[0][0].strip().lower() == "label":
            rows = rows[1:]
        row_names = [r[0].strip() for r in rows]
        values = _numbers([r[1:] for r in rows], path, first_line=1)
        return _from_array(path, values, kind, row_names, names)
    header = [c.strip() for c in rows[0]]
    body = rows[1:]
    # pandas-style files label every row too: an empty corner cell, or one more cell per row
    labelled = header[0] == "" or (bool(body) and len(body[0]) == len(header) + 1)
    header = header[1:] if header[0] == "" else header
    if labelled:
        for n, r in enumerate(body, 2):
            want = header[n - 2] if n - 2 < len(header) else "(none)"
            if r[0].strip() != want:
                raise NormtoolError(
                    f"line {n}: row label {r[0].strip()!r} does not match the header's {want!r}",
                    path,
                )
        body = [r[1:] for r in body]
    values = _numbers(body, path, first_line=2)
    return _from_array(path, values, "distances", header, names)


def _numbers(rows: list[list[str]], path: Path, first_line: int) -> np.ndarray:
    if not rows:
        raise NormtoolError("CSV file has no rows of numbers", path)
    widths = {len(r) for r in rows}
    if len(widths) > 1:
        raise NormtoolError(f"CSV rows have different lengths {sorted(widths)}", path)
    for n, r in enumerate(rows, first_line):
        for c in r:
            try:
                float(c)
            except ValueError:
                raise NormtoolError(f"line {n}: {c.strip()!r} is not a number", path) from None
    return np.array([[float(c) for c in r] for r in rows], dtype=np.float64)


def _from_array(
    path: Path, array: np.ndarray, kind: str, stored: list[str] | None, names: list[str] | None
) -> Metric:
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise NormtoolError(f"expected a 2-D numeric array, got shape {array.shape}", path)
    n = array.shape[0]
    if kind != "embeddings" and array.shape[1] != n:
        raise NormtoolError(f"distance matrix is not square: shape {n}×{array.shape[1]}", path)
    if stored is not None and len(stored) != n:
        raise NormtoolError(f"{len(stored)} label names for {n} rows", path)
    if stored is None and names is not None and len(names) != n:
        raise NormtoolError(
            f"the metric has {n} unnamed points but --labels names {len(names)}", path
        )
    point_names = stored if stored is not None else names or [str(i) for i in range(n)]
    if len(set(point_names)) != n:
        dup = next(s for s in point_names if point_names.count(s) > 1)
        raise NormtoolError(f"label {dup!r} is named twice", path)
    if kind == "embeddings":
        vectors = np.asarray(array, dtype=np.float64)
        if not np.isfinite(vectors).all():
            raise NormtoolError("embeddings contain NaN or infinite values", path)
        return EmbeddingMetric(point_names, vectors)
    _check_distances(array, path)
    return MatrixMetric(point_names, array)


def _check_distances(d: np.ndarray, path: Path) -> None:
    n = d.shape[0]
    for start in range(0, n, _ROW_CHUNK):  # row blocks: bounded memory for memory-mapped input
        rows = np.asarray(d[start : start + _ROW_CHUNK], dtype=np.float64)
        cols = np.asarray(d[:, start : start + _ROW_CHUNK], dtype=np.float64).T
        where = lambda mask: tuple(int(x) for x in np.argwhere(mask)[0])  # noqa: E731
        if not np.isfinite(rows).all():
            i, j = where(~np.isfinite(rows))
            raise NormtoolError(f"distance d[{start + i},{j}] is not finite", path)
        if (rows < 0).any():
            i, j = where(rows < 0)
            raise NormtoolError(
                f"negative distance d[{start + i},{j}] = {rows[i, j]:g}; distances must be ≥ 0",
                path,
            )
        diag = rows[np.arange(rows.shape[0]), start + np.arange(rows.shape[0])]
        if (diag != 0).any():
            i = int(np.flatnonzero(diag != 0)[0])
            raise NormtoolError(
                f"d[{start + i},{start + i}] = {diag[i]:g}; a label's distance to itself must be 0",
                path,
            )
        tol = 1e-9 + 1e-6 * np.maximum(np.abs(rows), np.abs(cols))
        bad = np.abs(rows - cols) > tol
        if bad.any():
            i, j = where(bad)
            raise NormtoolError(
                f"distance matrix is asymmetric: d[{start + i},{j}] = {rows[i, j]:g} but "
                f"d[{j},{start + i}] = {cols[i, j]:g}",
                path,
            )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise NormtoolError(f"cannot read as UTF-8 text ({e})", path) from e


def load_label_space(
    metric: Path, kind: str, labels: Path | None, observed: Path | None, k: int
) -> LabelSpace:
    """The metric file read (``kind`` as ``--metric-kind``) and its labels resolved against a
    model's ``k`` outputs — what ``loki-head`` and its ``normtool run`` step both need."""
    names = read_label_file(labels) if labels else None
    m = load_metric(metric, kind, names)
    seen = read_label_file(observed) if observed else None
    return resolve_labels(m, k, names, seen, labels, observed)
