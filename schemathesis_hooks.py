"""schemathesis hooks for this API, loaded by `schemathesis.toml` (`hooks`).

`Idempotency-Key` (docs/api.md) is state: a key used once with one request is 422
`idempotency_key_reused` with any other, which no schema can describe. schemathesis generates
short keys ("0", "00") and sends them with many bodies, so most of its schema-valid `POST`s
would be refused that way, reported as valid requests rejected (ST202) and kept from reaching
the handlers. Before each call, a key the document allows is therefore made unique to this run
and this request: what was generated (cut to leave room), then "." and 16 hex digits of a
digest of the run and the request (method, path, query, media type, body: the service's
fingerprint includes the Content-Type). The result is still a key the
document allows (checked against the document's own schema here), the same request repeated
keeps its key (so replays still happen), and a key the document forbids is sent as generated,
so its rejection is still tested. The Rust contract test (tests/tests/api/contract.rs) checks
every answer of a key, reuse included, and the exact length bounds.
"""

import hashlib
import uuid

import jsonschema
import schemathesis

HEADER = "Idempotency-Key"
RUN = uuid.uuid4().hex


def _key_schema(operation):
    for parameter in operation.definition.raw.get("parameters", []):
        if parameter.get("in") == "header" and parameter.get("name", "").lower() == HEADER.lower():
            return parameter.get("schema")
    return None


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    key = case.headers.get(HEADER) if case.headers else None
    schema = _key_schema(case.operation)
    if not isinstance(key, str) or schema is None or not jsonschema.Draft202012Validator(schema).is_valid(key):
        return
    content_type = next((v for k, v in (case.headers or {}).items() if k.lower() == "content-type"), None)
    media_type = content_type or getattr(case, "media_type", None)
    request = repr((RUN, case.method, case.formatted_path, sorted((case.query or {}).items()), media_type, case.body))
    suffix = "." + hashlib.sha256(request.encode()).hexdigest()[:16]
    room = schema.get("maxLength", len(key) + len(suffix)) - len(suffix)
    unique = key[:room] + suffix
    if not jsonschema.Draft202012Validator(schema).is_valid(unique):
        raise AssertionError(f"{unique!r} breaks the document's {HEADER} schema {schema}")
    case.headers[HEADER] = unique
