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


# --- the book's bound and its eviction rule ---------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from protocol.messages import MAX_OFFER_TTL_MS, ModelCapability  # noqa: E402
from protocol.stream import OfferWant  # noqa: E402

WANTED_SHA, OTHER_SHA = "ab" * 32, "cd" * 32
KEYS = [SigningKey(bytes([i, 1]) + bytes(30)) for i in range(40)]


def signed_offer(key: SigningKey, *, host: str = "127.0.0.1", sha: str = WANTED_SHA, issued: int = NOW,
                 pad_models: int = 0, ttl_ms: int = 60_000) -> bytes:
    models = (ModelCapability("m", sha, 300.0, "measured"),) + tuple(
        ModelCapability("pad", f"{i:064x}", 1.0, "declared") for i in range(1, pad_models + 1))
    return sign_offer(key, make_offer(provider=key.public_key, peer_id=key.peer_id, addrs=(f"/ip4/{host}/tcp/4001",),
                                      models=models, issued_at_ms=issued, expires_at_ms=issued + ttl_ms))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 39), st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
                          st.booleans(), st.integers(0, 3)), min_size=1, max_size=80),
       st.integers(1, 12), st.integers(1, 6), st.sets(st.integers(0, 39), max_size=5))
def test_the_book_stays_within_its_bounds_and_never_evicts_for_a_lower_ranked_offer(arrivals, max_offers, per_host,
                                                                                    good):
    """Whatever arrives, the book holds at most `max_offers` (and `per_host` per host),
    and whenever an entry leaves for a newcomer, the newcomer ranks higher: offers of our
    model, then providers with good receipts, then the ones held longest."""
    standing = {KEYS[i].peer_id: 10 for i in good}
    book = OfferBook(max_offers=max_offers, max_per_host=per_host, max_bytes=1 << 30,
                     wanted=lambda o: o.model(WANTED_SHA) is not None, standing=lambda pid: standing.get(pid, 0))
    for step, (i, host, wanted, pad) in enumerate(arrivals):
        now = NOW + step * 10
        before = {e.offer.peer_id: e for e in book.current(now_ms=now)}
        signed = signed_offer(KEYS[i], host=host, sha=WANTED_SHA if wanted else OTHER_SHA, issued=now,
                              pad_models=pad)
        offer = book.add(signed, now_ms=now)
        after = {e.offer.peer_id: e for e in book.current(now_ms=now)}
        assert len(after) <= max_offers
        hosts = [e.offer.addrs[0].split("/")[2] for e in after.values()]
        assert all(hosts.count(h) <= per_host for h in hosts)
        assert book.bytes == sum(len(e.signed) for e in after.values())
        for gone in set(before) - set(after) - {KEYS[i].peer_id}:
            assert offer is not None, "an entry left for a newcomer that was refused"
            assert book._rank(before[gone]) < book._rank(after[KEYS[i].peer_id])


def test_a_full_book_keeps_long_held_and_good_providers_against_a_flood_of_fresh_keys():
    honest = [signed_offer(KEYS[i]) for i in range(4)]
    book = OfferBook(max_offers=8, max_per_host=100, standing=lambda pid: 5 if pid == KEYS[3].peer_id else 0)
    for signed in honest:
        assert book.add(signed, now_ms=NOW)
    flood = [signed_offer(SigningKey(bytes([200, i]) + bytes(30)), issued=NOW + 1000) for i in range(100)]
    for signed in flood:
        book.add(signed, now_ms=NOW + 1000)
    held = {e.offer.peer_id for e in book.current(now_ms=NOW + 1000)}
    assert {k.peer_id for k in KEYS[:4]} <= held and len(held) == 8
    assert book.refused_full + book.evicted == 96  # the flood only displaced itself
    # Refreshing keeps a provider's place: its time in the book counts from its first offer.
    assert book.add(signed_offer(KEYS[0], issued=NOW + 2000), now_ms=NOW + 2000)
    assert book.entry(KEYS[0].peer_id).first_seen_ms == NOW


def test_the_byte_bound_holds_with_max_size_offers():
    book = OfferBook(max_bytes=200_000, max_per_host=1000)
    for i in range(40):
        book.add(signed_offer(SigningKey(bytes([100, i]) + bytes(30)), pad_models=255), now_ms=NOW)
    assert 0 < book.bytes <= 200_000 and book.count(now_ms=NOW) == book.bytes // len(
        book.current(now_ms=NOW)[0].signed)


def test_an_offer_living_longer_than_the_documented_maximum_is_refused():
    book = OfferBook()
    assert book.add(signed_offer(KEYS[0], ttl_ms=MAX_OFFER_TTL_MS), now_ms=NOW)
    assert book.add(signed_offer(KEYS[1], ttl_ms=MAX_OFFER_TTL_MS + 1), now_ms=NOW) is None
    assert book.add(signed_offer(KEYS[2], ttl_ms=10 * 60_000), now_ms=NOW) is None and book.rejected == 2


def test_pages_cover_what_was_asked_exactly_once_and_stay_under_their_byte_cap():
    book = OfferBook()
    for i in range(40):
        book.add(signed_offer(KEYS[i], sha=WANTED_SHA if i % 3 else OTHER_SHA, pad_models=40), now_ms=NOW)
    want = OfferWant(models=(WANTED_SHA,))
    seen, after, pages = [], "", 0
    while True:
        entries, more = book.page(want, after=after, max_bytes=20_000, max_count=4096, now_ms=NOW)
        pages += 1
        assert sum(len(e.signed) for e in entries) <= 20_000 or len(entries) == 1
        seen += [e.offer.peer_id for e in entries]
        if not more:
            break
        after = entries[-1].offer.peer_id
    expected = sorted(KEYS[i].peer_id for i in range(40) if i % 3)
    assert seen == expected and pages > 1


def test_a_want_can_name_providers_and_travels_unchanged_without_them():
    book = OfferBook()
    for i in range(5):
        book.add(signed_offer(KEYS[i]), now_ms=NOW)
    mine = OfferWant(providers=(KEYS[3].peer_id,))
    entries, more = book.page(mine, after="", max_bytes=1 << 20, max_count=4096, now_ms=NOW)
    assert [e.offer.peer_id for e in entries] == [KEYS[3].peer_id] and not more
    assert OfferWant.from_wire(mine.to_wire(), "want") == mine
    # Without providers the map is the one earlier nodes send and read.
    assert set(OfferWant(models=(WANTED_SHA,)).to_wire()) == {"models", "arches", "max_price_per_s"}
    assert OfferWant.from_wire({"models": [], "arches": [], "max_price_per_s": None}, "want") == OfferWant()
