-- Sampling: seeded, reproducible subsets and orders of a dataset's records, for probes on a
-- sample, train/test splits, class-balanced probe sets and progressive (early-stopping) scans.
--
-- Always at the record level: a record is kept or dropped whole, with all its symbols, so no
-- record is ever split between a sample and its complement, or between train and test.
--
-- Randomness is a hash, not USING SAMPLE (whose size and seed must be literals, so a macro
-- cannot pass them on). Every record gets a key that depends only on (dataset, record_id,
-- seed), so a result depends only on those and the arguments: the same seed gives the same
-- records in every run, in the Python package and in the DuckDB CLI alike, and adding records
-- to a dataset does not move the others.
--
-- The key is taken from md5(), not hash(): hash() happens to give the same values in DuckDB 2.0
-- (Python) and the DuckDB 1.5 CLI, but it is an internal function with no promise to stay the
-- same across versions, and its multi-argument form XORs the last argument's hash in, so keys of
-- two seeds (or of two streams) differ by a constant XOR: a fraction-1/2 sample of seed 1 is then
-- exactly the sample of seed 0 or its complement. md5 is the same function in every version and
-- mixes every input bit; it costs about 0.3 s per million records (2 CPU cores).
--
-- Pure SQL: this file runs in the DuckDB CLI too.
--
-- Guards: each macro's errors come from a branch joined with UNION ALL that has a row only for a
-- bad argument, and that row raises the error in its WHERE clause (in its columns too): an
-- error() only in a column is pruned when a query reads none of the guard's columns (count(*),
-- or seeded_order's rank alone gave the rows plus a NULL one for a bad seed).
--
-- Datasets: `ds` must name a dataset of the store (a row of `datasets`, or records stored under
-- that name); NULL or an unknown name is an error that names the macro and lists the datasets,
-- not an empty result that reads as "no records"; so is a ds that is not text (ds := 3). A
-- registered dataset without records gives no rows.
--
-- Arguments: a NULL seed is the default seed 0 in every macro, so `seed := NULL` gives the rows
-- of `seed := 0`. A seed and a count (sample_records' n, stratified_records' n_per_class) must be
-- a non-negative integer that fits a BIGINT (at most 9223372036854775807) or NULL, as inspect()
-- refuses a negative or fractional seed; anything else (2.7, -1, 1e19) is an error that names the
-- macro and the argument, as a fraction (sample_fraction's fraction, train_test_split's
-- test_fraction) is when it is not a number from 0 to 1 (NULL, NaN, 1.5, true, 'half'; text
-- holding a number, '3' or '0.5', is read as that number). Nothing is rounded (seed := 1.5 is an
-- error, not seed 2), and every argument is checked whatever the dataset holds, so an unknown or
-- empty dataset gives the same errors (these come first; then an unknown dataset's).

-- whole_nonneg(v): whether v is a whole number >= 0 (of any numeric type, 2.0 included, or text
-- holding one, '3'), of any size; false for a BOOLEAN (which Python's inspect refuses as a seed),
-- NULL for v NULL. A DECIMAL or text is checked exactly too: its DOUBLE holds no fraction beyond
-- 2^52, so seed := 4503599627370496.5 passed the DOUBLE test alone and was taken as seed
-- 4503599627370497 (CAST rounds), where every fraction is refused. (Not a FLOAT or DOUBLE:
-- DuckDB's DOUBLE to DECIMAL cast is inexact for large values, 1e19 giving a fraction.)
CREATE OR REPLACE MACRO whole_nonneg(v) AS
typeof(v) <> 'BOOLEAN' AND isfinite(TRY_CAST(v AS DOUBLE)) AND TRY_CAST(v AS DOUBLE) >= 0
AND TRY_CAST(v AS DOUBLE) = floor(TRY_CAST(v AS DOUBLE))
AND (NOT (typeof(v) = 'VARCHAR' OR typeof(v) LIKE 'DECIMAL%')
     OR coalesce(TRY_CAST(v AS DECIMAL(38, 18)) = floor(TRY_CAST(v AS DECIMAL(38, 18))), true));

-- nonneg_int(v): v as a BIGINT when it is a whole number from 0 to 9223372036854775807 (of any
-- numeric type, 2.0 included, or text holding one, '3'; whole_nonneg); NULL otherwise (a BOOLEAN
-- too, which Python's inspect refuses as a seed), and for v NULL.
CREATE OR REPLACE MACRO nonneg_int(v) AS
CASE WHEN whole_nonneg(v)
     THEN coalesce(TRY_CAST(v AS BIGINT), TRY_CAST(TRY_CAST(v AS DOUBLE) AS BIGINT)) END;

-- nonneg_int_error(what, v): NULL when v is NULL or a good nonneg_int; else the message the
-- macros below raise, naming the argument as `what` (e.g. 'sample_records: n').
CREATE OR REPLACE MACRO nonneg_int_error(what, v) AS
CASE WHEN v IS NOT NULL AND nonneg_int(v) IS NULL
     THEN what || ' must be a non-negative integer or NULL, got ' || CAST(v AS VARCHAR)
          || CASE WHEN whole_nonneg(v) THEN ' (larger than 9223372036854775807, the largest BIGINT)' ELSE '' END END;

-- unit_fraction(v): v as a DOUBLE when it is a number from 0 to 1 (of any numeric type, or text
-- holding one, '0.5'); NULL otherwise: NaN, a BOOLEAN (true is no fraction), text that is no
-- number ('half'), a list, and v NULL. The macros below compare keys with it, never with
-- CAST(v AS DOUBLE), which raised DuckDB's own conversion error for text ("Could not convert
-- string 'half' to INT32", naming no argument) before their guard could name the argument.
CREATE OR REPLACE MACRO unit_fraction(v) AS
CASE WHEN typeof(v) <> 'BOOLEAN' AND TRY_CAST(v AS DOUBLE) BETWEEN 0 AND 1 THEN TRY_CAST(v AS DOUBLE) END;

-- fraction_error(what, v): NULL when v is a good unit_fraction; else the message the macros below
-- raise, naming the argument as `what` (e.g. 'sample_fraction: fraction'); NULL is an error.
CREATE OR REPLACE MACRO fraction_error(what, v) AS
CASE WHEN unit_fraction(v) IS NULL
     THEN what || ' must be between 0 and 1, got ' || coalesce(CAST(v AS VARCHAR), 'NULL') END;

-- dataset_error(what, ds): NULL when `ds` names a dataset (a row of `datasets`, or one with
-- stored records); else the message the macros below raise, naming the macro as `what`. A ds
-- that is not text (ds := 3) is an error too: the macros read records WHERE dataset =
-- CAST(ds AS VARCHAR), so that it gets this error and not a conversion of every stored
-- dataset name to the type of ds ("Could not convert string 'd' to INT32").
CREATE OR REPLACE MACRO dataset_error(what, ds) AS
CASE WHEN ds IS NULL THEN what || ': ds must name a dataset, got NULL'
     WHEN typeof(ds) <> 'VARCHAR'
     THEN what || ': ds must name a dataset (text), got ' || CAST(ds AS VARCHAR) || ' of type ' || typeof(ds)
     WHEN NOT EXISTS (SELECT 1 FROM datasets WHERE name = CAST(ds AS VARCHAR))
          AND NOT EXISTS (SELECT 1 FROM records WHERE dataset = CAST(ds AS VARCHAR))
     THEN what || ': ds ''' || CAST(ds AS VARCHAR) || ''' is not a dataset of this store (datasets: '
          || coalesce((SELECT string_agg('''' || name || '''', ', ' ORDER BY name) FROM datasets), 'none') || ')' END;

-- sample_key(ds, record_id, seed := 0, stream := 'order'): the record's seeded key, an integer
-- uniform on [0, 2^52): the first 13 hex digits of md5('<stream>:<seed>:<record_id>:<ds>'),
-- with seed and record_id written as integers; key / 2^52 is an exact uniform number in [0, 1).
-- seed NULL is seed 0 and stream NULL is 'order' (the defaults), so no key is ever NULL for a
-- stored record and a good seed. A seed that is not a non-negative integer (1.5, -1) gives NULL,
-- never a rounded seed's key; the macros below refuse such a seed with an error naming them.
-- Every macro below orders and thresholds by it. `stream` gives independent keys for independent
-- decisions (a plain word, no ':'): 'order' (sample_records, sample_fraction, seeded_order,
-- stratified_records) and 'split' (train_test_split), so with one seed a split is not correlated
-- with a sample (a sample's records fall in the test split at the test fraction).
CREATE OR REPLACE MACRO sample_key(ds, record_id, seed := 0, stream := 'order') AS
CAST('0x' || md5(CAST(coalesce(stream, 'order') AS VARCHAR) || ':'
                 || CAST(CASE WHEN seed IS NULL THEN 0 ELSE nonneg_int(seed) END AS VARCHAR) || ':'
                 || CAST(CAST(record_id AS BIGINT) AS VARCHAR) || ':' || CAST(ds AS VARCHAR))[1:13]
     AS UBIGINT);

-- seeded_order(ds, seed := 0): every record of dataset `ds` with its position in a seeded
-- uniform random order: (record_id, rank), rank = 1, 2, ... n_records (ordered by the key, ties
-- by record_id), rows sorted by rank. For progressive scans that stop early: the records of
-- rank <= n are exactly sample_records(ds, n, seed), and every sample_fraction(ds, f, seed) is a
-- prefix of this order. seed NULL: seed 0; a seed that is not a non-negative integer is an error,
-- as is an unknown or NULL ds.
--
-- The rank is a record's place in an ordered list() of the dataset's records, not a
-- row_number() window: DuckDB 1.5 (the CLI) refuses a window whose ORDER BY reads a column of
-- an outer query ("window expression is not supported here"), so with a window, a LATERAL join
-- on a seed column (range(3) AS s(seed), LATERAL seeded_order('d', seed := s.seed)) failed in
-- the CLI while it ran in Python's DuckDB. An ordered aggregate is decorrelated by both.
CREATE OR REPLACE MACRO seeded_order(ds, seed := 0) AS TABLE
SELECT record_id, rank
FROM (SELECT unnest(ids) AS record_id, generate_subscripts(ids, 1) AS rank
      FROM (SELECT list(record_id ORDER BY sample_key(ds, record_id, seed), record_id) AS ids
            FROM records
            WHERE dataset = CAST(ds AS VARCHAR) AND typeof(ds) = 'VARCHAR')
      UNION ALL   -- the guard: a row only for a bad seed or dataset, and that row is the error
      SELECT CAST(error(msg) AS INTEGER), CAST(NULL AS BIGINT)
      FROM (SELECT coalesce(nonneg_int_error('seeded_order: seed', seed), dataset_error('seeded_order', ds)) AS msg)
      WHERE msg IS NOT NULL AND CAST(error(msg) AS BOOLEAN))
ORDER BY rank;

-- sample_records(ds, n, seed := 0): n records of dataset `ds` drawn uniformly without
-- replacement (all of them when the dataset has at most n; n NULL: all): (record_id), in the
-- seeded order, i.e. the first n records of seeded_order(ds, seed). Samples are nested: for one
-- seed, the sample of size n is contained in the sample of every larger size. n must be a
-- non-negative integer of at most 9223372036854775807 or NULL (2.7, -1 or 1e19 is an error);
-- seed NULL: seed 0; an unknown or NULL ds is an error. In a LATERAL join seed may be a column of the outer table, n not (DuckDB's
-- LIMIT takes no correlated values).
CREATE OR REPLACE MACRO sample_records(ds, n, seed := 0) AS TABLE
SELECT record_id
FROM (SELECT *   -- the first n records by key (a top-n), then the guard's error when n or seed is bad
      FROM (SELECT record_id, sample_key(ds, record_id, seed) AS key
            FROM records
            WHERE dataset = CAST(ds AS VARCHAR) AND typeof(ds) = 'VARCHAR'
            ORDER BY key, record_id
            -- a constant, so LIMIT folds it (even in a LATERAL join on seed); a bad n takes
            -- the guard's error below, never LIMIT's own (n NULL: LIMIT NULL, every record)
            LIMIT CASE WHEN n IS NOT NULL AND nonneg_int(n) IS NULL THEN 0 ELSE nonneg_int(n) END)
      UNION ALL
      SELECT CAST(error(msg) AS INTEGER), CAST(NULL AS UBIGINT)
      FROM (SELECT coalesce(nonneg_int_error('sample_records: n', n), nonneg_int_error('sample_records: seed', seed),
                            dataset_error('sample_records', ds)) AS msg)
      WHERE msg IS NOT NULL AND CAST(error(msg) AS BOOLEAN))
ORDER BY key, record_id;

-- sample_fraction(ds, fraction, seed := 0): each record of dataset `ds` kept independently with
-- probability `fraction` (0 <= fraction <= 1; Bernoulli sampling, so the count is binomial,
-- not exact): kept when key / 2^52 < fraction. Returns (record_id), in the seeded order.
-- Nested: with one seed, a record kept at fraction f is kept at every fraction f' > f, and
-- fraction 1 keeps every record. seed NULL: seed 0; a fraction outside [0, 1] or NULL, or a seed
-- that is not a non-negative integer, is an error (for an unknown or empty dataset too), as is
-- an unknown or NULL ds.
CREATE OR REPLACE MACRO sample_fraction(ds, fraction, seed := 0) AS TABLE
SELECT record_id
FROM (SELECT record_id, sample_key(ds, record_id, seed) AS key
      FROM records
      WHERE dataset = CAST(ds AS VARCHAR) AND typeof(ds) = 'VARCHAR'
        AND sample_key(ds, record_id, seed) < unit_fraction(fraction) * 4503599627370496.0
      UNION ALL   -- the guard, checked whatever the dataset holds: a row only for a bad argument
      SELECT CAST(error(msg) AS INTEGER), CAST(NULL AS UBIGINT)
      FROM (SELECT coalesce(fraction_error('sample_fraction: fraction', fraction),
                            nonneg_int_error('sample_fraction: seed', seed),
                            dataset_error('sample_fraction', ds)) AS msg)
      WHERE msg IS NOT NULL AND CAST(error(msg) AS BOOLEAN))
ORDER BY key, record_id;

-- train_test_split(ds, test_fraction := 0.2, seed := 0): every record of dataset `ds` with its
-- split, 'train' or 'test': (record_id, split), rows sorted by record_id. A record is in 'test'
-- when its 'split'-stream key / 2^52 < test_fraction, so each record lands in test with
-- probability test_fraction, independently (the test share is binomial, not exact), and the
-- split is independent of the samples above for the same seed. Test sets are nested: with one
-- seed, the test set of fraction f is inside the test set of every larger fraction. seed NULL:
-- seed 0; a test_fraction outside [0, 1] or NULL, or a seed that is not a non-negative integer,
-- is an error (for an unknown or empty dataset too), as is an unknown or NULL ds.
CREATE OR REPLACE MACRO train_test_split(ds, test_fraction := 0.2, seed := 0) AS TABLE
SELECT record_id, split
FROM (SELECT record_id,
             CASE WHEN sample_key(ds, record_id, seed, 'split') < unit_fraction(test_fraction) * 4503599627370496.0
                  THEN 'test' ELSE 'train' END AS split
      FROM records
      WHERE dataset = CAST(ds AS VARCHAR) AND typeof(ds) = 'VARCHAR' AND unit_fraction(test_fraction) IS NOT NULL
      UNION ALL   -- the guard, checked whatever the dataset holds: a row only for a bad argument
      SELECT CAST(error(msg) AS INTEGER), CAST(NULL AS VARCHAR)
      FROM (SELECT coalesce(fraction_error('train_test_split: test_fraction', test_fraction),
                            nonneg_int_error('train_test_split: seed', seed),
                            dataset_error('train_test_split', ds)) AS msg)
      WHERE msg IS NOT NULL AND CAST(error(msg) AS BOOLEAN))
ORDER BY record_id;

-- stratified_records(ds, tok, hyp, n_per_class, seed := 0): a class-balanced set of records of
-- dataset `ds` for a binary or categorical hypothesis `hyp` (a balanced probe set), with symbols
-- of tokenisation `tok`. Returns (record_id, class), rows sorted by class then seeded order;
-- class is the label code, as in `labels.value` and symbol_labels (binary: 0 or 1; categorical:
-- the category hypotheses.categories[class + 1]).
--
-- Class of a record (records are never split, and each is assigned to exactly one class):
--   1. the classes a record holds are the values of its symbols under symbol_labels (the
--      alignment rule; unlabelled symbols hold none);
--   2. the support of a class is the number of records of `ds` that hold it;
--   3. a record's class is the one of lowest support among the classes it holds (tie: the lower
--      class code) - the rarest class wins, so a record with a rare class is spent on that class
--      and not on a common one (binary: a record holding any symbol of the rarer value, usually
--      1, is of that class; the others, holding only the commoner value, are of the other).
-- Only records with stored labels of the hypothesis' current version and stored symbols of `tok`
-- count; a record with no labelled symbol has no class and is never returned.
--
-- Balance, at the record level: each class gets exactly min(n_per_class, records of that class)
-- records, the first ones of the class in the seeded order (the order of seeded_order(ds, seed)),
-- so every class with at least n_per_class records gets exactly n_per_class, and a class with
-- fewer gets all of its records. No record appears twice. Every returned record holds at least
-- one symbol of its class; its other symbols keep their own labels, so symbol counts per class
-- are not balanced (weight symbols in the probe if that matters). Balance needs records that
-- differ: when every record holds both values of a binary hypothesis, all of them go to one
-- class (the tie rule) and the other class is empty.
--
-- Errors, not an empty or one-class result (each names the argument and its value): hyp NULL,
-- unknown or continuous; ds NULL or not a dataset of the store; tok NULL or a tokenisation with
-- no symbols stored for `ds` (the error lists those that have some); and, the arguments being
-- good, labelled records that are all of one class (a hypothesis with one class present on the
-- dataset, or every record holding the same class besides others): a balanced set needs two
-- classes, so the error names the hypothesis and the class found. A dataset whose records have
-- no stored labels of the hypothesis (not annotated yet) gives no rows.
--
-- n_per_class NULL: the largest balanced set, every class getting the count of the rarest class
-- (the fewest records assigned to any class that has records; a class no record is assigned to
-- does not count), so each class gets exactly that many. Otherwise n_per_class must be a
-- non-negative integer of at most 9223372036854775807 (2.7, -1 or 1e19 is an error, never read
-- as NULL). seed NULL: seed 0; a seed that is not a non-negative integer is an error.
CREATE OR REPLACE MACRO stratified_records(ds, tok, hyp, n_per_class, seed := 0) AS TABLE
WITH checks AS (   -- msg NULL when the arguments are good, else the error (the first that applies)
    SELECT CASE WHEN typeof(hyp) NOT IN ('VARCHAR', '"NULL"')   -- 3, or a list (['digit'] for 'digit')
                THEN 'stratified_records: hyp must name a hypothesis (text), got ' || CAST(hyp AS VARCHAR)
                     || ' of type ' || typeof(hyp)
                WHEN hyp IS NULL OR n = 0
                THEN CASE WHEN hyp IS NULL THEN 'stratified_records: hyp must name a hypothesis, got NULL'
                          ELSE 'stratified_records: unknown hypothesis ' || CAST(hyp AS VARCHAR)
                               || ' (hyp := ''' || CAST(hyp AS VARCHAR) || ''')' END
                     || '; hyp must name a binary or categorical hypothesis of this store: '
                     || coalesce((SELECT string_agg('''' || name || '''', ', ' ORDER BY name) FROM hypotheses
                                  WHERE kind IN ('binary', 'categorical')), 'none')
                WHEN kind NOT IN ('binary', 'categorical')
                THEN 'stratified_records: hypothesis ' || CAST(hyp AS VARCHAR) || ' is ' || kind
                     || '; only binary and categorical hypotheses have classes'
                ELSE coalesce(nonneg_int_error('stratified_records: n_per_class', n_per_class),
                              nonneg_int_error('stratified_records: seed', seed),
                              dataset_error('stratified_records', ds),
                              tokenization_error('stratified_records', CAST(ds AS VARCHAR), tok)) END AS msg
    FROM (SELECT count(*) AS n, any_value(kind) AS kind FROM hypotheses WHERE name = CAST(hyp AS VARCHAR))
), guard AS (      -- a row only for bad arguments, and it is the error
    SELECT CAST(error(msg) AS INTEGER) AS record_id, CAST(NULL AS INTEGER) AS class
    FROM checks
    WHERE msg IS NOT NULL AND CAST(error(msg) AS BOOLEAN)
), labeled AS (
    SELECT lr.record_id
    FROM labeled_records AS lr
    JOIN hypotheses AS h ON lr.hypothesis = h.name AND lr.version = h.version
    WHERE h.name = CAST(hyp AS VARCHAR) AND lr.dataset = CAST(ds AS VARCHAR) AND typeof(ds) = 'VARCHAR'
), held AS (
    SELECT DISTINCT sl.record_id, CAST(sl.value AS INTEGER) AS class
    FROM symbol_labels_unchecked(CAST(ds AS VARCHAR), tok, [CAST(hyp AS VARCHAR)]) AS sl   -- checked above
    SEMI JOIN labeled ON labeled.record_id = sl.record_id
    WHERE sl.value IS NOT NULL
), support AS (
    SELECT class, count(*) AS n_records FROM held GROUP BY class
), assigned AS (
    SELECT held.record_id, arg_min(held.class, (support.n_records, held.class)) AS class
    FROM held JOIN support USING (class)
    GROUP BY held.record_id
), one_class AS (  -- good arguments, but the labelled records are all of one class: the error
    SELECT CAST(error(msg) AS INTEGER) AS record_id, CAST(NULL AS INTEGER) AS class
    FROM (SELECT 'stratified_records: hypothesis ''' || CAST(hyp AS VARCHAR) || ''' has a single class over the '
                 || 'labelled records of dataset ''' || CAST(ds AS VARCHAR) || ''' (tok ''' || CAST(tok AS VARCHAR)
                 || '''): class ' || CAST(class AS VARCHAR)
                 || coalesce(' (''' || (SELECT categories[class + 1] FROM hypotheses
                                         WHERE name = CAST(hyp AS VARCHAR)) || ''')', '')
                 || ', ' || CAST(n_records AS VARCHAR) || ' records'
                 || CASE WHEN n_held > 1
                         THEN ', as each of them holds it besides other classes (a record goes to the rarest class '
                              || 'it holds, a tie to the lower code)'
                         ELSE '' END
                 || '; a balanced set needs records of at least two classes' AS msg
          FROM (SELECT count(DISTINCT class) AS n_classes, min(class) AS class, count(*) AS n_records,
                       (SELECT count(*) FROM support) AS n_held
                FROM assigned)
          WHERE n_classes = 1 AND (SELECT msg FROM checks) IS NULL)   -- a bad argument's error comes first
    WHERE msg IS NOT NULL AND CAST(error(msg) AS BOOLEAN)
), chosen AS (     -- each class's first records in the seeded order: a slice of an ordered list(), as
                   -- in seeded_order, not a window (DuckDB 1.5 refuses one in a LATERAL join on seed)
    SELECT unnest(list_slice(ids, 1, CASE WHEN n_per_class IS NULL   -- the rarest class's count
                                          THEN (SELECT min(n_class) FROM (SELECT count(*) AS n_class
                                                                          FROM assigned GROUP BY class))
                                          ELSE nonneg_int(n_per_class) END)) AS record_id,   -- NULL (no row)
           class                                                       -- for a bad one: the guard's error
    FROM (SELECT class, list(record_id ORDER BY sample_key(ds, record_id, seed), record_id) AS ids
          FROM assigned GROUP BY class)
)
SELECT record_id, class
FROM (SELECT * FROM chosen UNION ALL SELECT * FROM guard UNION ALL SELECT * FROM one_class)
ORDER BY class, sample_key(ds, record_id, seed), record_id;
