"""servekit.ops."""
