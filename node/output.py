"""What the CLI and the devnet demo print about jobs: one place, so both say the same."""

from __future__ import annotations

import json
import os
from pathlib import Path

# Tables print peer ids by this many leading characters ("12D3KooW" + 8 that differ):
# enough to tell peers apart, and what `settle` and `receipts --peer` accept back.
PEER_PREFIX = 16


def write_json_atomic(path: Path, value: dict) -> None:
    """A status file a reader never sees half-written."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def print_outcomes(outcomes, summary, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"jobs": [o.to_json() for o in outcomes], **summary}, indent=2))
        return
    print(f"{'job':10} {'provider':16} {'state':9} {'latency_ms':>10} {'compute_ms':>10} "
          f"{'energy_j':>9} {'source':9} {'price_units':>11}")
    for o in outcomes:
        print(f"{o.job_id[:8]:10} {o.provider[:PEER_PREFIX]:16} {o.state:9} {o.latency_ms:10.1f} {o.compute_ms:10.2f} "
              f"{o.energy_j:9.4f} {o.energy_source:9} {o.price:11.2e}")
        if o.error:
            print(f"    error: {o.error}")
    settled = [o for o in outcomes if o.state == "settled"]
    providers = {o.provider for o in settled}
    sources = ", ".join(sorted({o.energy_source for o in settled if o.energy_source})) or "none"
    print(f"\n{len(settled)}/{len(outcomes)} jobs settled with verified receipts from {len(providers)} providers"
          f"; energy {sum(o.energy_j for o in settled):.3f} J (how obtained: {sources}); "
          f"paid {sum(o.price for o in settled):.9g} price units")
    if summary.get("resumed"):
        print(f"resumed batch {summary['batch']}: {summary['already_settled']} jobs were already paid for")
