-- Reading results: pure-SQL views of the scores table (they run in the DuckDB CLI too).

-- top_units(k := 5, qid := NULL, measure_name := 'corr', by_layer := false): the k units with the
-- largest |score| per (model, hypothesis) of one query (NULL: the latest query), unit-level scores
-- only, with the unit's layer width from the catalog. One row per (model, hypothesis, rank).
-- by_layer := true ranks per (model, layer, hypothesis) instead: the sets a `top_k` query stops on.
-- measure_name := NULL ranks every measure of the query, each on its own (the `measure` column).
-- separated: true when the unit's interval for |score| lies wholly above the interval of every
-- unit ranked outside the top k, so that no outsider can overtake it at the query's confidence
-- (its place in the top k is settled by the data); false when some outsider's interval reaches
-- it; NULL when the unit or an outsider has no interval. Units whose scores are nearly tied at
-- the k-th place are not separated however many records are read.
CREATE OR REPLACE MACRO top_units(k := 5, qid := NULL, measure_name := 'corr', by_layer := false) AS TABLE
WITH picked AS (
    SELECT s.model, s.hypothesis, s.layer, s.unit, s.score, s.ci_low, s.ci_high, s.q_value, s.n, s.measure,
           CASE WHEN by_layer THEN s.layer END AS part,
           -- the interval of |score|: from 0 where the score's interval holds 0
           CASE WHEN s.ci_low IS NULL OR s.ci_high IS NULL OR isnan(s.ci_low) OR isnan(s.ci_high) THEN NULL
                WHEN s.ci_low > 0 THEN s.ci_low
                WHEN s.ci_high < 0 THEN -s.ci_high
                ELSE 0 END AS abs_low,
           CASE WHEN s.ci_low IS NULL OR s.ci_high IS NULL OR isnan(s.ci_low) OR isnan(s.ci_high) THEN NULL
                ELSE greatest(abs(s.ci_low), abs(s.ci_high)) END AS abs_high
    FROM scores AS s
    WHERE s.query_id = coalesce(qid, (SELECT max(query_id) FROM scores))
      AND (measure_name IS NULL OR s.measure = measure_name)
      AND s.unit IS NOT NULL AND s.score IS NOT NULL
),
ranked AS (
    SELECT *, row_number() OVER (PARTITION BY model, measure, hypothesis, part
                                 ORDER BY abs(score) DESC, layer, unit) AS rank
    FROM picked
),
outside AS (   -- per ranked set, the highest |score| an outsider's interval reaches
    SELECT model, measure, hypothesis, part, max(abs_high) AS high, bool_or(abs_high IS NULL) AS unbounded
    FROM ranked WHERE rank > k
    GROUP BY ALL
)
SELECT r.model, r.hypothesis, r.rank, r.layer, r.unit, r.score, r.ci_low, r.ci_high, r.q_value, r.n, l.width,
       CASE WHEN r.abs_low IS NULL OR o.unbounded THEN NULL
            WHEN o.high IS NULL THEN true               -- every unit of the set is in the top k
            ELSE r.abs_low > o.high END AS separated,
       r.measure
FROM ranked AS r
LEFT JOIN outside AS o
  ON o.model = r.model AND o.measure = r.measure AND o.hypothesis = r.hypothesis
 AND o.part IS NOT DISTINCT FROM r.part
LEFT JOIN layers AS l ON l.model = r.model AND l.layer = r.layer
WHERE r.rank <= k
ORDER BY r.model, r.measure, r.hypothesis, r.part, r.rank;

-- compare_scores(model_a, model_b, measure_name := 'corr', ds := NULL): for every (layer, unit,
-- hypothesis) scored for both models on the same dataset, the two scores and their difference:
-- how a unit's affinity changed between two checkpoints, or between a model and its untrained
-- copy. Each model's score is its latest non-NULL one (highest query_id; NULL when all are NULL)
-- per (dataset, layer, unit, hypothesis), the dataset being that of the score's query
-- (queries.dataset, joined on query_id; scores without a queries row are left out), so a score is
-- only ever paired with a score of the same dataset: a later query on another dataset does not
-- replace it. ds := NULL compares on every dataset both models were scored on (one row per
-- dataset); ds := 'code' on that dataset only. Columns: layer, unit, hypothesis, score_a,
-- score_b, delta (score_b - score_a), dataset; rows by |delta| (largest first), then layer, unit,
-- hypothesis, dataset.
CREATE OR REPLACE MACRO compare_scores(model_a, model_b, measure_name := 'corr', ds := NULL) AS TABLE
WITH latest AS (
    SELECT s.model, q.dataset, s.layer, s.unit, s.hypothesis, arg_max(s.score, s.query_id) AS score
    FROM scores AS s
    JOIN queries AS q ON q.query_id = s.query_id
    WHERE s.measure = measure_name AND s.unit IS NOT NULL AND s.model IN (model_a, model_b)
      AND (ds IS NULL OR q.dataset = ds)
    GROUP BY ALL
)
SELECT a.layer, a.unit, a.hypothesis, a.score AS score_a, b.score AS score_b,
       b.score - a.score AS delta, a.dataset
FROM latest AS a JOIN latest AS b
  ON a.dataset = b.dataset AND a.layer = b.layer AND a.unit = b.unit AND a.hypothesis = b.hypothesis
WHERE a.model = model_a AND b.model = model_b
ORDER BY abs(b.score - a.score) DESC NULLS LAST, a.layer, a.unit, a.hypothesis, a.dataset;
