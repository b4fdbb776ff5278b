-- Reading results: pure-SQL views of the scores table (they run in the DuckDB CLI too).

-- arg_nested(v): whether v is a list, array, struct, map or union. Such a value is never a name or
-- a number: the macros below refuse it by name, where comparing its text with names would report
-- measure_name := ['corr'] as an unknown measure '[corr]'.
CREATE OR REPLACE MACRO arg_nested(v) AS
regexp_matches(typeof(v), '\]$|^(STRUCT|MAP|UNION)\(');

-- arg_literal(v): v written as in SQL, for error messages: a list or struct through its JSON with
-- SQL's quotes (['corr'], where CAST(v AS VARCHAR) gives [corr], which reads as a bracketed name).
CREATE OR REPLACE MACRO arg_literal(v) AS
CASE WHEN v IS NULL THEN 'NULL'
     WHEN arg_nested(v) THEN replace(replace(CAST(to_json(v) AS VARCHAR), '''', ''''''), '"', '''')
     ELSE CAST(v AS VARCHAR) END;

-- top_units(k := 5, qid := NULL, measure_name := 'corr', by_layer := false): the k units with the
-- largest |score| per (model, hypothesis) of one query, unit-level scores only, with the unit's
-- layer width from the catalog. One row per (model, hypothesis, rank). qid NULL: the latest query
-- that wrote scores, max(query_id) over the scores table - not the latest row of `queries`,
-- which may be a compare_layers query (it writes similarities, not scores); with no scores at all
-- there is nothing to rank and no row.
-- by_layer := true ranks per (model, layer, hypothesis) instead: the sets a `top_k` query stops on.
-- measure_name := NULL ranks every measure of the query, each on its own (the `measure` column).
-- separated: true when the unit's interval for |score| lies wholly above the interval of every
-- unit ranked outside the top k, so that no outsider can overtake it at the query's confidence
-- (its place in the top k is settled by the data); false when some outsider's interval reaches
-- it; NULL when the unit or an outsider has no interval. Units whose scores are nearly tied at
-- the k-th place are not separated however many records are read.
-- k must be a whole number >= 1 (2.0 and '2' included): 0, a negative or fractional k, or NULL is
-- an error naming k, whatever the scores table holds (not an empty result that reads as
-- "nothing was scored"); a BOOLEAN k too. So are a by_layer other than true or false (NULL
-- included), a qid that is not NULL or a number ('x', true: not a conversion error, nor query 1),
-- a qid that is not a whole number (1.5 is no query id: not "no such query"), a qid with no
-- scores (no such query, or one that wrote none: the error lists the queries that have scores)
-- and a measure_name with no unit scores in the query ranked (a typo such as 'cor', or 'corr'
-- when the latest query scored only 'iou': the error lists the query's measures; measure_name is
-- compared as text, so 5 is the unknown '5', but a list such as ['corr'] is refused as no name).
-- A NaN score, as a NULL one, is never ranked (it would sort above every number). The guard
-- raises its error in its WHERE clause: an error() only in a column is pruned when a query reads
-- none of the guard's columns.
CREATE OR REPLACE MACRO top_units(k := 5, qid := NULL, measure_name := 'corr', by_layer := false) AS TABLE
WITH picked AS (
    SELECT s.model, s.hypothesis, s.layer, s.unit, s.score, s.ci_low, s.ci_high, s.q_value, s.n, s.measure,
           CASE WHEN TRY_CAST(by_layer AS BOOLEAN) THEN s.layer END AS part,
           -- the interval of |score|: from 0 where the score's interval holds 0
           CASE WHEN s.ci_low IS NULL OR s.ci_high IS NULL OR isnan(s.ci_low) OR isnan(s.ci_high) THEN NULL
                WHEN s.ci_low > 0 THEN s.ci_low
                WHEN s.ci_high < 0 THEN -s.ci_high
                ELSE 0 END AS abs_low,
           CASE WHEN s.ci_low IS NULL OR s.ci_high IS NULL OR isnan(s.ci_low) OR isnan(s.ci_high) THEN NULL
                ELSE greatest(abs(s.ci_low), abs(s.ci_high)) END AS abs_high
    FROM scores AS s
    WHERE s.query_id = CASE WHEN qid IS NULL THEN (SELECT max(query_id) FROM scores)
                            WHEN typeof(qid) <> 'BOOLEAN' THEN TRY_CAST(qid AS DOUBLE) END   -- 'x', true: no row
      AND (measure_name IS NULL OR s.measure = CAST(measure_name AS VARCHAR))
      AND s.unit IS NOT NULL AND s.score IS NOT NULL AND NOT isnan(s.score)
),
ranked AS (
    SELECT *, row_number() OVER (PARTITION BY model, measure, hypothesis, part
                                 ORDER BY abs(score) DESC, layer, unit) AS rank
    FROM picked
),
outside AS (   -- per ranked set, the highest |score| an outsider's interval reaches
    SELECT model, measure, hypothesis, part, max(abs_high) AS high, bool_or(abs_high IS NULL) AS unbounded
    FROM ranked WHERE rank > TRY_CAST(k AS DOUBLE)
    GROUP BY ALL
)
SELECT model, hypothesis, rank, layer, unit, score, ci_low, ci_high, q_value, n, width, separated, measure
FROM (SELECT r.model, r.hypothesis, r.rank, r.layer, r.unit, r.score, r.ci_low, r.ci_high, r.q_value, r.n,
             l.width,
             CASE WHEN r.abs_low IS NULL OR o.unbounded THEN NULL
                  WHEN o.high IS NULL THEN true               -- every unit of the set is in the top k
                  ELSE r.abs_low > o.high END AS separated,
             r.measure, r.part
      FROM ranked AS r
      LEFT JOIN outside AS o
        ON o.model = r.model AND o.measure = r.measure AND o.hypothesis = r.hypothesis
       AND o.part IS NOT DISTINCT FROM r.part
      LEFT JOIN layers AS l ON l.model = r.model AND l.layer = r.layer
      WHERE r.rank <= TRY_CAST(k AS DOUBLE)
      UNION ALL   -- the guard, checked whatever the scores hold: a row only for a bad argument, and it is the error
      SELECT CAST(error(msg) AS VARCHAR), NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
             NULL
      FROM (SELECT CASE WHEN NOT coalesce(typeof(k) <> 'BOOLEAN' AND isfinite(TRY_CAST(k AS DOUBLE))
                                          AND TRY_CAST(k AS DOUBLE) >= 1
                                          AND TRY_CAST(k AS DOUBLE) = floor(TRY_CAST(k AS DOUBLE)), false)
                        THEN 'top_units: k must be a whole number >= 1 (the units per hypothesis), got '
                             || arg_literal(k) || CASE WHEN arg_nested(k) THEN ' of type ' || typeof(k) ELSE '' END
                        WHEN by_layer IS NULL OR typeof(by_layer) NOT IN ('BOOLEAN', 'VARCHAR')
                             OR TRY_CAST(by_layer AS BOOLEAN) IS NULL
                        THEN 'top_units: by_layer must be true or false, got ' || arg_literal(by_layer)
                             || CASE WHEN arg_nested(by_layer) THEN ' of type ' || typeof(by_layer) ELSE '' END
                        WHEN qid IS NOT NULL AND (typeof(qid) = 'BOOLEAN' OR TRY_CAST(qid AS DOUBLE) IS NULL
                                                  OR NOT isfinite(TRY_CAST(qid AS DOUBLE))
                                                  OR TRY_CAST(qid AS DOUBLE) <> floor(TRY_CAST(qid AS DOUBLE)))
                        THEN 'top_units: qid must be a query id (a whole number) or NULL (the latest query with scores), got '
                             || arg_literal(qid) || CASE WHEN arg_nested(qid) THEN ' of type ' || typeof(qid) ELSE '' END
                        WHEN qid IS NOT NULL AND NOT EXISTS (SELECT 1 FROM scores WHERE query_id = TRY_CAST(qid AS DOUBLE))
                        THEN 'top_units: qid ' || CAST(qid AS VARCHAR) || ' has no scores ('
                             || CASE WHEN EXISTS (SELECT 1 FROM queries WHERE query_id = TRY_CAST(qid AS DOUBLE))
                                     THEN 'the query wrote none: a compare_layers query writes similarities'
                                     ELSE 'no such query' END
                             || '); qid must be NULL (the latest query with scores) or a query with scores: '
                             || coalesce((SELECT CASE WHEN count(*) <= 20 THEN string_agg(CAST(i AS VARCHAR), ', ' ORDER BY i)
                                                      ELSE CAST(min(i) AS VARCHAR) || ' to ' || CAST(max(i) AS VARCHAR)
                                                           || ' (' || CAST(count(*) AS VARCHAR) || ' queries)' END
                                          FROM (SELECT DISTINCT query_id AS i FROM scores)), 'none, nothing is scored')
                        WHEN arg_nested(measure_name)
                        THEN 'top_units: measure_name must name one measure (text), or be NULL (every measure), got '
                             || arg_literal(measure_name) || ' of type ' || typeof(measure_name)
                        WHEN measure_name IS NOT NULL AND q IS NOT NULL
                             AND NOT EXISTS (SELECT 1 FROM scores WHERE query_id = q
                                                                    AND measure = CAST(measure_name AS VARCHAR)
                                                                    AND unit IS NOT NULL)
                        THEN 'top_units: measure_name ''' || CAST(measure_name AS VARCHAR) || ''' has no unit scores in query '
                             || CAST(TRY_CAST(q AS BIGINT) AS VARCHAR) || CASE WHEN qid IS NULL THEN ' (the latest query with scores)' ELSE '' END
                             || '; its measures with unit scores: '
                             || coalesce((SELECT string_agg('''' || m || '''', ', ' ORDER BY m)
                                          FROM (SELECT DISTINCT measure AS m FROM scores
                                                WHERE query_id = q AND unit IS NOT NULL)), 'none')
                             || ' (measure_name := NULL ranks every measure)' END AS msg
            FROM (SELECT coalesce(TRY_CAST(qid AS DOUBLE), (SELECT max(query_id) FROM scores)) AS q))
      WHERE msg IS NOT NULL AND CAST(error(msg) AS BOOLEAN))
ORDER BY model, measure, hypothesis, part, rank;

-- compare_scores(model_a, model_b, measure_name := 'corr', ds := NULL): for every (layer, unit,
-- hypothesis) scored for both models over the same records of a dataset, the two scores and their
-- difference: how a unit's affinity changed between two checkpoints, or between a model and its
-- untrained copy. Columns: layer, unit, hypothesis, score_a, score_b, delta (score_b - score_a),
-- dataset, measure; rows by |delta| (largest first), then layer, unit, hypothesis, dataset,
-- measure. measure_name := NULL compares every measure, each on its own (the `measure` column),
-- as in top_units.
--
-- Only scores computed over the same records are paired, so that a delta is the models'
-- difference and not a mix of it with a difference of data. A score's records are those of its
-- query (queries, joined on query_id; scores without a queries row are left out), and two
-- queries count as having read the same records when they agree on all of:
--   dataset                 the dataset;
--   n_records, n_symbols    the records read and their symbols (a max_records, record_ids or
--                           early-stopped query reads fewer than a full scan);
--   params->>'record_count' the records selected (a scan that stopped early read the first
--                           n_records of them);
--   params->>'seed'         only when the scan stopped early (n_records < record_count): the
--                           seeded order whose first records it read.
-- (The queries table keeps counts, not record ids: two record_ids lists of one size and one
-- symbol count cannot be told apart.) Per model and record set the score is the latest non-NULL
-- one (highest query_id; NULL when all are NULL). A NaN score counts as NULL, as in top_units: a
-- NaN delta would sort above every number, and a later NaN would hide an earlier score. A unit
-- gets one row per dataset: from the record set both models were scored on most recently (the
-- largest min(latest query of a, latest query of b)); a unit whose two models were never scored
-- over the same records of a dataset gets no row for it, however many queries scored each on
-- part of it. Two models scored in one query (baseline := true, checkpoints inspected together)
-- share one queries row and are paired: a
-- progressive query stops them at one window, so they read the same records (where an engine
-- could not, queries.params->'per_model' lists each model's records_used).
-- ds := NULL compares on every dataset (one row per dataset); ds := 'code' on that dataset only.
--
-- Errors, not an empty result that reads as "no unit changed": model_a or model_b NULL or with no
-- unit scores (a typo; the error lists the models that have some), a measure_name that is not
-- among the measures of either model's unit scores (the error lists that model's), and a ds that
-- is no dataset of the store (neither in `datasets` nor scored by a query); model_a, model_b, ds and
-- measure_name are compared as text (an INTEGER 5 is '5', named in the error, not a conversion
-- error about a column), and a list, struct or map for any of them is refused as no name
-- (['planted'] is not the unknown model '[planted]'). Two models that have
-- unit scores of the measure but share no record set of a dataset still give no row for it.
CREATE OR REPLACE MACRO compare_scores(model_a, model_b, measure_name := 'corr', ds := NULL) AS TABLE
WITH record_sets AS (   -- per query: its dataset and what identifies the records it read
    SELECT query_id, dataset, n_records, n_symbols, n_selected,
           CASE WHEN n_records < n_selected THEN seed END AS order_seed
    FROM (SELECT query_id, dataset, n_records, n_symbols,
                 TRY_CAST(json_extract_string(params, '$.record_count') AS BIGINT) AS n_selected,
                 coalesce(TRY_CAST(json_extract_string(params, '$.seed') AS BIGINT), 0) AS seed
          FROM queries
          WHERE ds IS NULL OR dataset = CAST(ds AS VARCHAR))
), latest AS (          -- per model, record set and unit: the latest non-NULL score
    SELECT s.model, r.dataset, r.n_records, r.n_symbols, r.n_selected, r.order_seed,
           s.layer, s.unit, s.hypothesis, s.measure,
           arg_max(CASE WHEN NOT isnan(s.score) THEN s.score END, s.query_id) AS score,   -- NaN: NULL
           max(s.query_id) AS last_query
    FROM scores AS s
    JOIN record_sets AS r ON r.query_id = s.query_id
    WHERE (measure_name IS NULL OR s.measure = CAST(measure_name AS VARCHAR)) AND s.unit IS NOT NULL
      AND s.model IN (CAST(model_a AS VARCHAR), CAST(model_b AS VARCHAR))
    GROUP BY ALL
), pairs AS (           -- per unit and dataset: the record set both models were scored on last
    SELECT a.layer, a.unit, a.hypothesis, a.score AS score_a, b.score AS score_b, a.dataset, a.measure
    FROM latest AS a JOIN latest AS b
      ON a.dataset = b.dataset AND a.layer = b.layer AND a.unit = b.unit AND a.hypothesis = b.hypothesis
     AND a.measure = b.measure
     AND a.n_records IS NOT DISTINCT FROM b.n_records AND a.n_symbols IS NOT DISTINCT FROM b.n_symbols
     AND a.n_selected IS NOT DISTINCT FROM b.n_selected AND a.order_seed IS NOT DISTINCT FROM b.order_seed
    WHERE a.model = CAST(model_a AS VARCHAR) AND b.model = CAST(model_b AS VARCHAR)
    QUALIFY row_number() OVER (PARTITION BY a.dataset, a.layer, a.unit, a.hypothesis, a.measure
                               ORDER BY least(a.last_query, b.last_query) DESC,
                                        greatest(a.last_query, b.last_query) DESC) = 1
), checks AS (          -- msg NULL when the arguments are good, else the error (the first that applies)
    SELECT CASE WHEN arg_nested(model_a) OR arg_nested(model_b) OR arg_nested(measure_name) OR arg_nested(ds)
                THEN 'compare_scores: '
                     || CASE WHEN arg_nested(model_a) THEN 'model_a must name a model (text), got '
                                  || arg_literal(model_a) || ' of type ' || typeof(model_a)
                             WHEN arg_nested(model_b) THEN 'model_b must name a model (text), got '
                                  || arg_literal(model_b) || ' of type ' || typeof(model_b)
                             WHEN arg_nested(measure_name)
                             THEN 'measure_name must name one measure (text), or be NULL (every measure), got '
                                  || arg_literal(measure_name) || ' of type ' || typeof(measure_name)
                             ELSE 'ds must name one dataset (text), or be NULL (every dataset), got '
                                  || arg_literal(ds) || ' of type ' || typeof(ds) END
                WHEN model_a IS NULL OR model_b IS NULL OR NOT has_a OR NOT has_b
                THEN 'compare_scores: '
                     || CASE WHEN model_a IS NULL THEN 'model_a must name a model with unit scores, got NULL'
                             WHEN model_b IS NULL THEN 'model_b must name a model with unit scores, got NULL'
                             WHEN NOT has_a THEN 'model_a ''' || CAST(model_a AS VARCHAR) || ''' has no unit scores'
                             ELSE 'model_b ''' || CAST(model_b AS VARCHAR) || ''' has no unit scores' END
                     || '; models with unit scores: '
                     || coalesce((SELECT string_agg('''' || m || '''', ', ' ORDER BY m)
                                  FROM (SELECT DISTINCT model AS m FROM scores WHERE unit IS NOT NULL)), 'none')
                WHEN measure_name IS NOT NULL AND NOT (a_has_measure AND b_has_measure)
                THEN 'compare_scores: measure_name ''' || CAST(measure_name AS VARCHAR) || ''' has no unit scores of '
                     || CASE WHEN NOT a_has_measure THEN 'model_a ''' || CAST(model_a AS VARCHAR)
                             ELSE 'model_b ''' || CAST(model_b AS VARCHAR) END
                     || '''; its measures: '
                     || (SELECT string_agg('''' || m || '''', ', ' ORDER BY m)
                         FROM (SELECT DISTINCT measure AS m FROM scores
                               WHERE unit IS NOT NULL
                                 AND model = CAST(CASE WHEN NOT a_has_measure THEN model_a ELSE model_b END
                                                  AS VARCHAR)))
                     || ' (measure_name := NULL compares every measure)'
                WHEN ds IS NOT NULL AND NOT EXISTS (SELECT 1 FROM datasets WHERE name = CAST(ds AS VARCHAR))
                                    AND NOT EXISTS (SELECT 1 FROM queries WHERE dataset = CAST(ds AS VARCHAR))
                THEN 'compare_scores: ds ''' || CAST(ds AS VARCHAR) || ''' is not a dataset of this store; ds must be '
                     || 'NULL (every dataset) or one of: '
                     || coalesce((SELECT string_agg('''' || d || '''', ', ' ORDER BY d)
                                  FROM (SELECT name AS d FROM datasets
                                        UNION SELECT dataset FROM queries WHERE dataset IS NOT NULL)), 'none') END AS msg
    FROM (SELECT coalesce(bool_or(model = CAST(model_a AS VARCHAR)), false) AS has_a,
                 coalesce(bool_or(model = CAST(model_b AS VARCHAR)), false) AS has_b,
                 coalesce(bool_or(model = CAST(model_a AS VARCHAR) AND measure = CAST(measure_name AS VARCHAR)),
                          false) AS a_has_measure,
                 coalesce(bool_or(model = CAST(model_b AS VARCHAR) AND measure = CAST(measure_name AS VARCHAR)),
                          false) AS b_has_measure
          FROM scores WHERE unit IS NOT NULL)
)
SELECT layer, unit, hypothesis, score_a, score_b, delta, dataset, measure
FROM (SELECT layer, unit, hypothesis, score_a, score_b, score_b - score_a AS delta, dataset, measure FROM pairs
      UNION ALL   -- the guard: a row only for a bad argument, and it raises the error
      SELECT CAST(error(msg) AS VARCHAR), NULL, NULL, NULL, NULL, NULL, NULL, NULL
      FROM checks
      WHERE msg IS NOT NULL AND CAST(error(msg) AS BOOLEAN))
ORDER BY abs(delta) DESC NULLS LAST, layer, unit, hypothesis, dataset, measure;
