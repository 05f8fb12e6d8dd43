"""HTDemucs' forward pass, rewritten so that a TorchScript trace exports to a lean ONNX graph.

The demucs modules are called with their weights; what is restated, and why:

- the complex STFT/ISTFT moves out, to `converter.build.spectral`, shared by all models of a bag;
- `expand_as` on the frequency embedding becomes a broadcast, which would otherwise let the
  exporter fold a full-size tensor into the file;
- the transformer's sinusoidal position embeddings (5.5 + 2.75 MB at full size) are computed
  in-graph from a value that depends on the input, so neither the exporter nor ONNX Runtime's
  constant folding can bake them into initializers and blow the file-size budget;
- attention is computed for blocks of query rows one after the other, so no attention matrix
  exceeds ATTENTION_BLOCK_BYTES (a full one is 231 MB at full size, and ONNX Runtime's arena
  sizes itself on the largest live tensors);
- the encoder and decoder layers (`_encode`, `_decode`) are restated so that ONNX Runtime makes
  fewer passes over their large tensors: the residual branches (DConv) take their GroupNorm
  statistics from the small tensor before the expanding conv and fold normalization, affine
  and LayerScale into it (`_dconv_rows`); a GLU is two convs; the frequency ConvTranspose is a
  conv and a shuffle; 1-D convs run as 2-D ones;
- transformer tokens go in memory order and LayerScales ride on the projections;
- every statistic (the input normalization, the transformer's `norm_out`, the DConv norms
  over long rows, every DConv's GLU mean and variance over time, short rows included) is a
  tree of short sums of centred data (`_tree_sum`, `_long_sum`, `_mean_var`): ONNX Runtime's
  float32 reductions accumulate naively and cost 35-50 dB against PyTorch on trained-like
  weights, and 12 dB on rows of one large and many equal small terms (docs/accuracy.md).
- the decoder's and the transformer's inputs get shapes ONNX Runtime only learns at run time
  (`_unplanned`), so its planner cannot hand them the buffers of same-shaped tensors freed long
  before and hold those buffers in between (peak RSS: CHANGELOG.md, 0.4.0).

Each restatement is exact up to float rounding and checked against demucs' module in
`tests/test_exportable.py`. Everything else is the demucs arithmetic in demucs' order, for eval
mode, `cac=True` and the training segment length (what `apply_model(..., split=False)` feeds
the model).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from demucs.demucs import DConv
from demucs.hdemucs import HDecLayer, HEncLayer
from demucs.htdemucs import HTDemucs
from torch import nn
from torch.nn import functional as F

from converter.facts import SUM_LEAF, sum_blocks

ATTENTION_BLOCK_BYTES = 32 << 20
# No reduction in the graph covers more values than this: ONNX Runtime's float32 reductions
# (ReduceSum, MatMul's inner dimension, the norms) add naively, so their error grows with the
# length, while PyTorch's stay near machine precision.
SHORT_REDUCTION = 4096


def _tree_sum(x: torch.Tensor, squares: bool = False, dim: int = -1) -> torch.Tensor:
    """The sum (of squares, with `squares`) over axis `dim` of `x`, dropping it: sums of
    block sums of about sqrt(length) values (zero-padded to whole blocks, which adds nothing),
    level after level until at most SUM_LEAF terms are left. Squares are Mul + ReduceSum: ORT's
    ReduceL2 cost 10 dB on loud noise."""
    dim = dim % x.dim()
    lead, tail = [int(n) for n in x.shape[:dim]], [int(n) for n in x.shape[dim + 1 :]]
    length = int(x.shape[dim])
    while length > SUM_LEAF:
        blocks, block = sum_blocks(length)
        if blocks * block != length:
            x = F.pad(x, [0, 0] * len(tail) + [0, blocks * block - length])
        x = x.reshape(lead + [blocks, block] + tail)
        x = (x * x).sum(dim=dim + 1) if squares else x.sum(dim=dim + 1)
        length, squares = blocks, False
    return (x * x).sum(dim=dim) if squares else x.sum(dim=dim)


def _long_sum(x: torch.Tensor, dims: int, squares: bool = False) -> torch.Tensor:
    """The sum (of squares, with `squares`) over the last `dims` axes of `x`, keeping them as
    ones, accurate in float32 whatever the length and however uneven the terms (`_tree_sum`)."""
    lead = [int(n) for n in x.shape[: x.dim() - dims]]
    length = math.prod(int(n) for n in x.shape[x.dim() - dims :])
    return _tree_sum(x.reshape(lead + [length]), squares).reshape(lead + [1] * dims)


def _mean_var(
    x: torch.Tensor, dims: int, refine: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, biased variance, x - mean) over the last `dims` axes: tree sums, and the
    variance of the centred values (never E[x²] - E[x]², which cancels under a large mean).
    With `refine`, the mean of the centred values corrects the mean and them: under a large
    offset the first mean is only good to about one ulp, and an input normalization adds it
    back to every stem."""
    count = math.prod(int(n) for n in x.shape[x.dim() - dims :])
    mean = _long_sum(x, dims) / count
    centered = x - mean
    if refine:
        correction = _long_sum(centered, dims) / count
        mean, centered = mean + correction, centered - correction
    return mean, _long_sum(centered, dims, squares=True) / count, centered


def _normalize(
    x: torch.Tensor, dims: int, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last `dims` axes, accurately.
    Weight over sqrt, not times rsqrt: ORT 1.32 fuses
    Mul(Div(1, s), w) and then fails to load when `w` is a deduplicated initializer."""
    _, var, centered = _mean_var(x, dims)
    return centered * (weight / torch.sqrt(var + eps)) + bias


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` on `x` minus its mean. ORT 1.17's LayerNormalization (and SkipLayerNormalization,
    ORT's fusion of Add + LayerNorm, in every version) take E[x²] - E[x]² in float32, which
    cancels when the mean is large against the spread (48 dB SNR at 100:1); LayerNorm does not
    change under the shift, and the shifted data's mean is near zero."""
    if not isinstance(norm, nn.LayerNorm):
        return norm(x)
    dims = tuple(range(-len(norm.normalized_shape), 0))
    return norm(x - x.mean(dim=dims, keepdim=True))


def _anchor(mix: torch.Tensor) -> torch.Tensor:
    """A zero that depends on the input (non-finite inputs give non-finite stems anyway)."""
    return mix[0, 0, 0] * 0.0


def _sin_embedding(length: int, dim: int, max_period: float, anchor: torch.Tensor) -> torch.Tensor:
    """`demucs.transformer.create_sin_embedding(length, dim)` as [1, length, dim]."""
    half = dim // 2
    adim = torch.arange(half).view(1, -1)
    period = max_period ** (adim / (half - 1))  # the float32 constant demucs computes
    pos = torch.arange(length).view(-1, 1) + anchor
    phase = pos / period
    return torch.cat([torch.cos(phase), torch.sin(phase)], dim=-1)[None]


def _sin_embedding_2d(
    dim: int, height: int, width: int, max_period: float, anchor: torch.Tensor
) -> torch.Tensor:
    """`create_2d_sin_embedding(dim, height, width)` rearranged to [1, height·width, dim]."""
    half = dim // 2
    div_term = torch.exp(torch.arange(0.0, half, 2) * -(math.log(max_period) / half))

    def interleaved(count: int) -> torch.Tensor:
        pos = torch.arange(0.0, count).unsqueeze(1) + anchor
        angle = pos * div_term
        return torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1).reshape(count, half)

    along_width = interleaved(width)[None, :, :].expand(height, width, half)
    along_height = interleaved(height)[:, None, :].expand(height, width, half)
    return torch.cat([along_width, along_height], dim=-1).reshape(1, height * width, dim)


def _scaled_linear(linear: nn.Linear, gamma: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`gamma(linear(x))`, a channel-last LayerScale folded into the linear's weights."""
    if isinstance(gamma, nn.Identity):
        return linear(x)
    return F.linear(x, linear.weight * gamma.scale[:, None], linear.bias * gamma.scale)


def fold_factors(model: HTDemucs) -> list[torch.Tensor]:
    """The scales `_scaled_linear` and `_attention` fold into weight matrices (LayerScales, the
    query scale): `converter.build.storage` factors the products back into float16 weights."""
    module = model.crosstransformer
    factors = []
    for layer in [*module.layers, *module.layers_t] if module else []:
        mha = getattr(layer, "self_attn", None) or layer.cross_attn
        factors.append(torch.tensor(mha.head_dim**-0.5))
        gammas = (layer.gamma_1, layer.gamma_2)
        factors += [g.scale for g in gammas if not isinstance(g, nn.Identity)]
    return [f.detach().float() for f in factors]


def _attention(
    mha: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, gamma: nn.Module
) -> torch.Tensor:
    """`gamma(mha(query, key, key, need_weights=False)[0])` for batch-first eval, in row blocks.

    The 1/sqrt(head_dim) rides on the query projection (a power of two for HTDemucs' heads,
    so bit for bit) and the LayerScale `gamma` on the output projection.
    """
    if not (
        mha.batch_first and mha._qkv_same_embed_dim and mha.bias_k is None and not mha.add_zero_attn
    ):
        raise NotImplementedError("only the plain batch-first attention of HTDemucs converts")
    dim, heads = mha.embed_dim, mha.num_heads
    head_dim = dim // heads
    weight, bias = mha.in_proj_weight, mha.in_proj_bias
    q = F.linear(query, weight[:dim] * head_dim**-0.5, bias[:dim] * head_dim**-0.5)
    k = F.linear(key, weight[dim : 2 * dim], bias[dim : 2 * dim])
    v = F.linear(key, weight[2 * dim :], bias[2 * dim :])
    batch, len_q, len_k = q.shape[0], q.shape[1], k.shape[1]
    q = q.reshape(batch, len_q, heads, head_dim).transpose(1, 2)
    k = k.reshape(batch, len_k, heads, head_dim).permute(0, 2, 3, 1)
    v = v.reshape(batch, len_k, heads, head_dim).transpose(1, 2)
    blocks = math.ceil(batch * heads * len_q * len_k * 4 / ATTENTION_BLOCK_BYTES)
    rows = math.ceil(len_q / blocks)
    out = torch.cat(
        [torch.softmax(q[:, :, i : i + rows] @ k, dim=-1) @ v for i in range(0, len_q, rows)],
        dim=2,
    )
    return _scaled_linear(mha.out_proj, gamma, out.transpose(1, 2).reshape(batch, len_q, dim))


def _gram_root(weight: torch.Tensor) -> torch.Tensor:
    """A constant [d, d] R with RᵀR = WᵀW for [n, d] `weight` W (QR in float64): |R c|² is
    the sum over W's rows of (W_r c)², at d values per frame instead of n."""
    matrix = weight.detach().double().cpu().numpy()
    return torch.tensor(np.linalg.qr(matrix, mode="r"), dtype=weight.dtype)


def _normalized_glu(
    conv: nn.Conv1d, norm: nn.GroupNorm, scale: torch.Tensor, g: torch.Tensor, ones: torch.Tensor
) -> torch.Tensor:
    """`scale * GLU(norm(conv(g)))` for [rows, d, T] `g`, a 1x1 `conv` to 2C channels and
    GroupNorm(1, 2C), without materializing `conv(g)` or taking a pass over it.

    The conv output is 2C/d = 16 times larger than `g`. Its per-row mean and (biased) variance
    follow exactly from `g`'s channel means m and centred values c = g - m: mean_c = W_c m + b_c,
    and var = (Σ_t |R c_t|² / T + Σ_c (mean_c - μ)²) / 2C, the within- plus between-channel
    parts (RᵀR = WᵀW, `_gram_root`), both tree sums of squares, so nothing cancels and no sum
    runs over T in one accumulator (one MatMul over T lost ~100 ulp on a steady width-1 row).
    Normalization, affine and LayerScale are then per-(row, channel) factors that fold into the
    conv's weights, giving each row its own [2C, d + 1] matrix (the last column is the bias,
    against a row of ones). What is left on the large tensors is the GLU itself: two products,
    a Sigmoid and a Mul.
    """
    weight, bias = conv.weight[:, :, 0], conv.bias  # [2C, d], [2C]
    frames = int(g.shape[-1])
    mean = _long_sum(g, 1) / frames  # [rows, d, 1]
    within = _long_sum(torch.matmul(_gram_root(weight), g - mean), 2, squares=True)[..., 0]
    channel_means = torch.matmul(weight, mean)[..., 0] + bias  # [rows, 2C]
    count = int(channel_means.shape[1])
    mu = _long_sum(channel_means, 1) / count
    var = (within / frames + _long_sum(channel_means - mu, 1, squares=True)) / count
    fold = torch.cat([scale, torch.ones_like(scale)])  # LayerScale acts on the value half only
    factor = norm.weight * fold / torch.sqrt(var + norm.eps)  # [rows, 2C]
    shift = factor * (bias - mu) + norm.bias * fold
    folded = torch.cat([factor[..., None] * weight, shift[..., None]], dim=2)  # [rows, 2C, d+1]
    g = torch.cat([g, ones], dim=1)
    channels = scale.shape[0]
    value = torch.matmul(folded[:, :channels], g)
    gate = torch.matmul(folded[:, channels:], g)
    return value * torch.sigmoid(gate)


def _dconv_rows(dconv: DConv, x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """`DConv.forward` on [rows, C, T], its two GroupNorm(1) per layer spelled for ONNX Runtime.

    GroupNorm(1, d) exports as InstanceNormalization on a reshape, then a Mul and an Add for
    the per-channel affine: five reads and three writes of the tensor, on one thread when there
    is one row (the time branch). The small norm after the compressing conv becomes a
    LayerNormalization over (d, T), whose [d, T] scale and bias are built at run time from
    `anchor` so that no constant folding stores repeated weights (over long rows, `_normalize`);
    the large one, with the GLU and LayerScale, is `_normalized_glu`.
    """
    frames = int(x.shape[-1])
    # Zeros and ones computed from x rather than built to its shape: a constant shape would give
    # every tensor of the layer a static shape again, whatever `_unplanned` did to x.
    row = x[:1, 0] * anchor  # [1, T]
    ones = x[:, :1] * anchor + 1.0  # [rows, 1, T]
    for layer in dconv.layers:
        mods = list(layer)
        kinds = [type(m).__name__ for m in mods]
        if kinds != [
            "Conv1d",
            "GroupNorm",
            "GELU",
            "Conv1d",
            "GroupNorm",
            "GLU",
            "LayerScale",
        ] or any(m.num_groups != 1 for m in (mods[1], mods[4])):
            raise NotImplementedError(
                f"only DConv layers without attention or LSTM convert: {kinds}"
            )
        conv1, norm1, act, conv2, norm2, _, layer_scale = mods
        h = conv1(x)
        if norm1.num_channels * frames <= SHORT_REDUCTION:  # shifted: see `_layer_norm`
            h = F.layer_norm(
                h - h.mean(dim=(1, 2), keepdim=True),
                (norm1.num_channels, frames),
                norm1.weight[:, None] + row,
                norm1.bias[:, None] + row,
                norm1.eps,
            )
        else:  # ORT's LayerNormalization takes E[x²] - E[x]² in one naive pass
            h = _normalize(h, 2, norm1.weight[:, None], norm1.bias[:, None], norm1.eps)
        x = x + _normalized_glu(conv2, norm2, layer_scale.scale, act(h), ones)
    return x


def _freq_dconv(dconv: DConv, y: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """DConv over time for every frequency row of [B, C, Fr, T], as `HEncLayer` applies it."""
    batch, channels, freqs, frames = y.shape
    y = _dconv_rows(dconv, y.permute(0, 2, 1, 3).reshape(-1, channels, frames), anchor)
    return y.view(batch, freqs, channels, frames).permute(0, 2, 1, 3)


def _layer_dconv(
    layer: HEncLayer | HDecLayer, y: torch.Tensor, anchor: torch.Tensor
) -> torch.Tensor:
    if not layer.dconv:
        return y
    return (
        _freq_dconv(layer.dconv, y, anchor) if layer.freq else _dconv_rows(layer.dconv, y, anchor)
    )


def _conv(
    conv: nn.Conv1d | nn.Conv2d,
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`conv` on `x`, with `weight` and `bias` in place of its own if given.

    A 1-D conv runs as a 2-D one over [B, C, 1, L]:
    ONNX Runtime runs 2-D convs in its blocked layout and 1-D ones as im2col + GEMM, which
    reached about half the speed on HTDemucs' time branch."""
    weight = conv.weight if weight is None else weight
    bias = conv.bias if bias is None else bias
    if isinstance(conv, nn.Conv2d):
        return conv._conv_forward(x, weight, bias)
    y = F.conv2d(
        x[:, :, None],
        weight[:, :, None],
        bias,
        stride=(1, conv.stride[0]),
        padding=(0, conv.padding[0]),
        dilation=(1, conv.dilation[0]),
        groups=conv.groups,
    )
    return y[:, :, 0]


def _glu_after(conv: nn.Conv1d | nn.Conv2d, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`F.glu(norm(conv(x)), dim=1)`. Without a norm (HTDemucs' layers below `norm_starts`),
    the value and gate halves come from two convs over halves of the weights: no Split of a
    doubled output, and ONNX Runtime fuses the Sigmoid into the gate conv."""
    if not isinstance(norm, nn.Identity):
        return F.glu(norm(conv(x)), dim=1)
    half = conv.out_channels // 2
    value = _conv(conv, x, conv.weight[:half], conv.bias[:half])
    gate = _conv(conv, x, conv.weight[half:], conv.bias[half:])
    return value * torch.sigmoid(gate)


def _conv_tr_freq(conv_tr: nn.ConvTranspose2d, x: torch.Tensor) -> torch.Tensor:
    """`conv_tr(x)` for HTDemucs' frequency kernel (2s, 1) at stride (s, 1), as a (2, 1) conv
    to s·C_out channels and a shuffle of those onto the frequency axis.

    Output row s·g + j takes tap j from input row g and tap s + j from row g - 1. ONNX Runtime
    runs ConvTranspose as a GEMM and a single-threaded col2im; the conv runs in its blocked
    layout and the shuffle moves whole frames.
    """
    weight = conv_tr.weight  # [C_in, C_out, 2s, 1]
    c_in, c_out, kernel = weight.shape[:3]
    stride = conv_tr.stride[0]
    if kernel != 2 * stride or conv_tr.stride[1] != 1 or conv_tr.padding != (0, 0):
        return conv_tr(x)
    taps = weight[..., 0].reshape(c_in, c_out, 2, stride).flip(2)  # tap 0 sees row g - 1
    taps = taps.permute(1, 3, 0, 2).reshape(c_out * stride, c_in, 2, 1)
    # Spelled so the exporter folds it: repeat_interleave exports shape arithmetic, which the
    # anchored shapes keep from folding, and ONNX Runtime blocks only convs with constant bias.
    bias = (conv_tr.bias[:, None] + torch.zeros(1, stride)).reshape(-1)
    y = F.conv2d(x, taps, bias, padding=(1, 0))
    batch, _, rows, frames = y.shape
    y = y.reshape(batch, c_out, stride, rows, frames).transpose(2, 3)
    return y.reshape(batch, c_out, rows * stride, frames)


def _encode(
    layer: HEncLayer, x: torch.Tensor, inject: torch.Tensor | None, anchor: torch.Tensor
) -> torch.Tensor:
    """`HEncLayer.forward`, its DConv through `_dconv_rows`."""
    if layer.empty:
        return layer(x, inject)
    if not layer.freq:
        if x.dim() == 4:
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        if x.shape[-1] % layer.stride:
            x = F.pad(x, (0, layer.stride - x.shape[-1] % layer.stride))
    y = _conv(layer.conv, x)
    if inject is not None:
        y = y + (inject[:, :, None] if inject.dim() == 3 and y.dim() == 4 else inject)
    y = _layer_dconv(layer, F.gelu(layer.norm1(y)), anchor)
    return _glu_after(layer.rewrite, layer.norm2, y) if layer.rewrite else y


def _unplanned(x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """`x` as a view whose shape ONNX Runtime only learns at run time, and so every tensor
    computed from it. ORT's planner gives a new tensor the dead buffer of an earlier one with
    the same static shape and keeps that buffer allocated in between: each decoder tensor took
    the buffer of its mirror in the encoder, which then stayed allocated through the
    transformer, in the arena and again in the memory pattern (CHANGELOG.md, 0.4.0). The sizes
    get an integer zero computed from the input (as in `converter.build.runtime_shapes`), so neither
    the exporter nor ORT folds them."""
    zero = (anchor < -math.inf).long()
    return x.reshape([size + zero for size in x.shape])


def _decode(
    layer: HDecLayer, x: torch.Tensor, skip: torch.Tensor, length: int, anchor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`HDecLayer.forward`, its DConv through `_dconv_rows`."""
    if layer.empty or (layer.freq and x.dim() == 3):
        return layer(x, skip, length)
    x = _unplanned(x, anchor) + _unplanned(skip, anchor)
    y = _glu_after(layer.rewrite, layer.norm1, x) if layer.rewrite else x
    y = _layer_dconv(layer, y, anchor)
    z = layer.norm2(_conv_tr_freq(layer.conv_tr, y) if layer.freq else layer.conv_tr(y))
    if layer.freq:
        z = z[..., layer.pad : -layer.pad, :] if layer.pad else z
    else:
        z = z[..., layer.pad : layer.pad + length]
    return (z if layer.last else F.gelu(z)), y


def _feed_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer.gamma_2(linear2(activation(linear1(x))))`."""
    return _scaled_linear(layer.linear2, layer.gamma_2, layer.activation(layer.linear1(x)))


def _norm_out(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer.norm_out(x)` if the layer has one (HTDemucs: MyGroupNorm with one group)."""
    if not layer.norm_out:
        return x
    norm = layer.norm_out
    if norm.num_groups != 1:
        return norm(x)
    return _normalize(x, 2, norm.weight, norm.bias, norm.eps)  # over tokens and channels


def _self_layer(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`MyTransformerEncoderLayer.forward` (eval, norm_first, dense attention)."""
    if not layer.norm_first or layer.sparse:
        raise NotImplementedError("only norm-first, dense transformer layers convert")
    normed = _layer_norm(layer.norm1, x)
    x = x + _attention(layer.self_attn, normed, normed, layer.gamma_1)
    x = x + _feed_forward(layer, _layer_norm(layer.norm2, x))
    return _norm_out(layer, x)


def _cross_layer(layer: nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`CrossTransformerEncoderLayer.forward` (eval, norm_first, dense attention)."""
    if not layer.norm_first or layer.sparse:
        raise NotImplementedError("only norm-first, dense transformer layers convert")
    normed_q, normed_k = _layer_norm(layer.norm1, q), _layer_norm(layer.norm2, k)
    x = q + _attention(layer.cross_attn, normed_q, normed_k, layer.gamma_1)
    x = x + _feed_forward(layer, _layer_norm(layer.norm3, x))
    return _norm_out(layer, x)


def _to_tokens(x: torch.Tensor, conv: nn.Conv1d | None) -> torch.Tensor:
    """[B, C, L] -> [B, L, C'] tokens, through the 1x1 `conv` if any, as one product whose
    operand transpose ONNX Runtime fuses into the GEMM (a standalone Transpose moving the
    innermost axis is among the slowest kernels it has)."""
    tokens = x.transpose(1, 2)
    return tokens if conv is None else torch.matmul(tokens, conv.weight[:, :, 0].t()) + conv.bias


def _from_tokens(tokens: torch.Tensor, conv: nn.Conv1d | None) -> torch.Tensor:
    """[B, L, C'] tokens -> [B, C, L], the inverse of `_to_tokens`."""
    x = tokens.transpose(1, 2)
    return x if conv is None else torch.matmul(conv.weight[:, :, 0], x) + conv.bias[:, None]


def _cross_transformer(
    model: HTDemucs, x: torch.Tensor, xt: torch.Tensor, anchor: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bottom of `HTDemucs.forward`: channel up-sampling, `CrossTransformerEncoder.forward`
    in eval mode with in-graph position embeddings, channel down-sampling.

    demucs orders the frequency tokens (frame, bin); here they are (bin, frame), the order of
    [B, C, F, T] in memory, with the position embedding in the same order. Attention, layer and
    group norms are indifferent to token order, and this one needs no transpose of the
    innermost axis on the way in or out.
    """
    module = model.crosstransformer
    if module.emb != "sin":
        raise NotImplementedError(f"transformer embedding {module.emb!r} (pretrained use 'sin')")
    up, up_t, down, down_t = (
        (
            model.channel_upsampler,
            model.channel_upsampler_t,
            model.channel_downsampler,
            model.channel_downsampler_t,
        )
        if model.bottom_channels
        else (None, None, None, None)
    )
    batch, _, freqs, frames = x.shape
    x = _to_tokens(x.reshape(batch, -1, freqs * frames), up)
    channels = x.shape[-1]
    pos_2d = _sin_embedding_2d(channels, freqs, frames, module.max_period, anchor)
    x = _layer_norm(module.norm_in, x) + module.weight_pos_embed * pos_2d

    xt = _to_tokens(xt, up_t)
    length_t, channels_t = xt.shape[1], xt.shape[2]
    pos = _sin_embedding(length_t, channels_t, module.max_period, anchor)
    xt = _layer_norm(module.norm_in_t, xt) + module.weight_pos_embed * pos

    # Every layer's tensors have the shapes of the layer two before: static, each would take the
    # buffers that layer freed and hold them through the layer in between.
    x, xt = _unplanned(x, anchor), _unplanned(xt, anchor)
    for idx in range(module.num_layers):
        if idx % 2 == module.classic_parity:
            x = _self_layer(module.layers[idx], x)
            xt = _self_layer(module.layers_t[idx], xt)
        else:
            x, xt = (
                _cross_layer(module.layers[idx], x, xt),
                _cross_layer(module.layers_t[idx], xt, x),
            )

    x = _from_tokens(x, down).reshape(batch, -1, freqs, frames)
    return x, _from_tokens(xt, down_t)


def _standardize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, std, (x - mean) / (1e-5 + std)) over all but the batch axis, as HTDemucs
    normalizes its inputs (unbiased std), from tree sums of centred values, the mean refined
    (`_mean_var`)."""
    count = math.prod(int(n) for n in x.shape[1:])
    mean, var, centered = _mean_var(x, x.dim() - 1, refine=True)
    std = torch.sqrt(var * (count / (count - 1)))
    return mean, std, centered / (1e-5 + std)


class Network(nn.Module):
    """One HTDemucs without its STFT/ISTFT: (mix, spectrogram) -> (spectral out, time out).

    `stems` selects (and `scales` weights) the sources this model contributes to a bag, so a
    model whose bag weight for a stem is zero produces nothing for it.
    """

    def __init__(self, model: HTDemucs, stems: list[int], scales: list[float]):
        super().__init__()
        if not isinstance(model, HTDemucs):
            raise TypeError(f"only HTDemucs models are supported, got {type(model).__name__}")
        if not model.cac or model.wiener_iters:
            raise NotImplementedError("only cac=True models without Wiener filtering")
        self.model = model
        self.stems = list(stems)
        self.scales = [float(s) for s in scales]

    def forward(self, mix: torch.Tensor, mag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        anchor = _anchor(mix)
        x = mag
        batch, channels, freqs, frames = x.shape
        mean, std, x = _standardize(x)
        meant, stdt, xt = _standardize(mix)

        saved, saved_t, lengths, lengths_t = [], [], [], []
        for idx, encode in enumerate(model.encoder):
            lengths.append(x.shape[-1])
            inject = None
            if idx < len(model.tencoder):
                lengths_t.append(xt.shape[-1])
                tenc = model.tencoder[idx]
                xt = _encode(tenc, xt, None, anchor)
                if not tenc.empty:
                    saved_t.append(xt)
                else:
                    inject = xt
            x = _encode(encode, x, inject, anchor)
            if idx == 0 and model.freq_emb is not None:
                frs = torch.arange(x.shape[-2])
                emb = model.freq_emb(frs).t()[None, :, :, None]
                x = x + model.freq_emb_scale * emb
            saved.append(x)

        if model.crosstransformer:
            x, xt = _cross_transformer(model, x, xt, anchor)

        for idx, decode in enumerate(model.decoder):
            skip = saved.pop(-1)
            x, pre = _decode(decode, x, skip, lengths.pop(-1), anchor)
            offset = model.depth - len(model.tdecoder)
            if idx >= offset:
                tdec = model.tdecoder[idx - offset]
                length_t = lengths_t.pop(-1)
                if tdec.empty:
                    pre = pre[:, :, 0]
                    xt, _ = _decode(tdec, pre, None, length_t, anchor)
                else:
                    skip = saved_t.pop(-1)
                    xt, _ = _decode(tdec, xt, skip, length_t, anchor)

        sources = len(model.sources)
        x = x.view(batch, sources, -1, freqs, frames) * std[:, None] + mean[:, None]
        xt = xt.view(batch, sources, -1, mix.shape[-1]) * stdt[:, None] + meant[:, None]
        return self._select(x), self._select(xt)

    def _select(self, out: torch.Tensor) -> torch.Tensor:
        if self.stems != list(range(out.shape[1])):
            out = out[:, self.stems]
        if any(scale != 1.0 for scale in self.scales):
            shape = [1, len(self.scales)] + [1] * (out.dim() - 2)
            out = out * torch.tensor(self.scales).view(shape)
        return out
