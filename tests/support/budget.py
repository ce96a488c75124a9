"""Hypothesis budgets: what every run spends on the property tests, and how to spend more.

Profiles, chosen with ``WGMESH_HYPOTHESIS`` (default ``ci``):

* ``ci``: each property test's own budget (``max_examples=examples(N)``: N examples;
  a test that names none gets 100); what CI and ``scripts/test.sh`` run.
* ``long``: every budget x 20, for a run before a release or after touching a codec.
* ``soak``: every budget x 200, an overnight run.

No profile has a deadline: the machine is shared, and a per-example time limit would
fail on the load, not on a bug. ``print_blob`` puts the reproducing blob in a failure's
report, so a long run's find can be replayed with ``@reproduce_failure``.
"""

from __future__ import annotations

import os

from hypothesis import settings

__all__ = ["PROFILE", "SCALE", "examples", "register"]

DEFAULT_EXAMPLES = 100
PROFILES = {"ci": 1, "long": 20, "soak": 200}
PROFILE = os.environ.get("WGMESH_HYPOTHESIS", "ci")
if PROFILE not in PROFILES:
    raise SystemExit(f"WGMESH_HYPOTHESIS={PROFILE!r}: one of {', '.join(PROFILES)}")
SCALE = PROFILES[PROFILE]


def examples(n: int) -> int:
    """A property test's budget of ``n`` examples in CI, scaled by the active profile."""
    return n * SCALE


def register() -> None:
    """Register every profile and load the one ``WGMESH_HYPOTHESIS`` names."""
    for name, scale in PROFILES.items():
        settings.register_profile(name, max_examples=DEFAULT_EXAMPLES * scale, deadline=None,
                                  print_blob=True)
    settings.load_profile(PROFILE)
