"""servekit.server."""
