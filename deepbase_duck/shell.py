"""``deepbase-duck shell``: an interactive SQL shell with deepbase_duck's Python UDFs live.

The DuckDB CLI cannot run Python UDFs (inspect, extract_activations, ...); this shell opens the
store through ``deepbase_duck.connect()`` so every macro works, and offers what the DuckDB CLI
users expect: readline history (~/.deepbase_duck_history), statements over several lines ending
with ';', aligned table output, and dot-commands:

    .tables [PATTERN]  tables and views of the store (those whose name matches a LIKE pattern)
    .schema [NAME]     CREATE statements (of one table or view, or all)
    .read FILE         run the statements of a SQL file
    .timer on|off      print each statement's wall time
    .help              this list
    .quit / .exit      leave

Modes: interactive (a terminal), ``-c 'SQL'`` (run and exit), a script file argument, or SQL on
standard input. Ctrl-C at the prompt drops the statement typed so far, as in the DuckDB CLI. In
the non-interactive modes the first error ends the shell with status 1, its line naming the
failed statement and where it starts ('Error: line 3 of q.sql (SELECT ...): ...'). A deepbase_duck
call refused for its input (a DeepBaseError: an unknown layer, a bad argument) is that line alone;
one that failed otherwise (a bug, in deepbase_duck or in a model's or hypothesis' own code) is
followed by its Python traceback (what ``SELECT last_error()`` shows at the prompt, which could not
run after it), as is every failed call with ``--traceback``. Output whose reader went away
(``| head``) ends it quietly, status 0.
The store must exist (a path with none is refused, status 2) unless ``--create`` is given.
``--read-only`` opens it without writing (a read-only file, or a store other read-only processes
hold): results can be read, and what would write is refused by name.
"""
from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import sys
import threading
import time
from pathlib import Path


HISTORY = Path(os.path.expanduser("~")) / ".deepbase_duck_history"
HELP = __doc__.split("dot-commands:\n\n", 1)[1].split("\n\nModes:", 1)[0]


class Shell:
    def __init__(self, con, out=None, err=None, tracebacks: bool = False):
        # the streams of the moment (not those of import time, which a caller may have replaced);
        # a closed one (`>&-`, `2>&-`: None in Python) discards what it is given, as print does
        # tracebacks (--traceback): outside the prompt, the traceback of a refused call too
        self.con, self.tracebacks = con, tracebacks
        self.out, self.err = out or sys.stdout or _Discard(), err or sys.stderr or _Discard()
        self.timer = False
        self.open = False            # a statement is under way: lines are buffered until it ends
        self.reading = []            # (resolved path, name as given) of the script and .read files under way
        self.nested = 0              # .read commands under way (the lines fed come from their files)
        self.running = None          # (line offset, text) of the statement of run_sql under way

    # -- statements --------------------------------------------------------------------------
    def run_sql(self, sql: str) -> None:
        """Run the statements of ``sql``, printing each result (and, with .timer on, each
        statement's own wall time, as the DuckDB CLI does: one total for 'SELECT 1; SELECT 2;'
        would not say which of them was slow)."""
        with _ctrl_c_stops_udfs():
            end = 0
            for text in split_statements(sql)[0]:
                at = sql.find(text, end)         # only white space lies between `end` and the statement
                end = at + len(text)
                self.running = (sql.count("\n", 0, at), text)
                t0 = time.perf_counter()
                rel = self.con.sql(text)
                if rel is not None:
                    self.out.write(_render(rel) + "\n")
                if self.timer:
                    self.out.write(f"Run Time: {time.perf_counter() - t0:.3f} s\n")

    def dot(self, line: str) -> bool:
        """Run a dot-command; False means quit. Its arguments are split as a POSIX shell splits
        words, so a file or table name with spaces is quoted: .read "my script.sql"."""
        try:
            parts = shlex.split(line)
        except ValueError:                       # a quote left open, or an apostrophe in a name (don't.sql):
            parts = line.split(None, 1)          # the rest of the line is one argument
        cmd, args = parts[0], parts[1:]
        if cmd in (".quit", ".exit"):
            return False
        if cmd == ".help":
            self.out.write(HELP + "\n")
        elif cmd == ".tables":
            # an argument is a LIKE pattern, as in the DuckDB CLI (ignoring it listed every table)
            if len(args) > 1:
                raise ValueError(f".tables takes at most one LIKE pattern (e.g. .tables 'behavior%'), got {len(args)}")
            rows = self.con.sql("SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' "
                                + ("AND table_name LIKE ? " if args else "") + "ORDER BY table_name",
                                params=args or None).fetchall()
            self.out.write("  ".join(r[0] for r in rows) + "\n")
        elif cmd == ".schema":
            where = "AND table_name = ?" if args else ""
            rows = self.con.sql(f"SELECT sql FROM duckdb_tables() WHERE schema_name = 'main' {where} "
                                f"UNION ALL SELECT sql FROM duckdb_views() WHERE NOT internal AND schema_name = 'main' "
                                f"{'AND view_name = ?' if args else ''}",
                                params=(args[:1] * 2) if args else None).fetchall()
            if args and not rows:
                raise ValueError(f"no table or view named {args[0]!r}")
            self.out.write("\n".join(r[0] for r in rows) + "\n")
        elif cmd == ".read":
            if len(args) != 1:
                raise ValueError(".read takes one file name" + (f", got {len(args)}: {args!r} (quote a name with "
                                                                 f"spaces: .read \"my script.sql\")" if args else ""))
            # a file that reads itself, directly or through others, is refused by name: it used to
            # recurse until Python's limit, then print hundreds of 'stopped at the error above'
            path = Path(args[0]).resolve()
            if path in [p for p, _ in self.reading]:
                chain = " -> ".join([name for _, name in self.reading] + [args[0]])
                raise ValueError(f".read {args[0]}: that file is being read already, so it would read itself "
                                 f"without end ({chain}); remove the .read that loops")
            text = read_script(args[0])
            self.reading.append((path, args[0]))
            self.nested += 1
            try:
                failed = self.feed(text.splitlines(), interactive=False, source=args[0])   # statements and dot-commands
            finally:
                self.reading.pop()
                self.nested -= 1
            if failed:
                raise _ReadStopped(f".read {args[0]}: stopped at the error above")
        elif cmd == ".timer":
            if not args or args[0] not in ("on", "off"):
                raise ValueError(".timer takes on or off")
            self.timer = args[0] == "on"
        else:
            raise ValueError(f"unknown command {cmd}; .help lists them")
        return True

    # -- loops -------------------------------------------------------------------------------
    def feed(self, lines, interactive: bool, source: str | None = None) -> int:
        """Run statements from an iterable of lines; returns the exit status. Lines are buffered
        until a ';' ends a statement and nothing but white space and comments follows it (see
        split_statements), as in the DuckDB CLI. ``source`` names where the lines come from (a
        script file, -c, standard input) in the error of a statement that fails outside the prompt,
        with the statement and its line: a script's error used to be the bare message, which did
        not say which of its statements failed."""
        buf, self.open, first = [], False, 1
        for number, line in enumerate(lines, 1):
            if line is CANCEL:                   # Ctrl-C at the prompt: the unfinished statement is dropped
                buf, self.open = [], False
                continue
            if not buf and line.strip().startswith("."):
                try:
                    if not self.dot(line.strip()):
                        return 0
                except BrokenPipeError:         # the output's reader went away (`| head`): not the command's error
                    raise
                except Exception as exc:
                    # a nested .read that stopped says so once, at the outermost .read
                    if not (isinstance(exc, _ReadStopped) and self.nested):
                        self.err.write(f"Error: {exc}\n")
                    if not interactive:
                        return 1
                except KeyboardInterrupt:       # Ctrl-C in a .read file's statement: the prompt stays
                    if not interactive:
                        raise
                    self.err.write("Error: interrupted\n")
                continue
            if not buf:
                first = number                   # the line the buffered statement starts on
            buf.append(line)
            if self.open and ";" not in line and "*/" not in line:
                continue                         # such a line cannot end what is under way: no rescan
            text = "\n".join(buf)
            statements, self.open = split_statements(text)
            if self.open:
                continue
            buf = []                             # ended, or nothing but comments so far
            if statements:
                before, self.running = self._last_traceback(), None
                try:
                    self.run_sql(text)
                except BrokenPipeError:         # `deepbase-duck shell ... | head`: the caller ends quietly
                    raise
                except Exception as exc:
                    if not interactive and self._interrupted(exc, before):
                        raise KeyboardInterrupt from None
                    self.error(exc, before, interactive, self._where(first, source))
                    if not interactive:
                        return 1
                except KeyboardInterrupt:       # a Ctrl-C that came while Python (not DuckDB) ran
                    if not interactive:
                        raise
                    self.err.write("Error: interrupted\n")
        self.open = False
        if buf:
            before, self.running = self._last_traceback(), None
            try:
                self.run_sql("\n".join(buf))
            except BrokenPipeError:
                raise
            except Exception as exc:
                if self._interrupted(exc, before):
                    raise KeyboardInterrupt from None
                self.error(exc, before, interactive=False, where=self._where(first, source))
                return 1
        return 0

    def _interrupted(self, exc: Exception, before) -> bool:
        """Whether a statement failed because Ctrl-C stopped it: DuckDB's 'Query interrupted', or a
        deepbase_duck UDF that Ctrl-C stopped (_ctrl_c_stops_udfs). Outside the prompt the shell
        then ends as the other commands do on Ctrl-C (status 130, one line): it reported an
        'Error: ... Query interrupted' and status 1, which a calling script took for a failed
        statement."""
        import duckdb
        if isinstance(exc, duckdb.InterruptException):
            return True
        tb = self._last_traceback()
        return tb is not None and tb is not before and tb.rstrip().endswith("KeyboardInterrupt")

    def _where(self, first: int, source: str | None) -> str:
        """The statement of run_sql that failed and its line, for an error outside the prompt:
        'line 3 of q.sql (SELECT * FROM scores WHERE ...)'. The statement's leading comment lines
        are not shown (its line is that of its code); a long one is cut."""
        if self.running is None:
            return f"line {first}" + (f" of {source}" if source else "")
        offset, text = self.running
        lines = text.split("\n")
        while len(lines) > 1 and (not lines[0].strip() or lines[0].lstrip().startswith("--")):
            lines.pop(0)
            offset += 1
        shown = " ".join(" ".join(lines).split())
        if len(shown) > 60:
            shown = shown[:57] + "..."
        return f"line {first + offset}" + (f" of {source}" if source else "") + f" ({shown})"

    def _last_traceback(self):
        """The newest traceback a deepbase_duck UDF of this connection kept (what last_error()
        shows), or None."""
        from .catalog import session_of
        try:
            kept = session_of(self.con).udf_tracebacks
        except Exception:
            return None
        return kept[-1] if kept else None

    def error(self, exc: Exception, before, interactive: bool, where: str | None = None) -> None:
        """Report a failed statement: its message on one line (outside the prompt, after
        ``where``: the statement and its line) and, when a deepbase_duck UDF failed in it, that
        UDF's Python traceback: in full in the non-interactive modes, which end here (so `SELECT
        last_error()` can never run after it), or as a pointer to last_error() at the prompt.
        A call refused for its input (only DeepBaseErrors in the traceback, see _input_error)
        is the one line alone outside the prompt (unless --traceback): its message says what
        is wrong, and a page of the library's frames after it read as a crash."""
        at = f"{where}: " if where and not interactive else ""
        self.err.write(f"Error: {at}{_one_line(exc)}\n")
        tb = self._last_traceback()
        if tb is None or tb is before or tb.rstrip().endswith("KeyboardInterrupt"):   # Ctrl-C: no bug to show
            return
        if not interactive and not self.tracebacks and _input_error(tb):
            return
        if interactive:
            self.err.write("(SELECT last_error(); shows the Python traceback of the failed deepbase_duck call)\n")
        else:
            self.err.write("Python traceback of the failed deepbase_duck call (as SELECT last_error() shows it):\n"
                           + tb.rstrip("\n") + "\n")

    def interactive(self) -> int:
        try:
            import readline
            try:
                readline.read_history_file(HISTORY)
            except OSError:
                pass
        except ImportError:  # pragma: no cover - platforms without readline
            readline = None
        self.out.write("deepbase_duck shell: SQL ending with ';', .help for commands, .quit to leave\n")

        def lines():
            prompt = "D "
            while True:
                try:
                    line = input(prompt)
                except EOFError:
                    self.out.write("\n")
                    return
                except KeyboardInterrupt:         # as in the DuckDB CLI: the lines typed so far are dropped
                    self.out.write("^C\n")
                    prompt = "D "
                    yield CANCEL
                    continue
                yield line
                prompt = "· " if self.open else "D "

        try:
            return self.feed(lines(), interactive=True)
        finally:
            if readline is not None:
                try:
                    readline.write_history_file(HISTORY)
                except OSError:
                    pass


CANCEL = object()   # fed as a line: drop the statement typed so far (Ctrl-C at the prompt)


class _ReadStopped(ValueError):
    """A .read whose file stopped at an error, which is printed above it. A .read inside a read
    file that stops is not reported at each level: only the outermost .read says it stopped."""


class _Discard:
    """A stream for one the process does not have (stdout or stderr closed): writes go nowhere."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


@contextlib.contextmanager
def _ctrl_c_stops_udfs():
    """While statements run: Ctrl-C also stops the deepbase_duck UDFs (inspect, extract_activations,
    ...) running on DuckDB's worker threads, which it never reached before (DuckDB waited for the
    UDF: a scan ran to its end and stored its scores, then the statement said 'Query interrupted').
    Only where Ctrl-C raises KeyboardInterrupt (not ignored, as in a background job), and from
    the main thread, the only one that may set a signal handler."""
    from .surface.udfs import chained_ctrl_c
    previous = signal.getsignal(signal.SIGINT)
    if (threading.current_thread() is not threading.main_thread() or not callable(previous)
            or previous is chained_ctrl_c()):     # dbd.connect chained it already: one interrupt per Ctrl-C
        yield
        return

    def handler(signum, frame):
        from .surface.udfs import interrupt_udfs
        interrupt_udfs()
        previous(signum, frame)

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _render(rel) -> str:
    """An aligned text table of a result (DuckDB's own box rendering)."""
    return str(rel)


def _input_error(tb) -> bool:
    """Whether a kept UDF traceback is that of a call refused for its input (only DeepBaseErrors
    in its chain: errors.refused_for_input, read from the live exception when it was kept)."""
    return bool(getattr(tb, "input_error", False))


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


_DOLLAR = re.compile(r"\$([A-Za-z_][A-Za-z_0-9]*)?\$")


def _word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


def split_statements(text: str) -> tuple[list[str], bool]:
    """The statements of SQL ``text``, split as the DuckDB CLI splits them, and whether more lines
    are needed. A statement ends at a ';' outside '...' strings (E'...' with backslash escapes
    too), "..." identifiers, $$...$$ or $tag$...$tag$ dollar quotes and comments (-- to the end
    of the line, /* */); one holding nothing but comments is left out. More lines are needed
    when code follows the last ';' or a string, identifier, dollar quote or comment is left
    unterminated; that last part is still returned, as the last statement."""
    statements, start, code, i, n = [], 0, False, 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("--", i):
            nl = text.find("\n", i)
            i = n if nl < 0 else nl + 1
        elif text.startswith("/*", i):
            close = text.find("*/", i + 2)
            if close < 0:
                return statements + [text[start:]], True
            i = close + 2
        elif c in "'\"":
            escapes = c == "'" and i > 0 and text[i - 1] in "eE" and (i < 2 or not _word_char(text[i - 2]))
            j = i + 1
            while True:
                if j >= n:
                    return statements + [text[start:]], True
                if escapes and text[j] == "\\":
                    j += 2
                elif text[j] != c:
                    j += 1
                elif text.startswith(c, j + 1):      # a doubled quote stands for one, inside
                    j += 2
                else:
                    break
            i, code = j + 1, True
        elif c == "$" and (i == 0 or not _word_char(text[i - 1])) and _DOLLAR.match(text, i):
            tag = _DOLLAR.match(text, i).group(0)
            close = text.find(tag, i + len(tag))
            if close < 0:
                return statements + [text[start:]], True
            i, code = close + len(tag), True
        else:
            if c == ";":
                if code:
                    statements.append(text[start:i + 1].strip())
                start, code = i + 1, False
            elif not c.isspace():
                code = True
            i += 1
    if code:
        statements.append(text[start:].strip())
    return statements, code


_SQL_START = re.compile(r"\s*(SELECT|FROM|WITH|INSERT|CREATE|PRAGMA|DESCRIBE|SHOW|COPY|UPDATE|DELETE|DROP|EXPLAIN|"
                        r"SUMMARIZE|CALL|ATTACH|SET|ALTER|VALUES|TABLE)\s", re.IGNORECASE)


def _reads_as_sql(text: str) -> bool:
    """Whether a STORE or SCRIPT argument is SQL: a statement's first keyword and a space (a name
    ending as a store or script file does, 'show results.duckdb', is a file's)."""
    if text.lower().rstrip().endswith((".duckdb", ".db", ".sql", ".ddb")):
        return False
    return bool(_SQL_START.match(text + " "))


def read_script(path: str) -> str:
    """The text of a SQL script file, or one DeepBaseError naming what is wrong with it."""
    from .errors import DeepBaseError
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DeepBaseError(f"no script file {path!r}") from None
    except UnicodeDecodeError as exc:
        raise DeepBaseError(f"script {path!r} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise DeepBaseError(f"cannot read script {path!r}: {exc.strerror}") from None


def main(store: str | None, command: str | None, script: str | None, quiet: bool, create: bool = False,
         read_only: bool = False, traceback: bool = False) -> int:
    """Run the shell on the store at ``store`` (None or ':memory:': in memory). A path with no
    store is refused unless ``create`` (the command's --create), as the other commands that read
    a store refuse it: a mistyped path must not become a new, empty store. ``read_only`` (the
    command's --read-only): the store is opened read-only (``dbd.connect(..., read_only=True)``),
    so that a read-only file, or one another read-only process holds, opens; what would write
    (inspect, define_hypothesis, INSERT ...) is refused by name. ``traceback`` (--traceback): a
    script's refused deepbase_duck call is followed by its Python traceback too."""
    import deepbase_duck as dbd
    from .errors import DeepBaseError
    if command is not None and script is not None:     # before the store is opened (or created)
        raise DeepBaseError(f"give either -c SQL or a script file ({script!r}), not both: -c would run and the "
                            f"script would not")
    if read_only and (create or store in (None, ":memory:")):
        raise DeepBaseError("--read-only opens an existing store file: give its path, without --create")
    for path, what in ((store, "store"), (script, "script file")):
        if path is not None and _reads_as_sql(path) and not Path(path).exists():
            # as `duckdb STORE 'SELECT ...'` takes it: here that is -c, and --create would have
            # made a store named after the SQL
            raise DeepBaseError(f"no {what} {path!r}: that reads as SQL, which the shell runs when given with -c: "
                                f"deepbase-duck shell {'STORE' if what == 'script file' else '[STORE]'} "
                                f"-c {shlex.quote(path)}")
    if store not in (None, ":memory:") and not create and not Path(store).is_file():
        raise DeepBaseError(f"no store at {store!r}; --create makes a new one there "
                            f"(or leave out the path for a store in memory)")
    con = dbd.connect(store, progress=not quiet, read_only=read_only)
    try:
        sh = Shell(con, tracebacks=traceback)
        if command is not None:
            return sh.feed(command.splitlines(), interactive=False, source="-c")
        if script is not None:
            text = read_script(script)
            sh.reading.append((Path(script).resolve(), script))     # a .read of itself is a loop
            return sh.feed(text.splitlines(), interactive=False, source=script)
        if sys.stdin.isatty():
            return sh.interactive()
        return sh.feed(sys.stdin.read().splitlines(), interactive=False, source="standard input")
    finally:
        dbd.close(con)
