"""Attacked, deeper than the core suite's pass: the same property-based fuzz of every route the
router has (junk path parameters, queries, headers and bodies), 60 examples a route instead of 10; and
the arbitrary-header-bytes fuzz with a token set, 40 a route instead of 6."""
from __future__ import annotations

from test_security import fuzz_every_route, fuzz_header_bytes_with_a_token, gateway  # noqa: F401  (gateway is the daemon fixture)

DEEP_EXAMPLES_PER_ROUTE = 60
DEEP_HEADER_BYTES_EXAMPLES_PER_ROUTE = 40


def test_a_deep_fuzz_of_every_route_gives_no_server_error_and_the_supervisor_survives(gateway, tmp_path):  # noqa: F811
    fuzz_every_route(gateway, tmp_path, DEEP_EXAMPLES_PER_ROUTE)


def test_a_deep_fuzz_of_header_bytes_with_a_token_gives_no_server_error(tmp_path):
    fuzz_header_bytes_with_a_token(tmp_path, DEEP_HEADER_BYTES_EXAMPLES_PER_ROUTE)
