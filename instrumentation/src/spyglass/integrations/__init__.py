"""Integrations with the frameworks spyglass instruments (Flask; Celery and SQLAlchemy later)."""
