"""The embedded default's event log (dagster.yaml): Dagster's SQLite event log storage, made cheap per event.

Dagster's SQLite storage (one database per run plus an index database, same files, same schema) builds
a new SQLAlchemy engine for every operation and commits every event with a full fsync: ~15 ms an event
on an idle laptop, and a curation run over 1,000 shards writes ~7,000 events (two materializations and
five check results a shard). This subclass keeps one engine per database and opens SQLite in WAL mode
with synchronous=NORMAL, its documented setting for WAL (a crashed process loses nothing; a power cut may
lose the last events). Deployments use PostgreSQL (docker/dagster.yaml) and are not affected.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import sqlalchemy as db
from dagster import StringSource
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from dagster._core.storage.sqlite import SQLITE_BUSY_TIMEOUT_SECONDS
from dagster._serdes import ConfigurableClassData
from sqlalchemy.pool import StaticPool

_OPEN_ENGINES = 64  # run databases stay open while their run writes; older ones are closed


def _pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # Before a new database's first table (a no-op later): pages freed by Dagster's updates of its status
    # rows go back to the file system instead of piling up (3/4 of a 1,000-shard run's index, otherwise).
    cursor.execute("PRAGMA auto_vacuum=FULL")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA journal_size_limit=1048576")  # the WAL shrinks back to 1 MB after a checkpoint
    cursor.close()


class LocalEventLogStorage(SqliteEventLogStorage):
    """SQLite event log under `<dagster_home>/history/runs` (Dagster's own layout), one engine per database."""

    def __init__(self, dagster_home: str, inst_data: ConfigurableClassData | None = None) -> None:
        self._engines: OrderedDict[str, db.engine.Engine] = OrderedDict()
        self._tables: set[str] = set()
        base_dir = os.path.join(dagster_home, "history", "runs")
        new_index = not os.path.exists(os.path.join(base_dir, "index.db"))
        super().__init__(base_dir, inst_data)  # creates the index database with an engine of its own
        if new_index:  # still empty: cheap to rebuild with auto_vacuum
            with self._engine("index").connect() as conn:
                conn.exec_driver_sql("PRAGMA auto_vacuum=FULL")
                conn.exec_driver_sql("VACUUM")

    @classmethod
    def config_type(cls) -> dict[str, Any]:
        return {"dagster_home": StringSource}

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: Mapping[str, Any]) -> Any:
        return cls(inst_data=inst_data, **config_value)

    def _engine(self, shard: str) -> db.engine.Engine:
        engine = self._engines.pop(shard, None)
        if engine is None:
            engine = db.create_engine(
                self.conn_string_for_shard(shard),
                # One open connection per database, used under the storage's lock: closing the last
                # connection of a WAL database checkpoints it (an fsync), so it stays open.
                poolclass=StaticPool,
                connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
            )
            db.event.listen(engine, "connect", _pragmas)
            if shard not in self._initialized_dbs:
                self._initdb(engine)
                self._initialized_dbs.add(shard)
        self._engines[shard] = engine
        while len(self._engines) > _OPEN_ENGINES:
            self._engines.popitem(last=False)[1].dispose()
        return engine

    def has_table(self, table_name: str) -> bool:
        """Asked for every event (a new engine each time upstream); tables are only ever added."""
        if table_name not in self._tables and super().has_table(table_name):  # may run under the lock
            self._tables.add(table_name)
        return table_name in self._tables

    @contextmanager
    def _connect(self, shard: str) -> Iterator[db.engine.Connection]:
        with self._db_lock:
            with self._engine(shard).connect() as conn, conn.begin():
                yield conn
