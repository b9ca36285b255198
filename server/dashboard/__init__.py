"""`storefed dashboard`: the chain operator's pages over run and benchmark results.

:mod:`server.dashboard.runs` finds and summarises results (no web), :mod:`server.dashboard.pages`
writes the HTML, :mod:`server.dashboard.app` is the ASGI app and :func:`serve_dashboard`.
"""
