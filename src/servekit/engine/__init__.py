"""servekit.engine."""
