"""Database schema and engines."""
