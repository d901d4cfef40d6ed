"""Benchmarks of botmsg-async against a raw aiohttp loop and httpx.

Run ``python -m benchmarks --help``; ``benchmarks/README.md`` explains the
scenarios, what is measured and how, and holds the latest results.
"""
