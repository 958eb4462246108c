"""The topics FinFlow writes take records beyond Kafka's 1 MB default, as its producer does."""

from __future__ import annotations

from agents.topology import accounts, by_account_topic, dlq_topic
from finflow.app import MAX_RECORD_BYTES, app
from tables.state import ID_RECORD


def test_a_busy_accounts_value_fits_the_changelog_and_the_producer() -> None:
    busy_day = 20_000 * ID_RECORD  # the de-duplication ids alone of 20,000 transactions a day
    assert busy_day > 1_000_000  # Kafka's default record limit
    assert 50 * busy_day <= MAX_RECORD_BYTES
    changelog = accounts.changelog_topic
    for topic in (changelog, by_account_topic, dlq_topic):
        assert topic.config is not None
        assert topic.config["max.message.bytes"] == str(MAX_RECORD_BYTES), topic
    assert app.conf.producer_max_request_size == MAX_RECORD_BYTES
