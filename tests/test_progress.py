"""Progress bars: the SQL surface shows the same bars as the Python API (a store connected with
progress, stderr a terminal or DEEPBASE_DUCK_PROGRESS=1), and a query's scoring (probe fits,
row-sample intervals) has its own bar after the scan's; progress=False keeps both silent."""
import pytest

import deepbase_duck as dbd
from conftest import TEXTS, planted_adapter


def store(progress: bool):
    con = dbd.connect(None, progress=progress)
    dbd.register_model(con, "planted", planted_adapter())
    dbd.add_dataset(con, "snippets", TEXTS)
    return con


@pytest.mark.parametrize("how", ["sql", "python"])
def test_bars_from_sql_and_python(monkeypatch, capfd, how):
    monkeypatch.setenv("DEEPBASE_DUCK_PROGRESS", "1")
    con = store(progress=True)
    try:
        capfd.readouterr()
        if how == "sql":
            con.sql("SELECT count(*) FROM annotate(['digit'], 'snippets')").fetchall()
            con.sql("SELECT count(*) FROM inspect('planted', ['planted'], ['digit'], 'snippets', "
                    "measures := ['corr', 'probe'])").fetchall()
        else:
            dbd.annotate(con, ["digit"], "snippets")
            dbd.inspect(con, "planted", ["planted"], ["digit"], "snippets", measures=["corr", "probe"])
        err = capfd.readouterr().err
        assert "labels snippets" in err and "inspect planted" in err and "score corr, probe" in err
        assert "0/2 [" in err                                  # one per (layer, measure) state
    finally:
        dbd.close(con)


def test_no_bars_without_progress(monkeypatch, capfd):
    monkeypatch.setenv("DEEPBASE_DUCK_PROGRESS", "1")
    con = store(progress=False)
    try:
        capfd.readouterr()
        con.sql("SELECT count(*) FROM inspect('planted', ['planted'], ['digit'], 'snippets', "
                "measures := ['corr', 'probe'])").fetchall()
        assert capfd.readouterr().err == ""
    finally:
        dbd.close(con)


def test_the_scan_bar_counts_records_in_whole_numbers(monkeypatch):
    """The scan's bar was updated by a float (records x layers held / layers), so tqdm showed
    '14.0/24 [' where it means 14 of 24 records. Every update is recorded here (tqdm's own
    display is throttled): whole numbers, adding up to the records scanned."""
    import deepbase_duck.engine.inspect  # noqa: F401  (the module, not the package's function)
    import sys
    engine = sys.modules["deepbase_duck.engine.inspect"]
    made = []

    class Recorder:
        def __init__(self, total, desc, *a, **k):
            self.total, self.desc, self.steps = total, desc, []
            made.append(self)

        def update(self, n=1):
            self.steps.append(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def close(self):
            pass

        def __getattr__(self, name):          # set_postfix_str, refresh, ...
            return lambda *a, **k: None

    monkeypatch.setattr(engine, "progress_bar", Recorder)
    con = store(progress=True)
    try:
        dbd.inspect(con, "planted", ["planted", "mix"], ["digit"], "snippets", batch_size=2)
    finally:
        dbd.close(con)
    (scan,) = [b for b in made if b.desc.startswith("inspect planted")]
    assert scan.steps and all(isinstance(n, int) for n in scan.steps), scan.steps
    assert sum(scan.steps) == scan.total
