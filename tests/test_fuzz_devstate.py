"""Mutated device state blobs (bench/devstatefuzz.py, the `devstate` target of
python -m bench.fuzz) through the daemon's decoding and connect-time validation: each
is refused with EINVAL and a message, or accepted with every bound kept and every index
consistent with the copied rings. Hypothesis picks the mutations here; the long run is
in docs/hardening.md."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from profiles import examples

from backendd import devstate
from backendd.devstate import Section
from bench import devstatefuzz

CASES = devstatefuzz.cases()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_valid_blobs_are_accepted(case):
    assert devstatefuzz.check(case, devstate.encode(case.dtype, case.sections)) == "accepted"


@settings(max_examples=examples(400), deadline=None)
@given(st.sampled_from(CASES), st.integers(0, 2**32 - 1))
def test_mutated_blobs_are_refused_or_consistent(case, seed):
    blob = devstatefuzz.mutate(random.Random(seed), case)
    assert devstatefuzz.check(case, blob) in ("refused", "accepted")


@settings(max_examples=examples(300), deadline=None)
@given(st.sampled_from([c for c in CASES if len(c.sections) > 1]), st.data())
def test_one_section_rewritten(case, data):
    """One section's body replaced by hypothesis' bytes, or one u32 of it set to any
    value (checksum right): the field-level cases a random mutation rarely hits."""
    sections = list(case.sections)
    k = data.draw(st.integers(0, len(sections) - 1))
    body = sections[k].body
    if len(body) >= 4 and data.draw(st.booleans()):
        off = data.draw(st.integers(0, len(body) // 4 - 1)) * 4
        body = body[:off] + struct.pack("<I", data.draw(st.integers(0, 2**32 - 1))) \
            + body[off + 4:]
    else:
        body = data.draw(st.binary(max_size=96))
    sections[k] = Section(sections[k].type, body)
    blob = devstate.encode(case.dtype, sections)
    assert devstatefuzz.check(case, blob) in ("refused", "accepted")


def test_the_fuzz_target_runs_clean():
    inputs, counts, bad = devstatefuzz.run(3000, seed=11)
    assert inputs == 3000 and not bad, bad[:3]
    assert counts["accepted"] > 100 and counts["refused"] > 1000
