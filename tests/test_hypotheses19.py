"""Hunt 19 of hypotheses: the settings a label is computed with (an image grid's size and coverage)
kept over a change under a version given by hand."""
from __future__ import annotations

import json

import numpy as np
import pytest

import deepbase_duck as dbd
from deepbase_duck.corpora import scenes
from deepbase_duck.errors import HypothesisError
from deepbase_duck.hypotheses import register
from deepbase_duck.hypotheses.grid import GridHypothesis

MASK = np.zeros((16, 16))
MASK[:, :5] = 1                  # the left 5 of 16 columns


def _grid_labels(grid: int, coverage: float) -> list[tuple[int, int]]:
    """Independent reference: (record-free) cell spans of MASK on a grid x grid grid, cells of
    16 / grid pixels a side, a cell in the concept where its covered fraction reaches coverage."""
    side = 16 // grid
    cov = MASK.reshape(grid, side, grid, side).mean((1, 3)).reshape(-1)
    return [(int(i), int(i) + 1) for i in np.flatnonzero(cov >= coverage)]


def _stored(con) -> dict[int, list[tuple[int, int]]]:
    out: dict[int, list] = {}
    for r, s, e in con.sql("SELECT record_id, start_char, end_char FROM labels WHERE hypothesis = 'left19' "
                           "ORDER BY ALL").fetchall():
        out.setdefault(r, []).append((s, e))
    # adjacent cells are one span: split into cells to compare with the reference
    return {r: [(c, c + 1) for s, e in spans for c in range(s, e)] for r, spans in out.items()}


def _left(grid, coverage, version):
    return register(GridHypothesis("left19", lambda t: MASK, "binary", grid=grid, coverage=coverage,
                                   version=version))


@pytest.fixture
def scenes_con(con):
    dbd.add_dataset(con, "sc19", scenes.scene_records(3, seed=2, size=16))
    return con


def test_grid_settings_changed_under_a_hand_given_version_are_refused(scenes_con):
    """A GridHypothesis given ``version="1"`` and then another grid or coverage under that version
    reused the labels of the old grid: cells of a 4x4 grid read as the first cells of a 2x2 one
    (``_check_stored_meaning`` compared kind and categories only). The settings the labels were
    computed with are now recorded with the catalog row, and a change under the same version is
    refused by name."""
    con = scenes_con
    _left(4, 0.5, "1")
    dbd.annotate(con, "left19", "sc19")
    first = _stored(con)
    assert first == {r: _grid_labels(4, 0.5) for r in range(3)}            # column 0 only
    _left(4, 0.25, "1")                                                     # column 1 (1/4 covered) joins
    with pytest.raises(HypothesisError, match=r"hypothesis 'left19'.*version '1'.*'grid=4\|coverage=0\.5'.*"
                                              r"'grid=4\|coverage=0\.25'.*version=\.\.\."):
        dbd.annotate(con, "left19", "sc19")
    _left(2, 0.5, "1")
    with pytest.raises(HypothesisError, match=r"'grid=4\|coverage=0\.5'.*'grid=2\|coverage=0\.5'"):
        dbd.annotate(con, "left19", "sc19")
    assert _stored(con) == first                                            # nothing was stored meanwhile
    # a new version computes the new grid's labels, and records its settings in turn
    _left(2, 0.5, "2")
    out = dbd.annotate(con, "left19", "sc19")
    assert [(o["labeled"], o["reused"]) for o in out] == [(3, 0)]
    assert _stored(con) == {r: _grid_labels(2, 0.5) for r in range(3)}      # cells 0 and 2 (5/8 covered)
    assert _grid_labels(2, 0.5) != _grid_labels(4, 0.5)
    _left(4, 0.5, "2")
    with pytest.raises(HypothesisError, match=r"version '2'.*'grid=2\|coverage=0\.5'.*'grid=4\|coverage=0\.5'"):
        dbd.annotate(con, "left19", "sc19")
    # the same settings again under the same version reuse the labels
    _left(2, 0.5, "2")
    assert [(o["labeled"], o["reused"]) for o in dbd.annotate(con, "left19", "sc19")] == [(0, 3)]


def test_settings_of_a_store_written_before_they_were_recorded_are_unknown(scenes_con):
    """A store written before the settings were recorded holds labels whose settings are not
    known: they are used as before (no refusal) and not recorded as the current ones, which
    they may not be."""
    con = scenes_con
    _left(4, 0.5, "1")
    dbd.annotate(con, "left19", "sc19")
    key = "hypothesis_settings left19"
    assert json.loads(con.sql(f"SELECT value FROM dbd_meta WHERE key = '{key}'").fetchall()[0][0]) == \
        {"version": "1", "settings": "grid=4|coverage=0.5"}
    con.execute(f"DELETE FROM dbd_meta WHERE key = '{key}'")                 # as a store written before
    _left(4, 0.25, "1")
    assert [(o["labeled"], o["reused"]) for o in dbd.annotate(con, "left19", "sc19")] == [(0, 3)]
    assert con.sql(f"SELECT count(*) FROM dbd_meta WHERE key = '{key}'").fetchall()[0][0] == 0


def test_a_coverage_given_as_an_integer_is_the_same_setting(scenes_con):
    """coverage=1 and coverage=1.0 label alike, but their settings read 'coverage=1' and
    'coverage=1.0': a different version for the same labels, and a refusal where the version is
    given by hand. The coverage is kept as a float."""
    import fractions
    con = scenes_con
    assert _left(4, 1, "1").version_settings() == _left(4, 1.0, "1").version_settings() == \
        _left(4, np.float32(1), "1").version_settings() == "grid=4|coverage=1.0"
    assert _left(4, fractions.Fraction(1, 4), "1").coverage == 0.25
    _left(4, 1, "1")
    dbd.annotate(con, "left19", "sc19")
    _left(4, 1.0, "1")
    assert [(o["labeled"], o["reused"]) for o in dbd.annotate(con, "left19", "sc19")] == [(0, 3)]
    assert _stored(con) == {r: _grid_labels(4, 1.0) for r in range(3)}


def test_drop_hypothesis_drops_the_recorded_settings(con):
    """drop_hypothesis deletes what the store holds only for the hypothesis: the settings
    recorded with its catalog row go with the row."""
    dbd.add_dataset(con, "d19", ["ab12", "x9z"])
    dbd.define_hypothesis(con, "digits19", "[0-9]+")
    dbd.annotate(con, "digits19", "d19")
    key = "hypothesis_settings digits19"
    version = con.sql("SELECT version FROM hypotheses WHERE name = 'digits19'").fetchall()[0][0]
    assert json.loads(con.sql(f"SELECT value FROM dbd_meta WHERE key = '{key}'").fetchall()[0][0]) == \
        {"version": version, "settings": ""}
    from deepbase_duck.hypotheses.regex import drop_hypothesis
    drop_hypothesis(con, "digits19")
    assert con.sql(f"SELECT count(*) FROM dbd_meta WHERE key = '{key}'").fetchall()[0][0] == 0
    assert con.sql("SELECT count(*) FROM hypotheses WHERE name = 'digits19'").fetchall()[0][0] == 0
