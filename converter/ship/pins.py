"""`invoke pin-openkara`: write a published release's URL and SHA-256 into an OpenKara checkout.

OpenKara pins each model in several files (docs/openkara-pins.md lists them and their syntax);
if one is missed, the app and its CI disagree. So every place is rewritten together or none is:
all patterns must match before any file is written, and a failed write rolls back the others.
The SHA-256 comes from the release's own `.sha256` asset, checked against GitHub's `digest`.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from converter.errors import UserError
from converter.facts import WAVEFORM
from converter.metadata import parse_sidecar
from converter.ship import github
from converter.ship.tags import parse_tag

log = logging.getLogger(__name__)

# The `ModelDescriptor` const of each model OpenKara pins; htdemucs_6s has none (four stems).
DESCRIPTORS = {"htdemucs": "HTDEMUCS", "htdemucs_ft": "HTDEMUCS_FT"}
UNPINNED = (
    "OpenKara has no place for {model}: its app pins only htdemucs and htdemucs_ft (its stem "
    "list has four stems), so there is nothing to rewrite; see docs/openkara-pins.md"
)


@dataclass(frozen=True)
class Pin:
    """What OpenKara pins for one published model file."""

    model: str
    tag: str
    asset: str
    url: str
    sha256: str


class _Missing(Exception):
    """A place's expected text was not found."""


def _sub(text: str, pattern: str, value: str, what: str, flags: int = re.M) -> str:
    """Replace group-delimited value(s) of `pattern` (groups 1 and 2 surround it) with `value`."""
    new, count = re.subn(pattern, lambda m: m[1] + value + m[2], text, flags=flags)
    if not count:
        raise _Missing(what)
    return new


@dataclass(frozen=True)
class Place:
    """One file of OpenKara that pins the model: how to rewrite it and how the pin reads there."""

    path: str
    rewrite: Callable[[str, Pin], str]
    snippet: Callable[[Pin], str]


def _descriptor(text: str, pin: Pin) -> str:
    const = DESCRIPTORS[pin.model]
    head = f"pub const {const}: ModelDescriptor = ModelDescriptor {{"
    match = re.search(re.escape(head) + r"(.*?)\};", text, re.S)
    if not match:
        raise _Missing(f"`{head} ... }};`")
    body = match[1]
    if f'filename: "{pin.asset}",' not in body:
        raise _Missing(f'`filename: "{pin.asset}",` in {const}')
    body = _sub(body, r'(download_url:\s*")[^"]*(",)', pin.url, f"`download_url:` in {const}")
    body = _sub(body, r'(sha256:\s*")[^"]*(",)', pin.sha256, f"`sha256:` in {const}")
    return text[: match.start(1)] + body + text[match.end(1) :]


def _asserts(text: str, pin: Pin) -> str:
    const = DESCRIPTORS[pin.model]
    for field, value in (("download_url", pin.url), ("sha256", pin.sha256)):
        pattern = rf'(assert_eq!\(\s*{const}\.{field},\s*")[^"]*("\s*\))'
        text = _sub(text, pattern, value, f'`assert_eq!({const}.{field}, "...")`')
    return text


def _setup_sh(text: str, pin: Pin) -> str:
    text = _sub(text, r'^(MODEL_URL=")[^"]*(")', pin.url, '`MODEL_URL="..."`')
    return _sub(text, r'^(MODEL_SHA256=")[^"]*(")', pin.sha256, '`MODEL_SHA256="..."`')


def _ci_env(text: str, pin: Pin) -> str:
    # Two spaces: the workflow's top-level `env:` block, not a job's.
    text = _sub(text, r"^(  MODEL_URL: )[^\s#]+()", pin.url, "top-level `  MODEL_URL: ...`")
    return _sub(text, r"^(  MODEL_SHA256: )[^\s#]+()", pin.sha256, "`  MODEL_SHA256: ...`")


def _contract_doc(text: str, pin: Pin) -> str:
    pattern = rf"^(\s*- `{pin.model}`: `)[^`/]+(/{re.escape(pin.asset)}`)"
    return _sub(text, pattern, pin.tag, f"`- `{pin.model}`: `TAG/{pin.asset}``")


def _embedded(text: str, pin: Pin) -> str:
    pattern = r'(pub const EMBEDDED_MODEL_FILENAME: &str = ")[^"]*(";)'
    return _sub(text, pattern, pin.asset, '`pub const EMBEDDED_MODEL_FILENAME: &str = "...";`')


BOOTSTRAP = Place(
    "src-tauri/src/separator/bootstrap.rs",
    _descriptor,
    lambda p: f'    download_url: "{p.url}",\n    sha256: "{p.sha256}",',
)
MODEL_RS = Place(
    "src-tauri/src/separator/model.rs",
    _embedded,
    lambda p: f'pub const EMBEDDED_MODEL_FILENAME: &str = "{p.asset}";',
)
TESTS = Place(
    "src-tauri/tests/phase6_model_bootstrap.rs",
    _asserts,
    lambda p: (
        f'assert_eq!({DESCRIPTORS[p.model]}.download_url, "{p.url}");\n'
        f'assert_eq!({DESCRIPTORS[p.model]}.sha256, "{p.sha256}");'
    ),
)
SETUP_SH = Place(
    "scripts/setup.sh",
    _setup_sh,
    lambda p: f'MODEL_URL="{p.url}"\nMODEL_SHA256="{p.sha256}"',
)
CI_YML = Place(
    ".github/workflows/ci.yml",
    _ci_env,
    lambda p: f"  MODEL_URL: {p.url}\n  MODEL_SHA256: {p.sha256}",
)
CONTRACT_DOC = Place(
    "docs/references/contracts/phase-6-model-bootstrap-contract.md",
    _contract_doc,
    lambda p: f"   - `{p.model}`: `{p.tag}/{p.asset}`",
)
PLACES = {
    "htdemucs": (BOOTSTRAP, MODEL_RS, TESTS, SETUP_SH, CI_YML, CONTRACT_DOC),
    "htdemucs_ft": (BOOTSTRAP, TESTS, CONTRACT_DOC),
}


def places(model: str) -> tuple[Place, ...]:
    if model not in PLACES:
        raise UserError(UNPINNED.format(model=model))
    return PLACES[model]


def snippets(pin: Pin) -> str:
    """Markdown: the pin as each OpenKara file spells it (model card, step summary)."""
    if pin.model not in PLACES:
        return UNPINNED.format(model=pin.model) + "."
    parts = [
        f"`invoke pin-openkara --tag {pin.tag} --checkout PATH/TO/openkara` rewrites these "
        f"{len(PLACES[pin.model])} places together (docs/releasing.md):",
        "",
    ]
    for place in PLACES[pin.model]:
        parts += [f"`{place.path}`", "", "```", place.snippet(pin), "```", ""]
    return "\n".join(parts)


def fetch_pin(
    client: github.Client, tag: str, server_url: str, allow_prerelease: bool = False
) -> Pin:
    """The pin of the PUBLISHED release `tag`: its `.sha256` asset, checked against the model
    asset's GitHub `digest` (or its downloaded bytes when GitHub gives none)."""
    parsed = parse_tag(tag)
    places(parsed.model)  # refuse htdemucs_6s before any network call
    found = github.find_release(client, tag)
    if found is None:
        raise UserError(f"no release {tag} in {client.repository}: publish it with invoke release")
    if found["draft"]:
        raise UserError(
            f"release {tag} is a draft: its download URL changes on publishing; pin it only "
            "after `invoke release` has published it"
        )
    if found.get("prerelease") and not allow_prerelease:
        raise UserError(
            f"release {tag} is a prerelease: stable OpenKara builds must not pin it "
            "(pass --allow-prerelease for a test branch)"
        )
    asset = f"{parsed.model}.onnx"
    assets = {a["name"]: a for a in github.list_assets(client, found)}
    missing = [name for name in (asset, f"{asset}.sha256") if name not in assets]
    if missing:
        raise UserError(f"release {tag} lacks {' and '.join(missing)}: it cannot be pinned")
    text = bytearray()
    client.download_asset(assets[f"{asset}.sha256"], text.extend)
    try:
        digest, name = parse_sidecar(text.decode("utf-8", "replace"), f"{asset}.sha256 of {tag}")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if name != asset:
        raise UserError(f"{asset}.sha256 of {tag} is not a `sha256sum` line for {asset}: {text!r}")
    if not (assets[asset].get("digest") or "").startswith("sha256:"):
        log.info("GitHub gives no digest for %s; downloading it to hash it", asset)
    actual = github.remote_sha256(client, assets[asset])
    if actual != digest:
        raise UserError(
            f"{asset} of {tag} has SHA-256 {actual} on GitHub but its .sha256 asset says "
            f"{digest}: the release is wrong; do not pin it, release a new tag"
        )
    url = github.download_url(server_url, client.repository, tag, asset)
    log.info("published %s: %s sha256 %s", tag, url, digest)
    return Pin(parsed.model, tag, asset, url, digest)


def rewrite(checkout: Path, pin: Pin) -> dict[Path, tuple[str, str]]:
    """{file: (old text, new text)} for every place of `pin.model`; nothing is written. One
    UserError names every place whose file or pattern is missing."""
    changes, problems = {}, []
    for place in places(pin.model):
        path = checkout / place.path
        try:
            old = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{place.path}: cannot read ({exc})")
            continue
        try:
            changes[path] = (old, place.rewrite(old, pin))
        except _Missing as exc:
            problems.append(f"{place.path}: {exc} not found")
    if problems:
        raise UserError(
            f"not pinning {pin.tag}: {'; '.join(problems)}. Is {checkout} an OpenKara checkout "
            "in the layout of docs/openkara-pins.md? No file was changed"
        )
    return changes


def diff(checkout: Path, changes: dict[Path, tuple[str, str]]) -> str:
    lines: list[str] = []
    for path, (old, new) in changes.items():
        name = path.relative_to(checkout).as_posix()
        lines += difflib.unified_diff(
            old.splitlines(keepends=True), new.splitlines(keepends=True), f"a/{name}", f"b/{name}"
        )
    return "".join(lines)


def write_all(changes: dict[Path, tuple[str, str]]) -> None:
    """Stage every new text beside its file, then rename them in; a failure, Ctrl-C or SIGTERM
    anywhere on the way puts every file back as it was."""
    staged: dict[Path, Path] = {}
    done: list[Path] = []
    try:
        for path, (_, new) in changes.items():
            staged[path] = _stage(path, new)
        for path, tmp in staged.items():
            done.append(path)  # before the rename: a signal between the two restores it too
            os.replace(tmp, path)
    except BaseException as exc:
        lost = _put_back(changes, done)
        kept = (
            "no file was changed"
            if not lost
            else f"could not put back {', '.join(lost)}: restore them with `git checkout`"
        )
        if isinstance(exc, KeyboardInterrupt):
            exc.add_note(kept)
            raise
        if isinstance(exc, OSError):
            raise UserError(
                f"could not rewrite {exc.filename or exc}: {exc.strerror}; {kept}"
            ) from None
        raise
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)


def _stage(path: Path, text: str) -> Path:
    """`text` in a temp file beside `path`, with `path`'s mode (scripts/setup.sh stays
    executable)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(text.encode("utf-8"))
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _put_back(changes: dict[Path, tuple[str, str]], done: list[Path]) -> list[str]:
    """Rename each old text back over the files in `done`; the ones that failed."""
    lost = []
    for path in done:
        tmp = None
        try:
            tmp = _stage(path, changes[path][0])
            os.replace(tmp, path)
        except OSError as exc:
            log.error("could not put back %s: %s", path, exc)
            lost.append(str(path))
            if tmp is not None:
                tmp.unlink(missing_ok=True)
    return lost


def pin_openkara(
    tag: str,
    checkout: Path,
    *,
    dry_run: bool = False,
    allow_prerelease: bool = False,
    client: github.Client | None = None,
    server_url: str | None = None,
) -> str:
    """Rewrite every pin of `tag`'s model in `checkout` (or, dry run, return the diff)."""
    parsed = parse_tag(tag)
    if parsed.interface != WAVEFORM:
        raise UserError(
            f"{tag} is a {parsed.interface} release: OpenKara takes those from its catalog, not "
            "from pins; hand it over with `invoke catalog --tag TAG` (docs/releasing.md)"
        )
    places(parsed.model)
    if not checkout.is_dir():
        raise UserError(f"--checkout {checkout} is not a directory: pass an OpenKara checkout")
    client = client or github.from_env()
    server = server_url or github.server_url()
    pin = fetch_pin(client, tag, server, allow_prerelease)
    changes = rewrite(checkout, pin)
    changed = {path: texts for path, texts in changes.items() if texts[0] != texts[1]}
    names = ", ".join(path.relative_to(checkout).as_posix() for path in changed) or "none"
    if dry_run:
        return (
            diff(checkout, changed)
            + f"dry run: {len(changed)} of {len(changes)} places would change ({names}); "
            "nothing written"
        )
    if not changed:
        return f"{checkout} already pins {pin.asset} at {tag} in all {len(changes)} places"
    write_all(changed)
    for path in changed:
        log.info("rewrote %s", path)
    return (
        f"pinned {pin.asset} {tag} (sha256 {pin.sha256}) in {checkout}: {len(changed)} of "
        f"{len(changes)} places changed ({names}); commit them together"
    )
