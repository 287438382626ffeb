"""serving.randomhex: the random strings every answer carries (correlation ids, answer-id nonces)."""

from __future__ import annotations

import os
import re

import pytest

from serving.randomhex import RandomHex


def test_strings_are_hex_of_the_asked_length_and_never_repeat_across_draws():
    pool = RandomHex(16, per_draw=8)  # many refills from the OS in 4,000 strings
    got = [pool.take() for _ in range(4000)]
    assert all(re.fullmatch(r"[0-9a-f]{16}", s) for s in got)
    assert len(set(got)) == len(got)
    other = RandomHex(16, per_draw=8)
    assert not set(got) & {other.take() for _ in range(4000)}  # another pool (another server) differs


@pytest.mark.parametrize("chars", [0, -2, 7])
def test_an_odd_or_empty_length_is_refused(chars):
    with pytest.raises(ValueError, match="even number of hex digits"):
        RandomHex(chars)


def test_an_empty_draw_is_refused_at_construction_not_at_the_first_take():
    with pytest.raises(ValueError, match="at least one string per draw"):
        RandomHex(16, per_draw=0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
def test_a_forked_child_never_hands_out_its_parents_next_strings():
    # Strings are drawn in bulk: a child forked with a filled pool would otherwise pop the very
    # nonces and request ids its parent is about to issue.
    pool = RandomHex(16, per_draw=64)
    pool.take()  # the pool now holds 63 more
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ten strings, then out without running pytest's exit code
        try:
            os.write(write_end, "".join(pool.take() for _ in range(10)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        text = pipe.read().decode()
    os.waitpid(pid, 0)
    child = {text[i : i + 16] for i in range(0, len(text), 16)}
    parent = {pool.take() for _ in range(10)}
    assert len(child) == 10 and not child & parent
