"""The update a site's train reply carries, read and rewritten in place by the site's mods.

The reply's shape is the wire contract's (strategies/protocol.py): a plain reply holds
the site's full local tensors, a secure one its update (``local - global``) in the
request's tensor order. `clients/site/mods.py` clips that update whatever the shape.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Message
from flwr.common import Parameters, bytes_to_ndarray, ndarray_to_bytes
from flwr.compat.common import recorddict_compat as compat

from strategies.protocol import (
    ARRAYS,
    SECURE_OUT,
    from_record,
    read_request,
    secure_names,
    to_record,
)


def reply_update(
    request: Message, reply: Message
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(global tensors, the update the reply carries as ``local - global``)."""
    reference, _ = read_request(request)
    if SECURE_OUT in reply.content.array_records:
        arrays = reply.content.array_records[SECURE_OUT].values()
        names = secure_names(request)
        return reference, dict(zip(names, (bytes_to_ndarray(a.data) for a in arrays), strict=True))
    local = from_record(reply.content.array_records[ARRAYS])
    return reference, {
        k: local[k].astype(np.float64) - reference[k].astype(np.float64) for k in local
    }


def replace_update(request: Message, reply: Message, update: Mapping[str, np.ndarray]) -> None:
    """Write ``update`` back into the reply, in the reply's shape, in place."""
    reference, _ = read_request(request)
    records = reply.content.array_records
    if SECURE_OUT in records:
        params = Parameters(
            tensors=[ndarray_to_bytes(np.asarray(update[n])) for n in secure_names(request)],
            tensor_type="numpy.ndarray",
        )
        records[SECURE_OUT] = compat.parameters_to_arrayrecord(params, keep_input=True)
        return
    local = from_record(records[ARRAYS])
    new = {k: (reference[k].astype(np.float64) + update[k]).astype(local[k].dtype) for k in local}
    records[ARRAYS] = to_record(new)
