"""The spyglass demo service (a minimal instrumented Flask app until the shop demo lands)."""
