-- Reading results: pure-SQL views of the scores table (they run in the DuckDB CLI too).

-- top_units(k := 5, qid := NULL, measure_name := 'corr'): the k units with the largest |score|
-- per (model, hypothesis) of one query (NULL: the latest query), unit-level scores only, with
-- the unit's layer width from the catalog. One row per (model, hypothesis, rank).
CREATE OR REPLACE MACRO top_units(k := 5, qid := NULL, measure_name := 'corr') AS TABLE
SELECT s.model, s.hypothesis,
       row_number() OVER (PARTITION BY s.model, s.hypothesis ORDER BY abs(s.score) DESC, s.layer, s.unit) AS rank,
       s.layer, s.unit, s.score, s.ci_low, s.ci_high, s.q_value, s.n, l.width
FROM scores AS s
LEFT JOIN layers AS l ON l.model = s.model AND l.layer = s.layer
WHERE s.query_id = coalesce(qid, (SELECT max(query_id) FROM scores))
  AND s.measure = measure_name AND s.unit IS NOT NULL AND s.score IS NOT NULL
QUALIFY rank <= k
ORDER BY s.model, s.hypothesis, rank;

-- compare_scores(model_a, model_b, measure_name := 'corr'): for every (layer, unit, hypothesis)
-- scored for both models (their latest scores), the two scores and their difference: how a
-- unit's affinity changed between two checkpoints, or between a model and its untrained copy.
CREATE OR REPLACE MACRO compare_scores(model_a, model_b, measure_name := 'corr') AS TABLE
WITH latest AS (
    SELECT model, layer, unit, hypothesis, arg_max(score, query_id) AS score
    FROM scores
    WHERE measure = measure_name AND unit IS NOT NULL AND model IN (model_a, model_b)
    GROUP BY ALL
)
SELECT a.layer, a.unit, a.hypothesis, a.score AS score_a, b.score AS score_b,
       b.score - a.score AS delta
FROM latest AS a JOIN latest AS b
  ON a.layer = b.layer AND a.unit = b.unit AND a.hypothesis = b.hypothesis
WHERE a.model = model_a AND b.model = model_b
ORDER BY abs(b.score - a.score) DESC NULLS LAST, a.layer, a.unit, a.hypothesis;
