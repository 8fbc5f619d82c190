"""The metering use cases: recording and summarising usage (service), meters, corrections."""

from server.metering.service import BatchOutcome, Metering

__all__ = ["BatchOutcome", "Metering"]
