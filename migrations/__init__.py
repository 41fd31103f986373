"""Alembic migrations (packaged, so an installed a1111-proxy can migrate its database)."""
