"""The SuperLink's nodes with the public key each one stands for: a script `Federation` runs.

Flower 1.41's ``flwr supernode ls --format json`` leaves out each node's public key, and
``fedlora federation`` needs it: to find out whether a key is registered after
``flwr supernode register`` got no answer, and to show which key a node that is not on
the roster has. This makes the same Control API call (``ListNodes``) with the same
connection, client and error handling as that command, and prints the same JSON with
``public-key`` (PEM, as the SuperLink stores it) and ``name`` added::

    FLWR_HOME=fed/flwr-home python -I server/node_list.py fedlora

It runs in a process of its own, as ``flwr`` does: Flower reads the connection and any
login tokens from ``$FLWR_HOME`` and writes its messages to stdout. It imports nothing of
fedlora, so ``python -I`` runs it from its path whatever is installed.
"""

from __future__ import annotations

import sys

from flwr.cli.flower_config import read_superlink_connection
from flwr.cli.utils import (
    cli_output_handler,
    flwr_cli_exc_handler,
    init_http_client_from_connection,
    print_json_to_stdout,
)
from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=no-name-in-module


def main(connection: str) -> None:
    """Print ``{"success": true, "nodes": [...]}``, or Flower's JSON error on failure."""
    with cli_output_handler(output_format="json"):
        client = init_http_client_from_connection(read_superlink_connection(connection))
        try:
            with flwr_cli_exc_handler():
                response = client.ListNodes(ListNodesRequest())
        finally:
            client.close()
        nodes = [
            {
                "node-id": str(node.node_id),
                "status": node.status,
                "name": node.name,
                "public-key": node.public_key.decode("ascii", errors="replace"),
            }
            for node in response.nodes_info
        ]
        print_json_to_stdout({"success": True, "nodes": nodes})


if __name__ == "__main__":
    main(sys.argv[1])
