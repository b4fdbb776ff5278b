-- Migrations: bring a store written by an earlier deepbase_duck up to the current catalog.
-- Each statement is idempotent (a new store already has everything), so the file runs on
-- every open. Pure SQL: runs in the DuckDB CLI too.

-- 0.1: scores gained the Benjamini-Hochberg q-value and the measure's own columns as JSON.
ALTER TABLE scores ADD COLUMN IF NOT EXISTS q_value DOUBLE;
ALTER TABLE scores ADD COLUMN IF NOT EXISTS detail VARCHAR;

-- 0.2: models record how many length-sorted forward batches a progressive scan's window runs as.
ALTER TABLE models ADD COLUMN IF NOT EXISTS window_split INTEGER;

-- 0.3: a model's checksum covers its module classes and variant besides its weights; rows
-- written before hold the weights' checksum and keep identity NULL until the model is next
-- loaded, when deepbase_duck moves them and their behaviors to the new checksum.
ALTER TABLE models ADD COLUMN IF NOT EXISTS identity INTEGER;

-- 0.4: each record keeps the md5 of its text as stored, so a text changed in place afterwards
-- (an UPDATE of records) is noticed and what was stored from the old text is computed again.
-- Rows written before get it at their dataset's next use (deepbase_duck fills NULLs).
ALTER TABLE records ADD COLUMN IF NOT EXISTS text_md5 VARCHAR;

-- 0.5: hypotheses defined by a regular expression are stored in hypothesis_definitions, which
-- 00_catalog.sql creates (IF NOT EXISTS) in a store written before, at its next open.
