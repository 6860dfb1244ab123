import pytest
import torch

from traincraft.strategies import CommunicationLedger, wire_bytes


def test_ring_model_of_each_collective():
    assert wire_bytes("all_reduce", 800, 4) == 2 * 3 * 800 // 4
    assert wire_bytes("all_gather", 800, 4) == 3 * 800
    assert wire_bytes("reduce_scatter", 800, 4) == 3 * 800 // 4
    assert wire_bytes("broadcast", 800, 4) == 800 and wire_bytes("broadcast", 800, 4, is_source=False) == 0
    assert wire_bytes("all_reduce", 800, 1) == 0
    with pytest.raises(ValueError, match="unknown collective"):
        wire_bytes("gossip", 1, 2)


def test_ledger_counts_per_axis_and_kind_and_closes_steps():
    ledger = CommunicationLedger()
    ledger.record("all_reduce", torch.zeros(10, dtype=torch.float16), group_size=2, axis="data")
    ledger.record("all_reduce", torch.zeros(5), group_size=2, axis="data")
    ledger.record("all_gather", torch.zeros(3), group_size=2, axis="column")
    assert ledger.metrics() == {"comm/bytes": 0, "comm/wire_bytes": 0}  # nothing closed yet
    ledger.end_step()
    m = ledger.metrics()
    assert m["comm/data/all_reduce_bytes"] == 20 + 20 and m["comm/column/all_gather_bytes"] == 12
    assert m["comm/bytes"] == 52 and m["comm/wire_bytes"] == 40 + 12
    assert ledger.last_step()[("data", "all_reduce")]["calls"] == 2
    ledger.end_step()
    assert ledger.metrics()["comm/bytes"] == 0 and ledger.total_payload == 52 and ledger.steps == 2
    restored = CommunicationLedger()
    restored.load_state_dict(ledger.state_dict())
    assert restored.state_dict() == ledger.state_dict()
