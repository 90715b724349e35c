"""A ClickHouse HTTP interface served by chDB, for testing the clickhouse-connect sink.

Run as ``python -m tests.usage.chdb_http PORT DATA_DIR``: every request's SQL (the ``query``
parameter, or the body; an INSERT's rows follow in the body) runs in chDB, the real ClickHouse
engine, and the result goes back in the format the statement asked for. Settings passed as URL
parameters (``insert_deduplication_token`` ...) are applied to the statement. Enough of the
protocol for clickhouse-connect; not a ClickHouse server.
"""

from __future__ import annotations

import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Lock
from urllib.parse import parse_qs, urlsplit

from chdb import session as chs

_NOT_SETTINGS = {"query", "database", "session_id", "session_timeout", "query_id",
                 "default_format", "compress", "decompress", "user", "password",
                 "session_check", "client_protocol_version",
                 # the HTTP interface's own settings (chDB has no HTTP layer)
                 "wait_end_of_query", "send_progress_in_http_headers",
                 "http_headers_progress_interval_ms", "enable_http_compression",
                 "http_zlib_compression_level", "cancel_http_readonly_queries_on_client_close"}


def main() -> None:
    port, data = int(sys.argv[1]), sys.argv[2]
    db = chs.Session(data)
    lock = Lock()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self._handle(b"")

        def do_POST(self) -> None:
            self._handle(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

        def _handle(self, body: bytes) -> None:
            params = {k: v[-1] for k, v in parse_qs(urlsplit(self.path).query).items()}
            if "query" not in params and not body:
                return self._reply(200, b"Ok.\n")  # the ping
            sql, data = (params["query"], body) if "query" in params else (body.decode(), b"")
            settings = {k: v for k, v in params.items() if k not in _NOT_SETTINGS}
            fmt = "TabSeparated"
            insert = sql.lstrip().upper().startswith("INSERT")
            match = re.search(r"\bFORMAT\s+(\w+)\s*$", sql, re.I)
            if match and not insert:
                fmt, sql = match.group(1), sql[:match.start()]
            if settings:
                text = "SETTINGS " + ", ".join(f"{k} = '{v}'" for k, v in settings.items()
                                               if re.fullmatch(r"\w+", k) and "'" not in v)
                sql = (re.sub(r"\bFORMAT\b", lambda _: f"{text} FORMAT", sql, count=1,
                              flags=re.I) if insert else f"{sql} {text}")
            try:
                with lock:
                    out = db.query(sql + ("\n" + data.decode() if data else ""), fmt)
                self._reply(200, out.bytes() if out is not None else b"")
            except Exception as exc:
                self._reply(500, f"Code: 1. DB::Exception: {exc}".encode())

        def _reply(self, status: int, payload: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("X-ClickHouse-Server-Display-Name", "chdb")
            self.send_header("X-ClickHouse-Summary", '{"read_rows":"0","written_rows":"0"}')
            self.end_headers()
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
