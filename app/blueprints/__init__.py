"""HTTP blueprints: thin adapters from requests to services."""
