"""Local table state the changelogs no longer back, found before a worker opens its tables.

Each partition's RocksDB store remembers the offset of the last changelog record it holds.
When that offset is at or past the changelog's end, the topic was deleted or recreated while
the local files were kept (a new or reset cluster, a development broker started afresh):
Faust then refuses to start (``ConsistencyError``: persisted offset higher than the
highwater), on every restart. Kafka Streams, in the same case, wipes the store and restores
it from the changelog; so does the worker (``finflow.cli``), before Faust opens the stores.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

from aiokafka import TopicPartition
from faust.stores.rocksdb import Store
from rocksdict import AccessType, Options, Rdict

from finflow.errors import ConfigError
from finflow.preflight import metadata_client, partitions_of
from finflow.settings import BrokerSecurity


def ensure_data_dir(data_dir: str) -> Path:
    """``FINFLOW_DATA_DIR``, created if missing, once a file could be written there; a
    one-line :class:`ConfigError` naming the variable otherwise (a path through a file, a
    read-only or full file system), before the worker contacts the broker: Faust would fail
    later, with a traceback, opening its first table."""
    if not data_dir:
        raise ConfigError("FINFLOW_DATA_DIR='' is invalid: it is empty")
    path = Path(data_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"FINFLOW_DATA_DIR={data_dir!r} is invalid: {reason}") from None
    return path


#: Workers of one app that may share a ``FINFLOW_DATA_DIR`` on one machine.
MAX_SHARING = 64
_held: list[int] = []  # lock files of the directories this process claimed, open until exit


def claim_data_dir(data_dir: str, app_id: str) -> str:
    """The data directory this worker uses: ``data_dir`` itself unless another running
    worker of the app holds it, else the first free ``<data_dir>/<app_id>.<n>``.

    Faust's documentation starts a second worker on a machine with only another web port,
    so both get the same ``FINFLOW_DATA_DIR``. The second took the first's running marker
    for an unclean stop and deleted the tables under it. A directory is held with an
    exclusive ``flock`` for the life of the process; the kernel releases it when the
    process ends, ``kill -9`` included, so a restarted worker takes its directory back.
    """
    for n in range(MAX_SHARING):
        path = Path(data_dir) if n == 0 else Path(data_dir) / f"{app_id}.{n}"
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / f"{app_id}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _held.append(fd)
        return str(path)
    raise ConfigError(
        f"FINFLOW_DATA_DIR={data_dir!r} is invalid: {MAX_SHARING} workers of {app_id!r} use it"
    )


def persisted_offsets(tabledir: Path, table: str) -> dict[int, int]:
    """Changelog offset held by each local partition store of ``table`` (Faust's layout:
    ``<tabledir>/<table>-<partition>.db``); stores holding none are left out."""
    found: dict[int, int] = {}
    for path in sorted(tabledir.glob(f"{table}-*.db")):
        partition = path.name[len(table) + 1 : -len(".db")]
        if not partition.isdigit():
            continue
        db = Rdict(str(path), Options(raw_mode=True), access_type=AccessType.read_only())
        try:
            raw = db.get(Store.offset_key)
        finally:
            db.close()
        if raw is not None:
            found[int(partition)] = int(raw)
    return found


async def changelog_ends(
    bootstrap: str, topic: str, partitions: list[int], security: BrokerSecurity
) -> dict[int, int]:
    """End offset (the next offset to be written) of each of ``partitions`` of ``topic``;
    0 for a partition or topic that does not exist."""
    async with metadata_client(bootstrap, security) as consumer:
        existing = await partitions_of(consumer, topic) or set()
        wanted = [TopicPartition(topic, p) for p in partitions if p in existing]
        ends = await consumer.end_offsets(wanted) if wanted else {}
    return {p: ends.get(TopicPartition(topic, p), 0) for p in partitions}


def unbacked(persisted: dict[int, int], ends: dict[int, int]) -> dict[int, tuple[int, int]]:
    """Partitions whose store holds an offset the changelog does not have:
    ``{partition: (persisted offset, changelog end)}``."""
    return {
        partition: (offset, ends.get(partition, 0))
        for partition, offset in persisted.items()
        if offset >= ends.get(partition, 0)
    }


async def find_unbacked(
    tabledir: Path, table: str, changelog: str, bootstrap: str, security: BrokerSecurity
) -> dict[int, tuple[int, int]]:
    """:func:`unbacked` for the local stores of ``table`` against its ``changelog`` topic."""
    persisted = persisted_offsets(tabledir, table)
    if not persisted:
        return {}
    ends = await changelog_ends(bootstrap, changelog, sorted(persisted), security)
    return unbacked(persisted, ends)
