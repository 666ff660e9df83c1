"""The second testbed's corpus sources: pinned PyPI packages and Debian documentation packages.

Pythia's regime needs over 100M tokens of real text and code that anyone can fetch again by exact
version. Every source is one registry artefact named by registry, name and version (`Source`):
a PyPI sdist or wheel (`pip download NAME==VER`) or a Debian package (`apt-get download
NAME=VER`). Its text files are read straight from the archive (tar, zip, or a .deb's data.tar),
each recorded with its SHA-256.

The GPU machine reaches no network and takes at most 64 MiB a call, so the text travels as a
*pack*: xz-compressed tar shards (each under `SHARD_LIMIT`) plus `files.json.xz`, the manifest of
every file (path, bytes, SHA-256). `unpack` reads the shards back and checks every file against
that manifest, and the manifest's digest against `pile_sources.json`, the small per-source record
shipped in the package (artefact hash, file count, bytes, digest of the file list).

    python -m mechmem.testbed.sources fetch --downloads DIR    # here, with the registries
    python -m mechmem.testbed.sources pack --downloads DIR --out PACK
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from mechmem.atomic import atomic_json, atomic_write, sha256_file

logger = logging.getLogger(__name__)

SOURCES_FILE = Path(__file__).resolve().parent / "pile_sources.json"
SHARD_LIMIT = 60 * 2**20            # compressed bytes per shard: one shard always travels in one call
MAX_FILE_BYTES = 1_000_000          # larger files are data dumps, not prose or code
MAX_LINE_CHARS = 4000               # minified code, base64 blobs, generated tables
# Debian documentation: markup-heavy formats whose text is also there as .txt/.rst/.pod.
DEB_SKIP_SUFFIXES = (".html", ".htm", ".js", ".css", ".svg", ".xml", ".inv")


@dataclass(frozen=True)
class Source:
    """One registry artefact: `kind` is "sdist" or "wheel" (PyPI) or "deb" (Debian)."""
    kind: str
    name: str
    version: str

    @property
    def label(self) -> str:
        return f"{self.kind}/{self.name}-{self.version}"


# The pile-regime corpus, fixed. Projects come as sdists (code, tests and docs) where pip can read
# the sdist's metadata with the common build backends; the others as wheels (manylinux, CPython
# 3.12, for the compiled ones: numpy to statsmodels; pure-Python for dask, distributed, bokeh).
PILE_SOURCES: tuple[Source, ...] = tuple(Source(k, n, v) for k, n, v in [
    ("sdist", "Django", "5.1.4"),
    ("sdist", "sympy", "1.13.3"),
    ("sdist", "Sphinx", "8.1.3"),
    ("sdist", "docutils", "0.21.2"),
    ("sdist", "networkx", "3.4.2"),
    ("sdist", "pygments", "2.18.0"),
    ("sdist", "setuptools", "75.6.0"),
    ("sdist", "pip", "24.3.1"),
    ("sdist", "twisted", "24.10.0"),
    ("sdist", "tornado", "6.4.2"),
    ("sdist", "flask", "3.1.0"),
    ("sdist", "werkzeug", "3.1.3"),
    ("sdist", "jinja2", "3.1.4"),
    ("sdist", "requests", "2.32.3"),
    ("sdist", "mypy", "1.13.0"),
    ("sdist", "pylint", "3.3.1"),
    ("sdist", "astroid", "3.3.5"),
    ("sdist", "ipython", "8.29.0"),
    ("wheel", "dask", "2024.11.2"),
    ("wheel", "distributed", "2024.11.2"),
    ("sdist", "hypothesis", "6.112.0"),
    ("sdist", "black", "24.10.0"),
    ("sdist", "rich", "13.9.4"),
    ("sdist", "click", "8.1.7"),
    ("sdist", "pytest", "8.3.3"),
    ("sdist", "attrs", "24.2.0"),
    ("sdist", "babel", "2.16.0"),
    ("sdist", "boto3", "1.35.70"),
    ("sdist", "scrapy", "2.12.0"),
    ("sdist", "nltk", "3.9.1"),
    ("wheel", "bokeh", "3.6.1"),
    ("sdist", "xarray", "2024.11.0"),
    ("sdist", "sqlparse", "0.5.2"),
    ("sdist", "pyparsing", "3.2.0"),
    ("wheel", "numpy", "2.1.3"),
    ("wheel", "scipy", "1.14.1"),
    ("wheel", "pandas", "2.2.3"),
    ("wheel", "matplotlib", "3.9.2"),
    ("wheel", "scikit-learn", "1.5.2"),
    ("wheel", "statsmodels", "0.14.4"),
    ("deb", "python3.11-doc", "3.11.2-6+deb12u9"),
    ("deb", "perl-doc", "5.36.0-7+deb12u4"),
    ("deb", "git-doc", "1:2.39.5-0+deb12u3"),
    ("deb", "bash-doc", "5.2.15-2"),
])


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- fetching
def _artefact(src: Source, folder: Path) -> Path | None:
    """The downloaded file of `src` in `folder`, if there (pip normalises names, apt quotes ':')."""
    stem = src.name.lower().replace("-", "_")
    version = src.version.split(":")[-1]
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        low = p.name.lower().replace("-", "_")
        if src.kind == "deb" and p.suffix == ".deb" and p.name.startswith(f"{src.name}_"):
            if version in p.name.replace("%3a", ":"):
                return p
        elif src.kind == "sdist" and low.startswith(f"{stem}_{version}".lower()) and p.name.endswith((".tar.gz", ".zip")):
            return p
        elif src.kind == "wheel" and low.startswith(f"{stem}_{version}".lower()) and p.suffix == ".whl":
            return p
    return None


def fetch(src: Source, folder: Path) -> Path:
    """Download `src` into `folder` with the registry's own client (pip or apt-get); cached."""
    folder.mkdir(parents=True, exist_ok=True)
    found = _artefact(src, folder)
    if found is not None:
        return found
    env = dict(os.environ, PIP_CONSTRAINT="")  # pins here, not the machine's constraints
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder)]
    if src.kind == "sdist":
        cmd = pip + ["--no-binary", ":all:", "--no-build-isolation", f"{src.name}=={src.version}"]
    elif src.kind == "wheel":
        cmd = pip + ["--only-binary", ":all:", "--python-version", "3.12", "--implementation", "cp",
                     "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
                     f"{src.name}=={src.version}"]
    elif src.kind == "deb":
        cmd = ["apt-get", "download", f"{src.name}={src.version}"]
    else:
        raise ValueError(f"unknown source kind {src.kind!r}")
    # pip reads an sdist's metadata with the build backend already installed (hatchling,
    # flit_core, setuptools_scm): a fresh isolated build environment per package takes a minute.
    subprocess.run(cmd, cwd=folder, env=env, check=True, stdout=subprocess.DEVNULL)
    found = _artefact(src, folder)
    if found is None:
        raise FileNotFoundError(f"{' '.join(cmd)} left no file for {src.label} in {folder}")
    return found


# --------------------------------------------------------------------------- reading archives
def _ar_members(data: bytes) -> Iterator[tuple[str, bytes]]:
    """Members of a Unix ar archive (a .deb's outer format), which the standard library lacks."""
    if not data.startswith(b"!<arch>\n"):
        raise ValueError("not an ar archive")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
        yield name, data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)


def _tar_files(fileobj) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(fileobj=fileobj, mode="r:*") as tar:
        for m in tar:
            if m.isfile():
                f = tar.extractfile(m)
                if f is not None:
                    yield m.name, f.read()


def archive_files(path: Path) -> Iterator[tuple[str, bytes]]:
    """(member path, bytes) of every regular file in an sdist, wheel or .deb; gzipped Debian
    documents are decompressed (`changelog.gz` -> `changelog`)."""
    path = Path(path)
    if path.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not info.is_dir():
                    yield info.filename, z.read(info)
    elif path.suffix == ".deb":
        for name, blob in _ar_members(path.read_bytes()):
            if name.startswith("data.tar"):
                for member, data in _tar_files(io.BytesIO(blob)):
                    if member.endswith(".gz"):
                        try:
                            member, data = member[:-3], gzip.decompress(data)
                        except OSError:
                            continue
                    yield member.removeprefix("./"), data
    else:
        yield from _tar_files(path.open("rb"))


def text_of(member: str, data: bytes, kind: str) -> str | None:
    """The file as text if it is prose or code: UTF-8, no NUL, not huge, no minified lines."""
    if len(data) > MAX_FILE_BYTES or len(data) == 0 or b"\x00" in data:
        return None
    if kind == "deb" and member.lower().endswith(DEB_SKIP_SUFFIXES):
        return None
    if "/.git/" in f"/{member}" or member.endswith((".pyc", ".mo")):
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text.strip() or max(map(len, text.splitlines()), default=0) > MAX_LINE_CHARS:
        return None
    return text


def source_files(src: Source, artefact: Path) -> list[tuple[str, str]]:
    """(corpus path, text) of `src`'s text files, sorted; the corpus path is `kind/name-version/member`."""
    out = {}
    for member, data in archive_files(artefact):
        text = text_of(member, data, src.kind)
        if text is not None:
            out[f"{src.label}/{member}"] = text
    return sorted(out.items())


def files_digest(entries: list[dict]) -> str:
    """One hash of a file list: path and SHA-256 of every file, in path order."""
    return hashlib.sha256("".join(f"{e['path']}\0{e['sha256']}\n" for e in entries).encode()).hexdigest()


# --------------------------------------------------------------------------- packing
def _write_shard(path: Path, files: list[tuple[str, bytes]], preset: int) -> dict:
    def write(tmp: Path):
        with lzma.open(tmp, "wb", preset=preset) as xz, tarfile.open(fileobj=xz, mode="w") as tar:
            for name, data in files:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    atomic_write(path, write)
    size = path.stat().st_size
    if size > SHARD_LIMIT:
        raise ValueError(f"{path.name} is {size / 2**20:.1f} MiB compressed, over {SHARD_LIMIT / 2**20:.0f} MiB: "
                         f"pass a smaller shard_raw")
    logger.info(f"pack: {path.name} {size / 2**20:.1f} MiB ({sum(len(d) for _, d in files) / 2**20:.0f} MiB of text)")
    return {"file": path.name, "bytes": size, "sha256": sha256_file(path), "files": len(files)}


def write_pack(groups: Iterator[tuple[dict, list[tuple[str, str]]]], out: Path, *, shard_raw: int = 128 * 2**20,
               preset: int = 9, jobs: int = 1) -> dict:
    """Write (record, files) groups as xz tar shards, `files.json.xz` and `pack.json` in `out`.

    Each group is one source: its record (what names it) and its (path, text) files. Shards are
    compressed `jobs` at a time (lzma lets go of the GIL). Returns pack.json's content. Raises if a
    shard comes out over SHARD_LIMIT: lower `shard_raw` then.
    """
    from concurrent.futures import ThreadPoolExecutor

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*.tar.xz"):
        old.unlink()
    entries: list[dict] = []
    records: list[dict] = []
    pending: list[list[tuple[str, bytes]]] = [[]]
    shard_bytes = 0
    for record, files in groups:
        mine = []
        for name, text in files:
            data = text.encode("utf-8")
            mine.append({"path": name, "bytes": len(data), "sha256": _sha(data)})
            if shard_bytes + len(data) > shard_raw and pending[-1]:
                pending.append([])
                shard_bytes = 0
            pending[-1].append((name, data))
            shard_bytes += len(data)
        entries += mine
        records.append({**record, "files": len(mine), "bytes": sum(e["bytes"] for e in mine),
                        "files_sha256": files_digest(mine)})
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        shards = list(pool.map(lambda k: _write_shard(out / f"shard-{k:03d}.tar.xz", pending[k], preset),
                               [k for k in range(len(pending)) if pending[k]]))
    entries.sort(key=lambda e: e["path"])
    meta = {"sources": records, "shards": shards, "files_sha256": files_digest(entries),
            "files": len(entries), "bytes": sum(e["bytes"] for e in entries)}
    atomic_write(out / "files.json.xz", lambda p: p.write_bytes(lzma.compress(json.dumps(entries).encode())))
    atomic_json(out / "pack.json", meta)
    return meta


def pack(sources: tuple[Source, ...], downloads: Path, out: Path, **kwargs) -> dict:
    """Pack every source's text files (downloaded in `downloads` by `fetch`)."""
    def groups():
        for src in tqdm(sources, desc="packing sources"):
            artefact = _artefact(src, downloads)
            if artefact is None:
                raise FileNotFoundError(f"{src.label} is not downloaded in {downloads}: run `fetch` first")
            record = {**asdict(src), "artefact": artefact.name, "artefact_sha256": sha256_file(artefact)}
            yield record, source_files(src, artefact)
    return write_pack(groups(), out, **kwargs)


def unpack(pack_dir: Path, expected: dict | None | str = "shipped") -> tuple[list[tuple[str, str]], dict]:
    """(path, text) of every packed file, sorted by path, each checked against the pack's manifest.

    `expected` is a record to match (its `files_sha256`): by default the shipped pile_sources.json,
    so a pack made from other sources or versions is refused; None checks the pack against itself
    only (dry runs). Returns the files and pack.json's content.
    """
    pack_dir = Path(pack_dir)
    if not (pack_dir / "pack.json").is_file():
        raise FileNotFoundError(f"no corpus pack in {pack_dir} (pack.json missing): make one with "
                                f"`python -m mechmem.testbed.sources pack --out {pack_dir}`")
    meta = json.loads((pack_dir / "pack.json").read_text())
    if expected == "shipped":
        expected = json.loads(SOURCES_FILE.read_text())
    if isinstance(expected, dict) and expected.get("files_sha256") != meta["files_sha256"]:
        raise ValueError(f"the pack in {pack_dir} holds other files than {SOURCES_FILE.name} records "
                         f"(files digest {meta['files_sha256'][:12]} != {expected.get('files_sha256', '')[:12]})")
    entries = json.loads(lzma.decompress((pack_dir / "files.json.xz").read_bytes()))
    if files_digest(entries) != meta["files_sha256"]:
        raise ValueError(f"{pack_dir / 'files.json.xz'} does not match pack.json")
    want = {e["path"]: e["sha256"] for e in entries}
    texts: dict[str, str] = {}
    for shard in tqdm(meta["shards"], desc="unpacking"):
        path = pack_dir / shard["file"]
        if sha256_file(path) != shard["sha256"]:
            raise ValueError(f"{path} is corrupt (SHA-256 differs from pack.json)")
        with lzma.open(path) as xz:
            for name, data in _tar_files(xz):
                if want.get(name) != _sha(data):
                    raise ValueError(f"{name} in {path.name} differs from the manifest")
                texts[name] = data.decode("utf-8")
    missing = set(want) - set(texts)
    if missing:
        raise ValueError(f"{len(missing)} files of the manifest are in no shard, e.g. {sorted(missing)[0]}")
    return sorted(texts.items()), meta


PROG = "python -m mechmem.testbed.sources"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from mechmem.cli import Parser

    p = Parser(PROG, __doc__.split("\n")[0])
    p.add_argument("action", choices=["fetch", "pack", "check"])
    p.add_argument("--downloads", type=Path, default=Path("build/pile-downloads"))
    p.add_argument("--out", type=Path, default=Path("build/pile-pack"), help="the pack folder")
    p.add_argument("--shard-mib", type=int, default=128, help="text per shard before compression")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="shards compressed at once")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    if args.action == "fetch":
        failed = []
        for src in tqdm(PILE_SOURCES, desc="fetching"):
            try:
                fetch(src, args.downloads)
            except (subprocess.CalledProcessError, FileNotFoundError) as err:
                failed.append(src.label)
                logger.warning(f"{src.label}: {err}")
        if failed:
            logger.error(f"could not fetch {len(failed)} sources: {', '.join(failed)}")
            return 1
        logger.info(f"{len(PILE_SOURCES)} sources in {args.downloads}")
    elif args.action == "pack":
        meta = pack(PILE_SOURCES, args.downloads, args.out, shard_raw=args.shard_mib * 2**20, jobs=args.jobs)
        atomic_json(SOURCES_FILE, {k: meta[k] for k in ("files_sha256", "files", "bytes", "sources")})
        total = sum(s["bytes"] for s in meta["shards"])
        logger.info(f"{meta['files']:,} files, {meta['bytes'] / 2**20:.0f} MiB of text -> {len(meta['shards'])} "
                    f"shards, {total / 2**20:.1f} MiB in {args.out}; record in {SOURCES_FILE}")
    else:
        files, meta = unpack(args.out)
        logger.info(f"{len(files):,} files match {SOURCES_FILE.name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from mechmem import cli

    return cli.main(PROG, parse_args, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
