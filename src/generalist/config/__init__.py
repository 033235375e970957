"""Typed run configuration (being split into rooms: schema, building, validation)."""

from generalist.config.schema import *  # noqa: F403
