"""No record is dropped behind a seek when partitions are assigned: two Faust 0.15.3 fixes.

When table recovery completes, Faust's ``Recovery.on_recovery_completed`` resumes the stream
partitions, *then* seeks them to their committed offsets (aiokafka asks the coordinator one
partition at a time), *then* resumes flow control, which clears every stream buffer. The
fetcher runs throughout. Records it hands over while the seek is under way are delivered,
then cleared, but the consumer's position has already moved past them: the worker never sees
them. Faust's drain loop takes the jump for a gap, and its commit counts a gap as processed,
so they are lost for good. Faust's own agents lose them the same way (their queues are
cleared by the same call). It is what made ``test_kill9_and_restart_is_exact`` fail now and
then: the restarted worker skipped the records just after its committed offsets.

The second flaw: Faust hands aiokafka its live set of active partitions, and aiokafka reads an
empty set as "every partition". When recovery pauses the changelogs while the streams are
still paused, a fetch already waiting drains every buffered stream record; Faust drops them as
not active, and the positions have moved past them (for a partition without a committed
offset no seek ever brings them back).

Measured without these fixes (a restart over a backlog of 10,000 records, 4 partitions): a
clean restart lost 142 of them (1.4 %); with the coordinator answering OffsetFetch in 200 ms,
6,000 (60 %); in one run the fresh worker of that test counted nothing in 3 minutes (not
analysed further). With them, none
(tests/integration/test_crash.py::test_restart_with_a_backlog_and_a_slow_coordinator).

:func:`seek_before_resume` replaces the method on the app's recovery service with the same
steps in a safe order (seek while the stream partitions are still paused, clear the buffers,
then resume the partitions, with no ``await`` between the clear and the resume), and gives
the app's consumer thread a view of the active set that is never read as "every partition".
Faust's other resume path, ``_resume_streams``, has the same order but only runs for an app
without tables, which FinFlow never is. Remove both when Faust seeks before it resumes and
stops passing an empty set to aiokafka.
"""

from __future__ import annotations

import asyncio
import types
from typing import Any

import faust

#: The Faust release whose ``Recovery.on_recovery_completed`` this replaces, step for step.
FAUST_VERSION = "0.15.3"


def seek_before_resume(app: faust.App) -> None:
    """Give ``app``'s recovery service the safe ``on_recovery_completed`` and its consumer
    thread a never-empty view of the active partitions; idempotent."""
    if faust.__version__ != FAUST_VERSION:
        raise RuntimeError(
            f"agents.resume replaces Faust {FAUST_VERSION}'s on_recovery_completed, found "
            f"{faust.__version__}: compare it with the new release before upgrading"
        )
    recovery: Any = app.tables.recovery  # type: ignore[attr-defined]
    if getattr(recovery.on_recovery_completed, "seeks_first", False):
        return
    recovery.on_recovery_completed = types.MethodType(_on_recovery_completed, recovery)
    thread: Any = app.consumer._thread  # type: ignore[attr-defined]
    fetch = thread._fetch_records

    async def fetch_records(consumer: Any, active: set[Any] | None, **wait: Any) -> Any:
        only = None if active is None else _Active(active)  # None: a client-only app, all
        return await fetch(consumer, only, **wait)

    thread._fetch_records = fetch_records


class _Active:
    """The live set of active partitions as aiokafka's ``fetched_records`` reads it: by
    membership, and never empty (aiokafka takes an empty set for every partition)."""

    __slots__ = ("live",)

    def __init__(self, live: set[Any]) -> None:
        self.live = live

    def __bool__(self) -> bool:
        return True

    def __contains__(self, tp: object) -> bool:
        return tp in self.live


async def _on_recovery_completed(self: Any, generation_id: int = 0) -> None:
    """Faust 0.15.3's ``Recovery.on_recovery_completed``, seeking before it resumes."""
    app = self.app
    consumer = app.consumer
    self.log.info("Restore complete!")
    await app.on_rebalance_complete.send()
    self._set_recovery_ended()
    callbacks = [
        asyncio.ensure_future(
            table.on_recovery_completed(
                self.actives_for_table[table], self.standbys_for_table[table]
            )
        )
        for table in self.tables.values()
    ]
    if callbacks:
        await asyncio.wait(callbacks)
    assignment = consumer.assignment()
    if app.consumer_generation_id != generation_id:
        self.log.warning(
            f"Recovery rebalancing again app id {app.consumer_generation_id} param {generation_id}"
        )
        return
    streams = {tp for tp in assignment if not self._is_changelog_tp(tp)}
    if assignment:
        self.log.info("Seek stream partitions to committed offsets.")
        await self._wait(consumer.perform_seek(), timeout=app.conf.broker_request_timeout)
    self.completed.set()
    app.flow_control.resume()  # clears the buffers; the streams, still paused, sent nothing
    consumer.resume_partitions(streams)  # no await since the clear
    consumer.resume_flow()
    await app._fetcher.maybe_start()
    self.tables.on_actives_ready()
    if not app.assignor.assigned_standbys():
        self.tables.on_standbys_ready()
    app.on_rebalance_end()
    self.log.info("Worker ready")


_on_recovery_completed.seeks_first = True  # type: ignore[attr-defined]
