"""Names on the libp2p network (pure). Anything a third-party node needs to talk to us."""

OFFERS_TOPIC = "idlemesh/offers/1"
OFFER_SYNC_PROTOCOL = "/idlemesh/offer-sync/1.0.0"
JOB_PROTOCOL = "/idlemesh/job/1.0.0"
REPUTATION_TOPIC = "idlemesh/reputation/1"
# Settlement after the fact: a buyer delivers acks the provider never received, and both
# sides compare what they hold for each other (node/settle.py).
SETTLE_PROTOCOL = "/idlemesh/settle/1.0.0"
