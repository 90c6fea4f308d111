import uuid

from program_timer.core.ids import uuid4_strings


def test_batch_uuids_are_distinct_version_4() -> None:
    ids = uuid4_strings(5000)
    assert len(set(ids)) == 5000
    for text in ids:
        value = uuid.UUID(text)
        assert value.version == 4 and value.variant == uuid.RFC_4122
        assert str(value) == text


def test_zero_ids() -> None:
    assert uuid4_strings(0) == []
