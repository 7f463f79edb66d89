"""Errors an expert group raises on purpose; the dispatcher tells them apart from a dead or slow group."""

from __future__ import annotations

from moeserve.router.errors import MoeserveError


class GroupDrainingError(MoeserveError):
    """The group is draining and takes no new rows; send them to another replica (retryable)."""


class StaleRoutingError(MoeserveError):
    """The rows name a local expert this group does not hold: the sender's placement is out of date."""
