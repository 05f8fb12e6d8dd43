"""Random-weight demucs model repos in demucs' own on-disk format, for offline runs and tests.

Pretrained weights cannot be downloaded everywhere (CI, air-gapped machines), but the loading
code must still be the real one. A repo written here is exactly what `demucs --repo DIR` reads:
`SIG-CHECKSUM.th` packages from `demucs.states.serialize_model` (fp16 state, like the released
checkpoints) saved by `save_with_checksum`, plus one `NAME.yaml` per bag. `size="full"` uses the
pretrained hyper-parameters (41,984,456 parameters for htdemucs); `size="small"` keeps every
architectural feature (time/frequency branches, cross-transformer, bottom channels or not) at a
size that converts in seconds.

Weights at demucs' initialization hide numerical trouble, so `statistics="trained"` moves them
where trained weights are (`trained_like`): biases of 0.5·N(0, 1), norm scales of 1 + 0.7·N(0, 1)
(some near zero or negative), LayerScales of 0.2·N(0, 1) instead of 1e-3 or 1e-4, and conv
weights calibrated so that activations grow about 1.5x per encoder layer.
"""

from __future__ import annotations

import hashlib
import logging
from fractions import Fraction
from pathlib import Path

import torch
import yaml
from demucs.demucs import LayerScale as DConvLayerScale
from demucs.htdemucs import HTDemucs
from demucs.states import save_with_checksum, serialize_model
from demucs.transformer import LayerScale as TransformerLayerScale
from torch import nn

from .errors import UserError

log = logging.getLogger(__name__)

STATISTICS = ("init", "trained")
GROWTH = 1.5  # activation RMS growth per encoder layer of a trained-like model
_CONVS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)

FOUR_STEMS = ["drums", "bass", "other", "vocals"]
SIX_STEMS = FOUR_STEMS + ["guitar", "piano"]

# demucs 4.1.0's pretrained HTDemucs arguments (sources: docs/demucs-facts.md).
FULL_KWARGS = dict(
    audio_channels=2,
    channels=48,
    growth=2,
    depth=4,
    nfft=4096,
    cac=True,
    rewrite=True,
    freq_emb=0.2,
    kernel_size=8,
    stride=4,
    time_stride=2,
    context=1,
    norm_starts=4,
    norm_groups=4,
    dconv_mode=3,
    dconv_depth=2,
    dconv_comp=8,
    bottom_channels=512,
    t_layers=5,
    t_heads=8,
    t_hidden_scale=4.0,
    t_dropout=0.02,
    segment=Fraction(39, 5),
    samplerate=44100,
)
SMALL_KWARGS = dict(
    FULL_KWARGS,
    channels=8,
    depth=2,
    nfft=512,
    bottom_channels=32,
    t_layers=2,
    t_heads=2,
    t_hidden_scale=2.0,
    segment=Fraction(1, 2),
)

# name -> (signatures, weights or None, sources, overrides of the 4-stem kwargs)
BAGS: dict[str, tuple[list[str], list[list[float]] | None, list[str], dict]] = {
    "htdemucs": (["955717e8"], None, FOUR_STEMS, {}),
    "htdemucs_ft": (
        ["f7e0c4bc", "d12395a8", "92cfc3b6", "04573f0d"],
        [[1.0 if i == j else 0.0 for j in range(4)] for i in range(4)],
        FOUR_STEMS,
        {},
    ),
    "htdemucs_6s": (["5c90dfd2"], None, SIX_STEMS, {"bottom_channels": 0}),
}


def model_kwargs(name: str, size: str) -> dict:
    """HTDemucs keyword arguments of the bag `name` at `size` ('full' or 'small')."""
    if size not in ("full", "small"):
        raise UserError(f"unknown size {size!r}: use 'full' or 'small'")
    _, _, sources, overrides = BAGS[name]
    base = FULL_KWARGS if size == "full" else SMALL_KWARGS
    return dict(base, sources=sources, **overrides)


def _encoder_growth(model: HTDemucs) -> list[float]:
    """RMS(output) / RMS(input) of every encoder layer (frequency, then time) on 0.1 noise."""
    ratios: dict[int, float] = {}
    layers = [*model.encoder, *model.tencoder]

    class Done(Exception):
        """Raised after the last encoder layer: the rest of the forward is not needed."""

    def hook(index: int):
        def record(module, inputs, output) -> None:
            ratios[index] = float(output.pow(2).mean().sqrt() / inputs[0].pow(2).mean().sqrt())
            if len(ratios) == len(layers):
                raise Done

        return record

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    length = int(model.segment * model.samplerate)
    noise = torch.randn(1, model.audio_channels, length, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            model.eval()(0.1 * noise)
    except Done:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return [ratios[i] for i in range(len(layers))]


def trained_like(model: HTDemucs, seed: int, rounds: int = 3) -> list[float]:
    """Give `model` trained-like statistics (module docstring); returns the encoder growth.

    The conv gains are calibrated in a few forward passes: scaling a layer's convs by f
    changes its growth by roughly f (GELU and GLU are close to homogeneous at these scales).
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(tensor: torch.Tensor, std: float, mean: float = 0.0) -> None:
        tensor.copy_(mean + std * torch.randn(tensor.shape, generator=gen))

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and module.weight is not None:
                normal(module.weight, 0.7, 1.0)
            elif isinstance(module, (DConvLayerScale, TransformerLayerScale)):
                normal(module.scale, 0.2)
            for name, param in module.named_parameters(recurse=False):
                if name.endswith("bias"):
                    normal(param, 0.5)
        layers = [*model.encoder, *model.tencoder]
        for _ in range(rounds):
            for layer, growth in zip(layers, _encoder_growth(model), strict=True):
                layer.conv.weight.mul_((GROWTH / growth) ** 0.5)
                if isinstance(layer.rewrite, _CONVS):
                    layer.rewrite.weight.mul_((GROWTH / growth) ** 0.5)
    return _encoder_growth(model)


def write_checkpoint(repo: Path, signature: str, kwargs: dict, statistics: str = "init") -> Path:
    """Write one random-weight model as `SIG-CHECKSUM.th`; the seed derives from `signature`."""
    if statistics not in STATISTICS:
        choices = " or ".join(map(repr, STATISTICS))
        raise UserError(f"unknown statistics {statistics!r}: use {choices}")
    seed = int(hashlib.sha256(signature.encode()).hexdigest()[:8], 16)
    torch.manual_seed(seed)
    model = HTDemucs(**kwargs)
    if statistics == "trained":
        growth = trained_like(model, seed)
        shown = " ".join(f"{g:.2f}" for g in growth)
        log.info("%s: trained-like, encoder growth per layer %s", signature, shown)
    # The training config is irrelevant for inference; demucs stores it as a plain dict.
    from omegaconf import OmegaConf

    package = serialize_model(model, OmegaConf.create({}))
    save_with_checksum(package, repo / f"{signature}.th")
    (path,) = repo.glob(f"{signature}-*.th")
    log.info("wrote %s (%d parameters)", path.name, sum(p.numel() for p in model.parameters()))
    return path


def write_bag(
    repo: Path, name: str, signatures: list[str], weights: list[list[float]] | None = None
) -> Path:
    """Write the bag file `NAME.yaml` as demucs' `BagOnlyRepo` reads it."""
    content: dict = {"models": list(signatures)}
    if weights is not None:
        content["weights"] = weights
    path = repo / f"{name}.yaml"
    path.write_text(yaml.safe_dump(content, default_flow_style=None), encoding="utf-8")
    return path


def write_repo(
    out: Path, size: str = "full", names: list[str] | None = None, statistics: str = "init"
) -> Path:
    """Write the bags `names` (default: all three pretrained products) into `out`, with
    weights at demucs' initialization or trained-like `statistics`."""
    names = names or list(BAGS)
    unknown = [n for n in names if n not in BAGS]
    if unknown:
        raise UserError(f"unknown model(s) {unknown}: choose from {', '.join(BAGS)}")
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        signatures, weights, _, _ = BAGS[name]
        kwargs = model_kwargs(name, size)
        for signature in signatures:
            if not any(out.glob(f"{signature}-*.th")):
                write_checkpoint(out, signature, kwargs, statistics)
        write_bag(out, name, signatures, weights)
        log.info("wrote bag %s (%s size, %s statistics) into %s", name, size, statistics, out)
    return out
