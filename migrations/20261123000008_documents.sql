-- Datasets may be documents for ingestion (text, Markdown, HTML, JSON, PDF) besides tables.
ALTER TABLE datasets DROP CONSTRAINT datasets_format_check;
ALTER TABLE datasets ADD CONSTRAINT datasets_format_check
    CHECK (format IN ('csv', 'tsv', 'ndjson', 'parquet', 'document'));
