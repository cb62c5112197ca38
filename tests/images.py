"""Builds the local test images with ``docker import``: there is no registry here.

``python tests/images.py`` (or :func:`ensure_images`) is idempotent: an image that
already exists is left alone. Needs root for debootstrap, and busybox-static.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

BUSYBOX = "ufaas-test/busybox"
PYTHON = "ufaas-test/python"
IMAGES = (BUSYBOX, PYTHON)

BUSYBOX_APPLETS = (
    "sh ash echo cat ls sleep mkdir rm tar kill env printf yes head tail wc sync true false "
    "id ps seq dd chmod ln mv cp find grep sed tr test [ expr stat touch readlink sort uniq od"
).split()


def image_exists(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True).returncode == 0


def _import(root: str, name: str) -> None:
    tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["docker", "import", "-", name], stdin=tar.stdout, check=True,
                   stdout=subprocess.DEVNULL)
    if tar.wait() != 0:
        raise RuntimeError(f"tar of {root} failed")


def _busybox_binary() -> str:
    for path in ("/bin/busybox", "/usr/bin/busybox"):
        if os.path.exists(path):
            return path
    raise RuntimeError("busybox not found: apt-get install busybox-static")


def build_busybox(name: str = BUSYBOX) -> None:
    with tempfile.TemporaryDirectory() as root:
        os.makedirs(f"{root}/bin")
        shutil.copy(_busybox_binary(), f"{root}/bin/busybox")
        for applet in BUSYBOX_APPLETS:
            os.symlink("busybox", f"{root}/bin/{applet}")
        for d in ("tmp", "proc", "sys", "dev", "etc"):
            os.makedirs(f"{root}/{d}", exist_ok=True)
        os.chmod(f"{root}/tmp", 0o1777)
        _import(root, name)


def build_python(name: str = PYTHON) -> None:
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap not found: apt-get install debootstrap")
    with tempfile.TemporaryDirectory() as root:
        subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3", "bookworm", root],
            check=True, stdout=subprocess.DEVNULL,
        )
        # Keep the image small: package caches and docs are not needed to run code.
        junk_dirs = ("var/cache/apt/archives", "usr/share/doc", "usr/share/man", "usr/share/locale")
        for junk in junk_dirs:
            shutil.rmtree(f"{root}/{junk}", ignore_errors=True)
        _import(root, name)


def ensure_images() -> list[str]:
    """Build whichever test image is missing; return the names built."""
    built = []
    for name, build in ((BUSYBOX, build_busybox), (PYTHON, build_python)):
        if not image_exists(name):
            build(name)
            built.append(name)
    return built


if __name__ == "__main__":
    built = ensure_images()
    print("built:", ", ".join(built) if built else "nothing (images exist)", file=sys.stderr)
