"""The semantic-ID ranker (QARM): `qarm samples` (Spark) and `qarm rank train | eval | ablate` (Ray Train)."""
