-- deepbase_duck catalog: the tables every store holds.
--
-- Reading order: models and their layers; datasets, their records and each model
-- tokenisation's symbols (a symbol = one input position of a model, with the character span
-- of the record it covers); hypotheses and their labels over character spans; behaviors
-- (stored activations, one Parquet-backed view per model x layer x dataset x tokenisation x
-- dtype); queries and the scores they produced.
--
-- Pure SQL: this file runs in the DuckDB CLI too.

CREATE TABLE IF NOT EXISTS dbd_meta (key VARCHAR PRIMARY KEY, value VARCHAR);

CREATE TABLE IF NOT EXISTS models (
    name          VARCHAR PRIMARY KEY,
    loader        VARCHAR,            -- 'package.module:function' that rebuilds the adapter, or NULL (live only)
    params        VARCHAR,            -- JSON keyword arguments for the loader
    checksum      VARCHAR NOT NULL,   -- the model's identity: sha256 over its weights, module classes, plain settings and variant
    tokenization  VARCHAR NOT NULL,   -- id of the encoder's tokenisation (symbols depend on it)
    architecture  VARCHAR,            -- class name of the torch module
    n_params      BIGINT,
    registered_at TIMESTAMP DEFAULT current_timestamp,
    window_split  INTEGER,            -- forward batches per progressive-scan window (NULL: 1)
    identity      INTEGER             -- 3: checksum as above; 2: without the settings; NULL: over the weights alone
);

CREATE TABLE IF NOT EXISTS layers (
    model        VARCHAR,
    layer        VARCHAR,   -- dotted PyTorch module path, as model.named_modules() names it
    module_type  VARCHAR,
    width        INTEGER,   -- units per symbol in the module's output; NULL when it yields no tensor
    PRIMARY KEY (model, layer)
);

CREATE TABLE IF NOT EXISTS datasets (
    name        VARCHAR PRIMARY KEY,
    description VARCHAR,
    created_at  TIMESTAMP DEFAULT current_timestamp
);

CREATE TABLE IF NOT EXISTS records (
    dataset   VARCHAR,
    record_id INTEGER,
    source    VARCHAR,   -- where the text came from (file, sentence id, ...)
    text      VARCHAR NOT NULL,
    PRIMARY KEY (dataset, record_id)
);

-- One row per model input position that carries a record's characters [start_char, end_char).
CREATE TABLE IF NOT EXISTS symbols (
    dataset      VARCHAR,
    tokenization VARCHAR,
    record_id    INTEGER,
    pos          INTEGER,   -- 0-based index of the symbol in the record; activations use the same pos
    start_char   INTEGER,
    end_char     INTEGER,
    token        VARCHAR
);

CREATE TABLE IF NOT EXISTS tokenized_records (
    dataset      VARCHAR,
    tokenization VARCHAR,
    record_id    INTEGER,
    n_symbols    INTEGER,
    PRIMARY KEY (dataset, tokenization, record_id)
);

CREATE TABLE IF NOT EXISTS hypotheses (
    name        VARCHAR PRIMARY KEY,
    kind        VARCHAR NOT NULL CHECK (kind IN ('binary', 'categorical', 'continuous')),
    description VARCHAR,
    version     VARCHAR NOT NULL,
    categories  VARCHAR[],   -- categorical only: label code i means categories[i + 1]
    source      VARCHAR      -- the Python function that computes it
);

-- Hypotheses defined by a regular expression (define_hypothesis): stored with the store, so that
-- every process opening it (a second script, `deepbase-duck shell`) computes their labels without
-- any Python definition. version follows (kind, pattern, flags), as the labels do.
CREATE TABLE IF NOT EXISTS hypothesis_definitions (
    name        VARCHAR PRIMARY KEY,
    kind        VARCHAR NOT NULL CHECK (kind IN ('binary', 'categorical')),
    pattern     VARCHAR NOT NULL,   -- Python `re` syntax
    flags       VARCHAR NOT NULL,   -- letters of a (ASCII), i, m, s, x; '' for none
    categories  VARCHAR[],          -- categorical only: the pattern's named groups, in order
    description VARCHAR,
    version     VARCHAR NOT NULL,
    defined_at  TIMESTAMP DEFAULT current_timestamp
);

-- Labels over character spans [start_char, end_char) of a record. Spans of one hypothesis never
-- overlap within a record. Characters outside every span take the hypothesis' default:
-- 0 for binary hypotheses, NULL (no label) otherwise. Categorical values are category codes.
CREATE TABLE IF NOT EXISTS labels (
    hypothesis VARCHAR,
    version    VARCHAR,
    dataset    VARCHAR,
    record_id  INTEGER,
    start_char INTEGER,
    end_char   INTEGER,
    value      DOUBLE
);

CREATE TABLE IF NOT EXISTS labeled_records (
    hypothesis VARCHAR,
    version    VARCHAR,
    dataset    VARCHAR,
    record_id  INTEGER,
    n_spans    INTEGER,
    PRIMARY KEY (hypothesis, version, dataset, record_id)
);

-- Stored activations ("behaviors"): Parquet parts with columns (record_id, pos, act), read
-- through the view named in view_name as (record_id, pos, act FLOAT[width]).
CREATE TABLE IF NOT EXISTS behaviors (
    behavior_id    INTEGER PRIMARY KEY,
    model          VARCHAR NOT NULL,
    model_checksum VARCHAR NOT NULL,
    layer          VARCHAR NOT NULL,
    dataset        VARCHAR NOT NULL,
    tokenization   VARCHAR NOT NULL,
    dtype          VARCHAR NOT NULL CHECK (dtype IN ('float32', 'float16')),
    width          INTEGER NOT NULL,
    directory      VARCHAR NOT NULL,   -- relative to the store's activation folder
    view_name      VARCHAR NOT NULL
);

CREATE TABLE IF NOT EXISTS behavior_parts (
    behavior_id INTEGER,
    part        INTEGER,
    file        VARCHAR,
    n_rows      BIGINT,
    PRIMARY KEY (behavior_id, part)
);

CREATE TABLE IF NOT EXISTS behavior_records (
    behavior_id INTEGER,
    record_id   INTEGER,
    part        INTEGER,
    PRIMARY KEY (behavior_id, record_id)
);

CREATE TABLE IF NOT EXISTS queries (
    query_id    INTEGER PRIMARY KEY,
    model       VARCHAR,
    dataset     VARCHAR,
    layers      VARCHAR[],
    hypotheses  VARCHAR[],
    measures    VARCHAR[],
    params      VARCHAR,    -- JSON of the remaining arguments
    n_records   BIGINT,
    n_symbols   BIGINT,
    source      VARCHAR,    -- 'model' (forward passes ran) or 'stored' (stored behaviors were read)
    started_at  TIMESTAMP,
    seconds     DOUBLE
);

-- One row per (query, model, layer, unit, hypothesis, measure). unit is NULL for scores of a
-- whole unit group (probes, CKA). q_value: Benjamini-Hochberg adjusted p-value over the query's
-- family of tests of the same measure (every model, layer, unit and hypothesis of the query).
-- detail holds the measure's own columns as JSON (a threshold,
-- the bins, the train/test sizes...): detail->>'threshold'.
CREATE TABLE IF NOT EXISTS scores (
    query_id   INTEGER,
    model      VARCHAR,
    layer      VARCHAR,
    unit       INTEGER,
    hypothesis VARCHAR,
    measure    VARCHAR,
    score      DOUBLE,
    n          BIGINT,
    ci_low     DOUBLE,
    ci_high    DOUBLE,
    p_value    DOUBLE,
    q_value    DOUBLE,
    detail     VARCHAR
);

-- Similarity of unit groups over the same symbols (linear CKA): one row per pair of
-- (model, layer) groups compared by a query of `compare_layers`.
CREATE TABLE IF NOT EXISTS similarities (
    query_id INTEGER,
    dataset  VARCHAR,
    model_a  VARCHAR,
    layer_a  VARCHAR,
    model_b  VARCHAR,
    layer_b  VARCHAR,
    measure  VARCHAR,
    score    DOUBLE,
    n        BIGINT
);
