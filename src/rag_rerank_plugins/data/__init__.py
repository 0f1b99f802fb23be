"""Bundled sample data for the demo and the quickstart notebook."""
