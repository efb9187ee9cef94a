"""Data for the executor: ingest and tokenize (`prepare`), memory-mapped token shards
(`shards`), the embedded default corpus (`corpus`), objectives (`objectives`) and the
deterministic packed loader (`loader`) that yields `Batch`es (`batch`)."""
