"""Random-weight demucs model repos in demucs' own on-disk format, for offline runs and tests.

Pretrained weights cannot be downloaded everywhere (CI, air-gapped machines), but the loading
code must still be the real one. A repo written here is exactly what `demucs --repo DIR` reads:
`SIG-CHECKSUM.th` packages from `demucs.states.serialize_model` (fp16 state, like the released
checkpoints) named as `save_with_checksum` names them, plus one `NAME.yaml` per bag, and
`fake-repo.json` with the settings of each checkpoint. `size="full"` uses the pretrained
hyper-parameters (41,984,456 parameters for htdemucs); `size="small"` keeps every
architectural feature (time/frequency branches, cross-transformer, bottom channels or not) at a
size that converts in seconds.

Weights at demucs' initialization hide numerical trouble, so `statistics="trained"` moves them
where trained weights are (`trained_like`): biases of 0.5·N(0, 1), norm scales of 1 + 0.7·N(0, 1)
(some near zero or negative), LayerScales of 0.2·N(0, 1) instead of 1e-3 or 1e-4, and conv
weights calibrated so that activations grow about 1.5x per encoder layer.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from fractions import Fraction
from pathlib import Path

import torch
import yaml
from demucs.demucs import LayerScale as DConvLayerScale
from demucs.htdemucs import HTDemucs
from demucs.states import serialize_model
from demucs.transformer import LayerScale as TransformerLayerScale
from omegaconf import OmegaConf
from torch import nn

from converter.errors import UserError
from converter.facts import sha256_file
from converter.metadata import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

STATISTICS = ("init", "trained")
MANIFEST = "fake-repo.json"  # the settings each checkpoint was written with
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


def checkpoint_seed(signature: str, seed: int | None = None) -> int:
    """The random seed of `signature`'s weights: from the signature alone by default (the
    bytes every earlier repo holds), or from the signature and `seed` for other draws."""
    text = signature if seed is None else f"{signature}:{seed}"
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def _check_statistics(statistics: str) -> None:
    if statistics not in STATISTICS:
        choices = " or ".join(map(repr, STATISTICS))
        raise UserError(f"unknown statistics {statistics!r}: use {choices}")


def checkpoint_bytes(
    signature: str, kwargs: dict, statistics: str = "init", seed: int | None = None
) -> tuple[str, bytes]:
    """(`SIG-CHECKSUM.th`, its bytes) for one random-weight model (`checkpoint_seed`): what
    demucs' `save_with_checksum` would write."""
    _check_statistics(statistics)
    seed = checkpoint_seed(signature, seed)
    torch.manual_seed(seed)
    model = HTDemucs(**kwargs)
    if statistics == "trained":
        growth = trained_like(model, seed)
        shown = " ".join(f"{g:.2f}" for g in growth)
        log.info("%s: trained-like, encoder growth per layer %s", signature, shown)
    buffer = io.BytesIO()
    # The training config is irrelevant for inference; demucs stores it as a plain dict.
    torch.save(serialize_model(model, OmegaConf.create({})), buffer)
    data = buffer.getvalue()
    return f"{signature}-{hashlib.sha256(data).hexdigest()[:8]}.th", data


def _write(path: Path, data: bytes) -> Path:
    """`data` into `path` through a temp file and a rename: a full disk or a stop leaves no
    partial checkpoint under a name demucs would load."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    log.info("wrote %s (%.1f MB)", path.name, len(data) / 1e6)
    return path


def write_checkpoint(
    repo: Path, signature: str, kwargs: dict, statistics: str = "init", seed: int | None = None
) -> Path:
    """Write one random-weight model as `repo/SIG-CHECKSUM.th` (`checkpoint_bytes`)."""
    name, data = checkpoint_bytes(signature, kwargs, statistics, seed)
    return _write(repo / name, data)


def intact(checkpoint: Path) -> bool:
    """Whether `SIG-CHECKSUM.th` holds the bytes its name promises (demucs' own check)."""
    checksum = checkpoint.stem.rsplit("-", 1)[-1]
    return sha256_file(checkpoint)[: len(checksum)] == checksum


def write_bag(
    repo: Path, name: str, signatures: list[str], weights: list[list[float]] | None = None
) -> Path:
    """Write the bag file `NAME.yaml` as demucs' `BagOnlyRepo` reads it."""
    content: dict = {"models": list(signatures)}
    if weights is not None:
        content["weights"] = weights
    path = repo / f"{name}.yaml"
    write_text_atomic(path, yaml.safe_dump(content, default_flow_style=None))
    return path


def _settings_text(settings: dict | None) -> str:
    if settings is None:
        return "unknown settings (not recorded by fake-repo)"
    seed = "default seed" if settings["seed"] is None else f"seed {settings['seed']}"
    return f"{settings['size']} size, {settings['statistics']} statistics, {seed}"


def _read_manifest(out: Path) -> dict:
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _prepare(out: Path) -> None:
    """Create `out`, or say in one line why it cannot be a repo folder."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; pick another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(f"cannot create --out {out}: {reason}; pick another --out") from None


def _existing(out: Path, signature: str, settings: dict, manifest: dict) -> Path | None:
    """The checkpoint of `signature` already in `out` if it is intact and was written with
    `settings`; damaged ones (checksum mismatch) are removed; others refused."""
    found = [p for p in out.glob(f"{signature}-*.th") if p.stem.split("-")[0] == signature]
    kept = []
    for path in found:
        if intact(path):
            kept.append(path)
        else:
            log.warning("removing %s: its bytes do not match the checksum in its name", path)
            path.unlink()
    if not kept:
        return None
    entry = manifest.get(signature)
    recorded = entry.get("settings") if isinstance(entry, dict) else None
    if len(kept) == 1 and recorded == settings and entry.get("file") == kept[0].name:
        log.info("kept %s: intact and written with %s", kept[0].name, _settings_text(settings))
        return kept[0]
    names = ", ".join(p.name for p in kept)
    raise UserError(
        f"{out} already holds {names}, written with {_settings_text(recorded)}, not "
        f"{_settings_text(settings)}: remove it or pick another --out"
    )


def write_repo(
    out: Path,
    size: str = "full",
    names: list[str] | None = None,
    statistics: str = "init",
    seed: int | None = None,
) -> Path:
    """Write the bags `names` (default: all three pretrained products) into `out`, with
    weights at demucs' initialization or trained-like `statistics`, drawn with `seed`.

    Checkpoints already there are kept only if intact and written with the same settings
    (recorded in `fake-repo.json`); a damaged one is rewritten, any other refused.
    """
    names = names or list(BAGS)
    unknown = [n for n in names if n not in BAGS]
    if unknown:
        raise UserError(f"unknown model(s) {unknown}: choose from {', '.join(BAGS)}")
    _check_statistics(statistics)
    kwargs = {name: model_kwargs(name, size) for name in names}
    _prepare(out)
    settings = {"size": size, "statistics": statistics, "seed": seed}
    manifest = _read_manifest(out)
    written: list[str] = []
    try:
        for name in names:
            signatures, weights, _, _ = BAGS[name]
            for signature in signatures:
                if _existing(out, signature, settings, manifest) is None:
                    file, data = checkpoint_bytes(signature, kwargs[name], statistics, seed)
                    # The settings first: a stop in between leaves a record of a missing file,
                    # which the next run writes, never a file of unknown settings.
                    manifest[signature] = {"file": file, "settings": settings}
                    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
                    written.append(_write(out / file, data).name)
            write_bag(out, name, signatures, weights)
            log.info("bag %s (%s) ready in %s", name, _settings_text(settings), out)
    except OSError as exc:  # a full disk, a folder made read-only meanwhile
        reason = exc.strerror or type(exc).__name__
        kept = f"; kept {len(written)} complete checkpoint(s) written so far" if written else ""
        raise UserError(
            f"cannot write into {out}: {reason}{kept}; free space or pick another --out, then "
            "rerun (no partial file is left)"
        ) from None
    except KeyboardInterrupt as exc:
        done = (
            f"kept {len(written)} complete checkpoint(s) written so far in {out}; rerun the "
            "same command to write the rest"
            if written
            else f"no checkpoint was written to {out}"
        )
        exc.add_note(done + " (no partial file is left)")
        raise
    return out
