"""The web console: static ES modules and CSS served at /ui, calling the same REST API."""
