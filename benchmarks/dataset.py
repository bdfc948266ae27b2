"""Deterministic benchmark data: a source-like tree of small files and one big file.

The same seed gives byte-identical files, modes and mtimes, so runs on different
days (and different systems in one run) see the same data. Sizes are log-normal
with a median of about 3 KB (a source tree), contents mostly text with some
binary files, so ``file --mime-type`` has real work to do. A few files are
executable (0755): a mount that shows wrong modes gets caught by the find check.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

BASE_MTIME = 1_700_000_000  # whole seconds: SFTP v3 carries mtimes in seconds
EXTENSIONS = [".py", ".c", ".h", ".md", ".txt", ".json", ".sh", ".html", ".bin", ".png", ".gz"]
EXT_WEIGHTS = [30, 15, 10, 8, 8, 8, 4, 5, 5, 4, 3]
WORDS = ["def", "class", "return", "import", "self", "value", "index", "data", "file", "path", "open", "close", "read", "write", "buffer", "cache", "error", "config", "struct", "int", "char", "void", "static", "const", "if", "else", "for", "while", "the", "of", "to", "and", "a", "in", "is", "it", "that", "with", "as", "on", "be", "at", "by", "this", "from", "or", "an"]


@dataclass
class Spec:
    """Size of the data set: ``Spec.default()``, ``Spec.small()``, ``.scaled(k)``."""

    files: int = 1000
    dirs: int = 40
    median_size: int = 3000
    sigma: float = 1.66  # mean ≈ 4× median: 1,000 files ≈ 12 MB, as in a real tree
    max_size: int = 1 << 20
    big_size: int = 64 << 20
    seed: int = 20240601

    @classmethod
    def default(cls) -> Spec:
        return cls()

    @classmethod
    def small(cls) -> Spec:
        return cls(files=50, dirs=6, big_size=2 << 20)

    def scaled(self, k: float) -> Spec:
        return Spec(files=max(1, round(self.files * k)), dirs=max(1, round(self.dirs * k)),
                    median_size=self.median_size, sigma=self.sigma, max_size=self.max_size,
                    big_size=max(1 << 20, round(self.big_size * k)), seed=self.seed)


@dataclass
class Dataset:
    """A generated data set on local disk: ``tree/`` and ``big.bin`` under ``root``."""

    root: Path
    spec: Spec
    files: list[str] = field(default_factory=list)  # relative to tree, sorted
    total_bytes: int = 0

    @property
    def tree(self) -> Path:
        return self.root / "tree"

    @property
    def big(self) -> Path:
        return self.root / "big.bin"

    def sample(self, n: int, salt: str = "sample") -> list[str]:
        """A deterministic choice of n files (all of them if there are fewer)."""
        rng = random.Random(f"{self.spec.seed}-{salt}")
        return sorted(rng.sample(self.files, min(n, len(self.files))))

    def summary(self) -> dict:
        return {"files": len(self.files), "dirs": self.spec.dirs, "tree_bytes": self.total_bytes,
                "big_bytes": self.spec.big_size, "seed": self.spec.seed}


def _text_pool(rng: random.Random, size: int = 1 << 20) -> bytes:
    """A megabyte of code-like text that files take slices of (fast, still text)."""
    lines, n = [], 0
    while n < size:
        indent = "    " * rng.randrange(4)
        line = indent + " ".join(rng.choice(WORDS) for _ in range(rng.randrange(2, 12))) + "\n"
        lines.append(line)
        n += len(line)
    return "".join(lines).encode()


def _content(rng: random.Random, ext: str, size: int, pool: bytes) -> bytes:
    if ext in (".bin", ".png", ".gz"):
        head = {".png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ".gz": b"\x1f\x8b\x08\x00"}.get(ext, b"")
        return (head + rng.randbytes(size))[:size]
    start = rng.randrange(len(pool) - min(size, len(pool) - 1))
    body = pool[start:start + size]
    while len(body) < size:
        body += pool[: size - len(body)]
    if ext == ".sh":
        body = (b"#!/bin/sh\n" + body)[:size]
    elif ext == ".json":
        body = (b'{"k": "' + body.replace(b'"', b"'").replace(b"\n", b" ") + b'"}\n')[:size]
    elif ext == ".html":
        body = (b"<!DOCTYPE html>\n<html><body>\n" + body)[:size]
    return body


def _dir_names(rng: random.Random, count: int) -> list[str]:
    """count directory paths, nested up to four deep, like a project's src tree."""
    names = ["src", "lib", "tests", "docs", "tools", "core", "util", "net", "io", "ui"]
    dirs: list[str] = []
    while len(dirs) < count:
        parents = [d for d in dirs if d.count("/") < 3]
        parent = rng.choice(parents) + "/" if parents and rng.random() < 0.7 else ""
        name = f"{rng.choice(names)}{len(dirs)}"
        dirs.append(parent + name)
    return dirs


def generate(root: Path, spec: Spec) -> Dataset:
    """Write the data set under root (removed first); deterministic for spec.seed."""
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    ds = Dataset(root=root, spec=spec)
    rng = random.Random(spec.seed)
    pool = _text_pool(rng)
    dirs = _dir_names(rng, spec.dirs)
    ds.tree.mkdir(parents=True)
    for d in dirs:
        (ds.tree / d).mkdir(parents=True, exist_ok=True)
    mu = math.log(spec.median_size)
    for i in range(spec.files):
        ext = rng.choices(EXTENSIONS, EXT_WEIGHTS)[0]
        rel = f"{rng.choice(dirs)}/f{i:05d}{ext}"
        size = min(spec.max_size, int(rng.lognormvariate(mu, spec.sigma)))
        path = ds.tree / rel
        path.write_bytes(_content(rng, ext, size, pool))
        os.chmod(path, 0o755 if ext == ".sh" else 0o644)
        mtime = BASE_MTIME + rng.randrange(0, 86400 * 365)
        os.utime(path, (mtime, mtime))
        ds.files.append(rel)
        ds.total_bytes += size
    ds.files.sort()
    # directories last, deepest first, so creating files did not move their mtimes
    for d in sorted(dirs, key=lambda p: -p.count("/")) + [""]:
        mtime = BASE_MTIME + rng.randrange(0, 86400 * 365)
        os.utime(ds.tree / d, (mtime, mtime))
    with open(ds.big, "wb") as f:
        left = spec.big_size
        while left:
            n = min(left, 4 << 20)
            f.write(rng.randbytes(n))
            left -= n
    os.utime(ds.big, (BASE_MTIME, BASE_MTIME))
    return ds


def change_some(ds: Dataset, dest: Path, fraction: float = 0.01) -> list[str]:
    """Copy ds.tree to dest with ``fraction`` of the files rewritten (new content,
    new size, new mtime); the original tree is left alone. Returns the changed names."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(ds.tree, dest, copy_function=shutil.copy2)
    rng = random.Random(f"{ds.spec.seed}-change")
    changed = sorted(rng.sample(ds.files, max(1, round(len(ds.files) * fraction))))
    for rel in changed:
        p = dest / rel
        st = p.stat()
        p.write_bytes(p.read_bytes()[: st.st_size // 2] + rng.randbytes(100) + b"\n")
        os.utime(p, (st.st_mtime + 3600, st.st_mtime + 3600))
    return changed
