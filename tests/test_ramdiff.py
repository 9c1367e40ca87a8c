"""kvmshell.lab.ramdiff: two RAM dumps compared page by page, working-set pages named by generation."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from kvmshell.lab.ramdiff import CHUNK, PAGE, WS_MAGIC, diff_dumps


def ws_page(index: int, gen: int) -> bytes:
    """A page as workload.c writes it: MAGIC, index | gen << 32, seed, then a body."""
    return struct.pack("<QQQ", WS_MAGIC, index | gen << 32, 1) + bytes([gen % 256]) * (PAGE - 24)


def dumps(tmp_path: Path, src: bytes, dst: bytes) -> tuple[Path, Path]:
    a, b = tmp_path / "src.bin", tmp_path / "dst.bin"
    a.write_bytes(src)
    b.write_bytes(dst)
    return a, b


def test_equal_dumps(tmp_path: Path) -> None:
    ram = b"".join(ws_page(i, 3) for i in range(300))          # more than one chunk
    assert len(ram) > CHUNK
    diff = diff_dumps(*dumps(tmp_path, ram, ram))
    assert diff.equal and diff.pages == 300 and diff.summary() == "equal: 300 pages"


def test_stale_working_set_page_and_other_page(tmp_path: Path) -> None:
    """The destination holds page 260 one generation behind, and a kernel page with one byte off."""
    pages = [ws_page(i, 5) for i in range(300)] + [b"\x11" * PAGE] * 4
    src = b"".join(pages)
    pages[260] = ws_page(260, 4)
    pages[302] = b"\x11" * (PAGE - 1) + b"\x12"
    diff = diff_dumps(*dumps(tmp_path, src, b"".join(pages)))
    assert not diff.equal
    assert (diff.differing, diff.ws_pages, diff.stale) == (2, 1, 1)
    assert diff.named == [f"0x{260 * PAGE:x} ws page 260: source gen 5, destination gen 4",
                          f"0x{302 * PAGE:x} other"]
    assert "2 of 304 pages differ (1 of the working set, 1 of them stale" in diff.summary()


def test_labelled_pages_are_counted_by_label(tmp_path: Path) -> None:
    """A page the caller knows (the generation table) is named by its label, an unknown one as other."""
    src = b"\x00" * PAGE * 4
    dst = b"\x00" * PAGE + b"\x01" * PAGE + b"\x00" * PAGE + b"\x02" * PAGE
    diff = diff_dumps(*dumps(tmp_path, src, dst), labels={PAGE: "generation table", 2 * PAGE: "generation table"})
    assert diff.differing == 2 and diff.labelled == {"generation table": 1}
    assert diff.named == [f"0x{PAGE:x} generation table", f"0x{3 * PAGE:x} other"]
    assert "(0 of the working set, 0 of them stale on the destination, 1 generation table; 1 other)" in diff.summary()


def test_page_ahead_on_the_destination_is_not_stale(tmp_path: Path) -> None:
    src = b"".join(ws_page(i, 5) for i in range(4))
    dst = ws_page(0, 5) + ws_page(1, 6) + ws_page(2, 5) + ws_page(3, 5)
    diff = diff_dumps(*dumps(tmp_path, src, dst))
    assert (diff.differing, diff.ws_pages, diff.stale) == (1, 1, 0)


def test_dumps_of_different_sizes_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not the same whole pages"):
        diff_dumps(*dumps(tmp_path, ws_page(0, 1) * 2, ws_page(0, 1)))
