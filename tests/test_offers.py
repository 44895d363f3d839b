"""The offer book refuses an offer a buyer could not act on, before it enters a book."""

from __future__ import annotations

import pytest

from node.offers import OfferBook
from protocol.messages import sign_offer
from protocol.signing import SigningKey
from tests.test_protocol import NOW, PROVIDER, make_offer

STRANGER_KEY = SigningKey(bytes(range(7, 39)))


@pytest.mark.parametrize("addr, accepted", [
    ("/ip4/127.0.0.1/tcp/4001", True),
    (f"/ip4/127.0.0.1/tcp/4001/p2p/{PROVIDER.peer_id}", True),
    ("/ip4/not-an-address/tcp/4001", False),          # does not parse: it would crash a dial
    ("garbage", False),
    (f"/ip4/127.0.0.1/tcp/4001/p2p/{STRANGER_KEY.peer_id}", False),  # points buyers at another peer
])
def test_an_offer_whose_address_a_buyer_cannot_dial_never_enters_the_book(addr, accepted):
    book = OfferBook()
    stored = book.add(sign_offer(PROVIDER, make_offer(addrs=(addr,))), now_ms=NOW)
    assert (stored is not None) == accepted
    assert book.rejected == (0 if accepted else 1)
    assert book.count(now_ms=NOW) == (1 if accepted else 0)
