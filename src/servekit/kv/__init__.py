"""servekit.kv."""
