//! `ingest`: documents → chunks → embeddings → pgvector, searchable by vector, keyword or both.

pub mod chunk;
pub mod embed;
