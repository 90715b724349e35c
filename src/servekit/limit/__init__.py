"""servekit.limit."""
