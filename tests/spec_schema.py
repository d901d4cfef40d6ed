"""The JSON Schemas shipped in ``botmsg_async/schemas``, derived from the project's OpenAPI spec.

The fake server validates requests against ``botmsg_async/schemas/send-request.json``;
that file is generated from ``spec/botmessage-openapi.yaml`` by this module, and
``tests/test_contract.py`` checks the two still agree. After editing the spec, run::

    python -m tests.spec_schema
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Final

import yaml

ROOT: Final = Path(__file__).resolve().parent.parent
SPEC: Final = ROOT / "spec" / "botmessage-openapi.yaml"
VENDOR_SPEC: Final = ROOT / "spec" / "vendor" / "botmessage-openapi.yaml"
REQUEST_SCHEMA: Final = ROOT / "botmsg_async" / "schemas" / "send-request.json"

_REF_PREFIX: Final = "#/components/schemas/"
#: OpenAPI keywords with no meaning to a JSON Schema validator.
_OPENAPI_ONLY: Final = frozenset({"example"})


def load_spec(path: Path = SPEC) -> dict[str, Any]:
    """The OpenAPI document at ``path``, parsed."""
    spec: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return spec


def _resolved(node: Any, schemas: dict[str, Any]) -> Any:
    """``node`` with every component ``$ref`` inlined and OpenAPI-only keys left out."""
    if isinstance(node, list):
        return [_resolved(item, schemas) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if ref is not None:
        if not (isinstance(ref, str) and ref.startswith(_REF_PREFIX)):
            raise ValueError(f"unsupported $ref {ref!r}")
        return _resolved(schemas[ref.removeprefix(_REF_PREFIX)], schemas)
    return {
        key: _resolved(value, schemas)
        for key, value in node.items()
        if key not in _OPENAPI_ONLY and not key.startswith("x-")
    }


def request_schema(spec: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema (2020-12) of the send request body the spec describes."""
    operation = spec["paths"][
        "/communications/department/{departmentUUID}/user/{userUUID}/botmessage/send"
    ]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    resolved: dict[str, Any] = _resolved(body, spec["components"]["schemas"])
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": (
            "Generated from spec/botmessage-openapi.yaml by tests/spec_schema.py; "
            "tests/test_contract.py keeps the two equal. Do not edit by hand."
        ),
        "title": "Send a bot message to user: request body",
        **resolved,
    }


def render(schema: dict[str, Any]) -> str:
    """``schema`` as the text of the shipped file."""
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    """Write ``send-request.json`` from the spec."""
    REQUEST_SCHEMA.parent.mkdir(exist_ok=True)
    REQUEST_SCHEMA.write_text(render(request_schema(load_spec())), encoding="utf-8")
    sys.stdout.write(f"wrote {REQUEST_SCHEMA.relative_to(ROOT)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
