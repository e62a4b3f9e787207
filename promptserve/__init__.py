"""promptserve for its users: `promptserve.client` (`Client`, `AsyncClient`) talks to a running
service over HTTP. The service itself is the `service` package."""
