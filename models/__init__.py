"""Typed records of FinFlow: transactions, aggregates, validation errors."""
