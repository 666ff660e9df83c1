"""The second testbed's corpus sources: archives read right, packs travel intact or are refused."""

import gzip
import io
import json
import lzma
import tarfile
import zipfile

import pytest

from mechmem.testbed import sources
from mechmem.testbed.sources import (PILE_SOURCES, SOURCES_FILE, Source, _artefact, archive_files, source_files,
                                     text_of, unpack, write_pack)


def _tar_bytes(members: dict[str, bytes], mode="w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        assert len(header) == 60
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return out


def test_archive_files_reads_sdist_wheel_and_deb(tmp_path):
    sdist = tmp_path / "pkg-1.0.tar.gz"
    sdist.write_bytes(_tar_bytes({"pkg-1.0/pkg/a.py": b"x = 1\n", "pkg-1.0/README.rst": b"Read me\n"}))
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/a.py", "x = 1\n")
        z.writestr("pkg/lib.so", b"\x7fELF\x00\x00")
    deb = tmp_path / "pkg-doc_1.0-1_all.deb"
    data = _tar_bytes({"./usr/share/doc/pkg/guide.txt.gz": gzip.compress(b"A guide.\n"),
                       "./usr/share/doc/pkg/index.html": b"<html></html>\n"}, mode="w:xz")
    deb.write_bytes(_ar({"debian-binary": b"2.0\n", "control.tar.xz": b"", "data.tar.xz": data}))

    assert dict(archive_files(sdist)) == {"pkg-1.0/pkg/a.py": b"x = 1\n", "pkg-1.0/README.rst": b"Read me\n"}
    assert dict(archive_files(wheel))["pkg/lib.so"].startswith(b"\x7fELF")
    deb_files = dict(archive_files(deb))
    assert deb_files["usr/share/doc/pkg/guide.txt"] == b"A guide.\n"  # gunzipped, prefix dropped
    # what counts as text: the binary, and HTML in Debian docs, are left out
    wheel_text = source_files(Source("wheel", "pkg", "1.0"), wheel)
    assert wheel_text == [("wheel/pkg-1.0/pkg/a.py", "x = 1\n")]
    assert [p for p, _ in source_files(Source("deb", "pkg-doc", "1.0-1"), deb)] == [
        "deb/pkg-doc-1.0-1/usr/share/doc/pkg/guide.txt"]


def test_text_of_keeps_prose_and_code_only():
    assert text_of("a.py", b"def f():\n    return 1\n", "sdist") == "def f():\n    return 1\n"
    assert text_of("a.bin", b"ab\x00cd", "sdist") is None                  # NUL: binary
    assert text_of("a.txt", "caf\u00e9".encode("latin-1"), "sdist") is None  # not UTF-8
    assert text_of("a.js", b"x" * (sources.MAX_LINE_CHARS + 1), "sdist") is None  # minified
    assert text_of("big.txt", b"a\n" * sources.MAX_FILE_BYTES, "sdist") is None
    assert text_of("doc.html", b"<p>x</p>\n", "deb") is None and text_of("doc.html", b"<p>x</p>\n", "sdist")
    assert text_of("empty.txt", b"  \n", "sdist") is None


def test_artefact_names_follow_pip_and_apt(tmp_path):
    for name in ["Django-5.1.4.tar.gz", "scikit_learn-1.5.2-cp312-cp312-manylinux_2_17_x86_64.whl",
                 "git-doc_1%3a2.39.5-0+deb12u3_all.deb", "sqlparse-0.5.2.tar.gz", "sqlparse-0.5.20.tar.gz"]:
        (tmp_path / name).write_bytes(b"")
    assert _artefact(Source("sdist", "Django", "5.1.4"), tmp_path).name == "Django-5.1.4.tar.gz"
    assert _artefact(Source("wheel", "scikit-learn", "1.5.2"), tmp_path).name.startswith("scikit_learn-1.5.2")
    assert _artefact(Source("deb", "git-doc", "1:2.39.5-0+deb12u3"), tmp_path).name.startswith("git-doc_")
    assert _artefact(Source("sdist", "sqlparse", "0.5.2"), tmp_path).name == "sqlparse-0.5.2.tar.gz"
    assert _artefact(Source("sdist", "flask", "3.1.0"), tmp_path) is None


def _groups():
    a = ({"kind": "sdist", "name": "a", "version": "1"}, [("sdist/a-1/x.py", "x = 1\n" * 50), ("sdist/a-1/y.txt", "why\n")])
    b = ({"kind": "deb", "name": "b", "version": "2"}, [("deb/b-2/doc.txt", "d\u00e9j\u00e0 vu\n" * 80)])
    return iter([a, b])


def test_pack_roundtrip_in_several_shards(tmp_path):
    meta = write_pack(_groups(), tmp_path, shard_raw=400, preset=1)
    assert len(meta["shards"]) >= 2 and meta["files"] == 3
    files, again = unpack(tmp_path, expected=None)
    assert files == sorted([("sdist/a-1/x.py", "x = 1\n" * 50), ("sdist/a-1/y.txt", "why\n"),
                            ("deb/b-2/doc.txt", "d\u00e9j\u00e0 vu\n" * 80)])
    assert again == json.loads((tmp_path / "pack.json").read_text())
    assert [s["name"] for s in meta["sources"]] == ["a", "b"] and meta["sources"][0]["files"] == 2
    # a record of the same files passes, one of other files is refused
    unpack(tmp_path, expected={"files_sha256": meta["files_sha256"]})
    with pytest.raises(ValueError, match="other files"):
        unpack(tmp_path, expected={"files_sha256": "0" * 64})


def test_unpack_refuses_damage(tmp_path):
    write_pack(_groups(), tmp_path / "p", preset=1)
    shard = tmp_path / "p" / "shard-000.tar.xz"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 1
    shard.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="corrupt"):
        unpack(tmp_path / "p", expected=None)
    # a shard whose file differs from the manifest (re-made, so its own hash is right)
    write_pack(_groups(), tmp_path / "q", preset=1)
    entries = json.loads(lzma.decompress((tmp_path / "q" / "files.json.xz").read_bytes()))
    entries[0]["sha256"] = "0" * 64
    (tmp_path / "q" / "files.json.xz").write_bytes(lzma.compress(json.dumps(entries).encode()))
    with pytest.raises(ValueError, match="does not match pack.json"):
        unpack(tmp_path / "q", expected=None)
    with pytest.raises(FileNotFoundError, match="sources pack"):
        unpack(tmp_path / "missing")


def test_shipped_record_lists_the_pinned_sources():
    if not SOURCES_FILE.exists():
        pytest.skip("pile_sources.json not made yet (python -m mechmem.testbed.sources pack)")
    record = json.loads(SOURCES_FILE.read_text())
    assert SOURCES_FILE.stat().st_size < 2e6
    assert [(s["kind"], s["name"], s["version"]) for s in record["sources"]] == [
        (s.kind, s.name, s.version) for s in PILE_SOURCES]
    assert sum(s["files"] for s in record["sources"]) == record["files"]
    assert all(len(s["artefact_sha256"]) == 64 and s["files"] > 0 for s in record["sources"])
