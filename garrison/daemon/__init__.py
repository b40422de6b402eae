"""The daemon: aiohttp app factory, routes, middlewares, lifecycle under systemd."""
