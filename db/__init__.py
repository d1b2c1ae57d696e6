"""Persistence: SQLAlchemy models, sessions and Alembic migrations. Imports nothing of mintq."""
