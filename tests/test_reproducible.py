"""Same commit, same bytes: a conversion does not record where or by whom it ran.

What this proves: two venvs created separately, at different prefixes, run from different
working directories with different hash seeds, temp and home folders, convert to byte-identical
files that contain none of those paths nor the host name. Both venvs see the same installed
packages (a .pth file points at this venv's site-packages), so it does not prove that two
installs of the pinned toolchain compute the same; the provenance records those versions
without local labels (`2.13.0+cpu` -> `2.13.0`) so a CPU build from either index stamps alike.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

from converter import metadata

ROOT = Path(__file__).resolve().parent.parent


def make_venv(where: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "shared-toolchain.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_two_venvs_convert_to_identical_bytes(small_repo, tmp_path):
    files = []
    for n, cwd in ((1, ROOT), (2, tmp_path)):
        home = tmp_path / f"home-{n}"
        (home / "tmp").mkdir(parents=True)
        python = make_venv(tmp_path / ("venv-a" if n == 1 else "other/place/venv-b"))
        out = tmp_path / f"out-{n}"
        env = {
            **os.environ,
            "PYTHONHASHSEED": str(n),
            "HOME": str(home),
            "TMPDIR": str(home / "tmp"),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        done = subprocess.run(
            [
                str(python),
                "-m",
                "invoke",
                "--search-root",
                str(ROOT),
                "convert",
                "--model",
                "htdemucs",
                "--repo",
                str(small_repo),
                "--out-dir",
                str(out),
            ],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        files.append(out / "htdemucs.onnx")
    first, second = (path.read_bytes() for path in files)
    assert first == second
    assert metadata.sha256_file(files[0]) == metadata.sha256_file(files[1])
    for noise in (str(tmp_path), "venv-a", "venv-b", str(small_repo), str(Path.home())):
        assert noise.encode() not in first, noise
    host = socket.gethostname()
    if len(host) >= 6:
        assert host.encode() not in first


def test_provenance_versions_carry_no_local_label():
    versions = metadata.toolchain_versions()
    assert set(versions) == set(metadata.TOOLCHAIN)
    assert not [v for v in versions.values() if "+" in v]
