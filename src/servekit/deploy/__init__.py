"""Deployment shapes above the server and the gateway.

:mod:`servekit.deploy.ray` is servekit as a Ray Serve application (extra ``ray``);
:mod:`servekit.deploy.cli` is its ``servekit ray-serve`` command. This package itself imports
nothing optional, so the ``servekit`` command line builds without Ray installed.
"""
