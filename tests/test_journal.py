"""The query journal keeps every paid answer: a damaged record is an error naming its offset (never a silent cut),
only a torn tail is cut and only by a client that appends, a read-only open writes nothing, and ``kdl journal
repair`` keeps every readable record after backing the original up."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kd_lightning.commands import run_tool_command
from kd_lightning.teachers import LocalTeacher, QueryJournal
from kd_lightning.teachers.blackbox import JournalError, scan_frames
from tests.blackbox_helpers import digits8_teacher  # noqa: F401


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def journal(tmp_path: Path, digits8_teacher: Path) -> tuple[Path, str]:  # noqa: F811
    """A journal of 12 requests of 4 images: the header, 12 intents (reserved first), then 12 answers."""
    path = tmp_path / "queries" / "journal.bin"
    client = LocalTeacher(digits8_teacher, responses="hard", journal=path, max_batch=4)
    client.query(images(48))
    client.close()
    return path, client.fingerprint()


def frames(path: Path) -> list[tuple[bytes, int, int]]:
    """Each record of the journal: (kind, frame start, frame end)."""
    found, bad = scan_frames(path.read_bytes())
    assert bad is None
    return [(kind, start - 13, end) for kind, start, end in found]


def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_flipped_byte_mid_journal_is_an_error_naming_its_offset_and_the_file_stays(
    journal: tuple[Path, str],
    digits8_teacher: Path,  # noqa: F811
) -> None:
    path, fingerprint = journal
    records = frames(path)
    assert len(records) == 25
    kind, start, end = records[16]  # an answer in the middle, with 8 valid records after it
    assert kind == b"A"
    flip(path, (start + end) // 2)
    before = path.read_bytes()
    for mode in ("append", "read"):
        with pytest.raises(JournalError, match=rf"corrupt at byte {start}\b.*kdl journal repair"):
            QueryJournal(path, fingerprint, mode=mode)
        assert path.read_bytes() == before  # nothing cut, nothing added
    client = LocalTeacher(digits8_teacher, responses="hard", journal=path, max_batch=4)
    with pytest.raises(JournalError, match=f"corrupt at byte {start}"):
        client.query(images(48))  # a client refuses too, and pays nothing
    client.close()
    assert path.read_bytes() == before


def test_a_torn_tail_is_cut_by_a_client_only_and_a_read_only_open_writes_nothing(journal: tuple[Path, str]) -> None:
    path, fingerprint = journal
    lock = Path(str(path) + ".lock")
    lock.unlink()
    good = path.read_bytes()
    _kind, start, end = frames(path)[-1]
    torn = good + good[start : end - 7]
    path.write_bytes(torn)  # a crash in the middle of appending a copy of the last record
    stat = path.stat()
    j = QueryJournal(path, fingerprint, mode="read")
    assert len(j.answers) == 48 and j.spent == 48 and not j.pending and j.torn_tail == len(torn) - len(good)
    with pytest.raises(JournalError, match="reading only"):
        j.add_intent(b"\0" * 16, [], b"")
    j.close()
    assert path.read_bytes() == torn and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert not lock.exists()  # not even the lock file was created
    j = QueryJournal(path, fingerprint)  # a client appends: it cuts the torn tail
    assert len(j.answers) == 48 and j.torn_tail == 0
    j.close()
    assert path.read_bytes() == good


def test_a_whole_last_record_gone_bad_is_corruption_not_a_torn_tail(journal: tuple[Path, str]) -> None:
    path, fingerprint = journal
    _kind, start, end = frames(path)[-1]
    flip(path, end - 3)  # its length still says it is complete: a changed byte, not an interrupted write
    before = path.read_bytes()
    with pytest.raises(JournalError, match=f"corrupt at byte {start}"):
        QueryJournal(path, fingerprint)
    assert path.read_bytes() == before


def test_kdl_journal_check_and_repair_keep_every_readable_record(
    journal: tuple[Path, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, fingerprint = journal
    intact = QueryJournal(path, fingerprint, mode="read")
    all_answers = dict(intact.answers)
    intact.close()
    assert run_tool_command("journal", ["check", str(path)]) == 0
    assert "25 readable records" in capsys.readouterr().out
    records = frames(path)
    _, a_start, a_end = records[3]  # the intent of the 3rd request: its answer stays, its intent goes
    _, b_start, b_end = records[17]  # the answer of the 5th request: paid, lost
    assert records[3][0] == b"I" and records[17][0] == b"A"
    flip(path, a_start + 2)  # its magic
    flip(path, (b_start + b_end) // 2)
    damaged = path.read_bytes()
    assert run_tool_command("journal", ["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"bytes {a_start}-{a_end - 1}" in out and f"bytes {b_start}-{b_end - 1}" in out and "CORRUPT" in out
    assert path.read_bytes() == damaged  # check writes nothing
    assert run_tool_command("journal", ["repair", str(path)]) == 0
    out = capsys.readouterr().out
    backups = list(path.parent.glob("journal.bin.corrupt-*"))
    assert len(backups) == 1 and backups[0].read_bytes() == damaged and str(backups[0]) in out
    j = QueryJournal(path, fingerprint)
    lost = {h for h in all_answers if h not in j.answers}
    assert len(lost) == 4 and len(j.answers) == 44  # every answer but the damaged record's
    assert all((j.answers[h] == a).all() for h, a in j.answers.items() for a in [all_answers[h]])
    assert len(j.pending) == 1  # the 5th request's intent: resent (a free replay) on the next query
    assert j.spent == 48  # the 3rd request's answer still counts its 4 images as paid
    j.close()
    assert run_tool_command("journal", ["check", str(path)]) == 0
    assert "23 readable records" in capsys.readouterr().out
    assert run_tool_command("journal", ["repair", str(path)]) == 0
    assert "nothing to repair" in capsys.readouterr().out


def test_kdl_journal_on_what_is_not_a_journal_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    assert run_tool_command("journal", ["check", str(other)]) == 2
    assert "is not a query journal" in capsys.readouterr().err
    assert run_tool_command("journal", ["check", str(tmp_path / "missing.bin")]) == 2
    assert "cannot read query journal" in capsys.readouterr().err
    assert run_tool_command("journal", ["repair", str(other)]) == 2
    assert not list(tmp_path.glob("notes.txt.corrupt-*"))
    assert os.listdir(tmp_path) == ["notes.txt"]  # no backup, no lock file
