"""Refusal messages and ``inspect``'s figures, checked through the CLI (issue 14, item 8).

Refusals: one line of at most ``refusal.WIDTH`` (200) characters for a short path, naming the
first reason, counting the rest and pointing to ``normtool inspect PATH``, which lists every
reason on its own line; the reasons name only what the model has. Inspect: the parameter count
is torch's ``sum(p.numel() for p in model.parameters())`` of the original model (torch counts a
tied tensor once and never counts buffers), and the summary line describes a converted model
as it now is.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors import safe_open

from devkit.factories import (
    TINY_TRANSFORMER,
    load_hf,
    make_bert,
    make_cnn,
    make_gpt2,
    make_opt,
    make_reference_transformer,
    make_resnet,
    make_vit,
)
from normtool.load import load_model
from normtool.nn.transformer import ReferenceTransformer, transformer_config
from normtool.refusal import MIN_REASON, WIDTH, refusal_line
from tests.conftest import cli


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """One folder of tiny models, named briefly so that refusal lines can be held to WIDTH."""
    d = tmp_path_factory.mktemp("models")
    make_gpt2(d / "gpt2")
    make_bert(d / "bert")
    make_opt(d / "opt_post", pre=False)
    make_vit(d / "vit")
    make_resnet(d).rename(d / "resnet")
    make_cnn(d, "cnn")
    make_reference_transformer(d, "ref_un", norm="un")
    make_reference_transformer(d, "ref_pn", norm="powernorm")
    make_reference_transformer(d, "ref_pn_post", norm="powernorm", placement="post")
    return d


def _reasons(path: str, transform: str) -> list[str]:
    """The reasons ``inspect --json`` gives for ``transform`` not applying."""
    r = cli("inspect", path, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["transforms"][transform]["reasons"]


def _refused(*args: str) -> str:
    """The one stderr line of a refused command (exit 2, nothing written)."""
    r = cli(*args, "-o", "out.safetensors")
    assert r.returncode == 2, r.stderr
    assert not Path("out.safetensors").exists()
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.parametrize(
    "command, name, what",
    [
        ("fold", "gpt2", "nothing to fold"),  # one reason, naming its 5 LayerNorms
        ("convert-ln-to-rms", "bert", "cannot convert to RMSNorm"),  # 8 reasons, Post-LN
        ("convert-ln-to-rms", "opt_post", "cannot convert to RMSNorm"),
    ],
)
def test_refusal_is_one_short_line_pointing_to_inspect(models, monkeypatch, command, name, what):
    monkeypatch.chdir(models)
    transform = "fold" if command == "fold" else command
    reasons = _reasons(name, transform)
    line = _refused(command, name)
    assert len(line) <= WIDTH, line
    body = line.removeprefix(f"normtool: error: {name}: {what}: ")
    assert body != line, line
    if len(reasons) == 1:
        assert body == reasons[0]
    else:  # the first reason, whole or cut at a word with "…", then the count and the pointer
        tail = f" (+{len(reasons) - 1} more; run `normtool inspect {name}` for the full list)"
        assert body.endswith(tail), line
        shown = body.removesuffix(tail)
        cut = shown.removesuffix("…")
        assert shown == reasons[0] or (reasons[0].startswith(cut) and len(shown) >= 40), line
    # ... and inspect lists every reason, each on its own line
    text = cli("inspect", name).stdout.splitlines()
    for reason in reasons:
        assert any(row.strip().endswith(reason) for row in text), reason


def test_refusal_line_budget():
    """The documented budget: a path of up to 20 characters keeps the CLI's line within WIDTH
    whatever the reasons; a longer path keeps MIN_REASON characters of the first reason."""
    long = "norm 'blocks.11.norm1' output is read by 'blocks.11.resid2' (add), not a linear layer"
    what = "cannot convert to RMSNorm"
    for path in ("m", "models/gpt2-medium/x", "/a/much/longer/path/to/some/model.safetensors"):
        msg = refusal_line(what, [long] * 12, path)
        line = f"normtool: error: {path}: {msg}"
        if len(path) <= 20:
            assert len(line) <= WIDTH, line
        else:  # the floor: a long path does not squeeze the reason below MIN_REASON
            assert len(line) > WIDTH
        reason = msg.removeprefix(f"{what}: ").split(" (+11 more; ")[0]
        if reason != long:  # cut where the budget needs it, at a word, never below the floor
            assert reason.endswith("…") and long.startswith(reason[:-1]), reason
            assert len(reason) >= MIN_REASON - 20 and not reason[:-1].endswith(" "), reason
        assert msg.endswith(f" (+11 more; run `normtool inspect {path}` for the full list)")
    # a path the shell would split is quoted, so the command can be copied as it stands
    assert "`normtool inspect 'my models/m'`" in refusal_line(what, [long] * 2, "my models/m")
    assert refusal_line(what, [long] * 12, "m").startswith(f"{what}: {long} (+11")  # room
    assert refusal_line(what, [long * 3], "m") == f"{what}: {long * 3}"  # a lone reason: whole


def test_refusal_keeps_a_long_path_whole(models, tmp_path):
    """The path is never cut (the user copies it); a long one lengthens the line instead, and
    the first reason (shorter than MIN_REASON) stays whole."""
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "bert"
    deep.parent.mkdir(parents=True)
    (models / "bert").rename(deep)
    try:
        reasons = _reasons(str(deep), "convert-ln-to-rms")
        r = cli("convert-ln-to-rms", deep, "-o", tmp_path / "o.safetensors")
    finally:
        deep.rename(models / "bert")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
    assert len(reasons[0]) <= MIN_REASON and reasons[0] in r.stderr
    assert r.stderr.count(str(deep)) == 2  # where, and in the inspect command to run


def test_fold_refusal_names_only_what_the_model_has(models, monkeypatch):
    """GPT-2 has no convolution: its fold refusal must not speak of convolutions (it said "its
    convolutions store plain weights"), but of the LayerNorms it has."""
    monkeypatch.chdir(models)
    for extra in ((), ("--only", "ws"), ("--only", "un,ws")):
        line = _refused("fold", "gpt2", *extra)
        assert "convolution" not in line, line
        assert "layernorm ×5" in line and "convert-ln-to-rms" in line, line
    # a CNN with plain convs: the note counts them (4-D weights in the file: the convs)
    with safe_open(str(models / "cnn.safetensors"), "pt") as f:
        convs = sum(len(f.get_slice(k).get_shape()) == 4 for k in f.keys())  # noqa: SIM118 - not a dict
    line = _refused("fold", "cnn.safetensors", "--only", "ws")
    assert f"ws: nothing to bake — no ws_conv2d; its {convs} convolutions store plain" in line
    # PowerNorm but no conv at all: the ws note says so, the norms --only left out are counted
    # (inspect does not list those, so the line does not point there)
    line = _refused("fold", "ref_pn_post.safetensors", "--only", "un,ws")
    assert line.endswith(": ws: nothing to bake — no ws_conv2d; the graph has no conv (+4 more)")


def _torch_count(module) -> int:
    """torch's own count: ``parameters()`` yields a tied tensor once and no buffers."""
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", ["gpt2", "bert", "vit", "resnet", "opt_post"])
def test_parameter_count_is_the_original_models(models, name):
    """GPT-2 and OPT tie the LM head to the embedding (it was counted twice); ResNet's
    BatchNorms carry running statistics (counted as parameters)."""
    r = cli("inspect", models / name, "--json")
    assert r.returncode == 0, r.stderr
    want = _torch_count(load_hf(models / name))
    assert json.loads(r.stdout)["parameters"] == want
    assert load_model(models / name).param_count() == want  # the figure scripts report


@pytest.mark.parametrize("norm, name", [("un", "ref_un"), ("powernorm", "ref_pn")])
def test_parameter_count_leaves_out_norm_statistics(models, norm, name):
    """UN's running_var and PowerNorm's running_phi are buffers of the reference modules."""
    r = cli("inspect", models / f"{name}.safetensors", "--json")
    want = _torch_count(ReferenceTransformer(transformer_config(**TINY_TRANSFORMER, norm=norm)))
    assert json.loads(r.stdout)["parameters"] == want


def _stored(path: Path) -> int:
    """Elements stored in a normtool output (each tensor once, no buffers left by these passes)."""
    with safe_open(str(path), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118 - not a dict


def _summary(path: Path) -> tuple[dict, str]:
    j, text = cli("inspect", path, "--json"), cli("inspect", path)
    assert j.returncode == 0 and text.returncode == 0, j.stderr
    return json.loads(j.stdout), text.stdout.splitlines()[1]


def test_inspect_describes_the_converted_model(models, tmp_path):
    before, line = _summary(models / "gpt2")
    assert before["info"]["tied_head"] is True and "norm=layernorm" in line
    out = tmp_path / "gpt2.crms.safetensors"
    assert cli("convert-ln-to-rms", models / "gpt2", "--compressed", "-o", out).returncode == 0
    after, line = _summary(out)
    assert after["info"]["norm"] == "crmsnorm" and after["info"]["tied_head"] is False
    assert "norm=crmsnorm" in line and "tied_head=False" in line  # the conversion unties
    assert after["parameters"] == _stored(out)


@pytest.mark.parametrize("name, left", [("ref_un", "none"), ("ref_pn", "group_rmsnorm")])
def test_inspect_describes_the_folded_model(models, tmp_path, name, left):
    """After fold, the norms that remain: none of UN; PowerNorm's weightless group RMS."""
    out = tmp_path / f"{name}.folded.safetensors"
    r = cli("fold", models / f"{name}.safetensors", "-o", out)
    assert r.returncode == 0, r.stderr
    after, line = _summary(out)
    assert after["info"]["norm"] == left and f"norm={left}," in line + ","
    assert after["parameters"] == _stored(out)
