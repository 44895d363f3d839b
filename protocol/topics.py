"""Names on the libp2p network (pure). Anything a third-party node needs to talk to us."""

OFFERS_TOPIC = "idlemesh/offers/1"
OFFER_SYNC_PROTOCOL = "/idlemesh/offer-sync/1.0.0"
JOB_PROTOCOL = "/idlemesh/job/1.0.0"
REPUTATION_TOPIC = "idlemesh/reputation/1"
