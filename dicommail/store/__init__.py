"""Durable state: atomic files and (later) the SQLite state database."""
