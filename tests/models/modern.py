"""Modern architectures at their libraries' own default init, for issue 13.

Each builder returns `(model, example_input)`; everything is small enough that one `initdoctor.check`
takes well under 3 s on two CPU cores (widths are parameters: the ID204 false alarm depends on them).

- Hugging Face transformers built from configs in code (nothing downloaded): GPT-2, BERT, T5, LLaMA.
  `check` cannot take a dict or keyword inputs yet, so each is wrapped in `Ids`, a module that takes
  a tensor of token ids and returns the logits; `hf_inputs` gives the dict the issue wants to pass.
- Faithful replicas of torchvision/timm blocks (torchvision/timm wheels on this machine are CUDA builds
  that fail to import): EfficientNet's MBConv with squeeze-excitation (SiLU), RegNetY's block with a
  ReLU SE, Swin's shifted-window attention (`F.linear(x, self.qkv.weight, ...)`), timm's ViT with a
  class token, each with its library's init loop copied.
- Parametrized and composed: a spectral-norm deep ReLU MLP, a weight-norm MLP, a pre-norm stack with a
  hand-written RMSNorm and GPT-2's `gelu_new`.
- Real problems put into them: zero W_Q = W_K, a 10x embedding, N(0, 1) MLP weights (and the spectral
  norm stack above).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# --- Hugging Face transformers ----------------------------------------------------------------

VOCAB = 512
BATCH, SEQ = 4, 32


def _gen(seed: int) -> torch.Generator:
    """The example input's generator: apart from the global RNG the weights are drawn from (the same
    seed there would make the first weight rows copies of the first input rows)."""
    return torch.Generator().manual_seed(10_000 + seed)


def _ids(seed: int = 0, batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB) -> torch.Tensor:
    g = _gen(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


class Ids(nn.Module):
    """Takes a (batch, seq) tensor of ids, calls a transformers model with keywords, returns logits."""

    def __init__(self, model: nn.Module, decoder: bool = False) -> None:
        super().__init__()
        self.model = model
        self.decoder = decoder  # encoder-decoder (T5): the same ids feed the decoder

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        kw = {"decoder_input_ids": ids} if self.decoder else {}
        return self.model(input_ids=ids, **kw).logits


def hf_inputs(ids: torch.Tensor, decoder: bool = False) -> dict:
    """The dict a user would pass: `check(model, {"input_ids": ids})` (fails today)."""
    return {"input_ids": ids, **({"decoder_input_ids": ids} if decoder else {})}


def _seeded(seed: int):
    torch.manual_seed(seed)


def gpt2(n_layer: int = 4, n_embd: int = 256, n_head: int = 4, seed: int = 0, raw: bool = False):
    """GPT2LMHeadModel from a config: Conv1D (in, out) weights, N(0, .02) init, c_proj at .02/sqrt(2L),
    `gelu_new` (tanh inside), pre-LayerNorm, tied lm_head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _seeded(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=n_embd, n_layer=n_layer, n_head=n_head)
    m = GPT2LMHeadModel(cfg)
    return (m if raw else Ids(m)), _ids(seed)


def bert(n_layer: int = 4, hidden: int = 256, heads: int = 4, seed: int = 0, raw: bool = False):
    """BertForMaskedLM: post-LayerNorm, nn.Linear N(0, .02), exact GELU, tied decoder."""
    from transformers import BertConfig, BertForMaskedLM

    _seeded(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=n_layer, num_attention_heads=heads,
                     intermediate_size=4 * hidden, max_position_embeddings=64)
    m = BertForMaskedLM(cfg)
    return (m if raw else Ids(m)), _ids(seed)


def t5(n_layer: int = 3, d_model: int = 128, heads: int = 4, seed: int = 0, raw: bool = False):
    """T5ForConditionalGeneration: hand-written RMSNorm (`pow(2).mean` then `rsqrt`), no biases,
    N(0, factor / sqrt(d)) init, ReLU feed-forward, relative position bias."""
    from transformers import T5Config, T5ForConditionalGeneration

    _seeded(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=d_model, d_kv=d_model // heads, d_ff=4 * d_model, num_layers=n_layer,
                   num_heads=heads, decoder_start_token_id=0)
    m = T5ForConditionalGeneration(cfg)
    return (m if raw else Ids(m, decoder=True)), _ids(seed)


def llama(n_layer: int = 4, hidden: int = 256, heads: int = 4, seed: int = 0, raw: bool = False):
    """LlamaForCausalLM: hand-written RMSNorm, SwiGLU (SiLU gate), RoPE, N(0, .02) init, untied head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _seeded(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=int(8 / 3 * hidden),
                      num_hidden_layers=n_layer, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=64)
    m = LlamaForCausalLM(cfg)
    return (m if raw else Ids(m)), _ids(seed)


# --- real problems put into them ---------------------------------------------------------------


def llama_zero_qk(seed: int = 0, **kw):
    """W_Q = W_K = 0 in every attention: scores are 0, attention is uniform, and Q, K get zero gradient
    forever (dL/dQ = dS K = 0, dL/dK = dS^T Q = 0): their rows are equal and stay equal (ID103)."""
    model, x = llama(seed=seed, **kw)
    with torch.no_grad():
        for layer in model.model.model.layers:
            layer.self_attn.q_proj.weight.zero_()
            layer.self_attn.k_proj.weight.zero_()
    return model, x


def gpt2_zero_qk(seed: int = 0, **kw):
    """The same on GPT-2's fused Conv1D c_attn: its (in, 3 * out) weight's first 2 * n_embd columns."""
    model, x = gpt2(seed=seed, **kw)
    with torch.no_grad():
        for block in model.model.transformer.h:
            d = block.attn.c_attn.weight.shape[0]
            block.attn.c_attn.weight[:, : 2 * d].zero_()
            block.attn.c_attn.bias[: 2 * d].zero_()
    return model, x


def gpt2_embed_scaled(factor: float = 10.0, seed: int = 0, **kw):
    """Token and position embeddings multiplied by `factor` (10: drawn at std 0.2 instead of 0.02)."""
    model, x = gpt2(seed=seed, **kw)
    with torch.no_grad():
        model.model.transformer.wte.weight.mul_(factor)
        model.model.transformer.wpe.weight.mul_(factor)
    return model, x


def llama_embed_scaled(factor: float = 10.0, seed: int = 0, **kw):
    model, x = llama(seed=seed, **kw)
    with torch.no_grad():
        model.model.model.embed_tokens.weight.mul_(factor)
    return model, x


def llama_mlp_unit_normal(seed: int = 0, **kw):
    """Every MLP weight N(0, 1): fan_in * Var(W) = 256-682 per layer instead of 0.1-0.3."""
    model, x = llama(seed=seed, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.model.layers:
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g))
    return model, x


def gpt2_mlp_unit_normal(seed: int = 0, **kw):
    model, x = gpt2(seed=seed, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.model.transformer.h:
            for c in (block.mlp.c_fc, block.mlp.c_proj):
                c.weight.copy_(torch.randn(c.weight.shape, generator=g))
    return model, x


def gpt2_duplicate_units(seed: int = 0, units: int = 4, **kw):
    """`units` identical output units in block 0's c_fc (Conv1D: a unit is a column of the (in, out)
    weight), biases equal too: ID102 material, as `linear_duplicate_units` is in nn.Linear."""
    model, x = gpt2(seed=seed, **kw)
    with torch.no_grad():
        c = model.model.transformer.h[0].mlp.c_fc
        c.weight[:, 1:units] = c.weight[:, :1]
        c.bias[1:units] = c.bias[0]
    return model, x


def linear_duplicate_units(seed: int = 0, units: int = 4, width: int = 256):
    """The control for `gpt2_duplicate_units`: the same 4 equal units in an nn.Linear (out, in)."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
    with torch.no_grad():
        m[0].weight[1:units] = m[0].weight[:1]
        m[0].bias[1:units] = m[0].bias[0]
    return m, torch.randn(BATCH * SEQ, width)


def relu_dead_bias(seed: int = 0, depth: int = 4, width: int = 128, bias: float = -4.0):
    """The control for SE's chance-level "dead" units: He ReLU layers whose biases sit `bias` pre-activation
    stds below zero, so nearly every unit is off for every one of the 256 samples: truly dead."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        layers += [lin, nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    model = nn.Sequential(*layers)
    x = torch.randn(256, width, generator=_gen(seed))
    with torch.no_grad():  # each layer's bias from the pre-activation std it actually sees
        h = x
        for lin in model[:-1:2]:
            nn.init.zeros_(lin.bias)
            z = lin(h)
            lin.bias.fill_(bias * float(z.std()))
            h = torch.relu(lin(h))
    return model, x


# --- torchvision / timm replicas ---------------------------------------------------------------


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: avgpool -> fc1 (1x1 conv) -> act -> fc2 -> sigmoid -> scale."""

    def __init__(self, channels: int, squeeze: int, activation=nn.ReLU) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = activation()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x):
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return s * x


def _conv_bn_act(cin, cout, k, stride=1, groups=1, act=nn.SiLU):
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class MBConv(nn.Module):
    """torchvision's MBConv: expand 1x1, depthwise kxk, SE (squeeze = input channels // 4, SiLU),
    project 1x1 (no activation); residual when shapes match (stochastic depth is off in eval-like use)."""

    def __init__(self, cin, cout, expand, k, stride) -> None:
        super().__init__()
        mid = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = []
        if mid != cin:
            layers.append(_conv_bn_act(cin, mid, 1))
        layers.append(_conv_bn_act(mid, mid, k, stride, groups=mid))
        layers.append(SqueezeExcitation(mid, max(1, cin // 4), activation=nn.SiLU))
        layers.append(_conv_bn_act(mid, cout, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        y = self.block(x)
        return y + x if self.use_res else y


class EfficientNetLike(nn.Module):
    # (expand, kernel, stride, in, out, repeats), a shrunk EfficientNet-B0 table
    SETTING = [(1, 3, 1, 16, 8, 1), (6, 3, 2, 8, 12, 2), (6, 5, 2, 12, 20, 2), (6, 3, 2, 20, 40, 3), (6, 5, 1, 40, 56, 3)]

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        layers = [_conv_bn_act(3, 16, 3, 2)]
        for e, k, s, cin, cout, n in self.SETTING:
            for i in range(n):
                layers.append(MBConv(cin if i == 0 else cout, cout, e, k, s if i == 0 else 1))
        layers.append(_conv_bn_act(56, 160, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(160, classes))
        # torchvision.models.efficientnet._efficientnet init loop
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                r = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -r, r)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def efficientnet(seed: int = 0):
    torch.manual_seed(seed)
    return EfficientNetLike(), torch.randn(8, 3, 64, 64, generator=_gen(seed))


class YBlock(nn.Module):
    """torchvision RegNet's ResBottleneckBlock + BottleneckTransform with SE (se_ratio 0.25, ReLU)."""

    def __init__(self, cin, cout, stride, group_width=8, se_ratio=0.25) -> None:
        super().__init__()
        w_b = cout
        g = w_b // group_width
        self.proj = _conv_bn_act(cin, cout, 1, stride, act=None) if (cin != cout or stride != 1) else None
        self.f = nn.Sequential(
            _conv_bn_act(cin, w_b, 1, act=nn.ReLU),
            _conv_bn_act(w_b, w_b, 3, stride, groups=g, act=nn.ReLU),
            SqueezeExcitation(w_b, int(round(se_ratio * cin)), activation=nn.ReLU),
            _conv_bn_act(w_b, cout, 1, act=None),
        )
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.f(x)
        return self.activation((x if self.proj is None else self.proj(x)) + y)


class RegNetYLike(nn.Module):
    def __init__(self, widths=(24, 56, 152, 368), depths=(1, 1, 4, 7), classes: int = 10, stem: int = 32) -> None:
        super().__init__()
        self.stem = _conv_bn_act(3, stem, 3, 2, act=nn.ReLU)
        blocks, cin = [], stem
        for w, d in zip(widths, depths):
            for i in range(d):
                blocks.append(YBlock(cin, w, 2 if i == 0 else 1))
                cin = w
        self.trunk_output = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)
        # torchvision.models.regnet.RegNet init loop
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, mean=0.0, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.trunk_output(self.stem(x))), 1))


def regnet_y(seed: int = 0, widths=(24, 56, 152, 368), depths=(1, 1, 4, 7)):
    """RegNetY-400MF's widths/depths (group width 8 here), on 64x64 inputs."""
    torch.manual_seed(seed)
    return RegNetYLike(widths, depths), torch.randn(8, 3, 64, 64, generator=_gen(seed))


class ShiftedWindowAttention(nn.Module):
    """torchvision.models.swin_transformer.ShiftedWindowAttention: the weights are used through
    `F.linear(x, self.qkv.weight, self.qkv.bias)` and `F.linear(x, self.proj.weight, ...)`,
    never by calling the modules."""

    def __init__(self, dim, window, shift, heads) -> None:
        super().__init__()
        self.window, self.shift, self.heads = window, shift, heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("relative_position_index", (rel[..., 0] * (2 * window - 1) + rel[..., 1]).flatten())
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x):  # (B, H, W, C)
        b, h, w, c = x.shape
        ws, s = self.window, self.shift
        if s:
            x = torch.roll(x, shifts=(-s, -s), dims=(1, 2))
        x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        qkv = F.linear(x, self.qkv.weight, self.qkv.bias)
        qkv = qkv.reshape(x.size(0), x.size(1), 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * (c // self.heads) ** -0.5
        attn = q.matmul(k.transpose(-2, -1))
        n = ws * ws
        bias = self.relative_position_bias_table[self.relative_position_index].view(n, n, -1).permute(2, 0, 1)
        attn = F.softmax(attn + bias.unsqueeze(0), dim=-1)
        x = attn.matmul(v).transpose(1, 2).reshape(x.size(0), n, c)
        x = F.linear(x, self.proj.weight, self.proj.bias)
        x = x.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        if s:
            x = torch.roll(x, shifts=(s, s), dims=(1, 2))
        return x


class SwinBlock(nn.Module):
    def __init__(self, dim, heads, window, shift) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ShiftedWindowAttention(dim, window, shift, heads)
        self.norm2 = nn.LayerNorm(dim)
        # torchvision's MLP draws xavier_uniform_ here; SwinTransformer's loop below re-draws every Linear
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SwinLike(nn.Module):
    def __init__(self, dim=48, depth=6, heads=3, window=4, patch=4, classes=10) -> None:
        super().__init__()
        self.patch = nn.Sequential(nn.Conv2d(3, dim, patch, patch), nn.LayerNorm(dim))
        self.blocks = nn.Sequential(*[SwinBlock(dim, heads, window, 0 if i % 2 == 0 else window // 2)
                                      for i in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        for m in self.modules():  # torchvision.models.SwinTransformer init
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.patch[0](x).permute(0, 2, 3, 1)
        x = self.blocks(self.patch[1](x))
        return self.head(self.norm(x).mean(dim=(1, 2)))


def swin(seed: int = 0, depth: int = 6):
    torch.manual_seed(seed)
    return SwinLike(depth=depth), torch.randn(4, 3, 32, 32, generator=_gen(seed))


class ViTAttention(nn.Module):
    def __init__(self, dim, heads) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class ViTBlock(nn.Module):
    def __init__(self, dim, heads) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ViTAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTLike(nn.Module):
    """timm VisionTransformer (init_weights 'jax'-less default): patchify conv (stride = kernel), class token
    N(0, 1e-6), pos_embed trunc_normal(.02), every Linear trunc_normal(.02) with zero bias, pre-norm."""

    def __init__(self, img=32, patch=4, dim=192, depth=6, heads=3, classes=10) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, patch)
        n = (img // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)
        # timm vision_transformer.init_weights('') + init_weights_vit_timm
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit(seed: int = 0, dim: int = 192, depth: int = 6, heads: int = 3):
    torch.manual_seed(seed)
    return ViTLike(dim=dim, depth=depth, heads=heads), torch.randn(
        4, 3, 32, 32, generator=_gen(seed))


# --- parametrized weights ----------------------------------------------------------------------


def spectral_norm_mlp(seed: int = 0, depth: int = 10, width: int = 128):
    """`depth` ReLU Linear layers under parametrizations.spectral_norm: every layer's largest singular
    value is 1, so a random direction keeps ~1/width... of its variance per layer; the signal and the
    gradient fall geometrically (the real problem)."""
    from torch.nn.utils.parametrizations import spectral_norm

    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [spectral_norm(nn.Linear(width, width)), nn.ReLU()]
    layers.append(spectral_norm(nn.Linear(width, 10)))
    return nn.Sequential(*layers), torch.randn(64, width, generator=_gen(seed))


def weight_norm_mlp(seed: int = 0, depth: int = 6, width: int = 128):
    """parametrizations.weight_norm on default nn.Linear layers (g = |row|, so the same function as the
    default init: PyTorch's U(+-1/sqrt(fan_in)) loses ~2/3 of the variance per ReLU layer)."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [weight_norm(nn.Linear(width, width)), nn.ReLU()]
    layers.append(weight_norm(nn.Linear(width, 10)))
    return nn.Sequential(*layers), torch.randn(64, width, generator=_gen(seed))


# --- composed activations: hand-written RMSNorm and gelu_new -----------------------------------


class RMSNorm(nn.Module):
    """LLaMA's: x * rsqrt(mean(x^2) + eps) * g, in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps)).to(x.dtype)


def gelu_new(x):
    """GPT-2's tanh approximation of GELU."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class PreNormMLPBlock(nn.Module):
    def __init__(self, dim: int, layers: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim)
        self.fc = nn.Linear(dim, 4 * dim)
        self.proj = nn.Linear(4 * dim, dim)
        for lin in (self.fc, self.proj):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        nn.init.normal_(self.proj.weight, std=0.02 / math.sqrt(2 * layers))

    def forward(self, x):
        return x + self.proj(gelu_new(self.fc(self.norm(x))))


class RMSGeluNet(nn.Module):
    """Token embedding N(0, .02), `depth` pre-RMSNorm MLP blocks with gelu_new, final RMSNorm, head."""

    def __init__(self, dim=128, depth=6, vocab=VOCAB) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.Sequential(*[PreNormMLPBlock(dim, depth) for _ in range(depth)])
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        nn.init.normal_(self.head.weight, std=0.02)

    def forward(self, ids):
        return self.head(self.norm(self.blocks(self.embed(ids))))


def rms_gelu_net(seed: int = 0, dim: int = 128, depth: int = 6):
    torch.manual_seed(seed)
    return RMSGeluNet(dim, depth), _ids(seed)


# --- the catalogue -----------------------------------------------------------------------------

LIBRARY = {  # at their libraries' default init: the expected verdict is "no warning"
    "gpt2": gpt2, "bert": bert, "t5": t5, "llama": llama,
    "efficientnet": efficientnet, "regnet_y": regnet_y, "swin": swin, "vit": vit,
    "weight_norm_mlp": weight_norm_mlp, "rms_gelu_net": rms_gelu_net,
}
PROBLEMS = {  # a real problem put into one: expected to be found and named by its cause
    "llama_zero_qk": llama_zero_qk, "gpt2_zero_qk": gpt2_zero_qk,
    "gpt2_embed10x": gpt2_embed_scaled, "llama_embed10x": llama_embed_scaled,
    "llama_mlp_N01": llama_mlp_unit_normal, "gpt2_mlp_N01": gpt2_mlp_unit_normal,
    "spectral_norm_mlp": spectral_norm_mlp,
    "gpt2_dup_units": gpt2_duplicate_units, "linear_dup_units": linear_duplicate_units,
    "relu_dead_bias": relu_dead_bias,
}
HF = {"gpt2", "bert", "t5", "llama", "llama_zero_qk", "gpt2_zero_qk", "gpt2_embed10x", "llama_embed10x",
      "llama_mlp_N01", "gpt2_mlp_N01", "gpt2_dup_units"}
