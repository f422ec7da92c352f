"""What a site sends, recorded: every reply message the site's ClientApp hands to Flower is described
(each array's name, shape and dtype; each metric and configuration value) in ``<audit>/NNNN-<kind>.json``,
and its exact serialised objects (the bytes that travel) in ``NNNN-<kind>.bin``, so a hospital (and the
message-content test) can check that only weights of the model's shapes and scalar metrics leave."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from DeepDosimetricsLib.runtime.atomic import write_bytes_atomic, write_text_atomic


def describe_content(content: Any) -> dict[str, Any]:
    """A Flower RecordDict as plain data: arrays (name -> shape, dtype), metrics and configs (name -> value)."""
    described: dict[str, Any] = {"arrays": {}, "metrics": {}, "configs": {}}
    for name, record in content.array_records.items():
        described["arrays"][name] = {key: {"shape": [int(n) for n in array.shape], "dtype": str(array.dtype)}
                                     for key, array in record.items()}
    for name, record in content.metric_records.items():
        described["metrics"][name] = {key: value for key, value in record.items()}
    for name, record in content.config_records.items():
        described["configs"][name] = {key: (value if isinstance(value, (int, float, bool, str)) else repr(value))
                                      for key, value in record.items()}
    return described


def serialised_bytes(message: Any) -> bytes:
    """The serialised objects of a message (what Flower stores and sends), concatenated."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return b"".join(obj.deflate() for obj in get_all_nested_objects(message).values())


def record_reply(folder: Path, reply: Any) -> Path:
    """Write the description and the bytes of one outgoing message; the description's path."""
    folder.mkdir(parents=True, exist_ok=True)
    number = len(list(folder.glob("*.json"))) + 1
    kind = str(reply.metadata.message_type).replace(".", "-")
    stem = folder / f"{number:04d}-{kind}"
    description = {"message_type": reply.metadata.message_type, "time": time.time(), "pid": os.getpid(),
                   "error": str(reply.error.reason) if reply.has_error() else None,
                   "content": None if reply.has_error() else describe_content(reply.content)}
    payload = serialised_bytes(reply)
    write_bytes_atomic(stem.with_suffix(".bin"), lambda handle: handle.write(payload))
    return write_text_atomic(stem.with_suffix(".json"), json.dumps(description, indent=1, default=str) + "\n")


__all__ = ["describe_content", "serialised_bytes", "record_reply"]
