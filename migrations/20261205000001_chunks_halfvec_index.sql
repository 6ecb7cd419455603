-- Search: the HNSW index over half-precision copies of the unit embeddings. Half the size of
-- the full-precision index (112 MB instead of 195 MB at 100k chunks), so it stays in shared
-- buffers where the other one was read back from the page cache on most searches; recall@10
-- within 1.5 points of it at 100k chunks, better at 1M (scripts/bench/search). Searches order by
-- `embedding::halfvec(384) <=> $1::halfvec(384)` and re-rank the candidates by the full
-- distance, so scores stay exact.
CREATE INDEX chunks_embedding_half ON chunks
    USING hnsw ((embedding::halfvec(384)) halfvec_cosine_ops);
DROP INDEX chunks_embedding;
