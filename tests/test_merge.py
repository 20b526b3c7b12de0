"""merge / barrier: permutation symmetry, weight matching, output formats, BatchNorm, errors.

Independent references: the unpermuted model's own output (a permutation must not change the
function), transformers' forward for Hugging Face folders, plain ``nn.Sequential`` modules for
MLPs, and statistics measured with forward hooks on the transformers ResNet.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from devkit import factories as fh
from devkit import factories as fr
from devkit import torch_cnns as tc
from normtool.cli import main
from normtool.inputs import max_seq, random_inputs
from normtool.load import HISTORY_KEY, load_model
from normtool.merge.groups import permutation_groups
from normtool.merge.matching import weight_matching
from normtool.merge.permute import invert, permute_weights, random_perms
from normtool.runtime.torch_exec import run_graph


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in-process (a subprocess per call would dominate this file's time)."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _mlp(widths: list[int], seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers).eval()


def _save(net: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


# ---- every family: permuting alone preserves the function ----------------------------------

FACTORIES = {
    "mlp": (lambda d: _save(_mlp([12, 32, 16, 5], 0), d / "mlp.safetensors"), {}),
    "gpt2": (lambda d: fh.make_gpt2(d / "gpt2"), {}),
    "opt_pre": (lambda d: fh.make_opt(d / "opt"), {}),
    "opt_post": (lambda d: fh.make_opt(d / "opt_post", pre=False), {}),
    "vit": (lambda d: fh.make_vit(d / "vit"), {}),
    "bert": (lambda d: fh.make_bert(d / "bert"), {}),
    "timm_vit": (lambda d: fh.make_timm_vit(d / "timm"), {"heads": 4}),
    "timm_vit_un": (lambda d: fh.make_timm_vit(d / "timm_un", norm="un"), {"heads": 4}),
    "normtool_transformer": (lambda d: fr.make_reference_transformer(d), {}),
    "normtool_cnn": (lambda d: fr.make_cnn(d), {}),
    "resnet_basic": (lambda d: fr.make_resnet(d), {}),
    "resnet_bottleneck": (lambda d: fr.make_resnet(d, layer_type="bottleneck"), {}),
    **{f: (lambda d, f=f: tc.make(f, d), {}) for f in tc.FAMILIES},
}


@pytest.fixture(scope="module")
def family_path(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(name: str) -> tuple[Path, dict]:
        make, kw = FACTORIES[name]
        if name not in made:
            made[name] = make(tmp_path_factory.mktemp(name))
        return made[name], kw

    return get


def _rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max() / a[k].abs().max()) for k in a)


@pytest.mark.parametrize("family", list(FACTORIES))
def test_random_permutation_preserves_function(family, family_path):
    path, kw = family_path(family)
    model = load_model(path, **kw)
    g = model.graph
    groups, skipped = permutation_groups(g)
    assert groups, f"{family}: no permutation group found"
    w = {k: model.tensor(k) for k in g.tensors}
    perms = random_perms(g, groups, torch.Generator().manual_seed(3))
    pw = permute_weights(g, w, perms)
    assert any(not torch.equal(w[k], pw[k]) for k in w), "the permutation moved nothing"
    x = random_inputs(g, batch=3, seq=min(8, max_seq(g)), seed=1)
    # fp32: a permutation only reorders sums, so outputs differ by rounding (~1e-7 relative);
    # 1e-5 leaves room for accumulation over a few layers, far below any real change.
    assert _rel_err(run_graph(g, w, x), run_graph(g, pw, x)) <= 1e-5


def test_head_groups_are_whole_heads(family_path):
    """Head units must move whole (a cross-head permutation of q/k changes the function)."""
    path, _ = family_path("gpt2")
    model = load_model(path)
    g = model.graph
    groups, _ = permutation_groups(g)
    heads = [gr for gr in groups if gr.heads]
    assert {gr.name for gr in heads} == {"blocks.0.attn", "blocks.1.attn"}
    perms = random_perms(g, groups, torch.Generator().manual_seed(0))
    for gr in heads:
        for space in gr.spaces:
            d = g.spaces[space].size // gr.heads
            blocks = perms[space].reshape(gr.heads, d) // d
            assert bool((blocks == blocks[:, :1]).all()), "a head's dims came from two heads"
    # negative control: permute the q/k space across heads -> the function changes
    w = {k: model.tensor(k) for k in g.tensors}
    qk = g.spaces["blocks.0.qk"].size
    bad = {"blocks.0.qk": torch.randperm(qk, generator=torch.Generator().manual_seed(5))}
    x = random_inputs(g, batch=2, seq=8, seed=0)
    assert _rel_err(run_graph(g, w, x), run_graph(g, permute_weights(g, w, bad), x)) > 1e-3


@pytest.mark.parametrize(
    "family", ["mlp", "gpt2", "resnet_basic", "tv_mobilenet_v2", "timm_convnext"]
)
def test_weight_matching_recovers_known_permutation(family, family_path):
    path, kw = family_path(family)
    model = load_model(path, **kw)
    g = model.graph
    groups, _ = permutation_groups(g)
    wa = {k: model.tensor(k).float() for k in g.tensors}
    known = random_perms(g, groups, torch.Generator().manual_seed(11))
    wb = permute_weights(g, wa, known)
    r = weight_matching(g, groups, wa, wb, max_iter=100, seed=0)
    undo = invert(known)
    for space, p in r.perms.items():
        assert torch.equal(p, undo[space]), f"{space}: not the inverse of the known permutation"
    back = permute_weights(g, wb, r.perms)
    assert all(torch.equal(back[k], wa[k]) for k in wa)
    assert r.objective_after > r.objective_before


# ---- digits: the matched barrier is far below the naive one ---------------------------------


def _train_digits(x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.nn.Sequential:
    """400 Adam steps on batches of 128 (about 97% train accuracy); one thread, because
    tiny matmuls only lose time to thread hand-offs on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(x, y, seed)
    finally:
        torch.set_num_threads(threads)


def _train(x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.nn.Sequential:
    net = _mlp([64, 128, 128, 10], seed).train()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(400):
        idx = torch.randint(0, len(x), (128,), generator=gen)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def _loss(net: torch.nn.Module, state: dict[str, torch.Tensor], x, y) -> float:
    net.load_state_dict(state)
    with torch.no_grad():
        return float(F.cross_entropy(net(x), y))


def test_digits_matched_barrier_is_a_tenth_of_naive(tmp_path, capsys):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    a = _save(_train_digits(x, y, 1), tmp_path / "a.safetensors")
    b = _save(_train_digits(x, y, 2), tmp_path / "b.safetensors")
    np.savez(tmp_path / "digits.npz", inputs=x.numpy(), labels=y.numpy())

    code, _, err = cli(capsys, "merge", a, b, "-o", tmp_path / "matched.safetensors")
    assert code == 0, err
    code, _, err = cli(
        capsys, "merge", a, b, "--method", "average", "-o", tmp_path / "naive.safetensors"
    )
    assert code == 0, err

    net = _mlp([64, 128, 128, 10], 0)
    ends = (_loss(net, load_file(a), x, y) + _loss(net, load_file(b), x, y)) / 2
    naive = _loss(net, load_file(tmp_path / "naive.safetensors"), x, y) - ends
    matched = _loss(net, load_file(tmp_path / "matched.safetensors"), x, y) - ends
    print(f"digits midpoint barrier: naive {naive:.4f}, matched {matched:.4f}")
    assert naive > 0.05  # the two networks really are in different bases
    assert matched <= naive / 10

    # the barrier command measures the same midpoint (3 steps: α = 0, 0.5, 1)
    png = tmp_path / "barrier.png"
    code, out, err = cli(
        capsys, "barrier", a, b, "--data", tmp_path / "digits.npz", "--steps", "3",
        "--plot", png, "--json",
    )  # fmt: skip
    assert code == 0, err
    rep = json.loads(out)
    # same maths in fp32, summed in another order: agreement to 1e-4 absolute on losses ~0.1
    assert abs(rep["naive"]["barrier"] - naive) < 1e-4
    assert abs(rep["matched"]["barrier"] - matched) < 1e-4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- output formats ----------------------------------------------------------------------


def test_hf_folder_merge_loads_in_transformers(tmp_path, capsys):
    a, b = fh.make_gpt2(tmp_path / "a", seed=0), fh.make_gpt2(tmp_path / "b", seed=1)
    perms = tmp_path / "perms.safetensors"
    code, _, err = cli(
        capsys, "merge", a, b, "--weights", "0,1", "-o", tmp_path / "pb", "--save-perms", perms
    )
    assert code == 0, err
    assert (tmp_path / "pb" / "config.json").read_text() == (a / "config.json").read_text()
    ref, got = fh.load_hf(b), fh.load_hf(tmp_path / "pb")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, have = ref(ids).logits, got(ids).logits
    # B permuted into A's basis computes B's function: fp32 rounding only
    assert float((want - have).abs().max() / want.abs().max()) <= 1e-5
    # the saved permutation of the MLP hidden space reproduces the permuted fc weight
    with safe_open(str(perms), "pt") as f:
        p = f.get_tensor("1/blocks.0.mlp")
    fc_b = load_file(b / "model.safetensors")["transformer.h.0.mlp.c_fc.weight"]  # Conv1D: [d, 4d]
    fc_pb = load_file(tmp_path / "pb" / "model.safetensors")["transformer.h.0.mlp.c_fc.weight"]
    with safe_open(str(perms), "pt") as f:
        pr = f.get_tensor("1/resid")
    assert torch.equal(fc_pb, fc_b[pr][:, p])

    # a real merge: loadable, provenance recorded, equal to the average of A and P(B)
    code, _, err = cli(capsys, "merge", a, b, "-o", tmp_path / "mid")
    assert code == 0, err
    mid = fh.load_hf(tmp_path / "mid")
    sd_a, sd_pb = fh.load_hf(a).state_dict(), got.state_dict()
    for k, v in mid.state_dict().items():
        if v.is_floating_point():
            # (a + b) / 2 in fp32 either way: exact up to one rounding
            assert torch.allclose(v, (sd_a[k] + sd_pb[k]) / 2, atol=1e-6, rtol=0), k
    with safe_open(str(tmp_path / "mid" / "model.safetensors"), "pt") as f:
        hist = json.loads(f.metadata()[HISTORY_KEY])
    params = hist[-1]["params"]
    assert params["method"] == "match" and params["seed"] == 0 and params["sweeps"] >= 1
    assert len(params["inputs"]) == 2 and all(len(i["sha256"]) == 64 for i in params["inputs"])
    assert params["l2_after"] < params["l2_before"]


def test_sharded_folder_stays_sharded(tmp_path, capsys):
    save = {"max_shard_size": "20KB"}
    a = fh.make_opt(tmp_path / "a", seed=0, save=save)
    b = fh.make_opt(tmp_path / "b", seed=1, save=save)
    shards_in = sorted(p.name for p in a.glob("*.safetensors"))
    assert len(shards_in) > 1
    code, _, err = cli(capsys, "merge", a, b, "--weights", "0,1", "-o", tmp_path / "out")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == shards_in
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert (
        index["weight_map"]
        == json.loads((a / "model.safetensors.index.json").read_text())["weight_map"]
    )
    ref, got = fh.load_hf(b), fh.load_hf(tmp_path / "out")
    ids = torch.randint(2, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, have = ref(ids).logits, got(ids).logits
    assert float((want - have).abs().max() / want.abs().max()) <= 1e-5


@pytest.mark.parametrize("nest", [None, "state_dict", "model"])
def test_plain_state_dicts_keep_names_and_format(tmp_path, capsys, nest):
    """A flat state dict stays flat; one nested under ``state_dict``/``model`` (training
    checkpoints) stays nested there, without the input's other entries (optimizer state)."""
    nets = [_mlp([12, 32, 16, 5], s) for s in (0, 1)]
    pts = []
    for i, n in enumerate(nets):
        pts.append(tmp_path / f"m{i}.pt")
        sd = n.state_dict()
        torch.save({nest: sd, "optimizer": {"step": torch.tensor(3)}} if nest else sd, pts[-1])
    code, _, err = cli(capsys, "merge", *pts, "--weights", "0,1")
    assert code == 0, err
    out = tmp_path / "m0.merged.pt"
    sd = torch.load(out, weights_only=True)
    if nest:
        assert list(sd) == [nest]
        sd = sd[nest]
    assert list(sd) == list(nets[1].state_dict())
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(0))
    user = _mlp([12, 32, 16, 5], 7)
    user.load_state_dict(sd)
    with torch.no_grad():
        # fp32 rounding only (a permuted network sums in another order)
        assert torch.allclose(user(x), nets[1](x), atol=1e-5, rtol=0)


def test_normtool_checkpoint_stays_normtool(tmp_path, capsys):
    a = fr.make_reference_transformer(tmp_path, name="a", seed=0)
    b = fr.make_reference_transformer(tmp_path, name="b", seed=1)
    code, _, err = cli(capsys, "merge", a, b)
    assert code == 0, err
    out = tmp_path / "a.merged.safetensors"
    assert load_model(out).graph.family == "normtool_transformer"
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()[HISTORY_KEY])[-1]["transform"] == "merge"


def test_three_permuted_copies_merge_to_the_original(tmp_path, family_path, capsys):
    """Three permutations of one model: MergeMany and --reference must both undo them."""
    path, _ = family_path("mlp")
    model = load_model(path)
    g = model.graph
    groups, _ = permutation_groups(g)
    w = {k: model.tensor(k) for k in g.tensors}
    files = [path]
    for s in (1, 2):
        pw = permute_weights(g, w, random_perms(g, groups, torch.Generator().manual_seed(s)))
        files.append(_save_dict(pw, tmp_path / f"p{s}.safetensors"))
    net = _mlp([12, 32, 16, 5], 0)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = net(x)
    for extra in ([], ["--reference"]):
        out = tmp_path / f"m{len(extra)}.safetensors"
        code, stdout, err = cli(capsys, "merge", *files, "-o", out, *extra, "--json")
        assert code == 0, err
        rep = json.loads(stdout)
        assert rep["algorithm"] == ("reference" if extra else "merge_many")
        assert rep["l2_after"] < 1e-5 < rep["l2_before"]
        net.load_state_dict(load_file(out))
        with torch.no_grad():
            # the merged model is the original in some basis: fp32 rounding only
            assert torch.allclose(net(x), want, atol=1e-5, rtol=0)


def _save_dict(w: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in w.items()}, str(path))
    return path


# ---- BatchNorm -----------------------------------------------------------------------------


def test_batchnorm_stale_warning_and_calib_repair(tmp_path, capsys):
    a = fr.make_resnet(tmp_path / "a", seed=0)
    b = fr.make_resnet(tmp_path / "b", seed=1)
    code, _, err = cli(capsys, "merge", a, b, "-o", tmp_path / "stale")
    assert code == 0, err
    assert "STALE" in err and "--calib" in err

    shape = load_model(a).graph.inputs[0].shape
    pixels = torch.randn(16, *shape[1:], generator=torch.Generator().manual_seed(0))
    save_file({"inputs": pixels}, str(tmp_path / "calib.safetensors"))
    code, _, err = cli(
        capsys, "merge", a, b, "-o", tmp_path / "fixed", "--calib", tmp_path / "calib.safetensors"
    )
    assert code == 0, err
    assert "STALE" not in err
    # independent check: every BatchNorm's stored statistics are the mean / unbiased variance
    # of the input it actually sees when transformers runs the merged model on the calib data
    model = fh.load_hf(tmp_path / "fixed")
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, i[0]))
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.BatchNorm2d)
    ]
    with torch.no_grad():
        model(pixels)
    for h in hooks:
        h.remove()
    assert seen
    for name, x in seen.items():
        bn = model.get_submodule(name)
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        # fp32 statistics over ≤ 16·32·32 values, computed in another order: 1e-4 relative
        torch.testing.assert_close(bn.running_mean, flat.mean(1), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.running_var, flat.var(1), rtol=1e-4, atol=1e-5)


# ---- refusals ------------------------------------------------------------------------------


def test_bad_inputs_exit_2(tmp_path, capsys, family_path):
    path, _ = family_path("mlp")
    other = _save(_mlp([12, 32, 17, 5], 1), tmp_path / "other.safetensors")
    same = _save(_mlp([12, 32, 16, 5], 1), tmp_path / "same.safetensors")
    nan = load_file(same)
    nan["2.weight"][0, 0] = float("nan")
    nanp = _save_dict(nan, tmp_path / "nan.safetensors")
    out = ["-o", tmp_path / "o.safetensors"]
    cases = [
        ((path, *out), "at least two"),
        ((path, other, *out), "'1.weight' (stored as '2.weight') has shape (17, 32)"),
        ((path, nanp, *out), "(stored as '2.weight') holds NaN"),
        ((path, same, "--weights", "1", *out), "2 models"),
        ((path, same, "--weights", "0.5,0.6", *out), "sum to 1"),
    ]
    for args, needle in cases:
        code, _, err = cli(capsys, "merge", *args)
        assert code == 2 and needle in err and err.count("\n") == 1, (args, err)
    assert not (tmp_path / "o.safetensors").exists()
    np.savez(tmp_path / "nolabels.npz", inputs=np.zeros((4, 12), np.float32))
    code, _, err = cli(capsys, "barrier", path, same, "--data", tmp_path / "nolabels.npz")
    assert code == 2 and "labels" in err


def test_barrier_plot_without_matplotlib_is_a_clear_error(tmp_path, capsys, monkeypatch):
    path = FACTORIES["mlp"][0](tmp_path)
    np.savez(tmp_path / "d.npz", inputs=np.ones((4, 12), np.float32), labels=np.arange(4) % 5)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    png = tmp_path / "b.png"
    code, _, err = cli(
        capsys, "barrier", path, path, "--data", tmp_path / "d.npz", "--steps", "2", "--plot", png
    )
    assert code == 2 and "pip install 'normtool[plot]'" in err
    assert not png.exists()
