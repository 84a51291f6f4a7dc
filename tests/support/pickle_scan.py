"""Every pickled object of a Beam runner API proto, opened, and searched for a secret.

A DoFn, CombineFn or coder that captured an API key ships it to every worker inside a pickle,
and base64 plus compression hide it from a search of the proto's bytes. :func:`unpickled_objects`
walks every FunctionSpec of a pipeline proto (those nested in ParDo, Combine, Read and WindowInto
payloads included), opens each pickle, searches it, and checks the object survives a round trip.
"""

from __future__ import annotations

import base64
import binascii
import bz2
import zlib
from collections.abc import Iterator
from typing import Any

from apache_beam.internal import pickler
from apache_beam.portability import common_urns, python_urns
from apache_beam.portability.api import beam_runner_api_pb2
from google.protobuf import wrappers_pb2

__all__ = ["PICKLED_URNS", "contains_key", "function_specs", "unpickled_objects"]

PICKLED_URNS = {python_urns.PICKLED_CODER, python_urns.PICKLED_COMBINE_FN,
                python_urns.PICKLED_DOFN, python_urns.PICKLED_DOFN_INFO,
                python_urns.PICKLED_SOURCE, python_urns.PICKLED_TRANSFORM,
                python_urns.PICKLED_WINDOW_MAPPING_FN, python_urns.PICKLED_WINDOWFN,
                python_urns.PICKLED_VIEWFN}
# Payloads that are themselves protos holding FunctionSpecs (DoFns, CombineFns, WindowFns).
NESTED_PAYLOADS = {
    common_urns.primitives.PAR_DO.urn: beam_runner_api_pb2.ParDoPayload,
    common_urns.primitives.ASSIGN_WINDOWS.urn: beam_runner_api_pb2.WindowIntoPayload,
    common_urns.deprecated_primitives.READ.urn: beam_runner_api_pb2.ReadPayload,
    common_urns.composites.COMBINE_PER_KEY.urn: beam_runner_api_pb2.CombinePayload,
    common_urns.composites.COMBINE_GLOBALLY.urn: beam_runner_api_pb2.CombinePayload,
    common_urns.combine_components.COMBINE_PER_KEY_PRECOMBINE.urn:
        beam_runner_api_pb2.CombinePayload,
    common_urns.combine_components.COMBINE_PER_KEY_MERGE_ACCUMULATORS.urn:
        beam_runner_api_pb2.CombinePayload,
    common_urns.combine_components.COMBINE_PER_KEY_EXTRACT_OUTPUTS.urn:
        beam_runner_api_pb2.CombinePayload,
    common_urns.combine_components.COMBINE_GROUPED_VALUES.urn: beam_runner_api_pb2.CombinePayload,
}


def function_specs(message) -> Iterator[beam_runner_api_pb2.FunctionSpec]:
    """Every FunctionSpec in a runner API proto, those inside known payloads included."""
    for field, value in message.ListFields():
        if field.type != field.TYPE_MESSAGE:
            continue
        if hasattr(value, "ListFields"):  # one message
            values = [value]
        elif hasattr(value, "keys"):  # a map
            values = list(value.values())
        else:  # a repeated field
            values = list(value)
        for item in values:
            if not hasattr(item, "ListFields"):
                continue
            if isinstance(item, beam_runner_api_pb2.FunctionSpec):
                yield item
                nested = NESTED_PAYLOADS.get(item.urn)
                if nested is not None and item.payload:
                    yield from function_specs(nested.FromString(item.payload))
            else:
                yield from function_specs(item)


def encoded_pickle(spec: beam_runner_api_pb2.FunctionSpec) -> bytes:
    """Beam's encoding of the pickle in a pickled FunctionSpec: base64 of a compressed pickle,
    for CombineFns, WindowFns and coders wrapped in a BytesValue, for coders after ``Name$``."""
    payload = spec.payload
    try:
        base64.b64decode(payload, validate=True)
    except binascii.Error:
        payload = wrappers_pb2.BytesValue.FromString(payload).value
    if spec.urn == python_urns.PICKLED_CODER:
        payload = payload.split(b"$", 1)[1]
    return payload


def raw_pickle(encoded: bytes) -> tuple[bytes, bool]:
    """The pickle itself, and whether it was zlib- (else bz2-) compressed."""
    data = base64.b64decode(encoded, validate=True)
    if data.startswith(b"BZh"):
        return bz2.decompress(data), False
    return zlib.decompress(data), True


def contains_key(data: bytes, key: str) -> bool:
    return key.encode() in data or key[8:24].encode() in data


def unpickled_objects(proto: beam_runner_api_pb2.Pipeline, key: str) -> tuple[list[Any], list[str]]:
    """Every pickled Python object of the pipeline, unpickled, pickled again and loaded back
    (an object that does not survive the trip fails the test), and the urns of the pickles that
    hold the key. Base64 and compression hide a key from a search of the proto's bytes, so each
    pickle is opened and searched."""
    objects, leaks = [], []
    for spec in function_specs(proto):
        if spec.urn not in PICKLED_URNS or not spec.payload:
            continue
        encoded = encoded_pickle(spec)
        raw, use_zlib = raw_pickle(encoded)
        if contains_key(raw, key):
            leaks.append(spec.urn)
        obj = pickler.loads(encoded, use_zlib=use_zlib)
        if spec.urn == python_urns.PICKLED_DOFN_INFO:
            obj = obj[0]  # (DoFn, args, kwargs, side inputs, windowing)
        again = pickler.loads(pickler.dumps(obj))
        assert type(again) is type(obj), spec.urn
        objects.append(obj)
    return objects, leaks
