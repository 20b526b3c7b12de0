"""loki-head: predictions of the torch executor and of the ONNX export (fp32, fp16) equal a
brute-force Fréchet mean written out here (a loop over candidate labels, distances from a
parent-pointer walk or the metric file's own numbers), unobserved labels are predicted when
they minimise the risk, ties go to the lowest label index, bad metrics exit 2 with the reason.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

from devkit.proc import run_cli
from normtool import runner
from normtool.cli import main
from normtool.load import load_model
from normtool.loki.head import LokiHead, duplicate_columns
from normtool.loki.labels import resolve_labels
from normtool.loki.metric import MatrixMetric
from normtool.loki.metric_files import load_metric
from normtool.runtime.torch_exec import run_graph

# ---- independent reference ----------------------------------------------------------------


def path_walk_distance(parent: dict[str, str], a: str, b: str) -> int:
    """Hops between a and b: climb from a recording depths, then climb from b to the first
    shared ancestor."""
    up, n, d = {}, a, 0
    while True:
        up[n] = d
        if n not in parent:
            break
        n, d = parent[n], d + 1
    n, d = b, 0
    while n not in up:
        n, d = parent[n], d + 1
    return up[n] + d


def brute_force_risk(
    logits: np.ndarray, observed: list[str], labels: list[str], dist
) -> np.ndarray:
    """risk[b, j] = Σ_i softmax(logits)[b, i] · dist(labels[j], observed[i])², in float64."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    risk = np.zeros((z.shape[0], len(labels)))
    for j, y in enumerate(labels):
        for i, lam in enumerate(observed):
            risk[:, j] += p[:, i] * float(dist(y, lam)) ** 2
    return risk


def assert_minimises(pred: np.ndarray, risk: np.ndarray) -> None:
    """``pred`` must be the lowest-index minimiser of ``risk``.

    Tolerance: the head computes a K-term risk in fp32 (≈ K·6e-8 relative to max D²); 1e-5 of
    the largest risk covers that with margin. Where labels within that band do not tie exactly
    in float64, fp32 cannot order them and any of them is accepted — at most 1 in 10 rows, so the
    check keeps its power.
    """
    assert pred.dtype == np.int64
    scale = float(risk.max())
    best = risk.min(1, keepdims=True)
    near = risk <= best + 1e-5 * scale
    exact = np.abs(risk - best) <= 1e-12 * scale
    ambiguous = 0
    for b in range(len(pred)):
        if (near[b] == exact[b]).all():
            assert pred[b] == np.flatnonzero(exact[b])[0], (b, pred[b], risk[b])
        else:
            assert near[b, pred[b]], (b, pred[b], risk[b])
            ambiguous += 1
    assert ambiguous <= len(pred) // 10


def onnx_outputs(model, inputs: dict[str, torch.Tensor], dtype: str) -> dict[str, np.ndarray]:
    from normtool.runtime.onnx_emit import EmitOptions, emit_onnx

    proto = emit_onnx(model.graph, model.weights(), EmitOptions(dtype=dtype))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    ft = np.float16 if dtype == "fp16" else np.float32
    feeds = {
        k: v.numpy().astype(ft) if v.is_floating_point() else v.numpy() for k, v in inputs.items()
    }
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds), strict=True))


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in-process (fast); returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return int(e.value.code), out.out, out.err


def save_mlp(path: Path, net: torch.nn.Sequential) -> Path:
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


# ---- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_tree(tmp_path_factory) -> tuple[Path, dict[str, str], list[str]]:
    """A seeded random tree of 40 nodes as .tsv; returns (file, parent map, leaves first-seen)."""
    rng = random.Random(3)
    parent = {f"n{i}": f"n{rng.randrange(max(0, i - 6), i)}" for i in range(1, 40)}
    d = tmp_path_factory.mktemp("tree")
    lines = [f"{c}\t{p}" for c, p in parent.items()]
    (d / "tree.tsv").write_text("child\tparent\n" + "\n".join(lines) + "\n")
    seen: list[str] = []
    for c, p in parent.items():
        seen += [n for n in (c, p) if n not in seen]
    leaves = [n for n in seen if n not in set(parent.values())]
    return d / "tree.tsv", parent, leaves


# ---- the tree index -----------------------------------------------------------------------


def test_tree_distances_equal_path_walk(random_tree):
    path, parent, leaves = random_tree
    metric = load_metric(path)
    assert [metric.names[i] for i in metric.default_labels] == leaves
    idx = np.arange(len(metric.names))
    got = metric.block(idx, idx)
    want = np.array(
        [[path_walk_distance(parent, a, b) ** 2 for b in metric.names] for a in metric.names]
    )
    assert np.array_equal(got, want)  # integers: exact
    a, b = np.meshgrid(idx, idx)  # the elementwise query (--eval) uses a different index
    assert np.array_equal(metric.pairs(a.ravel(), b.ravel()), want.T.ravel())


def test_json_tree_formats_equal_tsv(tmp_path, random_tree):
    path, parent, _ = random_tree
    tsv = load_metric(path)
    (tmp_path / "flat.json").write_text(json.dumps(parent))
    kids: dict[str, list[str]] = {}
    for c, p in parent.items():
        kids.setdefault(p, []).append(c)

    def nest(n: str) -> dict:
        return {"name": n, "children": [nest(c) for c in kids.get(n, [])]}

    (tmp_path / "nested.json").write_text(json.dumps(nest("n0")))
    for f in ("flat.json", "nested.json"):
        m = load_metric(tmp_path / f)
        order = [m.names.index(n) for n in tsv.names]
        idx = np.arange(len(order))
        assert np.array_equal(m.block(np.array(order), np.array(order)), tsv.block(idx, idx))


# ---- end to end: MLP, tree metric, torch and ONNX --------------------------------------------


def test_cli_mlp_tree_matches_brute_force(tmp_path, capsys, random_tree):
    tree, parent, leaves = random_tree
    rng = random.Random(5)
    observed = rng.sample(leaves, 7)  # a shuffled subset: the map must be followed, not guessed
    (tmp_path / "observed.txt").write_text("\n".join(observed) + "\n")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 7))
    with torch.no_grad():
        net[2].weight.mul_(4.0)  # confident but varied distributions: the head has work to do
    src = save_mlp(tmp_path / "mlp.safetensors", net.eval())
    r = run_cli(
        "loki-head", src, "--metric", tree, "--observed", tmp_path / "observed.txt", "--json"
    )
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    out = Path(info["output"])
    assert out == tmp_path / "mlp.loki.safetensors" and info["labels"] == len(leaves)
    model = load_model(out)
    assert model.graph.outputs == ["logits", "prediction"]

    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(7))
    got = run_graph(model.graph, model.weights(), {"input": x})
    # same float32 ops as the module: only summation-order noise
    assert torch.allclose(got["logits"], net(x), atol=1e-5, rtol=0)

    def dist(a, b):
        return path_walk_distance(parent, a, b)

    risk = brute_force_risk(got["logits"].numpy(), observed, leaves, dist)
    assert_minimises(got["prediction"].numpy(), risk)
    assert len(set(got["prediction"].tolist())) >= 3  # not a constant answer
    for dtype in ("fp32", "fp16"):  # through `normtool export`, as a user ships it
        onnx_path = tmp_path / f"mlp.{dtype}.onnx"
        code, _, err = cli(capsys, "export", out, "--dtype", dtype, "-o", onnx_path)
        assert code == 0, err
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        feed = {"input": x.numpy().astype(np.float16 if dtype == "fp16" else np.float32)}
        o = dict(zip([v.name for v in sess.get_outputs()], sess.run(None, feed), strict=True))
        # reference from the export's own logits: the head itself runs in fp32 in both exports
        assert_minimises(o["prediction"], brute_force_risk(o["logits"], observed, leaves, dist))


# ---- unobserved labels, ties, --eval ----------------------------------------------------------


def _equal_logit_mlp(path: Path, k: int) -> Path:
    """An MLP whose outputs are all 0: every input gives the uniform distribution over k classes."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, k))
    with torch.no_grad():
        net[2].weight.zero_()
        net[2].bias.zero_()
    return save_mlp(path, net)


@pytest.mark.parametrize("kind", ["tree", "embeddings"])
def test_unobserved_label_is_predicted_and_evaluated(tmp_path, capsys, kind):
    if kind == "tree":
        # root → A → {a1, a2}; root → b1. Labels include the inner node A (unobserved).
        metric = tmp_path / "t.tsv"
        metric.write_text("A\troot\na1\tA\na2\tA\nb1\troot\n")
        labels, observed = ["a1", "a2", "A", "b1"], ["a1", "a2"]
        # p = (½, ½): risk(a1) = ½·0 + ½·2² = 2, risk(a2) = 2, risk(A) = ½·1 + ½·1 = 1,
        # risk(b1) = ½·3² + ½·3² = 9 → A (index 2); argmax picks output 0 = a1 (index 0)
        truth, loki_msd, argmax_msd = 2, 0.0, 1.0
    else:
        # 1-D embeddings a=0, b=1, c=2; observed a and c. risk(b) = ½·1 + ½·1 = 1 < 2 = risk(a)
        metric = tmp_path / "e.csv"
        metric.write_text("label,x\na,0\nb,1\nc,2\n")
        labels, observed = ["a", "b", "c"], ["a", "c"]
        truth, loki_msd, argmax_msd = 1, 0.0, 1.0
    (tmp_path / "labels.txt").write_text("\n".join(labels))
    (tmp_path / "observed.txt").write_text("\n".join(observed))
    src = _equal_logit_mlp(tmp_path / "m.safetensors", len(observed))
    n = 10
    data = tmp_path / "eval.npz"
    np.savez(data, inputs=np.random.randn(n, 3).astype(np.float32), labels=np.full(n, truth))
    extra = ["--metric-kind", "embeddings"] if kind == "embeddings" else []
    code, out, err = cli(
        capsys, "loki-head", src, "--metric", metric, "--labels", tmp_path / "labels.txt",
        "--observed", tmp_path / "observed.txt", "--eval", data, "--json", *extra,
    )  # fmt: skip
    assert code == 0, err
    ev = json.loads(out)["eval"]
    # every example's true label is the unobserved one: Loki is exact, argmax off by one hop
    assert ev["loki"] == {"mean_squared_distance": loki_msd, "top1_accuracy": 1.0}
    assert ev["argmax"] == {"mean_squared_distance": argmax_msd, "top1_accuracy": 0.0}
    model = load_model(tmp_path / "m.loki.safetensors")
    x = {"input": torch.randn(5, 3)}
    assert run_graph(model.graph, model.weights(), x)["prediction"].tolist() == [truth] * 5
    for dtype in ("fp32", "fp16"):
        assert onnx_outputs(model, x, dtype)["prediction"].tolist() == [truth] * 5


@pytest.mark.parametrize("order", [["o1", "v", "u", "o2"], ["o1", "u", "v", "o2"]])
def test_exact_ties_go_to_the_lowest_label_index(tmp_path, order):
    """u and v are both at distance 1 from o1 and o2 (identical D² columns); with p = (½, ½)
    they minimise the risk (1 < 2) and tie exactly: the earlier of the two must win, in torch
    and in both ONNX exports."""
    d = {("o1", "o2"): 2, ("u", "v"): 2, ("o1", "u"): 1, ("o1", "v"): 1, ("o2", "u"): 1}
    d[("o2", "v")] = 1
    names = ["o1", "o2", "u", "v"]
    m = np.array([[d.get((a, b), d.get((b, a), 0)) for b in names] for a in names], float)
    metric = MatrixMetric(names, m)
    model = load_model(_equal_logit_mlp(tmp_path / "m.safetensors", 2))
    space = resolve_labels(metric, 2, order, ["o1", "o2"])
    new = runner.apply(model, [LokiHead(space)]).model
    x = {"input": torch.randn(4, 3)}
    assert run_graph(new.graph, new.weights(), x)["prediction"].tolist() == [1] * 4
    for dtype in ("fp32", "fp16"):
        assert onnx_outputs(new, x, dtype)["prediction"].tolist() == [1] * 4


def test_duplicate_columns_found_exactly():
    rng = np.random.default_rng(0)
    d2 = rng.integers(0, 5, size=(6, 40)).astype(np.float32)
    d2[:, 17] = d2[:, 3]
    d2[:, 30] = d2[:, 3]
    d2[:, 25] = d2[:, 9]
    want = np.zeros(40, bool)
    for j in range(40):  # brute force: equal to any earlier column
        want[j] = any(np.array_equal(d2[:, j], d2[:, i]) for i in range(j))
    assert want[[17, 30, 25]].all()
    assert np.array_equal(duplicate_columns(d2), want)


# ---- every classifier family -------------------------------------------------------------------


def _family_model(kind: str, d: Path) -> Path:
    from devkit.factories import (
        make_bert,
        make_cnn,
        make_reference_transformer,
        make_resnet,
        make_vit,
    )

    return {
        "vit": lambda: make_vit(d / "vit"),
        "bert": lambda: make_bert(d / "bert"),
        "resnet": lambda: make_resnet(d),
        "normtool_cnn": lambda: make_cnn(d),
        "normtool_transformer": lambda: make_reference_transformer(d, num_classes=4, causal=False),
    }[kind]()


@pytest.mark.parametrize("kind", ["vit", "bert", "resnet", "normtool_cnn", "normtool_transformer"])
def test_every_classifier_family(tmp_path, kind):
    from normtool.inputs import random_inputs

    model = load_model(_family_model(kind, tmp_path))
    k = model.graph.spaces[model.graph.value_spaces["logits"]].size
    # points on a line, the classes observed in reverse order among k + 3 labels
    pos = {f"y{j}": float(j) for j in range(k + 3)}
    names = list(pos)
    m = np.abs(np.subtract.outer(list(pos.values()), list(pos.values())))
    observed = [f"y{j}" for j in reversed(range(1, k + 1))]
    space = resolve_labels(MatrixMetric(names, m), k, None, observed)
    new = runner.apply(model, [LokiHead(space)]).model

    def dist(a, b):
        return abs(pos[a] - pos[b])

    x = random_inputs(new.graph, 16, 6, seed=1)
    got = run_graph(new.graph, new.weights(), x)
    assert_minimises(
        got["prediction"].numpy(), brute_force_risk(got["logits"].numpy(), observed, names, dist)
    )
    for dtype in ("fp32", "fp16"):
        o = onnx_outputs(new, x, dtype)
        assert_minimises(o["prediction"], brute_force_risk(o["logits"], observed, names, dist))


def test_language_model_is_refused(tmp_path, capsys):
    from devkit.factories import make_reference_transformer

    lm = make_reference_transformer(tmp_path, name="lm")
    (tmp_path / "t.tsv").write_text("a\troot\n")
    code, _, err = cli(capsys, "loki-head", lm, "--metric", tmp_path / "t.tsv")
    assert code == 2 and "one distribution per input" in err


# ---- bad metrics and maps: exit 2, one line naming the file and the reason --------------------


def _npy(a):
    return lambda d: (np.save(d / "m.npy", np.asarray(a, float)), d / "m.npy")[1]


def _text(name: str, text: str):
    return lambda d: ((d / name).write_text(text), d / name)[1]


BAD = {
    "not_square": (_npy(np.zeros((3, 4))), [], "m.npy", "not square"),
    "negative": (_text("m.csv", "a,b\n0,-1\n-1,0\n"), [], "m.csv", "negative"),
    "asymmetric": (_npy([[0, 1, 2], [1, 0, 1], [5, 1, 0]]), [], "m.npy", "asymmetric"),
    "diagonal": (_npy([[0, 1], [1, 3]]), [], "m.npy", "to itself"),
    "not_a_number": (_text("m.csv", "a,b\n0,x\n1,0\n"), [], "m.csv", "not a number"),
    "cycle_detached": (_text("t.tsv", "a\tr\nb\tc\nc\tb\n"), [], "t.tsv", "cycle"),
    "cycle_no_root": (_text("t.tsv", "a\tb\nb\ta\n"), [], "t.tsv", "cycle"),
    "self_loop": (_text("t.tsv", "a\ta\n"), [], "t.tsv", "cycle"),
    "several_roots": (_text("t.tsv", "a\tr1\nb\tr2\n"), [], "t.tsv", "2 roots"),
    "two_parents": (_text("t.json", '[["a", "r"], ["a", "s"], ["s", "r"]]'), [], "t.json", "two parents"),
    "unknown_observed": (
        _text("t.tsv", "a\tr\nb\tr\nc\tr\n"), ["--observed", "obs_bad.txt"], "obs_bad.txt", "unknown label",
    ),
    "k_mismatch": (_text("t.tsv", "a\tr\nb\tr\nc\tr\n"), ["--observed", "obs2.txt"], "obs2.txt", "3 outputs"),
    "observed_required": (_text("t.tsv", "a\tr\nb\tr\nc\tr\nd\tr\n"), [], "m.safetensors", "--observed"),
    "unknown_in_labels": (_text("t.tsv", "a\tr\nb\tr\n"), ["--labels", "obs_bad.txt"], "obs_bad.txt", "not in the metric"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_metric_exits_2(tmp_path, capsys, case):
    make, extra, name, words = BAD[case]
    metric = make(tmp_path)
    (tmp_path / "obs_bad.txt").write_text("a\nzebra\nb\n")
    (tmp_path / "obs2.txt").write_text("a\nb\n")
    src = _equal_logit_mlp(tmp_path / "m.safetensors", 3)
    args = [a if not a.endswith(".txt") else tmp_path / a for a in extra]
    code, out, err = cli(capsys, "loki-head", src, "--metric", metric, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert name in lines[0] and words in lines[0], lines[0]
    assert not (tmp_path / "m.loki.safetensors").exists()


def test_bad_metric_from_outside(tmp_path):
    """The same contract through a real subprocess, as CI sees it."""
    src = _equal_logit_mlp(tmp_path / "m.safetensors", 2)
    (tmp_path / "t.tsv").write_text("a\tr1\nb\tr2\n")
    r = run_cli("loki-head", src, "--metric", tmp_path / "t.tsv")
    assert r.returncode == 2 and "t.tsv" in r.stderr and "roots" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_nonfinite_weights_are_refused(tmp_path, value):
    """The Loki head pass refuses NaN/Inf weights like every transform (the CLI case is in
    test_hostile): a NaN logit makes every risk NaN, and the self-check, run against the same
    NaN logits, called the result "verified"."""
    from normtool.errors import NormtoolError

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    sd["2.bias"][0] = value
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    names = ["a", "b", "c"]
    space = resolve_labels(MatrixMetric(names, 1.0 - np.eye(3)), 3, None, names)
    with pytest.raises(NormtoolError, match=r"'1\.bias' \(stored as '2\.bias'\) holds NaN or Inf"):
        runner.apply(load_model(path, act="relu"), [LokiHead(space)])
