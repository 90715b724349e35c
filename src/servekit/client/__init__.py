"""servekit.client."""
