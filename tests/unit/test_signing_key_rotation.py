"""Signing-key rotation order: the newest rotation wins, whatever activation delays the rotations asked for.

`hivemesh keys rotate --activate-after 60` followed by `hivemesh keys rotate` (5 s) used to let the first new key
take over again 60 s later (keys were ordered by activation time); the operator's latest rotation must sign.
"""

from __future__ import annotations

from pathlib import Path

from hivemesh.controlplane.issuer import SigningKeys


def test_the_newest_rotation_signs_even_when_an_older_pending_key_activates_later(tmp_path: Path) -> None:
    first = SigningKeys.load_or_create(tmp_path / "state")
    now = [first.active.created_at]
    keys = SigningKeys(first.keys_dir, first.published(), retire_after_s=100.0, clock=lambda: now[0])
    original = keys.active
    slow = keys.rotate(60.0)
    fast = keys.rotate(5.0)
    assert fast.created_at > slow.created_at

    now[0] = fast.activates_at + 1  # the fast key's time has come, the slow one's not yet
    assert keys.active.kid == fast.kid
    now[0] = slow.activates_at + 1  # the older new key activates now: it must not take over
    assert keys.active.kid == fast.kid
    assert keys.state_of(fast) == "active"
    assert keys.state_of(slow) == "retiring" and keys.state_of(original) == "retiring"
    # Both older keys stop signing when the fast key starts; each leaves the JWKS retire_after_s after that.
    assert keys.retires_at(original) == keys.retires_at(slow) == fast.activates_at + 100.0
    assert keys.retires_at(fast) is None
    assert [k.kid for k in keys.published()] == [fast.kid, slow.kid, original.kid]  # newest first

    # A restart reads the same order back from the key files and the schedule.
    again = SigningKeys(first.keys_dir, SigningKeys.load_or_create(tmp_path / "state").published(),
                        clock=lambda: now[0])
    assert again.active.kid == fast.kid
