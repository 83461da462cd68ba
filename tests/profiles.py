"""Hypothesis settings profiles, chosen by HYPOTHESIS_PROFILE (registered and loaded in
conftest.py):

- "ci": derandomized (the same examples on every run, so a red build is reproducible and
  a green one is not luck), no example database. `make test` uses it, and so does any run
  with CI=true.
- "dev": random examples, the database on; a plain `pytest` outside CI.
- "fuzz": random examples, ten times as many per test; `make fuzz`.

Tests size their example counts with `examples(n)` so that the fuzz profile scales them
(an explicit max_examples in @settings would override any profile).
"""

from __future__ import annotations

import os

from hypothesis import settings

SCALE = {"ci": 1, "dev": 1, "fuzz": 10}


def chosen() -> str:
    name = os.environ.get("HYPOTHESIS_PROFILE", "")
    if not name:
        name = "ci" if os.environ.get("CI", "").lower() == "true" else "dev"
    if name not in SCALE:
        raise ValueError(f"HYPOTHESIS_PROFILE={name!r}: one of {', '.join(SCALE)}")
    return name


def register() -> None:
    settings.register_profile("ci", derandomize=True, database=None, deadline=None,
                              print_blob=True)
    settings.register_profile("dev", deadline=None)
    settings.register_profile("fuzz", deadline=None, print_blob=True)
    settings.load_profile(chosen())


def examples(n: int) -> int:
    """`n` examples under ci and dev, more under fuzz."""
    return n * SCALE[chosen()]
