"""Strategies for ``Trainer(strategy=...)`` and the communication accounting they share."""

from traincraft.strategies.communication import COLLECTIVES, CommunicationLedger, payload_bytes, wire_bytes

__all__ = ["COLLECTIVES", "CommunicationLedger", "payload_bytes", "wire_bytes"]
