"""Log epochs: where a stream resumes for a reader of a log that went back."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from cmdlog import epochs


@dataclass
class History:
    """A node's log as the boots that appended each entry, and its epochs."""

    log: list[str] = field(default_factory=list)
    epochs: list[epochs.Epoch] = field(default_factory=list)

    def open(self, boot: str) -> None:
        self.epochs = epochs.begin(self.epochs, len(self.log) + 1, boot)

    def append(self, count: int) -> None:
        self.log += [self.epochs[-1][1]] * count

    def copy(self) -> History:
        return History(list(self.log), list(self.epochs))


def test_begin_drops_empty_epoch() -> None:
    history = History()
    history.open("a1")
    history.append(3)
    history.open("b2")
    history.open("c3")
    assert history.epochs == [(1, "a1"), (4, "c3")]


def test_boot_at_finds_appending_boot() -> None:
    log_epochs = [(1, "a1"), (4, "b2")]
    assert epochs.boot_at(log_epochs, 0) is None
    assert epochs.boot_at(log_epochs, 3) == "a1"
    assert epochs.boot_at(log_epochs, 4) == "b2"
    assert epochs.boot_at(log_epochs, 99) == "b2"


def test_resume_after_cold_backup() -> None:
    """The reader read a boot that the restored log never had: from 0."""
    log_epochs = [(1, "a1"), (21, "c3")]  # a1 wrote 1-20, b2 (lost) wrote 21-30
    assert epochs.resume_point(log_epochs, head=35, after=30, boot="b2") == 0
    assert epochs.resume_point(log_epochs, head=35, after=20, boot="a1") == 20


def test_resume_after_hot_backup() -> None:
    """The backup ended inside the reader's epoch: resume at its end here."""
    log_epochs = [(1, "a1"), (11, "b2"), (16, "c3")]  # the backup ended at 15
    assert epochs.resume_point(log_epochs, head=40, after=30, boot="b2") == 15
    assert epochs.resume_point(log_epochs, head=12, after=30, boot="b2") == 15


def test_resume_without_an_epoch() -> None:
    """A reader with no recorded epoch is checked against the head only."""
    log_epochs = [(1, "a1")]
    assert epochs.resume_point(log_epochs, head=10, after=7, boot=None) == 7
    assert epochs.resume_point(log_epochs, head=10, after=12, boot=None) == 0
    assert epochs.resume_point(log_epochs, head=10, after=0, boot="a1") == 0


@st.composite
def restores(draw: st.DrawFn) -> tuple[History, History, int]:
    """A history with several boots, a backup taken at any point of it and
    restored, new boots on the restored copy, and a reader's cursor."""
    names = iter(f"{n:x}" for n in range(1, 1000))
    original = History()
    snapshots = [original.copy()]
    for _ in range(draw(st.integers(1, 5))):
        original.open(next(names))
        snapshots.append(original.copy())
        for _ in range(draw(st.integers(0, 3))):
            original.append(draw(st.integers(1, 4)))
            snapshots.append(original.copy())
    restored = draw(st.sampled_from(snapshots)).copy()
    for _ in range(draw(st.integers(1, 3))):
        restored.open(next(names))
        restored.append(draw(st.integers(0, 6)))
    cursor = draw(st.integers(0, len(original.log)))
    return original, restored, cursor


@settings(max_examples=400)
@given(case=restores())
def test_resume_point_in_shared_prefix(
    case: tuple[History, History, int],
) -> None:
    """A reader that read `cursor` entries of the original log resumes on
    the restored one at a point both logs share, and at its cursor when the
    restored log still has everything it read."""
    original, restored, cursor = case
    boot = epochs.boot_at(original.epochs, cursor)
    head = len(restored.log)
    start = epochs.resume_point(restored.epochs, head, cursor, boot)
    shared = 0
    while (
        shared < min(len(original.log), head)
        and original.log[shared] == restored.log[shared]
    ):
        shared += 1

    assert 0 <= start <= cursor
    assert start <= shared
    if cursor <= shared:
        assert start == cursor
