"""/api/openapi.json: a valid OpenAPI 3.1 document that covers exactly what the admin listener routes.

Every answer the admin tests receive is also validated against it (adminkit.call runs
openapi_check on each), so a handler that drifts from its documented schema fails the
test that called it.
"""

from __future__ import annotations

import json
import re

from openapi_spec_validator import validate

from adminkit import TOKEN, admin_toml, call, get, token_hash  # noqa: F401  (token_hash: a fixture)

from scriptsftp.server import __version__
from scriptsftp.server.ops import openapi
from scriptsftp.server.ops.admin import AdminListener


def _routed() -> set[tuple[str, str]]:
    """(method, path template) of every route the admin listener's application registers."""
    app = AdminListener(object(), "127.0.0.1", 0).build_app()  # type: ignore[arg-type]  (routes only)
    out = set()
    for route in app.router.routes():
        if route.method in ("HEAD", "*"):
            continue  # aiohttp adds HEAD beside each GET
        info = route.resource.get_info() if route.resource is not None else {}
        out.add((route.method, info.get("formatter") or info.get("path")))
    return out


def _documented(doc: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}


def test_the_document_is_valid_openapi_3_1():
    doc = openapi.document(__version__)
    validate(doc)  # openapi-spec-validator: raises with the offending part
    assert doc["openapi"].startswith("3.1")
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids)), "operationIds must be unique"


def test_every_route_is_documented_and_every_documented_path_is_routed():
    routed, documented = _routed(), _documented(openapi.document(__version__))
    assert routed - openapi.NOT_DOCUMENTED == documented, {
        "routed, not in the document": sorted(routed - openapi.NOT_DOCUMENTED - documented),
        "in the document, not routed": sorted(documented - routed)}
    assert openapi.NOT_DOCUMENTED <= routed, "a page listed as not documented is gone: drop it from the list"


def test_every_api_operation_needs_a_token_and_says_what_refusals_it_gives():
    doc = openapi.document(__version__)
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            responses = op["responses"]
            if path == "/healthz":
                assert op["security"] == []
                continue
            assert "security" not in op, (method, path)  # the document's default: bearer
            assert {"401", "403"} <= set(responses), (method, path)
            if "requestBody" in op:
                assert {"400", "413"} <= set(responses), (method, path)
            if re.search(r"{\w+}", path) and not path.startswith("/api/bans"):
                assert "404" in responses, (method, path)


def test_account_bodies_come_from_the_config_models():
    """A key added to config.User reaches the document without anyone copying it."""
    from scriptsftp.server.support.config import Folder, Group, User

    schemas = openapi.document(__version__)["components"]["schemas"]
    for model in (User, Group, Folder):
        name = model.__name__
        if name not in schemas:
            continue  # the account operations are not in the document yet
        expected = set(model.model_fields) - set(openapi.FILE_ONLY_USER_FIELDS)
        create = set(schemas[f"{name}Create"]["properties"])
        assert create - {"password"} == expected, name
        assert schemas[f"{name}Create"]["additionalProperties"] is False  # unknown keys are refused
        reply = set(schemas[name]["properties"])
        assert not reply & set(openapi.SECRET_FIELDS), name
    # the field docstrings of the config models explain the fields in the document too
    doc = openapi.document(__version__)["components"]["schemas"]
    if "UserCreate" in doc:
        assert "no limit" in doc["UserCreate"]["properties"]["quota_size"]["description"]
    assert openapi.field_docs(User)["quota_files"] == "Files the home may hold; 0: no limit."


def test_the_daemon_serves_the_document_to_any_token(daemons, token_hash):  # noqa: F811
    d = daemons.start(admin_toml(token_hash))
    status, body, headers = call(d, "GET", "/api/openapi.json")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert body == json.loads(json.dumps(openapi.document(__version__)))
    assert body["info"]["version"] == __version__
    assert call(d, "GET", "/api/openapi.json", token=None)[0] == 401
    # the answers of the rest are checked against it by adminkit.call
    assert get(d, "/api/status")["version"] == __version__
    assert get(d, "/healthz", token=None)["status"] == "ok"
    status, text, _ = call(d, "GET", "/metrics")
    assert status == 200 and "scriptsftp" in text
    assert TOKEN not in d.log_text()


def test_the_validator_catches_a_missing_location_an_undocumented_status_and_a_leaked_hash():
    """openapi_check is what every admin test relies on: it must refuse what the document forbids."""
    import pytest

    import openapi_check

    api = openapi_check.load(openapi.document(__version__))
    stamps = {"created_at": 1.0, "created_by": "api:x", "updated_at": 1.0, "updated_by": "api:x"}
    group = json.dumps({"name": "g", **stamps}).encode()
    json_type = {"Content-Type": "application/json"}
    openapi_check.check_response(api, "http://h", "POST", "/api/groups", 201,
                                 {**json_type, "Location": "/api/groups/g"}, group)
    with pytest.raises(AssertionError, match="Location"):
        openapi_check.check_response(api, "http://h", "POST", "/api/groups", 201, json_type, group)
    with pytest.raises(AssertionError):
        openapi_check.check_response(api, "http://h", "GET", "/api/groups/g", 418, json_type, group)
    user = {"name": "u", "home": "/h", "password_changed": None, "last_login": None, "has_password": True, **stamps}
    openapi_check.check_response(api, "http://h", "GET", "/api/users/u", 200, json_type, json.dumps(user).encode())
    for secret in ({"password_hash": "$argon2id$v=19$x"}, {"password": "p"}):
        with pytest.raises(AssertionError):
            openapi_check.check_response(api, "http://h", "GET", "/api/users/u", 200, json_type,
                                         json.dumps({**user, **secret}).encode())
    with pytest.raises(AssertionError, match="PathNotFound|not found"):
        openapi_check.check_response(api, "http://h", "GET", "/api/undocumented", 200, json_type, b"{}")
