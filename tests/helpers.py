"""Small shared checks for the tests."""
from __future__ import annotations

from defectcls.evaluate import at_temperature


def share_threshold(card: dict, share: float | None = None) -> float:
    """The threshold SHARE (default: the card's ``no_miss_share``) of the lowest validation bad score gives, at the
    card's temperature: the share is taken at the temperature the policy was chosen at (``chosen_at_temperature``)."""
    pol = card["threshold_policy"]
    share = pol["no_miss_share"] if share is None else share
    t, t_pol = card["temperature"], pol.get("chosen_at_temperature", card["temperature"])
    return at_temperature(share * at_temperature(pol["set_by"]["prob_bad"], t, t_pol), t_pol, t)
