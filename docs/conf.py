"""Sphinx configuration of the botmsg-async documentation.

Built by ``.ci/run`` with ``sphinx-build -W --keep-going -n -b html docs <dir>``:
warnings are errors and every cross-reference must resolve (nitpicky), offline.
"""

from __future__ import annotations

import botmsg_async

project = "botmsg-async"
author = "botmsg-async developers"
copyright = "botmsg-async developers"  # noqa: A001 - the name Sphinx reads
release = botmsg_async.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

# No intersphinx: the build must pass offline (CI has no network but the package
# indexes), and intersphinx fetches the other projects' inventories over the web.
# References to outside types (aiohttp, yarl, the standard library) therefore
# cannot resolve; nitpick_ignore_regex below names exactly those, so that a broken
# reference to anything of ours still fails the build.

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

myst_enable_extensions = ["colon_fence", "deflist"]
# Headings get anchors, so that pages can link to a section: [text](page.md#anchor).
myst_heading_anchors = 3

# The docstrings are Google style.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# Defaults as written in the source (``asyncio.sleep``), not their repr
# (``<function sleep>``), which the signature parser cannot read.
autodoc_preserve_defaults = True
# A long signature gets one parameter per line.
python_maximum_signature_line_length = 88
autodoc_default_options = {"members": True, "show-inheritance": True}

nitpicky = True
nitpick_ignore_regex = [
    # Private helpers (a base class such as _report._ByOutcome) are not documented.
    (r"py:.*", r"botmsg_async(\.\w+)*\._\w+"),
    # Names inside private modules (the telemetry hook protocols of _observe) and the bare
    # names autodoc leaves for type aliases and private classes it cannot resolve.
    (r"py:.*", r"botmsg_async\._\w+\..*"),
    (r"py:class", r"(Items|Observer|URL|_\w+)"),
    # Outside projects and the standard library: no intersphinx offline (see above).
    (r"py:.*", r"(aiohttp|yarl|multidict|jsonschema|pytest|attrs?|opentelemetry|redis)(\..*)?"),
    (r"py:.*", r"(collections\.abc|typing|types|asyncio|enum|uuid|os|ssl)\..*"),
    (r"py:class", r"(Callable|Awaitable|Iterator|Iterable|AsyncIterator|AsyncIterable)"),
    (r"py:class", r"(Mapping|Sequence|Literal|Any|Self|Protocol|Final)"),
    (r"py:(class|exc|obj)", r"(int|float|str|bytes|bool|object|dict|list|tuple|None)"),
    (r"py:(class|exc|obj)", r"(BaseException|Exception|ValueError|RuntimeError|TypeError)"),
    (r"py:(class|exc|obj)", r"(NoneType|frozenset|set|type|datetime\..*)"),
]

html_theme = "furo"
html_title = f"botmsg-async {release}"
