"""The embedded default's event log (dagster.yaml): one SQLite database, written cheaply per event.

Dagster's default SQLite event log keeps a database per run plus an index database and mirrors every asset
and check event into the index (check results a third time, in their table): a curation run over 1,000
shards wrote 81 MB. It also builds a new SQLAlchemy engine per operation and commits with a full fsync
(~15 ms an event; a 1,000-shard run writes ~9,000). This storage is Dagster's consolidated SQLite layout
(the schema and SQL that Dagster's PostgreSQL storage uses: each event stored once) with one engine per
process, WAL and synchronous=NORMAL, SQLite's documented setting for WAL (a crashed process loses nothing;
a power cut may lose the last events). Deployments use PostgreSQL (docker/dagster.yaml) and are not affected.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import sqlalchemy as db
from dagster import StringSource
from dagster._core.storage.event_log.sqlite.consolidated_sqlite_event_log import ConsolidatedSqliteEventLogStorage
from dagster._core.storage.sqlite import SQLITE_BUSY_TIMEOUT_SECONDS
from dagster._serdes import ConfigurableClassData
from sqlalchemy.pool import StaticPool
from watchdog.events import FileSystemEvent, PatternMatchingEventHandler
from watchdog.observers import Observer


def _pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA journal_size_limit=4194304")  # the WAL shrinks back to 4 MB after a checkpoint
    cursor.close()


def _create(path: str) -> None:
    """An empty database whose freed pages go back to the file system (Dagster updates each check result's
    row in place, from planned to evaluated) and that is in WAL mode from its first write."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA auto_vacuum=FULL")  # only before the first table
        conn.execute("PRAGMA journal_mode=WAL")
    finally:
        conn.close()


class LocalEventLogStorage(ConsolidatedSqliteEventLogStorage):
    """Every run's events in `<dagster_home>/history/event_log.db`, through one engine per process."""

    def __init__(self, dagster_home: str, inst_data: ConfigurableClassData | None = None) -> None:
        self._engine: db.engine.Engine | None = None
        self._lock = threading.Lock()
        self._tables: set[str] = set()
        base_dir = os.path.join(dagster_home, "history")
        new = not os.path.exists(os.path.join(base_dir, "event_log.db"))
        if new:
            _create(os.path.join(base_dir, "event_log.db"))
        super().__init__(base_dir, inst_data)  # sees the file, so leaves the schema to us
        if new:
            self._init_db()

    @classmethod
    def config_type(cls) -> dict[str, Any]:
        return {"dagster_home": StringSource}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: Mapping[str, Any]) -> Any:
        return cls(inst_data=inst_data, **config_value)

    @contextmanager
    def _connect(self) -> Iterator[db.engine.Connection]:
        # One open connection, used under a lock: the webserver and the run workers are threaded, and
        # closing a WAL database's last connection checkpoints it (an fsync), so it stays open.
        with self._lock:
            if self._engine is None:
                self._engine = db.create_engine(
                    self._conn_string,
                    poolclass=StaticPool,
                    connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
                )
                db.event.listen(self._engine, "connect", _pragmas)
            with self._engine.connect() as conn, conn.begin():
                yield conn

    def has_table(self, table_name: str) -> bool:
        """Asked for every event (a new engine each time upstream); tables are only ever added."""
        if table_name not in self._tables and super().has_table(table_name):  # own engine: may run under the lock
            self._tables.add(table_name)
        return table_name in self._tables

    def watch(self, run_id: str, cursor: str | None, callback: Any) -> None:
        """As upstream, but a commit in WAL mode changes `event_log.db-wal`, not `event_log.db`: watch both,
        or the UI's live run log would wait for a checkpoint."""
        if not self._obs:
            self._obs = Observer()
            self._obs.start()
            self._obs.schedule(_Changes(self), self._base_dir, recursive=False)
        self._watchers[run_id][callback] = cursor

    def dispose(self) -> None:
        super().dispose()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


class _Changes(PatternMatchingEventHandler):
    def __init__(self, storage: LocalEventLogStorage) -> None:
        self._storage = storage
        path = storage.get_db_path()
        super().__init__(patterns=[path, f"{path}-wal"])

    def on_modified(self, event: FileSystemEvent) -> None:
        self._storage.on_modified()
