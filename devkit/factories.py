"""Model factories shared by the tests and the benchmark scripts: one of each kind.

Hugging Face models saved with ``save_pretrained`` (GPT-2, OPT, ViT, BERT, ResNet), a
timm-style ViT state dict made by a plain-torch module written here, and normtool's own
reference transformer and CNN (``normtool.nn``). Every factory is seeded; the test sizes are
tiny (d=32, 2 layers) so a whole test file stays within seconds on 2 CPU cores, and the
scripts pass their own sizes.

Why the Hugging Face and timm models use no normtool code: they are the *independent
references* the adapters are tested against. Their parameters get N(0, noise²) on top of the
library's init (``NOISE`` = 0.2 unless a caller says otherwise), so LayerNorm gains and biases
are far from 1 and 0 and an adapter that ignored one of them would fail its test. Running
statistics of PowerNorm, UN and BatchNorm are set to random positive values (as after
training) so that tests exercise them instead of their identity initial values.

Functions: ``make_gpt2 / make_opt / make_vit / make_bert(dir, **config) -> folder``,
``make_decoder(dir, model, **config)`` for the Llama-class decoders, and
``load_hf(folder, dtype)`` for the transformers reference; ``gpt2_shapes(**config)`` for
scripts that stream random GPT-2 weights without building the model; ``make_timm_vit(dir, ...)
-> file`` and ``load_timm_vit(file, heads)`` for the timm-style reference;
``make_reference_transformer``, ``make_cnn``, ``make_ws_cnn``, ``make_resnet``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from normtool.nn.cnn import SmallCNN, cnn_config
from normtool.nn.save import save_reference
from normtool.nn.transformer import ReferenceTransformer, transformer_config

NOISE = 0.2


def _perturb(module: nn.Module, seed: int, noise: float = NOISE) -> None:
    """Add seeded N(0, noise²) noise to every parameter (tied ones once); 0: none."""
    if noise == 0:
        return
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * noise)


def _save_hf(
    model: Any, out: Path, seed: int, save: dict[str, Any] | None, noise: float = NOISE
) -> Path:
    _perturb(model, seed, noise)
    out = Path(out)
    model.save_pretrained(out, **(save or {}))
    return out


#: Shapes of the published models the benchmarks are sized like (random weights, no download).
GPT2_SMALL: dict[str, Any] = dict(
    n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257
)
VIT_B16: dict[str, Any] = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    image_size=224,
    patch_size=16,
    num_labels=1000,
)
GPT2_TINY: dict[str, Any] = dict(
    vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
)


def make_gpt2(
    out: Path,
    seed: int = 0,
    save: dict | None = None,
    model: str = "GPT2LMHeadModel",
    noise: float = NOISE,
    **cfg: Any,
) -> Path:
    """GPT2LMHeadModel (Conv1D weights, tied lm_head), or ``model="GPT2Model"`` (the base model,
    saved with unprefixed keys and no head). ``cfg`` overrides ``GPT2_TINY``; ``save``: kwargs
    for save_pretrained; ``noise``: the std of the noise added to every parameter (0: the
    library's init as it is)."""
    import transformers
    from transformers import GPT2Config

    torch.manual_seed(seed)
    net = getattr(transformers, model)(GPT2Config(**{**GPT2_TINY, **cfg}))
    return _save_hf(net.eval(), out, seed, save, noise)


def gpt2_shapes(**cfg: Any) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """``(config.json contents, {stored tensor: shape})`` of a GPT2LMHeadModel with ``cfg``
    (over ``GPT2_TINY``), without allocating it: for scripts that stream random weights of
    models too large to build. The tied ``lm_head`` and the causal-mask buffers are left out,
    as ``save_pretrained`` leaves them."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**{**GPT2_TINY, **cfg})
    with torch.device("meta"):
        net = GPT2LMHeadModel(config)
    shapes = {
        k: tuple(v.shape)
        for k, v in net.state_dict().items()
        if k != "lm_head.weight" and not k.endswith((".attn.bias", ".attn.masked_bias"))
    }
    return {**config.to_dict(), "architectures": ["GPT2LMHeadModel"]}, shapes


def make_opt(
    out: Path, pre: bool = True, seed: int = 0, save: dict | None = None, **cfg: Any
) -> Path:
    """OPTForCausalLM, Pre-LN (``pre=True``, like OPT-125m) or Post-LN (like OPT-350m)."""
    from transformers import OPTConfig, OPTForCausalLM

    base = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        max_position_embeddings=16,
        word_embed_proj_dim=32,
        do_layer_norm_before=pre,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    return _save_hf(OPTForCausalLM(OPTConfig(**{**base, **cfg})), out, seed, save)


def make_vit(
    out: Path, seed: int = 0, save: dict | None = None, noise: float = NOISE, **cfg: Any
) -> Path:
    """ViTForImageClassification on 16×16 RGB images, 4×4 patches, 5 classes (``cfg``
    overrides); ``noise`` as for ``make_gpt2``."""
    from transformers import ViTConfig, ViTForImageClassification

    base = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_channels=3,
        num_labels=5,
    )
    torch.manual_seed(seed)
    net = ViTForImageClassification(ViTConfig(**{**base, **cfg}))
    return _save_hf(net, out, seed, save, noise)


def make_bert(
    out: Path,
    seed: int = 0,
    save: dict | None = None,
    model: str = "BertForSequenceClassification",
    pooler: bool = True,
    **cfg: Any,
) -> Path:
    """BertForSequenceClassification (Post-LN), 3 labels; or another transformers BERT class
    named by ``model`` (BertForMaskedLM, BertModel: ``pooler=False`` leaves its pooler out)."""
    import transformers
    from transformers import BertConfig

    base = dict(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        num_labels=3,
    )
    torch.manual_seed(seed)
    kw = {} if pooler else {"add_pooling_layer": False}
    net = getattr(transformers, model)(BertConfig(**{**base, **cfg}), **kw)
    return _save_hf(net, out, seed, save)


_TEXT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
_IMAGE = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4
)

#: Tiny configs of the families ``make_family`` builds: config class, default model class, base.
FAMILY_CONFIGS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "distilbert": (
        "DistilBertConfig",
        "DistilBertForSequenceClassification",
        dict(
            vocab_size=64,
            dim=32,
            n_layers=2,
            n_heads=4,
            hidden_dim=64,
            num_labels=3,
            max_position_embeddings=16,
        ),
    ),
    "roberta": (
        "RobertaConfig",
        "RobertaForSequenceClassification",
        # 18 position rows: rows 0..1 sit below the first position (pad_token_id + 1 = 2)
        {**_TEXT, "intermediate_size": 64, "max_position_embeddings": 18, "num_labels": 3},
    ),
    "deit": (
        "DeiTConfig",
        "DeiTForImageClassification",
        {**_IMAGE, "intermediate_size": 64, "num_labels": 5},
    ),
    "dinov2": ("Dinov2Config", "Dinov2Model", {**_IMAGE, "mlp_ratio": 2}),
    # half of each head rotated, as in Pythia (rotary_pct 0.25) and Phi-2 (0.4)
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {**_TEXT, "intermediate_size": 64, "max_position_embeddings": 16, "rotary_pct": 0.5},
    ),
    "phi": (
        "PhiConfig",
        "PhiForCausalLM",
        {
            **_TEXT,
            "intermediate_size": 64,
            "max_position_embeddings": 16,
            "partial_rotary_factor": 0.5,
        },
    ),
    "clip_vision": ("CLIPVisionConfig", "CLIPVisionModel", {**_IMAGE, "intermediate_size": 64}),
    "clip_text": (
        "CLIPTextConfig",
        "CLIPTextModel",
        # eos inside the tiny vocab, so random ids hold it sometimes (pooling at its position)
        {
            **_TEXT,
            "intermediate_size": 64,
            "max_position_embeddings": 16,
            "eos_token_id": 7,
            "bos_token_id": 6,
            "pad_token_id": 1,
        },
    ),
}


def make_family(
    out: Path, family: str, model: str | None = None, seed: int = 0, **cfg: Any
) -> Path:
    """A tiny transformers model of ``family`` (``FAMILY_CONFIGS``), class ``model`` (default:
    the family's first), parameters perturbed as for ``make_gpt2``; ``cfg`` overrides."""
    import transformers

    config_cls, default, base = FAMILY_CONFIGS[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**base, **cfg})
    net = getattr(transformers, model or default)(config)
    return _save_hf(net.eval(), out, seed, None)


#: A tiny grouped-query decoder: 4 query heads sharing 2 key/value heads, head width 8.
DECODER_TINY: dict[str, Any] = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
)


def make_decoder(
    out: Path,
    model: str = "LlamaForCausalLM",
    seed: int = 0,
    save: dict | None = None,
    **cfg: Any,
) -> Path:
    """A Llama-class decoder (``LlamaForCausalLM``, ``MistralModel``, ``Qwen2ForCausalLM``…: the
    config class is the model class's family); ``cfg`` overrides ``DECODER_TINY``."""
    import transformers

    family = model.removesuffix("ForCausalLM").removesuffix("Model")
    # Gemma3ForCausalLM is configured by the text config (Gemma3Config is the multimodal one)
    make = getattr(transformers, f"{family}TextConfig", None) or getattr(
        transformers, f"{family}Config"
    )
    config = make(**{**DECODER_TINY, **cfg})
    torch.manual_seed(seed)
    net = getattr(transformers, model)(config)
    return _save_hf(net, out, seed, save)


def load_hf(folder: Path, dtype: torch.dtype = torch.float32) -> Any:
    """The transformers model saved in ``folder``, eager attention, eval mode, in ``dtype``."""
    import json

    import transformers

    arch = json.loads((Path(folder) / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, arch).from_pretrained(
        folder, attn_implementation="eager", dtype=torch.float32
    )
    return model.to(dtype).eval()


# ---- timm-style ViT, plain torch ------------------------------------------------------------


class UN(nn.Module):
    """Unified Normalization at inference: ``γ·x/√(running_var+eps)+β`` (no mean subtraction).

    Buffers follow the reference implementation's state-dict keys; only ``running_var`` is used
    at inference, the others are training state that a checkpoint carries along.
    """

    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.register_buffer("running_var", torch.ones(1, d, 1, 1))
        self.register_buffer("ema_gz", torch.zeros(1, d, 1, 1))
        self.register_buffer("iters", torch.ones(1))
        self.register_buffer("buffer_x2", torch.zeros(4, d))
        self.register_buffer("buffer_gz", torch.zeros(4, d))
        self.register_buffer("skip_counter", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x / torch.sqrt(self.running_var.reshape(-1) + self.eps) + self.bias


class PowerNorm(nn.Module):
    """PowerNorm at inference: group scaling (each token / RMS of its channel group, eps 1e-5),
    then ``γ·x/√(running_phi+eps)+β``."""

    def __init__(self, d: int, groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.register_buffer("running_phi", torch.ones(1, d, 1, 1))
        self.register_buffer("ema_gz", torch.zeros(1, d, 1, 1))
        self.register_buffer("iters", torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, d = x.shape
        g = x.reshape(*lead, self.groups, d // self.groups)
        moment2 = (g * g).mean(-1, keepdim=True).expand_as(g).reshape(x.shape)
        x = x / torch.sqrt(moment2 + 1e-5)
        return self.weight * x / torch.sqrt(self.running_phi.reshape(-1) + self.eps) + self.bias


def _norm(kind: str, d: int, groups: int, eps: float | None) -> nn.Module:
    """``eps`` None: the defaults (timm's LayerNorm 1e-6, UN/PowerNorm 1e-5); ``groups``:
    PowerNorm's group count (the head count in the official transformer layers)."""
    if kind == "layernorm":
        return nn.LayerNorm(d, eps=1e-6 if eps is None else eps)
    if kind == "un":
        return UN(d, 1e-5 if eps is None else eps)
    if kind == "powernorm":
        return PowerNorm(d, groups, 1e-5 if eps is None else eps)
    raise ValueError(kind)


class TimmBlock(nn.Module):
    def __init__(
        self, d: int, heads: int, hidden: int, norm: str, groups: int, eps: float | None
    ) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = _norm(norm, d, groups, eps)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(d, 3 * d)
        self.attn.proj = nn.Linear(d, d)
        self.norm2 = _norm(norm, d, groups, eps)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(d, hidden)
        self.mlp.fc2 = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        hd = d // self.heads
        qkv = self.attn.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1)
        x = x + self.attn.proj((w @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class TimmStyleViT(nn.Module):
    """The timm ``VisionTransformer`` layout (class token, learned positions, pre-norm blocks with
    fused qkv, final norm, head on the class token), written out in plain torch."""

    def __init__(
        self,
        img: int = 16,
        patch: int = 4,
        chans: int = 3,
        d: int = 32,
        depth: int = 2,
        heads: int = 4,
        hidden: int = 64,
        classes: int = 5,
        norm: str = "layernorm",
        pn_groups: int | None = None,
        eps: float | None = None,
    ) -> None:
        super().__init__()
        groups = heads if pn_groups is None else pn_groups
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(chans, d, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (img // patch) ** 2, d))
        self.blocks = nn.ModuleList(
            TimmBlock(d, heads, hidden, norm, groups, eps) for _ in range(depth)
        )
        self.norm = _norm(norm, d, groups, eps)
        self.head = nn.Linear(d, classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def _norm_kind(keys: set[str]) -> str:
    if "norm.running_phi" in keys:
        return "powernorm"
    if "norm.buffer_x2" in keys:
        return "un"
    return "layernorm"


def make_timm_vit(
    out: Path, heads: int = 4, norm: str = "layernorm", seed: int = 0, **kw: Any
) -> Path:
    """Save a timm-style ViT state dict as ``out/timm_vit.safetensors`` (no config: the head
    count must come from ``--heads``). ``norm``: layernorm, un or powernorm; UN/PowerNorm get
    positive random running statistics so folding them is a real test."""
    torch.manual_seed(seed)
    model = TimmStyleViT(heads=heads, norm=norm, **kw)
    _perturb(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith(("running_var", "running_phi")):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "timm_vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def load_timm_vit(
    path: Path, heads: int, dtype: torch.dtype = torch.float32, **norm: Any
) -> TimmStyleViT:
    """Rebuild the reference module from a file written by ``make_timm_vit`` (``norm``: the
    ``pn_groups``/``eps`` it was made with, which the state dict does not record)."""
    sd = load_file(str(path))
    d = sd["cls_token"].shape[-1]
    chans, patch = sd["patch_embed.proj.weight"].shape[1], sd["patch_embed.proj.weight"].shape[-1]
    img = int(round(math.sqrt(sd["pos_embed"].shape[1] - 1))) * patch
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    model = TimmStyleViT(
        img=img,
        patch=patch,
        chans=chans,
        d=d,
        depth=depth,
        heads=heads,
        hidden=sd["blocks.0.mlp.fc1.weight"].shape[0],
        classes=sd["head.weight"].shape[0],
        norm=_norm_kind(set(sd)),
        **norm,
    )
    model.load_state_dict(sd)
    return model.to(dtype).eval()


def save_as_bin(src: Path, out: Path) -> Path:
    """Copy a ``save_pretrained`` folder into the legacy layout: ``config.json`` plus a pickled
    ``pytorch_model.bin`` state dict (what ``safe_serialization=False`` wrote before v5)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text((Path(src) / "config.json").read_text())
    torch.save(load_file(str(Path(src) / "model.safetensors")), out / "pytorch_model.bin")
    return out


# ---- normtool's reference models and Hugging Face ResNet -------------------------------------

TINY_TRANSFORMER: dict[str, Any] = {
    "vocab_size": 48,
    "max_len": 16,
    "d_model": 16,
    "heads": 4,
    "layers": 2,
    "d_ff": 32,
}


def randomize_norm_state(model: nn.Module, seed: int) -> None:
    """Give every norm random affine parameters and trained-looking running statistics.

    Random affine: γ around 1 (some negative would break nothing here, but keep them natural),
    β small; running statistics positive, spread over an order of magnitude.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for name in ("running_var", "running_phi"):
                buf = getattr(m, name, None)
                if isinstance(buf, torch.Tensor):
                    buf.copy_(torch.rand(buf.shape, generator=g) * 2.0 + 0.2)
            mean = getattr(m, "running_mean", None)
            if isinstance(mean, torch.Tensor):
                mean.copy_(torch.randn(mean.shape, generator=g) * 0.3)
            if m is model or not hasattr(m, "weight") or isinstance(m, (nn.Linear, nn.Conv2d)):
                continue
            if isinstance(m, nn.Embedding) or m.weight is None:
                continue
            m.weight.copy_(1.0 + 0.3 * torch.randn(m.weight.shape, generator=g))
            bias = getattr(m, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(0.1 * torch.randn(bias.shape, generator=g))


def make_reference_transformer(
    dir: Path, name: str | None = None, seed: int = 0, trained: bool = True, **config: Any
) -> Path:
    """Write a tiny seeded ReferenceTransformer (``TINY_TRANSFORMER`` + ``config``) to ``dir``.

    Returns the ``.safetensors`` path (config in its metadata). The file name defaults to one
    derived from the norm and placement, so several variants can share a folder. ``trained``:
    norms get random affines and running statistics (``randomize_norm_state``); False keeps
    the initial ones.
    """
    cfg = transformer_config(**{**TINY_TRANSFORMER, **config})
    torch.manual_seed(seed)
    model = ReferenceTransformer(cfg)
    if trained:
        randomize_norm_state(model, seed + 1)
    stem = name or f"ref_{cfg['norm']}_{cfg['placement']}{'_par' if cfg['parallel'] else ''}"
    return save_reference(model.eval(), Path(dir) / f"{stem}.safetensors", force=True)


def make_cnn(dir: Path, name: str = "cnn", seed: int = 0, **config: Any) -> Path:
    """Write a tiny seeded SmallCNN (random BN statistics) to ``dir``; returns the path."""
    torch.manual_seed(seed)
    model = SmallCNN(cnn_config(**config))
    randomize_norm_state(model, seed + 1)
    return save_reference(model.eval(), Path(dir) / f"{name}.safetensors", force=True)


def make_ws_cnn(
    dir: Path,
    variant: str,
    name: str = "ws",
    seed: int = 0,
    constant_rows: bool = False,
    **cfg: Any,
) -> Path:
    """A WS+BN SmallCNN with trained-looking BN statistics and conv rows of spread 1e-3..1
    around non-zero means: rows of small spread make the two eps placements differ by O(1), so
    a bake with the wrong one fails the checks; ``constant_rows``: some rows have variance 0."""
    torch.manual_seed(seed)
    model = SmallCNN(cnn_config(weight_standardization=variant, **cfg))
    randomize_norm_state(model, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for block in model.blocks:
            w = block.conv.weight
            spread = 10 ** (-3 * torch.rand(w.shape[0], 1, 1, 1, generator=g))
            w.copy_(
                torch.randn(w.shape, generator=g) * spread
                + torch.randn(w.shape[0], 1, 1, 1, generator=g)
            )
            # as after training, BN's running variance follows its input's: Ŵ has unit spread
            # per row, so the conv output's variance grows with the fan-in
            block.bn.running_var.mul_(w[0].numel())
            if constant_rows:
                w[0] = 0.1  # not a power of two: the mean of the row must still come out exact
                w[-1] = -3.0
    return save_reference(model.eval(), Path(dir) / f"{name}.safetensors", force=True)


def make_resnet(dir: Path, layer_type: str = "basic", seed: int = 0, **config: Any) -> Path:
    """Save a tiny random ``ResNetForImageClassification`` folder (``save_pretrained``).

    BatchNorm statistics and affines are randomised so eval-mode BN is not the identity.
    """
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {
        "num_channels": 3,
        "embedding_size": 8,
        "hidden_sizes": [8, 16] if layer_type == "basic" else [16, 32],
        "depths": [1, 2],
        "layer_type": layer_type,
        "num_labels": 5,
        **config,
    }
    model = ResNetForImageClassification(ResNetConfig(**kwargs)).eval()
    randomize_norm_state(model, seed + 1)
    out = Path(dir) / f"resnet_{layer_type}"
    model.save_pretrained(out)
    return out
