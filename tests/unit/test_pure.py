"""Fast tests of the pure parts: sizes, IDs, MIME streaming, fragments, planning, names."""

from __future__ import annotations

import base64
import io
import tomllib
from email.message import Message
from pathlib import Path

import pytest

from dicommail.config import parse_config, parse_size, render_template
from dicommail.errors import ConfigError, IncompleteSetError, WireFormatError
from dicommail.wire import headers as h
from dicommail.wire.manifest import Manifest, ManifestEntry
from dicommail.wire.mime import LineReader, base64_size, read_headers, safe_param, walk, write_base64
from dicommail.wire.pack import _Item, estimate_wire_size, plan_parts
from dicommail.wire.partial import format_ranges, fragment_info, join_fragments, split_mail
from dicommail.wire.unpack import safe_file_name


@pytest.mark.parametrize(
    ("text", "size"), [("10M", 10 * 1024**2), ("512K", 512 * 1024), ("1G", 1024**3), ("1.5MiB", 1572864), (4096, 4096)]
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "ten", "-1M", "0", "5T"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_config_template_is_valid_and_typos_are_errors() -> None:
    config = parse_config(tomllib.loads(render_template("a@b.test")), Path("/x"))
    assert config.packing.max_mail_size == 10 * 1024**2
    assert config.packing.compression_level == 1
    with pytest.raises(ConfigError, match="max_mial_size"):
        parse_config({"packing": {"max_mial_size": "1M"}}, Path("/x"))
    with pytest.raises(ConfigError, match="at least"):
        parse_config({"packing": {"max_mail_size": "1K"}}, Path("/x"))
    with pytest.raises(ConfigError, match="uid_root"):
        parse_config({"packing": {"uid_root": "1.2.03"}}, Path("/x"))
    peers = parse_config({"peers": {"Pr@x.test": {"max_mail_size": "5M"}}}, Path("/x"))
    assert peers.max_mail_size_for("pr@x.test") == 5 * 1024**2


def test_set_ids_are_uids() -> None:
    ids = {h.new_set_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(h.is_uid(i) and i.startswith("2.25.") for i in ids)
    rooted = h.new_set_id("1.2.276.0.7230010")
    assert h.is_uid(rooted) and rooted.startswith("1.2.276.0.7230010.") and len(rooted) <= 64


@pytest.mark.parametrize("size", [0, 1, 56, 57, 58, 57 * 1024, 57 * 1024 + 1, 300_000])
def test_base64_lines_and_size(size: int) -> None:
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    out = io.BytesIO()
    assert write_base64(io.BytesIO(data), out) == size
    encoded = out.getvalue()
    assert len(encoded) == base64_size(size)
    assert all(len(line) <= 76 for line in encoded.split(b"\r\n"))
    assert base64.b64decode(encoded) == data


class _Collect:
    def __init__(self) -> None:
        self.parts: list[tuple[str, bytearray]] = []

    def open_leaf(self, headers: Message) -> _Collect.Sink:
        sink = _Collect.Sink()
        self.parts.append((headers.get_content_type(), sink.data))
        return sink

    class Sink:
        def __init__(self) -> None:
            self.data = bytearray()

        def write(self, data: bytes) -> None:
            self.data += data

        def close(self) -> None:
            pass


def _walk(raw: bytes) -> list[tuple[str, bytes]]:
    reader = LineReader(io.BytesIO(raw))
    collect = _Collect()
    walk(reader, read_headers(reader), collect)
    return [(t, bytes(d)) for t, d in collect.parts]


def test_walk_nested_multipart_and_encodings() -> None:
    raw = (
        b"Content-Type: multipart/mixed; boundary=outer\r\n\r\npreamble\r\n--outer\r\n"
        b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"M=C3=BCller soft=\r\nbreak\r\nline two\r\n--outer\r\n"
        b'Content-Type: multipart/alternative; boundary="in ner"\r\n\r\n--in ner\r\n'
        b"Content-Type: application/dicom\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(b"\x00\x01binary\r\n\xff" * 10).replace(b"\n", b"\r\n")
        + b"--in ner--\r\nepilogue\r\n--outer--\r\n"
    )
    parts = _walk(raw)
    assert parts[0] == ("text/plain", "Müller softbreak\r\nline two".encode())
    assert parts[1] == ("application/dicom", b"\x00\x01binary\r\n\xff" * 10)


def test_walk_rejects_truncated_and_bad_base64() -> None:
    with pytest.raises(WireFormatError, match="truncated"):
        _walk(b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nabc\r\n")
    with pytest.raises(WireFormatError, match="base64"):
        _walk(
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            b"!!!!\r\n--b--\r\n"
        )
    with pytest.raises(WireFormatError, match="boundary"):
        _walk(b"Content-Type: multipart/mixed\r\n\r\nx\r\n")


def test_safe_param_and_file_names() -> None:
    assert safe_param('a"b\r\nBcc: x@y') == "a_b__Bcc: x@y"
    assert "\n" not in safe_param("x\ny")
    assert safe_file_name("../../etc/passwd", "f") == "passwd"
    assert safe_file_name("/abs/path/IM1.dcm", "f") == "IM1.dcm"
    assert safe_file_name("C:\\x\\..\\y.dcm", "f") == "y.dcm"
    assert safe_file_name("..", "fallback") == "fallback"
    assert safe_file_name("", "fallback") == "fallback"
    # Escaped bytes from a manifest's JSON, or only dots once cut: never "", "." or a hidden file.
    for name in ("\udcff" * 300, "\udcff" * 300 + "..", "\ud800", "...", ". ."):
        result = safe_file_name(name, "fallback")
        assert result and result.strip(".") and not result.startswith(".") and len(result.encode()) <= 200
    assert safe_file_name("\udcff" * 300 + ".dcm", "f").endswith(".dcm")


def _items(*sizes: int) -> list[_Item]:
    return [_Item(Path(f"/f{i}"), s, "dicom", f"f{i}", f"f{i}", "application/dicom") for i, s in enumerate(sizes)]


def test_plan_parts_respects_limit_and_order() -> None:
    items = _items(*([500_000] * 50))
    parts = plan_parts(items, 5 * 1024**2)
    assert [i for p in parts for i in p] == items
    assert all(estimate_wire_size(p) <= 5 * 1024**2 for p in parts)
    assert len(parts) > 1
    # A file bigger than the limit gets a mail of its own.
    big = plan_parts(_items(100, 50 * 1024**2, 100), 10 * 1024**2)
    assert [len(p) for p in big] == [1, 1, 1]
    assert plan_parts([], 10 * 1024**2) == [[]]


def test_manifest_round_trip_and_validation() -> None:
    entry = ManifestEntry("f1.x@dicommail", "IM1.dcm", "dicom", 3, "a" * 64, sop_instance_uid="1.2.3")
    manifest = Manifest("2.25.1", "1.2.3", 1, 2, 5, 10, [entry])
    assert Manifest.from_json(manifest.to_json()) == manifest
    with pytest.raises(WireFormatError):
        Manifest.from_json(b"{}")
    with pytest.raises(WireFormatError):
        Manifest.from_json(Manifest("2.25.1", "1.2.3", 3, 2, 5, 10, []).to_json())


def test_format_ranges() -> None:
    assert format_ranges([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10"
    assert format_ranges([4]) == "4"


def _mail(tmp_path: Path, body_lines: int) -> Path:
    path = tmp_path / "whole.eml"
    head = (
        b"From: a@b.test\r\nTo: c@d.test\r\nSubject: s\r\nMessage-ID: <m@b.test>\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted";\r\n boundary="b"\r\n'
        b"X-TELEMEDICINE-SETID: 2.25.9\r\n\r\n"
    )
    body = b"".join(b"line %06d " % i + b"x" * 60 + b"\r\n" for i in range(body_lines))
    path.write_bytes(head + body)
    return path


def _info(path: Path) -> Message:
    with path.open("rb") as handle:
        return read_headers(LineReader(handle))


def test_split_and_join_fragments(tmp_path: Path) -> None:
    mail = _mail(tmp_path, 3000)
    pieces = split_mail(mail, 64 * 1024, tmp_path, "set-0001", "frag1", "DICOM-Mail x", "a@b.test")
    assert len(pieces) > 3
    assert all(p.stat().st_size <= 64 * 1024 for p in pieces)
    infos = [(fragment_info(_info(p)), p) for p in pieces]
    assert [i.total if i else -1 for i, _ in infos] == [None] * (len(pieces) - 1) + [len(pieces)]
    joined = tmp_path / "joined.eml"
    shuffled = [(i, p) for i, p in reversed(infos) if i is not None]
    join_fragments([*shuffled, shuffled[0]], joined)  # any order, a duplicate
    original, rebuilt = _info(mail), _info(joined)
    for name in ("From", "Subject", "Message-ID", "Content-Type", "X-TELEMEDICINE-SETID"):
        assert " ".join(str(original[name]).split()) == " ".join(str(rebuilt[name]).split())
    assert joined.read_bytes().endswith(mail.read_bytes()[-5000:])
    assert joined.read_bytes().split(b"\r\n\r\n", 1)[1] == mail.read_bytes().split(b"\r\n\r\n", 1)[1]
    with pytest.raises(IncompleteSetError) as missing:
        join_fragments(shuffled[:-2], tmp_path / "never.eml")
    assert missing.value.missing_parts == [1, 2]
    assert not (tmp_path / "never.eml").exists()


def test_fragment_info_bounds() -> None:
    def headers(params: str) -> Message:
        m = Message()
        m["Content-Type"] = f"message/partial; {params}"
        return m

    with pytest.raises(WireFormatError, match="100000"):
        fragment_info(headers('id="x"; number=1; total=100000'))
    with pytest.raises(WireFormatError):
        fragment_info(headers('id="x"; number=5; total=3'))
    with pytest.raises(WireFormatError):
        fragment_info(headers("number=1; total=3"))
    info = fragment_info(headers('id="x"; number=2; total=3'))
    assert info is not None and (info.number, info.total) == (2, 3)


def test_atomic_writer_never_replaces_a_device() -> None:
    from dicommail.store.files import atomic_writer

    with atomic_writer(Path("/dev/null")) as handle:
        handle.write(b"discarded")
    assert Path("/dev/null").is_char_device()


@pytest.mark.parametrize("name", ["hospital.toml", "practice.toml"])
def test_example_configs_are_valid(name: str) -> None:
    path = Path(__file__).resolve().parents[2] / "examples" / name
    parse_config(tomllib.loads(path.read_text()), Path("/x"), str(path))


@pytest.mark.parametrize("name", ["hospital.toml", "practice.toml"])
def test_example_configs_pass_the_acknowledgements_check(name: str, tmp_path: Path) -> None:
    # A hospital needs [mailbox] for the acknowledgements, a practice [smtp] to send them.
    from dicommail.checks import _check_acknowledgements

    path = Path(__file__).resolve().parents[2] / "examples" / name
    config = parse_config(tomllib.loads(path.read_text()), tmp_path, str(path))
    assert isinstance(_check_acknowledgements(config), str)


def test_fragment_combinations_are_bounded_and_find_a_mail_between_forgeries() -> None:
    # A round with nothing new walked the whole product (2^n); forgeries before and after the
    # genuine fragments hid them from the first 16 tries.
    import itertools

    from dicommail.receiver.pipeline import MAX_FRAGMENT_COMBINATIONS, _fragment_combinations

    ids = itertools.count(1)
    old = [[{"id": next(ids)} for _ in range(2)] for _ in range(40)]
    assert list(_fragment_combinations(old, tried_before=80)) == []  # at once, not after 2^40 looks
    for numbers in (3, 6, 12):
        choices = [[{"id": k, "who": "A"}, {"id": 100 + k, "who": "G"}, {"id": 200 + k, "who": "B"}]
                   for k in range(numbers)]
        tried = [tuple(m["who"] for m in c) for c in _fragment_combinations(choices, 0)]
        assert ("G",) * numbers in tried and len(tried) <= MAX_FRAGMENT_COMBINATIONS
