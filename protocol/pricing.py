"""The price formula, written once (pure; no I/O here).

A job costs its compute time times the provider's price per busy second. The matcher
(vectorised over numpy arrays), the provider (its quote before running, its charge
after) and the buyer (its ceiling check on the receipt) all call these functions, so
the formula cannot drift between them.
"""

from __future__ import annotations

# Prices are floats on the wire: a ceiling is met when within this slack (relative,
# plus the same absolute amount for ceilings near zero).
PRICE_TOLERANCE = 1e-9


def compute_s(items, items_per_s):
    """Seconds a job of `items` takes at `items_per_s` (floats or numpy arrays)."""
    return items / items_per_s


def batch_job_s(items: int, items_per_s: float, peak_items_per_s: float | None = None) -> float:
    """Seconds one job of `items` rows takes on a slot. Without a peak rate, items at
    `items_per_s`. With one, an affine model fitted to the two published figures: each
    run costs a fixed part (launch, weights read once) plus a per-item part, so one item
    takes 1/items_per_s and a large batch approaches peak_items_per_s."""
    if peak_items_per_s is None or peak_items_per_s <= items_per_s:
        return items / items_per_s
    per_item_s = 1.0 / peak_items_per_s
    fixed_s = 1.0 / items_per_s - per_item_s
    return fixed_s + items * per_item_s


def price(compute_s, price_per_s):
    """What `compute_s` busy seconds cost (floats or numpy arrays)."""
    return compute_s * price_per_s


def over_ceiling(price, max_price):
    """Whether `price` breaks the ceiling `max_price` (floats or numpy arrays; NaN is not over)."""
    return price > max_price * (1 + PRICE_TOLERANCE) + PRICE_TOLERANCE


def within_ceiling(price, max_price) -> bool:
    return not over_ceiling(price, max_price)


def charge(compute_ms: float, price_per_s: float, max_price: float) -> float:
    """What a provider charges for a job that ran `compute_ms`: never over the ceiling
    the buyer signed (a slow run is the provider's risk, not the buyer's)."""
    return min(price(compute_ms / 1000, price_per_s), max_price)
