"""normtool.nn: training-time norm layers and reference models.

Expected values are the papers' formulas written out here in plain torch (fp64), never the
layers' own code paths.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from devkit.factories import TINY_TRANSFORMER, make_reference_transformer
from normtool.graph import Graph, InputSpec, Op, Source, Space, TensorSpec
from normtool.nn import CRMSNorm, PowerNorm, ReferenceTransformer, RMSNorm, UnifiedNorm
from normtool.nn.save import load_reference, read_config, save_reference
from normtool.nn.transformer import transformer_config
from normtool.runtime.torch_exec import run_graph

D, HEADS = 8, 2


def _x(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _gs(x: torch.Tensor, groups: int, eps: float = 1e-5) -> torch.Tensor:
    """GroupScaling1D written out: each group of d/groups channels divided by its RMS."""
    parts = x.chunk(groups, dim=-1)
    return torch.cat([p / torch.sqrt((p * p).mean(-1, keepdim=True) + eps) for p in parts], -1)


# ---- PowerNorm -------------------------------------------------------------------------------
# Training steps (statistics, gradients, buffers) against the reference algorithms written out:
# tests/test_nn_training.py.


def test_powernorm_state_dict_matches_reference_layout():
    sd = PowerNorm(D, groups=HEADS).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes == {
        "weight": (D,),
        "bias": (D,),
        "running_phi": (1, D, 1, 1),
        "ema_gz": (1, D, 1, 1),
        "iters": (1,),
    }
    assert sd["iters"].dtype == torch.int64


def test_powernorm_backward_runs_and_updates_ema_gz():
    pn = PowerNorm(D, groups=HEADS, warmup_iters=0).double().train()
    x = _x(4, 6, D, seed=1).requires_grad_()
    (pn(x) * _x(4, 6, D, seed=2)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert pn.weight.grad is not None and pn.bias.grad is not None
    assert pn.ema_gz.abs().sum() > 0  # the gradient statistic ν moved away from its zero start
    # weight/bias gradients are exact: d/dγ Σ(g·y) = Σ g·ẑ, d/dβ = Σ g
    g = _x(4, 6, D, seed=2)
    # no warm-up: step 1 already divides by the running statistic, still at its initial ones
    z = (_gs(x.detach(), HEADS) / torch.sqrt(torch.ones(D, dtype=torch.float64) + 1e-5)).reshape(
        -1, D
    )
    assert torch.allclose(pn.weight.grad, (g.reshape(-1, D) * z).sum(0), atol=1e-10)
    assert torch.allclose(pn.bias.grad, g.reshape(-1, D).sum(0), atol=1e-12)


def test_powernorm_eval_formula_and_graph_op_agree():
    pn = PowerNorm(D, groups=HEADS).double().eval()
    with torch.no_grad():
        pn.weight.copy_(_x(D, seed=3))
        pn.bias.copy_(_x(D, seed=4))
        pn.running_phi.copy_(torch.rand(1, D, 1, 1, dtype=torch.float64) + 0.1)
    x = _x(2, 5, D, seed=5, scale=3.0)
    phi = pn.running_phi.reshape(-1)
    want = pn.weight * _gs(x, HEADS) / torch.sqrt(phi + 1e-5) + pn.bias
    assert (pn(x) - want).abs().max().item() < 1e-12
    graph = _one_op_graph("powernorm", ("weight", "bias", "running_phi"), groups=HEADS, gs_eps=1e-5)
    weights = {"n.weight": pn.weight, "n.bias": pn.bias, "n.running_phi": pn.running_phi}
    got = run_graph(graph, weights, {"x": x}, dtype=torch.float64)["n"]
    assert (got - want).abs().max().item() < 1e-12


# ---- Unified Normalization -------------------------------------------------------------------


def test_un_state_dict_matches_reference_layout():
    sd = UnifiedNorm(D, window=3).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes == {
        "weight": (D,),
        "bias": (D,),
        "running_var": (D,),
        "ema_gz": (D,),
        "iters": (1,),
        "buffer_x2": (3, D),
        "buffer_gz": (3, D),
        "skip_counter": (1,),
    }


def test_un_windowed_geometric_mean_and_running_var():
    w, warm, m = 3, 2, 0.7
    un = UnifiedNorm(D, window=w, warmup_iters=warm, momentum=m).double().train()
    rv = torch.ones(D, dtype=torch.float64)
    history = []
    for step in range(1, 9):
        x = _x(4, 3, D, seed=step, scale=0.5 + step / 4)
        y = un(x)
        x2 = x.pow(2).reshape(-1, D).mean(0)
        history.append(x2)
        # window full and warm-up over: the geometric mean of the last w statistics
        windowed = step > w and step >= warm
        var = torch.stack(history[-w:]).log().mean(0).exp() if windowed else x2
        want = un.weight * x / torch.sqrt(var + 1e-5) + un.bias
        assert (y - want).abs().max().item() < 1e-12, step
        rv = m * rv + (1 - m) * var
        assert torch.allclose(un.running_var, rv, atol=1e-12, rtol=0), step
        y.sum().backward()  # the backward updates the gradient window without error
    assert int(un.iters) == 8 and int(un.skip_counter) == 0
    assert un.buffer_gz.abs().sum() > 0 and un.ema_gz.abs().sum() > 0


def test_un_outlier_filtration_skips_a_spike():
    # warm-up ≥ window: the filter starts once the window holds batch statistics only
    un = UnifiedNorm(D, window=4, warmup_iters=4, outlier_filtration=True).double().train()
    for step in range(8):
        un(_x(16, D, seed=step))
    assert int(un.skip_counter) == 0
    before = un.running_var.clone()
    x = _x(16, D, seed=99, scale=50.0)  # a batch far outside the recent statistics
    y = un(x)
    assert int(un.skip_counter) == 1
    x2 = x.pow(2).mean(0)
    # a skipped batch is normalised by its own statistic, which also enters the EMA
    assert (y - (un.weight * x / torch.sqrt(x2 + 1e-5) + un.bias)).abs().max() < 1e-12
    assert torch.allclose(un.running_var, 0.9 * before + 0.1 * x2, atol=1e-12, rtol=0)
    # ...but the window keeps the running statistic in its place, not the outlier
    assert torch.allclose(un.buffer_x2[9 % 4], before, atol=0, rtol=0)


def test_un_eval_formula_and_graph_op_agree():
    un = UnifiedNorm(D).double().eval()
    with torch.no_grad():
        un.weight.copy_(_x(D, seed=3))
        un.bias.copy_(_x(D, seed=4))
        un.running_var.copy_(torch.rand(D, dtype=torch.float64) + 0.1)
    x = _x(2, 5, D, seed=5, scale=3.0)
    want = un.weight * x / torch.sqrt(un.running_var + 1e-5) + un.bias  # no mean subtraction
    assert (un(x) - want).abs().max().item() < 1e-12
    graph = _one_op_graph("unorm", ("weight", "bias", "running_var"))
    weights = {"n.weight": un.weight, "n.bias": un.bias, "n.running_var": un.running_var}
    got = run_graph(graph, weights, {"x": x}, dtype=torch.float64)["n"]
    assert (got - want).abs().max().item() < 1e-12


def _one_op_graph(kind: str, roles: tuple[str, ...], **attrs) -> Graph:
    tensors = {f"n.{r}": TensorSpec((D,), ("c",), Source(f"n.{r}")) for r in roles}
    return Graph(
        family="test",
        inputs=[InputSpec("x", "features", ("batch", "seq", D))],
        outputs=["n"],
        ops=[Op("n", kind, ("x",), "n", {r: f"n.{r}" for r in roles}, {"eps": 1e-5, **attrs})],
        spaces={"c": Space("c", D, "resid")},
        tensors=tensors,
        value_spaces={"x": "c", "n": "c"},
    )


# ---- RMSNorm / CRMSNorm ----------------------------------------------------------------------


def test_rmsnorm_and_crmsnorm_formulas():
    x = _x(3, 4, D, seed=7, scale=2.0)
    w = _x(D, seed=8)
    rms, crms = RMSNorm(D).double(), CRMSNorm(D).double()
    with torch.no_grad():
        rms.weight.copy_(w)
        crms.weight.copy_(w)
    want = x / torch.sqrt((x * x).sum(-1, keepdim=True) / D + 1e-5) * w
    assert (rms(x) - want).abs().max() < 1e-12
    # CRMSNorm on d values = RMSNorm of the zero-mean (d+1)-vector [x, -Σx], first d coords
    full = torch.cat([x, -x.sum(-1, keepdim=True)], -1)
    want_c = full / torch.sqrt((full * full).mean(-1, keepdim=True) + 1e-5)
    assert (crms(x) - want_c[..., :D] * w).abs().max() < 1e-12


# ---- ReferenceTransformer --------------------------------------------------------------------

NORM_KEYS = {
    "layernorm": {"weight", "bias"},
    "rmsnorm": {"weight"},
    "crmsnorm": {"weight"},
    "powernorm": {"weight", "bias", "running_phi", "ema_gz", "iters"},
    "un": {"weight", "bias", "running_var", "ema_gz", "iters", "buffer_x2", "buffer_gz"}
    | {"skip_counter"},
    "batchnorm": {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"},
}


@pytest.mark.parametrize("norm", sorted(NORM_KEYS))
@pytest.mark.parametrize(("placement", "parallel"), [("pre", False), ("post", True)])
def test_transformer_state_dict_contract(norm, placement, parallel):
    cfg = transformer_config(
        **{**TINY_TRANSFORMER, "layers": 1}, norm=norm, placement=placement, parallel=parallel
    )
    keys = set(ReferenceTransformer(cfg).state_dict())
    want = {"tok_emb.weight", "pos_emb.weight", "head.weight", "head.bias"}
    want |= {f"blocks.0.attn.{p}.{r}" for p in "qkvo" for r in ("weight", "bias")}
    want |= {f"blocks.0.mlp.{p}.{r}" for p in ("fc1", "fc2") for r in ("weight", "bias")}
    norms = ["blocks.0.norm1"] + ([] if parallel else ["blocks.0.norm2"])
    norms += ["norm_f"] if placement == "pre" else []
    want |= {f"{n}.{k}" for n in norms for k in NORM_KEYS[norm]}
    assert keys == want


def test_transformer_tied_without_bias_has_no_head_tensors():
    cfg = transformer_config(**TINY_TRANSFORMER, tie_embeddings=True, bias=False)
    keys = set(ReferenceTransformer(cfg).state_dict())
    assert not [k for k in keys if k.startswith("head.")]
    assert not [k for k in keys if k.endswith(".bias") and (".attn." in k or ".mlp." in k)]


def _plain_forward(sd: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """The contract's forward for pre-norm LayerNorm, serial or parallel, written out."""
    h, d = cfg["heads"], cfg["d_model"]
    b, t = ids.shape
    x = sd["tok_emb.weight"][ids] + sd["pos_emb.weight"][:t]

    def ln(p, v):
        mu = v.mean(-1, keepdim=True)
        var = ((v - mu) ** 2).mean(-1, keepdim=True)
        return (v - mu) / torch.sqrt(var + cfg["norm_eps"]) * sd[f"{p}.weight"] + sd[f"{p}.bias"]

    def lin(p, v):
        return v @ sd[f"{p}.weight"].T + sd[f"{p}.bias"]

    def attn(p, v):
        q, k, vv = (lin(f"{p}.{n}", v).reshape(b, t, h, d // h).transpose(1, 2) for n in "qkv")
        s = q @ k.transpose(-1, -2) / math.sqrt(d // h)
        s = s + torch.full((t, t), float("-inf"), dtype=s.dtype).triu(1)
        return lin(f"{p}.o", (s.softmax(-1) @ vv).transpose(1, 2).reshape(b, t, d))

    def mlp(p, v):
        u = lin(f"{p}.fc1", v)
        return lin(f"{p}.fc2", 0.5 * u * (1 + torch.erf(u / math.sqrt(2))))

    for i in range(cfg["layers"]):
        p = f"blocks.{i}"
        if cfg["parallel"]:
            n = ln(f"{p}.norm1", x)
            x = x + attn(f"{p}.attn", n) + mlp(f"{p}.mlp", n)
        else:
            x = x + attn(f"{p}.attn", ln(f"{p}.norm1", x))
            x = x + mlp(f"{p}.mlp", ln(f"{p}.norm2", x))
    return lin("head", ln("norm_f", x))


@pytest.mark.parametrize("parallel", [False, True])
def test_transformer_forward_matches_written_out_maths(tmp_path, parallel):
    path = make_reference_transformer(tmp_path, parallel=parallel)
    model = load_reference(path).double()
    ids = torch.randint(0, TINY_TRANSFORMER["vocab_size"], (2, 9))
    sd = {k: v.double() for k, v in model.state_dict().items()}
    want = _plain_forward(sd, model.config, ids)
    # fp64, same maths, different op order: rounding noise only
    assert (model(ids) - want).abs().max().item() < 1e-10


def test_post_norm_and_classifier_shapes(tmp_path):
    model = load_reference(make_reference_transformer(tmp_path, placement="post", num_classes=3))
    ids = torch.randint(0, TINY_TRANSFORMER["vocab_size"], (2, 5))
    assert model(ids).shape == (2, 3)
    # post placement: the last block's output is already normalised; no final norm
    assert not hasattr(model, "norm_f")


def test_save_load_roundtrip(tmp_path):
    cfg = transformer_config(**TINY_TRANSFORMER, norm="powernorm", placement="post")
    torch.manual_seed(0)
    model = ReferenceTransformer(cfg).eval()
    path = save_reference(model, tmp_path / "m.safetensors")
    assert read_config(path) == cfg
    again = load_reference(path)
    ids = torch.randint(0, cfg["vocab_size"], (2, 6))
    assert torch.equal(model(ids), again(ids))
    with pytest.raises(Exception, match="exists"):
        save_reference(model, path)


@pytest.mark.parametrize("norm", ["powernorm", "un"])
def test_transformer_trains_with_batch_statistic_norms(norm):
    torch.manual_seed(0)
    cfg = transformer_config(**TINY_TRANSFORMER, norm=norm)
    model = ReferenceTransformer(cfg).train()
    for m in model.modules():
        if isinstance(m, (PowerNorm, UnifiedNorm)):
            m.warmup_iters = 5
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    ids = torch.randint(0, cfg["vocab_size"], (8, 12))  # one fixed batch: loss must fall
    losses = []
    for _ in range(30):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg["vocab_size"]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0]
    stat = "running_phi" if norm == "powernorm" else "running_var"
    assert not torch.allclose(getattr(model.blocks[0].norm1, stat), torch.ones(1))


# ---- trained fixtures ------------------------------------------------------------------------

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.mark.parametrize("norm", ["powernorm", "un"])
@pytest.mark.parametrize("placement", ["pre", "post"])
def test_fixture_statistics_are_trained(norm, placement):
    path = FIXTURES / f"ref_{norm}_{placement}.safetensors"
    assert path.stat().st_size < 200 * 1024
    model = load_reference(path)
    assert (model.config["norm"], model.config["placement"]) == (norm, placement)
    stat = "running_phi" if norm == "powernorm" else "running_var"
    stats = [m for k, m in model.state_dict().items() if k.endswith(stat)]
    assert len(stats) == (5 if placement == "pre" else 4)
    for s in stats:
        assert torch.isfinite(s).all() and (s > 0).all()
        assert s.max() / s.min() > 1.2  # uneven across channels, unlike the initial ones
    # the eval forward (running statistics) still models the training data: x[t+1] = x[t] + k
    ids = (torch.arange(16) * 2 + 5).remainder(64).unsqueeze(0)
    pred = model(ids).argmax(-1)
    assert (pred[0, 2:-1] == ids[0, 3:]).float().mean() > 0.9
