"""The one Faust application of FinFlow; importing it reads settings but opens no connection."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import faust

from finflow import kafka_security, producer_topics
from finflow import settings as settings_module
from finflow.http_errors import json_errors

settings = settings_module.from_env()
producer_topics.apply()  # before Faust creates its producer


#: Largest record of the topics FinFlow writes, and of a producer request (Kafka's default is
#: 1 MB). An account's value carries its de-duplication ids (56 bytes per transaction of the
#: last 24 h): one with 20,000 transactions a day is a 1.1 MB changelog record, which a
#: broker at the default refuses, stopping the worker on that batch at every restart. The
#: records FinFlow re-keys or dead-letters are an input record plus headers.
MAX_RECORD_BYTES = 64 << 20


def create_app(conf: settings_module.Settings) -> faust.App:
    """Build the Faust app from FinFlow settings."""
    return faust.App(
        conf.app_id,
        origin="finflow.app",
        autodiscover=["agents", "finflow.views"],
        broker=list(conf.broker_urls),
        broker_credentials=kafka_security.faust_credentials(conf.broker_security),
        store="rocksdb://",
        # One directory per app id, as Faust's own default: apps sharing FINFLOW_DATA_DIR
        # would otherwise open each other's table files (same table names).
        datadir=str(Path(conf.data_dir) / conf.app_id),
        web_port=conf.web_port,
        web_bind=conf.web_host,
        canonical_url=conf.web_url,
        topic_partitions=conf.topic_partitions,
        topic_replication_factor=conf.topic_replication,
        topic_allow_declare=True,
        topic_disable_leader=True,
        processing_guarantee=conf.processing_guarantee,
        broker_session_timeout=conf.session_timeout_ms / 1000,
        broker_heartbeat_interval=conf.heartbeat_ms / 1000,
        broker_commit_interval=timedelta(seconds=1),
        table_standby_replicas=conf.standby_replicas,
        consumer_auto_offset_reset="earliest",
        key_serializer="raw",
        value_serializer="raw",
        producer_linger=0.005,
        producer_max_batch_size=512 * 1024,
        producer_max_request_size=MAX_RECORD_BYTES,
        web_enabled=True,
        # Faust's own /router and /table views answer without FinFlow's token check (the
        # key view serves an account's raw value); FinFlow forwards with its own views.
        web_router_enabled=False,
        web_tables_enabled=False,
        web_application_options={"middlewares": [json_errors]},
    )


app = create_app(settings)
