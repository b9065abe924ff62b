"""``vitcircuits serve RUN_DIR``: a local explorer of a run (live attention, head atlas, circuits, features).

Built on the standard library only (``http.server.ThreadingHTTPServer`` and one page of inline
vanilla JavaScript and CSS): no new dependencies, a small attack surface that is easy to review,
nothing to keep updated, and it works offline (the page fetches nothing but this server's routes).
It binds 127.0.0.1 by default, answers only GET, and serves files from inside the run folder only.
"""
from vitcircuits.serve.server import make_server, serve
from vitcircuits.serve.state import RunState

__all__ = ["RunState", "make_server", "serve"]
