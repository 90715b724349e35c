"""servekit.route."""
