"""Engines that behave the same on SQLite files and PostgreSQL.

SQLite connections get ``PRAGMA foreign_keys=ON``, ``PRAGMA journal_mode=WAL`` (readers
do not block the writer), ``PRAGMA secure_delete=ON`` (freed bytes are zeroed, so erased
text leaves the file) and a 30 s busy timeout. The ``sqlite3`` driver's own implicit
transaction handling is switched off (``isolation_level = None``) and every transaction
is begun explicitly from the engine's ``begin`` event, so a caller can ask for
``BEGIN IMMEDIATE``: that takes SQLite's write lock at once instead of at the first write,
which is what a read-then-write transaction needs to be safe across processes.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from harmtrace.errors import ConfigError, MissingExtraError

__all__ = ["SQLITE_BEGIN_OPTION", "make_engine"]

# Execution option read by the ``begin`` event: "DEFERRED" (default) or "IMMEDIATE".
SQLITE_BEGIN_OPTION = "harmtrace_sqlite_begin"
_SQLITE_BUSY_TIMEOUT_S = 30.0
_URL_HELP = "use sqlite:///PATH/harmtrace.db or postgresql+psycopg://USER:PASSWORD@HOST/DB"


def make_engine(url: str) -> Engine:
    """An engine for ``url``, configured as described in the module docstring."""
    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise ConfigError(f"database URL {url!r} cannot be parsed; {_URL_HELP}") from err

    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"timeout": _SQLITE_BUSY_TIMEOUT_S}
    try:
        engine = create_engine(parsed, **kwargs)
    except NoSuchModuleError as err:
        raise ConfigError(f"database URL {parsed!r} names an unknown driver; {_URL_HELP}") from err
    except ModuleNotFoundError as err:
        raise MissingExtraError(
            f"database URL {parsed!r} needs the driver module '{err.name}'; for PostgreSQL "
            "install it with: pip install 'harmtrace[postgres]'"
        ) from err

    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine)
    return engine


def _configure_sqlite(engine: Engine) -> None:
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Hand transaction control to _sqlite_on_begin instead of the driver's implicit BEGIN.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    # Zero freed bytes, so an erased record's text does not linger in free page space.
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    mode = conn.get_execution_options().get(SQLITE_BEGIN_OPTION, "DEFERRED")
    conn.exec_driver_sql(f"BEGIN {mode}")
