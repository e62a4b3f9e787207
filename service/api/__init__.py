"""Thin HTTP routers: parse, authorize, call the engine, format."""
