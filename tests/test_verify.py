"""``normtool verify`` and ``compare_models``: exit codes, the numbers reported, the JSON schema.

The reported errors are checked against an independent computation: the same inputs run through
the plain-torch modules the checkpoints were saved from, differences taken here.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import onnx
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from devkit import factories as fh
from devkit import factories as fr
from devkit.proc import run_cli
from normtool.errors import NormtoolError
from normtool.export import export_model
from normtool.inputs import random_inputs
from normtool.load import load_model
from normtool.verify import TOLERANCES, Report, compare, compare_models, open_runners
from tests.conftest import cli

DELTA = 1e-3  # the single-weight perturbation verify must catch at default tolerances


def verify_cli(*args: object) -> subprocess.CompletedProcess:
    """``normtool verify ARGS`` in this process (keeps this file fast)."""
    return cli("verify", *args)


def _save(net: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def _perturbed(net: torch.nn.Sequential, key: str, index: tuple[int, ...]) -> torch.nn.Sequential:
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin.state_dict()[key][index] += DELTA
    return twin.eval()


@pytest.fixture(scope="module")
def mlp_pair(tmp_path_factory, mlp_net):
    """The shared MLP and a twin whose first-layer weight [0, 0] is moved by DELTA."""
    d = tmp_path_factory.mktemp("verify")
    twin = _perturbed(mlp_net, "0.weight", (0, 0))
    return _save(mlp_net, d / "a.safetensors"), _save(twin, d / "b.safetensors"), twin


def test_self_is_equivalent_exit_0(mlp_path):
    r = run_cli("verify", mlp_path, mlp_path)
    assert r.returncode == 0, r.stderr
    assert "equivalent" in r.stdout and "FAIL" not in r.stdout


def test_one_weight_moved_by_1e3_is_caught(mlp_pair):
    """At the defaults (fp32 for two fp32 files), as a user's shell runs it; and in fp64."""
    a, b, _ = mlp_pair
    r = run_cli("verify", a, b)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "not equivalent" in r.stderr and str(b) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert "fp32" in r.stdout
    assert verify_cli(a, b, "--dtype", "fp64").returncode == 1


def test_reported_numbers_match_plain_torch(mlp_pair, mlp_net):
    """max_abs, scale and top-1 agreement recomputed from the torch modules on the same inputs."""
    a, b, twin = mlp_pair
    rep = compare_models(load_model(a), load_model(b), "fp64", samples=5, seed=3)
    graph = load_model(a).graph
    want_abs, want_scale, agree, rows = 0.0, 0.0, 0, 0
    net, twin = copy.deepcopy(mlp_net).double(), copy.deepcopy(twin).double()
    with torch.no_grad():
        for k, (batch, seq) in enumerate(rep.batches):
            x = random_inputs(graph, batch, seq or 1, 3 + k)["input"]
            ya, yb = net(x), twin(x)
            want_abs = max(want_abs, float((ya - yb).abs().max()))
            want_scale = max(want_scale, float(ya.abs().max()))
            agree += int((ya.argmax(-1) == yb.argmax(-1)).sum())
            rows += batch
    (out,) = rep.outputs
    # both sides are fp64 runs of the same maths: agreement to ~1e-15 relative
    assert out.max_abs == pytest.approx(want_abs, rel=1e-9)
    assert out.scale == pytest.approx(want_scale, rel=1e-12)
    assert out.agreement == agree / rows
    assert [bs for bs, _ in rep.batches][:4] == [1, 2, 8, 16]  # batch 1 is always included
    assert want_abs > 10 * out.limit  # the perturbation is far outside the fp64 tolerance
    assert not rep.ok


def test_tolerance_overrides(mlp_pair):
    a, b, _ = mlp_pair
    assert verify_cli(a, b, "--atol", "1e-2").returncode == 0
    assert verify_cli(a, b, "--atol", "0", "--rtol", "1e-2").returncode == 0
    assert verify_cli(a, b, "--atol", "0", "--rtol", "1e-6").returncode == 1


def test_json_schema(mlp_pair):
    a, b, _ = mlp_pair
    r = verify_cli(a, b, "--json", "--samples", "6", "--seed", "7", "--dtype", "fp64")
    assert r.returncode == 1
    d = json.loads(r.stdout)
    assert d["a"] == str(a) and d["b"] == str(b)
    assert d["equivalent"] is False and d["dtype"] == "fp64" and d["seed"] == 7
    assert (d["atol"], d["rtol"]) == (TOLERANCES["fp64"].atol, TOLERANCES["fp64"].rtol)
    assert len(d["batches"]) == 6 and d["batches"][0] == {"batch": 1, "seq": None}
    (o,) = d["outputs"]
    assert set(o) == {"name", "dtype", "max_abs", "scale", "max_rel", "limit", "agreement", "ok"}
    assert o["name"] == "logits" and o["ok"] is False
    assert o["max_rel"] == pytest.approx(o["max_abs"] / o["scale"])
    assert d["max_abs"] == o["max_abs"] and d["max_rel"] == o["max_rel"]


def _mlp(widths: list[int], seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers: list[torch.nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:], strict=False)):
        layers += [torch.nn.Linear(n_in, n_out)] + (
            [torch.nn.ReLU()] if i < len(widths) - 2 else []
        )
    return torch.nn.Sequential(*layers)


@pytest.mark.parametrize(
    ("widths", "needle"),
    [
        ([10, 32, 16, 5], "input 'input' differs"),  # 10 features instead of 12
        ([12, 32, 16, 7], "output 'logits' shapes differ"),  # 7 classes instead of 5
    ],
)
def test_mismatched_models_exit_2(tmp_path, mlp_path, widths, needle):
    other = _save(_mlp(widths, 1), tmp_path / "other.safetensors")
    r = verify_cli(mlp_path, other)
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr and str(other) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_nan_output_fails(tmp_path, mlp_net):
    bad = _perturbed(mlp_net, "4.bias", (0,))
    with torch.no_grad():
        bad[4].bias[0] = float("nan")
    a = _save(mlp_net, tmp_path / "a.safetensors")
    b = _save(bad, tmp_path / "nan.safetensors")
    r = verify_cli(a, b, "--json")
    assert r.returncode == 1
    assert json.loads(r.stdout)["outputs"][0]["max_abs"] == "nan"


def test_bad_arguments_exit_2(mlp_path, tmp_path):
    assert verify_cli(mlp_path, mlp_path, "--dtype", "fp8").returncode == 2
    assert verify_cli(mlp_path, mlp_path, "--samples", "0").returncode == 2
    r = verify_cli(mlp_path, tmp_path / "missing.safetensors")
    assert r.returncode == 2 and "missing.safetensors" in r.stderr


# ---- families: checkpoint vs its ONNX export, vs one weight moved -----------------------------
#: family -> (factory, extra load options, a checkpoint key (2-D weight) to perturb at [0, 0],
#: the dtype that must catch it). The CNN's head weight moves its tiny logits (scale ~0.25) by
#: only ~1.4e-5 of their scale — inside fp32 noise of large models — so fp64 must catch it there.
FAMILIES = {
    "ref_transformer": (
        lambda d: fr.make_reference_transformer(d),
        {},
        "blocks.0.mlp.fc1.weight",
        None,
    ),
    "gpt2": (lambda d: fh.make_gpt2(d / "gpt2"), {}, "transformer.h.0.attn.c_attn.weight", None),
    "opt": (lambda d: fh.make_opt(d / "opt"), {}, "model.decoder.layers.0.fc1.weight", None),
    "bert": (
        lambda d: fh.make_bert(d / "bert"),
        {},
        "bert.encoder.layer.0.attention.output.dense.weight",
        None,
    ),
    "vit": (
        lambda d: fh.make_vit(d / "vit"),
        {},
        "vit.encoder.layer.0.attention.attention.key.weight",
        None,
    ),
    "timm_vit": (
        lambda d: fh.make_timm_vit(d / "timm"),
        {"heads": 4},
        "blocks.0.attn.proj.weight",
        None,
    ),
    "cnn": (lambda d: fr.make_cnn(d), {}, "head.weight", "fp64"),
}


def _perturb_copy(src: Path, key: str, out: Path) -> Path:
    """A copy of checkpoint ``src`` (file or HF folder) with ``key[0, 0]`` moved by DELTA."""
    if src.is_dir():
        shutil.copytree(src, out)
        file = out / "model.safetensors"
    else:
        out.mkdir()
        file = shutil.copy(src, out / src.name)
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    tensors[key][0, 0] += DELTA
    save_file(tensors, str(file), metadata=meta)
    return out if src.is_dir() else Path(file)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_export_and_perturbed(family, tmp_path):
    make, opts, key, catch_dtype = FAMILIES[family]
    ckpt = make(tmp_path)
    onnx_path = export_model(load_model(ckpt, **opts), tmp_path / "m.onnx").path
    moved = _perturb_copy(ckpt, key, tmp_path / "moved")

    def check(a: Path, b: Path, dtype: str | None = None) -> Report:
        (ra, rb), precision = open_runners([a, b], dtype, **opts)
        return compare(ra, rb, precision.name)

    exported = check(ckpt, onnx_path)
    assert exported.ok, exported.to_dict()
    assert exported.outputs[0].name == "logits" and exported.dtype == "fp32"
    caught = check(ckpt, moved, catch_dtype)
    assert not caught.ok, caught.to_dict()
    # the move is several times the limit, and far above the ONNX export's rounding noise
    assert caught.max_abs > 3 * caught.outputs[0].limit
    assert caught.max_abs > 10 * exported.max_abs


def test_token_batches_include_batch_1_at_the_longest_sequence(tmp_path):
    ckpt = fr.make_reference_transformer(tmp_path)  # max_len 16 (devkit.factories.TINY_TRANSFORMER)
    m = load_model(ckpt)
    rep = compare_models(m, m, "fp32", samples=6, seed=1)
    assert rep.batches[0] == (1, 16) and (16, 1) in rep.batches
    assert all(1 <= s <= 16 for _, s in rep.batches) and len(rep.batches) == 6


def test_onnx_dtype_rules(mlp_path, tmp_path):
    """An fp16 export is compared at fp16 by default; asking it for fp32 or fp64 is refused."""
    model = load_model(mlp_path)
    fp16 = export_model(model, tmp_path / "m16.onnx", dtype="fp16").path
    fp32 = export_model(model, tmp_path / "m32.onnx").path
    r = verify_cli(mlp_path, fp16, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["dtype"] == "fp16"
    for a, b, dtype in ((mlp_path, fp16, "fp32"), (mlp_path, fp32, "fp64")):
        r = verify_cli(a, b, "--dtype", dtype)
        assert r.returncode == 2 and "compare it with --dtype" in r.stderr and str(b) in r.stderr


def test_checkpoint_onnx_cli_and_not_an_onnx_file(mlp_path, mlp_pair, tmp_path):
    onnx_path = export_model(load_model(mlp_path), tmp_path / "m.onnx").path
    assert verify_cli(mlp_path, onnx_path).returncode == 0
    assert verify_cli(mlp_pair[1], onnx_path).returncode == 1  # moved weight vs export
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf")
    r = verify_cli(mlp_path, junk)
    assert r.returncode == 2 and "junk.onnx" in r.stderr


def test_onnx_without_signature_takes_the_checkpoints(mlp_path, tmp_path):
    """A foreign ONNX file (no normtool.inputs metadata) is fed the checkpoint's signature;
    two such files have no signature to draw inputs from (exit 2)."""
    proto = onnx.load(str(export_model(load_model(mlp_path), tmp_path / "m.onnx").path))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    assert verify_cli(bare, mlp_path).returncode == 0
    r = verify_cli(bare, bare)
    assert r.returncode == 2 and "no normtool.inputs metadata" in r.stderr


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_runs(mlp_path, mlp_pair, dtype):
    """Half-precision runs of the same file agree exactly; the 1e-3 move (4e-4 of the scale)
    is inside fp16/bf16 rounding, so those tolerances accept it — as they must."""
    assert verify_cli(mlp_path, mlp_path, "--dtype", dtype).returncode == 0
    r = verify_cli(*mlp_pair[:2], "--dtype", dtype, "--json")
    assert (
        r.returncode == 0
        and json.loads(r.stdout)["outputs"][0]["dtype"]
        == {"fp16": "float16", "bf16": "bfloat16"}[dtype]
    )


# ---- precision: from the header, following most weights; memory bounded by declared sizes ----
def _cast(src: Path, out: Path, dtype: torch.dtype, keep: dict[str, torch.dtype]) -> Path:
    """A copy of ``src`` with every tensor in ``dtype`` except those named in ``keep``."""
    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    save_file({k: v.to(keep.get(k, dtype)) for k, v in tensors.items()}, str(out))
    return out


def test_one_bf16_tensor_does_not_relax_an_fp32_comparison(mlp_pair, tmp_path):
    """An fp32 MLP with its last bias stored in bf16 still computes in fp32 (the executor widens
    bf16 exactly), so the 1e-3 move stays caught: before, the stray tensor set bf16 tolerances
    (atol 1e-2) and the move passed as "equivalent (bf16 …)"."""
    a, b = (_cast(p, tmp_path / f"{p.stem}.mixed.safetensors", torch.float32,
                  {"4.bias": torch.bfloat16}) for p in mlp_pair[:2])  # fmt: skip
    r = verify_cli(a, b, "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    d = json.loads(r.stdout)
    assert d["precision"] == d["dtype"] == "fp32"
    # 12·32+32 + 32·16+16 + 16·5+5 = 1029 values, 5 of them (4.bias) bf16: 1024/1029 = 99.5 %
    want = f"{a}: 99.5% of its 1029 weight values are stored in fp32 (also bf16 0.5%"
    assert d["precision_reason"].startswith(want), d["precision_reason"]


def test_a_bf16_model_with_fp32_norms_stays_bf16(mlp_path, tmp_path):
    """The other way round: bf16 weights with one fp32 tensor compute in bf16."""
    m = _cast(mlp_path, tmp_path / "bf16.safetensors", torch.bfloat16, {"4.bias": torch.float32})
    r = verify_cli(m, m, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["precision"] == "bf16" and "(also fp32 0.5%" in d["precision_reason"]


def test_precision_reason_names_the_lower_side_and_given_dtype(mlp_path, tmp_path):
    fp16 = export_model(load_model(mlp_path), tmp_path / "m16.onnx", dtype="fp16").path
    d = json.loads(verify_cli(mlp_path, fp16, "--json").stdout)
    assert d["precision"] == "fp16"
    assert d["precision_reason"] == (
        f"{mlp_path}: every weight is stored in fp32; {fp16}: an ONNX model exported in fp16; "
        "compared in the lower, fp16"
    )
    d = json.loads(verify_cli(mlp_path, mlp_path, "--json", "--dtype", "fp64").stdout)
    assert (d["precision"], d["precision_reason"]) == ("fp64", "--dtype fp64 given")


def test_metadata_dtype_claim_cannot_loosen_tolerances(tmp_path):
    """A normtool output moved by 1e-3 fails verify (exit 1); the same file whose graph
    metadata claims F16 for one tensor (header: F32) was "equivalent (fp16 …)" with exit 0.
    Now the claim is checked against the header on load: exit 2, naming both."""
    src = fr.make_reference_transformer(tmp_path)
    rms = tmp_path / "rms.safetensors"
    assert cli("convert-ln-to-rms", src, "-o", rms).returncode == 0
    moved = _perturb_copy(rms, "blocks.0.mlp.fc1.weight", tmp_path / "moved")
    assert verify_cli(rms, moved).returncode == 1
    raw = moved.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    graph = json.loads(header["__metadata__"]["normtool.graph"])
    graph["tensors"]["tok_emb.weight"]["dtype"] = "F16"
    header["__metadata__"]["normtool.graph"] = json.dumps(graph)
    text = json.dumps(header).encode()
    forged = tmp_path / "forged.safetensors"
    forged.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    r = verify_cli(rms, forged)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "graph says tensor 'tok_emb.weight' is F16, the header says F32" in r.stderr


@pytest.mark.parametrize("family", ["ref_transformer", "vit", "cnn"])
def test_activation_sizes_bound_what_the_executor_makes(family, tmp_path, monkeypatch):
    """The static estimate (declared shapes only) against the tensors the ops actually return,
    recorded by wrapping every op of the executor: the largest never above the estimate, at
    most 4× below it (attention scores and the input, which no op returns, may be larger);
    the outputs' element count exact."""
    from normtool.runtime import torch_exec  # noqa: PLC0415
    from normtool.verify import activation_sizes  # noqa: PLC0415

    make, opts, _, _ = FAMILIES[family]
    model = load_model(make(tmp_path), **opts)
    seen = [0]

    def spy(fn):
        def run(op, xs, p):
            y = fn(op, xs, p)
            seen[0] = max(seen[0], y.numel())
            return y

        return run

    monkeypatch.setattr(torch_exec, "OPS", {k: spy(f) for k, f in torch_exec.OPS.items()})
    batch, seq = 3, 5
    x = random_inputs(model.graph, batch, seq, 0)
    outs = torch_exec.run_graph(model.graph, model.weights(), x)
    largest, outputs = activation_sizes(model.graph, batch, seq)
    assert seen[0] <= largest <= 4 * seen[0], (seen[0], largest)
    assert outputs == sum(y.numel() for y in outs.values())


def test_verify_memory_default_is_onnx_runtimes():
    """One limit for both sides of verify: the checkpoint side's default is ORT's."""
    from normtool.runtime.ort import DEFAULT_MEMORY_LIMIT  # noqa: PLC0415
    from normtool.verify import VERIFY_MEMORY_LIMIT  # noqa: PLC0415

    assert VERIFY_MEMORY_LIMIT == DEFAULT_MEMORY_LIMIT


def test_check_memory_runs_batches_together_only_when_all_fit(mlp_path):
    """The mlp (12 → 32 → 16 → 5) in fp32, per row: inputs made in fp64 12·8 = 96 bytes; the
    run 4 live copies of the widest value (32 floats) and the 5 outputs, 4·32·4 + 5·4 = 532
    (above the comparison's 5·(2·4 + 25) = 165). Batches of 1 and 2 rows: 628 and 1256 bytes."""
    from normtool.verify import TorchRunner, check_memory  # noqa: PLC0415

    m = load_model(mlp_path, act="relu")
    a, b = TorchRunner(m, "fp32"), TorchRunner(m, "fp32")
    plan = [(1, None), (2, None)]

    def check(limit: int) -> bool:
        return check_memory(a, b, m.graph.inputs, plan, torch.float32, limit, together=True)

    assert check(1884) is True  # both batches at once: 628 + 1256
    assert check(1883) is False  # one by one
    with pytest.raises(NormtoolError, match=r"one batch \(2: .*above the limit"):
        check(1255)


def test_onnx_dtype_claim_cannot_loosen_tolerances(mlp_pair, mlp_path, tmp_path):
    """An fp32 export whose ``normtool.dtype`` metadata claims fp16: the 1e-3 move (inside
    fp16 tolerances, see test_half_precision_runs) must still fail. Before, the claim set the
    precision and verify said "equivalent (fp16 …)", exit 0."""
    proto = onnx.load(str(export_model(load_model(mlp_path), tmp_path / "m.onnx").path))
    (prop,) = [p for p in proto.metadata_props if p.key == "normtool.dtype"]
    prop.value = "fp16"
    forged = tmp_path / "forged.onnx"
    onnx.save(proto, str(forged))
    r = verify_cli(mlp_pair[1], forged, "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    d = json.loads(r.stdout)
    assert (
        d["precision"] == "fp32"
        and f"{forged}: an ONNX model exported in fp32" in (d["precision_reason"])
    )
