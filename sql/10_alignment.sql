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
-- macros read ds and tok as CAST(... AS VARCHAR) and hyps through name_list. So is a recs that is
-- not a list of record ids (the guard checks it with id_list and record_ids_error; the rows read it
-- as TRY_CAST(recs AS INTEGER[]), which binds whatever it is): text ('x' raised "can't be cast to the
-- destination type INTEGER[]", '[1, 2]' was parsed), a list of text or of lists ("Cannot deduce
-- template type 'T' in function: 'list_contains'"), a list of BOOLEANs ([true] read as record 1),
-- a fraction ([1.5] matched nothing, as if record 1.5 had no symbols) and a NULL in the list. A
-- list of any integer type works (TINYINT to HUGEINT, unsigned too), and one of whole numbers of
-- another numeric type ([2.0] is [2], if it fits a BIGINT); an id no record has (-1,
-- 3000000000) matches nothing, as does an id a dataset has not (yet) got. Refused by type, a list
-- of text is refused even when empty ([]::VARCHAR[]); a plain [] gives no rows.

-- name_list(v): a list v as a VARCHAR[] (its names; [3] gives ['3'], which no hypothesis is
-- named); NULL for NULL and for anything that is not a list ('digit'), never a list parsed from
-- text. So symbol_labels binds whatever hyps is, and its guard names a hyps of another type.
CREATE OR REPLACE MACRO name_list(v) AS
CASE WHEN typeof(v) LIKE '%]' THEN TRY_CAST(v AS VARCHAR[]) END;

-- id_list(v): a list v of record ids as a BIGINT[]: a list of any integer type, or of whole numbers
-- of another numeric type ([2.0] is [2]; an integer beyond BIGINT is NULL there); NULL for NULL and
-- for anything else: text (never a list parsed from text: '[1, 2]' is refused as hyps' 'digit'
-- is), a list of text, BOOLEANs or lists, and a list holding a fraction, NaN, infinity or a
-- number of such a type beyond BIGINT ([1.5] is not rounded). A NULL element stays NULL. It binds
-- whatever v is, so symbol_labels' guard (record_ids_error) names a recs of another type.
CREATE OR REPLACE MACRO id_list(v) AS
CASE WHEN regexp_matches(typeof(v), '^(U?(TINYINT|SMALLINT|INTEGER|BIGINT|HUGEINT)|BIGNUM|"NULL")\[\d*\]$')
     THEN TRY_CAST(v AS BIGINT[])
     WHEN regexp_matches(typeof(v), '^(FLOAT|DOUBLE|DECIMAL\(\d+,\d+\))\[\d*\]$')
          AND TRY_CAST(TRY_CAST(v AS BIGINT[]) AS DOUBLE[]) = TRY_CAST(v AS DOUBLE[])   -- whole numbers only
     THEN TRY_CAST(v AS BIGINT[]) END;

-- record_ids_error(what, v): NULL when v is NULL (every record) or a list of record ids (id_list,
-- without NULLs); else the error message, naming the macro as `what`, v (cut at 100 characters:
-- an engine's block holds thousands of ids) and its type. Kept small, with no subquery and no
-- lambda: a query of a block of records binds it each time (a lambda that found the first fraction
-- cost 0.3 ms of a 5 ms query of 64 records).
CREATE OR REPLACE MACRO record_ids_error(what, v) AS
CASE WHEN v IS NULL THEN NULL
     WHEN id_list(v) IS NULL
     THEN what || ': recs must be a list of record ids (whole numbers: [0, 1, ...]) or NULL (every record), got '
          || CASE WHEN length(CAST(v AS VARCHAR)) > 100 THEN left(CAST(v AS VARCHAR), 100) || '...'
                  ELSE CAST(v AS VARCHAR) END || ' of type ' || typeof(v)
     WHEN list_position(TRY_CAST(v AS DOUBLE[]), NULL) > 0   -- every id of a list that id_list takes is a DOUBLE
     THEN what || ': recs holds NULL at position ' || CAST(list_position(TRY_CAST(v AS DOUBLE[]), NULL) AS VARCHAR)
          || ', which is no record id (recs must be a list of record ids, or NULL itself for every record)' END;

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
-- without its argument checks (bad arguments give no rows, but for recs, read as
-- TRY_CAST(recs AS INTEGER[]): a bad recs gives the rows of what that holds), for macros that
-- check them first themselves (stratified_records, so that its own errors are the ones raised).
-- TRY_CAST to INTEGER[], record_id's type, keeps list_contains as fast as over the list itself
-- (an id beyond INTEGER, which no record has, is NULL there and matches nothing); the exact
-- id_list cost a query of 3000 records a third more, being evaluated per chunk of rows.
CREATE OR REPLACE MACRO symbol_labels_unchecked(ds, tok, hyps, recs := NULL) AS TABLE
WITH sym AS (
    SELECT record_id, pos, start_char, end_char
    FROM symbols
    WHERE dataset = CAST(ds AS VARCHAR) AND tokenization = CAST(tok AS VARCHAR)
      AND (recs IS NULL OR list_contains(TRY_CAST(recs AS INTEGER[]), record_id))
), hyp AS (
    SELECT name, kind, version FROM hypotheses WHERE list_contains(name_list(hyps), name)
), spans AS (
    SELECT l.hypothesis, l.record_id, unnest(range(l.start_char, l.end_char)) AS c, l.value
    FROM labels AS l JOIN hyp ON l.hypothesis = hyp.name AND l.version = hyp.version
    WHERE l.dataset = CAST(ds AS VARCHAR) AND (recs IS NULL OR list_contains(TRY_CAST(recs AS INTEGER[]), l.record_id))
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
                  ELSE coalesce(tokenization_error('symbol_labels', ds, tok),
                                record_ids_error('symbol_labels', r)) END AS msg
      FROM (SELECT (SELECT string_agg(coalesce('''' || h || '''', 'NULL'), ', ' ORDER BY i)
                    FROM (SELECT unnest(name_list(hyps)) AS h, generate_subscripts(name_list(hyps), 1) AS i)
                    WHERE h IS NULL OR h NOT IN (SELECT name FROM hypotheses)) AS unknown,
                   recs AS r))   -- recs once, as in symbol_labels_unchecked
WHERE msg IS NOT NULL AND CAST(error(msg) AS BOOLEAN);
