-- symbol_labels(ds, tok, hyps, recs := NULL): the label of every symbol of dataset `ds` under
-- tokenisation `tok`, for each hypothesis named in the list `hyps` (labels of its current
-- version); `recs`, a list of record ids, restricts it to those records (the engine asks for
-- one block of records at a time).
--
-- The alignment rule (labels live on character spans, symbols cover character spans too):
--   a symbol takes the value held by the majority of its characters, where a character outside
--   every span holds the hypothesis' default (0 for binary, NULL = unlabelled otherwise);
--   a tie goes to the value of the earliest of the tied characters.
-- So a word piece "##ing" inside a verb span is a verb; a symbol "(x" whose "x" starts a string
-- literal is split 1:1 and takes the value of "(" (outside: 0); a symbol with no characters
-- (a [CLS] token) has no row in `symbols` and so no label.
--
-- Single-character symbols (character-level models) take the value of the span holding their
-- character directly; only longer symbols go through the vote.
--
-- Returns (hypothesis, record_id, pos, value); value NULL means "no label" and such symbols are
-- left out of every score of that hypothesis. Pure SQL: runs in the DuckDB CLI too.
--
-- Arguments are checked, so that a mistake is an error naming it and not an empty result that
-- reads as "no labels": ds, tok or hyps NULL, a name in hyps that is not in the hypotheses table
-- (or NULL), and a tokenisation with no symbols stored for the dataset (the error lists the
-- tokenisations that have some; symbols are stored when a model of the tokenisation first reads
-- the dataset). A known hypothesis with no stored labels on the dataset, and an empty hyps or recs
-- list, still give what they hold: binary hypotheses' default 0, no rows otherwise. An argument of
-- another type is an error naming it too: a ds or tok that is not text (ds := 3), a hyps that is
-- not a list ('digit' for ['digit']); these raised DuckDB's own errors naming no argument ("Could
-- not convert string 'snippets' to INT32", "UNNEST() can only be applied to lists"), so the
-- macros read ds and tok as CAST(... AS VARCHAR) and hyps through name_list.

-- name_list(v): a list v as a VARCHAR[] (its names; [3] gives ['3'], which no hypothesis is
-- named); NULL for NULL and for anything that is not a list ('digit'), never a list parsed from
-- text. So symbol_labels binds whatever hyps is, and its guard names a hyps of another type.
CREATE OR REPLACE MACRO name_list(v) AS
CASE WHEN typeof(v) LIKE '%]' THEN TRY_CAST(v AS VARCHAR[]) END;

-- tokenization_error(what, ds, tok): NULL when tokenisation `tok` has symbols stored for dataset
-- `ds`; else the error message, naming the macro as `what` (ds or tok NULL is an error too).
CREATE OR REPLACE MACRO tokenization_error(what, ds, tok) AS
CASE WHEN ds IS NULL THEN what || ': ds must name a dataset, got NULL'
     WHEN typeof(ds) <> 'VARCHAR'
     THEN what || ': ds must name a dataset (text), got ' || CAST(ds AS VARCHAR) || ' of type ' || typeof(ds)
     WHEN tok IS NULL THEN what || ': tok must name a tokenisation with symbols stored for dataset '''
                       || CAST(ds AS VARCHAR) || ''', got NULL'
     WHEN typeof(tok) <> 'VARCHAR'
     THEN what || ': tok must name a tokenisation (text), got ' || CAST(tok AS VARCHAR)
          || ' of type ' || typeof(tok)
     WHEN NOT EXISTS (SELECT 1 FROM symbols
                      WHERE dataset = CAST(ds AS VARCHAR) AND tokenization = CAST(tok AS VARCHAR))
     THEN what || ': tok ''' || CAST(tok AS VARCHAR) || ''' has no symbols stored for dataset '''
          || CAST(ds AS VARCHAR) || ''' (tokenisations with symbols there: '
          || coalesce((SELECT string_agg('''' || t || '''', ', ' ORDER BY t)
                       FROM (SELECT DISTINCT tokenization AS t FROM symbols
                             WHERE dataset = CAST(ds AS VARCHAR))), 'none')
          || '; symbols are stored when a model of the tokenisation first reads the dataset)' END;

-- symbol_labels_unchecked(ds, tok, hyps, recs := NULL): symbol_labels (defined below, over it)
-- without its argument checks (bad arguments give no rows), for macros that check them first
-- themselves (stratified_records, so that its own errors are the ones raised).
CREATE OR REPLACE MACRO symbol_labels_unchecked(ds, tok, hyps, recs := NULL) AS TABLE
WITH sym AS (
    SELECT record_id, pos, start_char, end_char
    FROM symbols
    WHERE dataset = CAST(ds AS VARCHAR) AND tokenization = CAST(tok AS VARCHAR)
      AND (recs IS NULL OR list_contains(recs, record_id))
), hyp AS (
    SELECT name, kind, version FROM hypotheses WHERE list_contains(name_list(hyps), name)
), spans AS (
    SELECT l.hypothesis, l.record_id, unnest(range(l.start_char, l.end_char)) AS c, l.value
    FROM labels AS l JOIN hyp ON l.hypothesis = hyp.name AND l.version = hyp.version
    WHERE l.dataset = CAST(ds AS VARCHAR) AND (recs IS NULL OR list_contains(recs, l.record_id))
), single AS (
    SELECT hyp.name AS hypothesis, sym.record_id, sym.pos,
           coalesce(spans.value, CASE WHEN hyp.kind = 'binary' THEN 0.0 END) AS value
    FROM sym CROSS JOIN hyp
    LEFT JOIN spans ON spans.hypothesis = hyp.name AND spans.record_id = sym.record_id
                   AND spans.c = sym.start_char
    WHERE sym.end_char - sym.start_char = 1
), votes AS (
    SELECT hyp.name AS hypothesis, chars.record_id, chars.pos,
           coalesce(spans.value, CASE WHEN hyp.kind = 'binary' THEN 0.0 END) AS value,
           count(*) AS n_chars, min(chars.c) AS first_char
    FROM (SELECT record_id, pos, unnest(range(start_char, end_char)) AS c
          FROM sym WHERE end_char - start_char > 1) AS chars
    CROSS JOIN hyp
    LEFT JOIN spans ON spans.hypothesis = hyp.name AND spans.record_id = chars.record_id
                   AND spans.c = chars.c
    GROUP BY ALL
)
SELECT * FROM single
UNION ALL
SELECT hypothesis, record_id, pos, arg_max_null(value, (n_chars, -first_char)) AS value
FROM votes
GROUP BY hypothesis, record_id, pos;

CREATE OR REPLACE MACRO symbol_labels(ds, tok, hyps, recs := NULL) AS TABLE
SELECT * FROM symbol_labels_unchecked(ds, tok, hyps, recs := recs)
UNION ALL   -- the guard, checked whatever the labels hold: a row only for a bad argument, and it is the error
SELECT CAST(error(msg) AS VARCHAR), NULL, NULL, NULL
FROM (SELECT CASE WHEN hyps IS NULL THEN 'symbol_labels: hyps must be a list of hypothesis names, got NULL'
                  WHEN name_list(hyps) IS NULL
                  THEN 'symbol_labels: hyps must be a list of hypothesis names ([''name'', ...]), got '
                       || CAST(hyps AS VARCHAR) || ' of type ' || typeof(hyps)
                  WHEN unknown IS NOT NULL
                  THEN 'symbol_labels: hyps holds names that are not hypotheses of this store: '
                       || unknown || ' (hypotheses: '
                       || coalesce((SELECT string_agg('''' || name || '''', ', ' ORDER BY name) FROM hypotheses),
                                   'none') || ')'
                  ELSE tokenization_error('symbol_labels', ds, tok) END AS msg
      FROM (SELECT (SELECT string_agg(coalesce('''' || h || '''', 'NULL'), ', ' ORDER BY i)
                    FROM (SELECT unnest(name_list(hyps)) AS h, generate_subscripts(name_list(hyps), 1) AS i)
                    WHERE h IS NULL OR h NOT IN (SELECT name FROM hypotheses)) AS unknown))
WHERE msg IS NOT NULL AND CAST(error(msg) AS BOOLEAN);
