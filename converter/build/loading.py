"""Load a pretrained Demucs bag with demucs' own loader and record where every weight came from.

`demucs.pretrained.get_model` is the loader users trust: the Hugging Face hub by default,
falling back to demucs' AWS mirror, or a local repo of `SIG-CHECKSUM.th` + `NAME.yaml` files
(`--repo`, the same meaning as demucs' own flag). Its failures are turned into one clear error
that names the fix; the checkpoints' digests go into the file's provenance.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch.hub
import yaml
from demucs.apply import BagOfModels
from demucs.hf import DEFAULT_NAMESPACE, hf_repo_name
from demucs.htdemucs import HTDemucs
from demucs.pretrained import REMOTE_ROOT, ModelLoadingError, _parse_remote_files, get_model
from huggingface_hub import try_to_load_from_cache

from converter.errors import UserError
from converter.facts import PRODUCTS
from converter.metadata import sha256_file

log = logging.getLogger(__name__)


@dataclass
class LoadedBag:
    """A demucs bag plus what the converter needs to know about it."""

    name: str
    bag: BagOfModels
    signatures: list[str]
    checkpoints: list[dict] = field(default_factory=list)

    @property
    def models(self) -> list[HTDemucs]:
        return list(self.bag.models)

    @property
    def weights(self) -> list[list[float]]:
        return [[float(w) for w in row] for row in self.bag.weights]

    @property
    def sources(self) -> list[str]:
        return list(self.bag.sources)

    @property
    def samplerate(self) -> int:
        return int(self.bag.samplerate)

    @property
    def segment_samples(self) -> int:
        """The training segment in samples: the one length the model sees unpadded."""
        lengths = {int(m.segment * m.samplerate) for m in self.models}
        if len(lengths) != 1:
            raise UserError(f"{self.name}: models disagree on the segment length {lengths}")
        return lengths.pop()


def _bag_signatures(name: str, repo: Path | None) -> list[str]:
    """The signatures `NAME.yaml` lists ([name] without one), checked as demucs will read them,
    so a broken bag file gets one line naming the file and the place instead of a parser dump."""
    bag_file = (repo if repo is not None else REMOTE_ROOT) / f"{name}.yaml"
    if bag_file.is_dir():
        raise UserError(f"{bag_file} is a directory, not a bag file; remove it")
    if not bag_file.is_file():
        return [name]
    fix = "fix it, or write a fresh repo with `invoke fake-repo`"
    try:
        bag = yaml.safe_load(bag_file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise UserError(f"bag file {bag_file} is not valid YAML ({problem}{at}); {fix}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read bag file {bag_file} ({exc}); {fix}") from None
    models = bag.get("models") if isinstance(bag, dict) else None
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        numbers = " (quote signatures YAML reads as numbers)" if isinstance(models, list) else ""
        raise UserError(
            f"bag file {bag_file} must map `models` to a list of checkpoint signatures, as "
            f"demucs writes it ('models: [955717e8]'){numbers}; it holds {str(bag)[:80]!r}: {fix}"
        )
    weights = bag.get("weights")
    rows_ok = (
        isinstance(weights, list)
        and len(weights) == len(models)
        and all(
            isinstance(row, list) and all(type(w) in (int, float) for w in row) for row in weights
        )
    )
    if weights is not None and not rows_ok:
        raise UserError(
            f"bag file {bag_file}: `weights` must hold one list of per-stem numbers for each of "
            f"its {len(models)} models; {fix}"
        )
    if weights is not None and len({len(row) for row in weights}) == 1:
        zero = [s for s in range(len(weights[0])) if sum(row[s] for row in weights) == 0]
        if zero:
            raise UserError(
                f"bag file {bag_file}: stem(s) {zero} have zero total weight, so no model "
                f"produces them; {fix}"
            )
    segment = bag.get("segment")
    if segment is not None and (type(segment) not in (int, float) or segment <= 0):
        raise UserError(f"bag file {bag_file}: `segment` {segment!r} is not a positive number")
    return models


def _locate_checkpoint(name: str, signature: str, repo: Path | None) -> dict:
    """Find the file demucs loaded for `signature` and describe it (source, checksum, sha256)."""
    if repo is not None:
        (path,) = [p for p in repo.glob(f"{signature}*.th") if p.stem.split("-")[0] == signature]
        checksum = path.stem.split("-", 1)[1] if "-" in path.stem else ""
        return {
            "signature": signature,
            "source": "local repo",
            "file": path.name,
            "checksum": checksum,
            "sha256": sha256_file(path),
        }
    repo_id = f"{DEFAULT_NAMESPACE}/{hf_repo_name(name)}"
    cached = try_to_load_from_cache(repo_id, f"{signature}.safetensors")
    if isinstance(cached, str):
        return {
            "signature": signature,
            "source": f"huggingface:{repo_id}",
            "file": Path(cached).name,
            "checksum": "",
            "sha256": sha256_file(Path(cached)),
        }
    url = _parse_remote_files(REMOTE_ROOT / "files.txt")[signature]
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]
    return {
        "signature": signature,
        "source": "demucs remote",
        "file": path.name,
        "checksum": path.stem.split("-", 1)[1],
        "sha256": sha256_file(path),
    }


def load(name: str, repo: Path | None = None) -> LoadedBag:
    """Load bag `name` from the hub, or from the local demucs repo `repo`."""
    if name not in PRODUCTS:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(PRODUCTS)}")
    if repo is not None and not repo.is_dir():
        raise UserError(
            f"--repo {repo} is not a directory: pass a local demucs model repo holding "
            f"SIG-CHECKSUM.th checkpoints and {name}.yaml (`invoke fake-repo --out DIR` writes one)"
        )
    where = f"local repo {repo}" if repo is not None else "the Hugging Face hub / demucs remote"
    signatures = _bag_signatures(name, repo)
    log.info("loading %s from %s", name, where)
    try:
        model = get_model(name, repo=repo)
    except ModelLoadingError as exc:
        hint = (
            f"the repo must hold {name}.yaml and a SIG-CHECKSUM.th file for every signature it "
            "lists, as written by demucs (or `invoke fake-repo`)"
            if repo is not None
            else "check the network, or convert offline with --repo DIR"
        )
        raise UserError(f"could not load {name} from {where}: {exc}; {hint}") from None
    except AssertionError:  # demucs' BagOfModels checks its members with bare asserts
        raise UserError(
            f"demucs refused the bag {name} from {where}: its models must share stems, sample "
            "rate and channels, and each `weights` row needs one number per stem"
        ) from None
    except Exception as exc:  # torch.load/pickle/network errors have no common base class
        if repo is not None:
            raise UserError(
                f"could not load {name} from {where}: {type(exc).__name__}: {exc}. A checkpoint "
                "is corrupt or not a demucs package; rewrite it (demucs.states.save_with_checksum)"
            ) from None
        raise UserError(
            f"could not download {name} ({type(exc).__name__}: {exc}). Check the network, or "
            "convert offline with --repo DIR pointing at a local demucs model repo "
            f"(SIG-CHECKSUM.th files + {name}.yaml)"
        ) from None

    bag = model if isinstance(model, BagOfModels) else BagOfModels([model])
    bad = [type(m).__name__ for m in bag.models if not isinstance(m, HTDemucs)]
    if bad:
        raise UserError(f"{name} holds {bad} models; only HTDemucs (Demucs v4) converts")
    if len(signatures) != len(bag.models):
        raise UserError(f"{name}: bag lists {len(signatures)} models, loaded {len(bag.models)}")
    loaded = LoadedBag(name=name, bag=bag.eval(), signatures=signatures)
    for signature in signatures:
        try:
            loaded.checkpoints.append(_locate_checkpoint(name, signature, repo))
        except (OSError, KeyError, ValueError) as exc:
            log.warning("no checkpoint digest for %s: %s", signature, exc)
            loaded.checkpoints.append({"signature": signature, "source": "unknown"})
    log.info(
        "loaded %s: %d model(s) %s, stems %s, %d parameters per model",
        name,
        len(bag.models),
        signatures,
        loaded.sources,
        sum(p.numel() for p in bag.models[0].parameters()),
    )
    return loaded
