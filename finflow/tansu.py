"""Every client-side adaptation FinFlow needs for the tansu broker, applied only on tansu."""

# Each patch below names the tansu (0.6.0) or Faust behaviour it works around and how to
# remove it. They are pinned to the library versions they were verified with: apply() raises
# on any other version, so an upgrade forces a re-check (tests/integration/
# test_tansu_adaptation.py fails when an adaptation stops being needed or stops working).
# To remove one: delete its _patch_* function and its entry in apply().

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, cast

import aiokafka
import aiokafka.errors as kafka_errors
import faust
from aiokafka.conn import ScramAuthenticator, create_conn
from aiokafka.consumer.fetcher import READ_COMMITTED, Fetcher
from aiokafka.protocol.api import RequestStruct, Response
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.protocol.transaction import InitProducerIdRequest, InitProducerIdRequest_v0
from aiokafka.protocol.types import CompactString, Int16, Int32, Int64, Schema, TaggedFields
from aiokafka.structs import TopicPartition
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.types import TP

from finflow import kafka_security, settings
from finflow.errors import ConfigError
from finflow.settings import BrokerSecurity

__all__ = ["apply", "broker_is_tansu"]

AIOKAFKA_VERSION = "0.14.0"
FAUST_VERSION = "0.15.3"

#: API keys every Apache Kafka broker since 1.0 offers and tansu 0.6.0 does not:
#: OffsetForLeaderEpoch (23) and CreatePartitions (37).
TANSU_MISSING_API_KEYS = frozenset({23, 37})

#: Fetch wait used to read high watermarks. tansu answers a Fetch with max_wait=0 with no
#: topics at all, and holds an empty partition's Fetch for the whole wait (even min_bytes=0).
HIGHWATER_FETCH_WAIT_MS = 5

_applied = False


# -- detection ----------------------------------------------------------------------------


async def broker_is_tansu(bootstrap: str, security: BrokerSecurity | None = None) -> bool:
    """True when the first reachable bootstrap server looks like tansu (by its ApiVersions).

    ``bootstrap`` is ``host:port[,host:port...]`` (a ``kafka://`` prefix is accepted).
    ``security`` defaults to the ``FINFLOW_BROKER_*`` settings of the environment; only its
    TLS part is used, as ApiVersions is answered before SASL authentication (and the SASL
    adaptation below is only applied once the broker is known to be tansu).
    An unreachable broker raises ``KafkaConnectionError``; it is never reported as "not tansu".
    An untrusted broker certificate raises :class:`ConfigError` naming the variable.
    """
    security = settings.from_env().broker_security if security is None else security
    versions = await _api_versions(bootstrap, security)
    return bool(versions) and not TANSU_MISSING_API_KEYS & versions.keys()


async def _api_versions(bootstrap: str, security: BrokerSecurity) -> dict[int, tuple[int, int]]:
    errors: list[str] = []
    for host, port in _servers(bootstrap):
        try:
            conn = await create_conn(host, port, **kafka_security.tls_kwargs(security))
        except (OSError, kafka_errors.KafkaError) as exc:
            line = kafka_security.describe_failure(exc, security, f"{host}:{port}")
            if line is not None:
                raise ConfigError(line) from None
            errors.append(f"{host}:{port}: {exc!r}")
            continue
        try:
            return dict(conn._versions)  # filled from the ApiVersions response on connect
        finally:
            conn.close()
    raise kafka_errors.KafkaConnectionError(f"no bootstrap server answered: {errors}")


def _servers(bootstrap: str) -> list[tuple[str, int]]:
    servers = []
    for part in (p.strip() for p in bootstrap.split(",")):
        address = part.split("://", 1)[-1]
        if address:
            host, _, port = address.rpartition(":")
            servers.append((host, int(port)))
    return servers


# -- apply ---------------------------------------------------------------------------------


def apply() -> None:
    """Patch aiokafka and Faust in this process for tansu; idempotent, refuses other versions."""
    global _applied
    if _applied:
        return
    _check_versions()
    _patch_end_offsets()
    _patch_init_producer_id()
    _patch_faust_exactly_once_highwaters()
    _patch_scram_server_error()
    _patch_fetch_max_wait()
    _applied = True


def _check_versions() -> None:
    found = {"aiokafka": aiokafka.__version__, "faust-streaming": faust.__version__}
    wanted = {"aiokafka": AIOKAFKA_VERSION, "faust-streaming": FAUST_VERSION}
    if found != wanted:
        raise RuntimeError(
            f"finflow.tansu was verified with {wanted}, found {found}: re-run "
            "tests/integration/test_tansu_adaptation.py and re-check each patch"
        )


# -- (a) end offsets from a Fetch high watermark ---------------------------------------------
# tansu 0.6.0 answers ListOffsets(LATEST) with the last batch's base offset + 1, not the high
# watermark (4 batches of 5 records: 16, not 20). Faust's table recovery reads changelog
# end offsets through AIOKafkaConsumer.end_offsets -> Fetcher.end_offsets, so recovery stops
# early and a restart crashes with ConsistencyError. We keep ListOffsets as a lower bound
# (so the Fetch returns at most the last batch) and take the Fetch response's high watermark
# (or last stable offset under read_committed). Only Fetcher.end_offsets changes; seeks and
# auto_offset_reset still use ListOffsets. Remove when ListOffsets(LATEST) == high watermark.

_original_end_offsets = Fetcher.end_offsets


def _patch_end_offsets() -> None:
    if Fetcher.end_offsets is not _original_end_offsets:
        raise RuntimeError("aiokafka Fetcher.end_offsets is already patched by someone else")
    Fetcher.end_offsets = _end_offsets_from_fetch


async def _end_offsets_from_fetch(
    self: Any, partitions: Sequence[TopicPartition], timeout_ms: int | None
) -> dict[TopicPartition, int]:
    lower = await _original_end_offsets(self, partitions, timeout_ms)
    committed = self._isolation_level == READ_COMMITTED
    timeout = None if timeout_ms is None else timeout_ms / 1000
    try:
        async with asyncio.timeout(timeout):
            return await _high_watermarks(self._client, lower, committed, self._retry_backoff)
    except TimeoutError as exc:
        raise kafka_errors.KafkaTimeoutError(
            f"no high watermark for {sorted(lower)} in {timeout_ms} ms"
        ) from exc


async def _high_watermarks(
    client: Any, start: Mapping[TopicPartition, int], committed: bool, backoff_s: float
) -> dict[TopicPartition, int]:
    """Fetch from ``start`` offsets on each leader until every partition has a watermark."""
    found: dict[TopicPartition, int] = {}
    while pending := {tp: offset for tp, offset in start.items() if tp not in found}:
        by_node = _group_by_leader(client, pending)
        for marks in await asyncio.gather(
            *(_fetch_marks(client, node, topics, committed) for node, topics in by_node.items())
        ):
            found.update(marks)
        if len(found) < len(start):
            client.force_metadata_update()
            await asyncio.sleep(backoff_s)
    return {tp: found[tp] for tp in start}  # keep the caller's key objects (e.g. Faust TPs)


def _group_by_leader(
    client: Any, offsets: Mapping[TopicPartition, int]
) -> dict[int, dict[str, list[tuple[int, int, int]]]]:
    by_node: dict[int, dict[str, list[tuple[int, int, int]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for tp, offset in offsets.items():
        node = client.cluster.leader_for_partition(tp)
        if node is not None and node >= 0:
            by_node[node][tp.topic].append((tp.partition, offset, 1))
    return by_node


async def _fetch_marks(
    client: Any, node: int, topics: Mapping[str, list[tuple[int, int, int]]], committed: bool
) -> dict[TopicPartition, int]:
    request = FetchRequest(
        HIGHWATER_FETCH_WAIT_MS, 1, 1, int(committed), [(t, p) for t, p in topics.items()]
    )
    response = await client.send(node, request)
    use_lso = committed and response.API_VERSION >= 4
    marks: dict[TopicPartition, int] = {}
    for topic, partitions in response.topics:
        for partition, error_code, highwater, *rest in partitions:
            error = kafka_errors.for_code(error_code)
            if error is not kafka_errors.NoError and not error.retriable:
                raise error(f"Fetch for high watermark of {topic}[{partition}]")
            if error is kafka_errors.NoError:
                marks[TopicPartition(topic, partition)] = rest[0] if use_lso else highwater
    return marks


# -- (b) InitProducerId v3 --------------------------------------------------------------------
# tansu 0.6.0 rejects InitProducerId below v3 (it logs "producer=None epoch=None" and answers
# UNKNOWN_SERVER_ERROR) although ApiVersions says 0..5; aiokafka 0.14 only knows v0, so
# idempotent and transactional producers (Faust exactly_once) fail with UnknownError.
# We add v3 (flexible; producer_id = producer_epoch = -1 asks for a new id) to aiokafka's
# version table. Remove when tansu accepts v0 or aiokafka ships v3 itself.


class InitProducerIdResponse_v3(Response):
    """InitProducerId v3 response (KIP-360 schema, flexible)."""

    API_KEY = 22
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("error_code", Int16),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("tags", TaggedFields),
    )


class InitProducerIdRequest_v3(RequestStruct):
    """InitProducerId v3 request (KIP-360 schema, flexible)."""

    FLEXIBLE_VERSION = True
    API_KEY = 22
    API_VERSION = 3
    RESPONSE_TYPE = InitProducerIdResponse_v3
    SCHEMA = Schema(
        ("transactional_id", CompactString("utf-8")),
        ("transaction_timeout_ms", Int32),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("tags", TaggedFields),
    )


_original_init_pid_build = InitProducerIdRequest.build


def _patch_init_producer_id() -> None:
    request_class = cast(Any, InitProducerIdRequest)
    if tuple(request_class._CLASSES) != (InitProducerIdRequest_v0,):
        raise RuntimeError(f"aiokafka InitProducerId versions changed: {request_class._CLASSES}")
    request_class._CLASSES = (InitProducerIdRequest_v0, InitProducerIdRequest_v3)
    request_class.build = _build_init_producer_id


def _build_init_producer_id(self: Any, request_struct_class: type[Any]) -> Any:
    if request_struct_class is InitProducerIdRequest_v3:
        return InitProducerIdRequest_v3(
            self._transactional_id, self._transaction_timeout_ms, -1, -1, {}
        )
    return _original_init_pid_build(self, request_struct_class)


# -- (c) Faust exactly_once recovery high water --------------------------------------------
# Faust 0.15.3 (not tansu) takes changelog highwaters from consumer.last_stable_offset() when
# processing_guarantee="exactly_once"; that is None before the first Fetch, recovery turns it
# into -1 and a fresh worker skips recovery with empty tables. We use end_offsets() instead;
# under exactly_once the consumer is read_committed, so (a) returns the last stable offset.
# Remove when Faust's AIOKafkaConsumerThread._highwaters stops using last_stable_offset.

_original_faust_highwaters = AIOKafkaConsumerThread._highwaters


def _patch_faust_exactly_once_highwaters() -> None:
    if AIOKafkaConsumerThread._highwaters is not _original_faust_highwaters:
        raise RuntimeError("Faust AIOKafkaConsumerThread._highwaters is already patched")
    AIOKafkaConsumerThread._highwaters = _highwaters_from_end_offsets  # type: ignore[method-assign]


async def _highwaters_from_end_offsets(
    self: AIOKafkaConsumerThread, partitions: list[TP]
) -> Mapping[TP, int]:
    consumer = self._ensure_consumer()
    return cast(Mapping[TP, int], await consumer.end_offsets(partitions))


# -- (d) SCRAM server-final errors --------------------------------------------------------
# tansu 0.6.0 (with --authentication) ends every failed SCRAM exchange with an RFC 5802
# server-error ("e=unknown-user") in a SaslAuthenticate response whose error code is 0;
# Apache Kafka answers SASL_AUTHENTICATION_FAILED (58) instead. aiokafka 0.14 only reads
# "v=" there, so a rejected login surfaces as KeyError('v'), which neither aiokafka's
# bootstrap nor FinFlow's preflight recognises. We raise SaslAuthenticationFailed carrying the
# server's error instead. Remove when tansu answers error code 58 or aiokafka reads "e=".

_original_scram_final = ScramAuthenticator.process_server_final_message


def _patch_scram_server_error() -> None:
    if ScramAuthenticator.process_server_final_message is not _original_scram_final:
        raise RuntimeError("aiokafka ScramAuthenticator.process_server_final_message is patched")
    ScramAuthenticator.process_server_final_message = _server_final_or_error


def _server_final_or_error(self: Any, server_final: str) -> None:
    if server_final.startswith("e="):
        raise kafka_errors.SaslAuthenticationFailed(f"SCRAM server-error {server_final[2:]!r}")
    _original_scram_final(self, server_final)


# -- (e) short fetch waits ----------------------------------------------------------------------
# tansu 0.6.0 does not answer a waiting Fetch when records arrive: the request is held (seen:
# about half its max wait) whatever arrives meanwhile (min bytes 1 notwithstanding), so a
# record produced while the consumer's Fetch is pending waits for it to time out. Faust's
# consumer asks for 1,500 ms (hard-coded in its aiokafka driver), which put 0.7-1.5 s into
# end-to-end latency at moderate rates. Faust's consumer gets FETCH_MAX_WAIT_MS instead (a
# Fetch returns at once when records are already there, so throughput is unchanged; an idle
# worker sends a small Fetch every FETCH_MAX_WAIT_MS). Remove when a Fetch pending on tansu
# returns once min bytes have arrived.

FETCH_MAX_WAIT_MS = 20
_original_create_worker_consumer = AIOKafkaConsumerThread._create_worker_consumer


def _patch_fetch_max_wait() -> None:
    if AIOKafkaConsumerThread._create_worker_consumer is not _original_create_worker_consumer:
        raise RuntimeError("Faust's AIOKafkaConsumerThread._create_worker_consumer is patched")
    AIOKafkaConsumerThread._create_worker_consumer = (  # type: ignore[method-assign]
        _worker_consumer_short_waits
    )


def _worker_consumer_short_waits(self: Any, *args: Any, **kwargs: Any) -> Any:
    consumer = _original_create_worker_consumer(self, *args, **kwargs)
    consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read by its Fetcher at start()
    return consumer
