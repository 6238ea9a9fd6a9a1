"""The admin API's OpenAPI 3.1 document, served at ``/api/openapi.json``.

One table (:data:`OPERATIONS`) names every operation the admin listener routes, its
answers and their schemas; the schemas come from pydantic models (the configuration's
``User``, ``Group`` and ``Folder`` for account bodies, api_models.py for the rest) through
``model_json_schema``, never copied by hand, so a key added to the config is in the API
and its document at once. tests/test_openapi.py holds the table to the router both ways
(every route documented, every documented path routed) and validates every answer the
tests receive against the document.

The account bodies are the config models with what an API call may not set taken out
(``password_hash_file``, ``generate_password``: files of the server) and a plain
``password`` added (hashed by the server); the replies never carry a password or its hash,
which the reply schemas state (``not: required: [password_hash]``) so the validator
checks it on every reply.
"""

from __future__ import annotations

import ast
import copy
import inspect
import re
import textwrap
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from scriptsftp.server.ops import api_models as M
from scriptsftp.server.support.config import Filter, Folder, Group, User

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{model}"

#: routes of the admin listener that are HTML pages for a browser, not API (the dashboard)
NOT_DOCUMENTED = frozenset({("GET", "/"), ("GET", "/accounts"), ("POST", "/login"), ("GET", "/login/{code}"),
                            ("POST", "/logout")})

#: user fields an API call never sets: they name files of the server
FILE_ONLY_USER_FIELDS = ("password_hash_file", "generate_password")
#: what no reply ever carries
SECRET_FIELDS = ("password", "password_hash", *FILE_ONLY_USER_FIELDS)


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": REF.format(model=name)}


def _array(name: str) -> dict[str, Any]:
    return {"type": "array", "items": _ref(name)}


@dataclass(frozen=True)
class Param:
    name: str
    description: str
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})


@dataclass(frozen=True)
class Operation:
    """One method on one path: what it answers on success, which refusals it may give."""

    method: str
    path: str
    summary: str
    tag: str
    ok: int
    reply: dict[str, Any] | None          # the success body's schema; None: no body
    body: dict[str, Any] | None = None    # the request body's schema
    refusals: tuple[int, ...] = ()        # besides 401/403 (every /api operation) and 400/413 (a body)
    query: tuple[Param, ...] = ()
    secured: bool = True
    media: str = "application/json"
    description: str = ""
    created: bool = False                 # 201 with a Location header


_ACCOUNT_PARAM = {"name": "user", "group": "group", "folder": "folder"}


def _crud(kind: str, plural: str, tag: str, what: str) -> list[Operation]:
    """The same five operations for users, groups and folders."""
    base, item = f"/api/{plural}", f"/api/{plural}/{{name}}"
    cap = kind.capitalize()
    return [
        Operation("GET", base, f"List the {plural} of the account database, by name", tag, 200, _array(cap)),
        Operation("POST", base, f"Create a {kind}", tag, 201, _ref(cap), body=_ref(f"{cap}Create"),
                  refusals=(409,), created=True,
                  description=f"409 when the name is taken, by the database or by the configuration file "
                              f"(the message names FILE:LINE). {what}"),
        Operation("GET", item, f"One {kind}", tag, 200, _ref(cap), refusals=(404,)),
        Operation("PUT", item, f"Replace a {kind}'s definition", tag, 200, _ref(cap), body=_ref(f"{cap}Create"),
                  refusals=(404, 409),
                  description="Every field not in the body takes its default."
                              + (" The password is kept unless the body sets one (replies never carry it); "
                                 "public_keys are part of the definition: a PUT without them removes them."
                                 if kind == "user" else "")
                              + f" 409 for a {kind} defined in the configuration file (edit the file)."),
        Operation("PATCH", item, f"Change some fields of a {kind}", tag, 200, _ref(cap), body=_ref(f"{cap}Patch"),
                  refusals=(404, 409), description="Only the fields in the body change; null resets a field "
                                                   "that may be unset (inherited from groups or defaults)."),
        Operation("DELETE", item, f"Delete a {kind}", tag, 204, None, refusals=(404, 409),
                  description=("Ends the user's open sessions when [accounts] kick_on_disable is true."
                               if kind == "user" else f"409 while users or groups still name the {kind}.")),
    ]


SINCE = Param("since", "Unix seconds, ISO 8601, or an age: 90s, 30m, 12h, 7d")

SERVER_OPERATIONS: tuple[Operation, ...] = (
    Operation("GET", "/healthz", "Liveness: 503 when no script worker is alive or while draining", "server",
              200, _ref("Health"), refusals=(503,), secured=False,
              description='503 with status "draining" from the moment a drain starts (a load balancer\'s health '
                          'check takes the node out), "degraded" when no script worker is alive.'),
    Operation("GET", "/metrics", "Prometheus metrics (text exposition format)", "server", 200,
              {"type": "string"}, media="text/plain"),
    Operation("GET", "/api/openapi.json", "This document", "server", 200, {"type": "object"}),
    Operation("GET", "/api/status", "Version, node, config and script hashes, listeners, workers, drain", "server", 200,
              _ref("Status")),
    Operation("POST", "/api/drain", "Stop accepting, let open sessions end, then stop the daemon", "server",
              202, _ref("Drain"), refusals=(400,), query=(
                  Param("timeout", "seconds open sessions get before those left are ended (default [server] "
                                   "drain_timeout)", {"type": "number", "minimum": 0, "maximum": 604800}),),
              description="Answers at once, the listeners already closed; asked again while draining, the "
                          "drain under way (a shorter timeout brings its deadline closer). The daemon exits with status 0 once "
                          "every client connection has ended, or at the deadline after ending those left "
                          "(their unfinished uploads discarded, never published)."),
    Operation("POST", "/api/reload", "Re-read the configuration and scripts; apply all or nothing", "server",
              200, _ref("ReloadResult"), refusals=(422,),
              description="422 (with the same body) when the file or a script is refused; nothing changes then."),
    Operation("GET", "/api/sessions", "Open client connections and their transfers", "sessions", 200,
              _array("SessionInfo"),
              description="With [cluster] database: this node's connections, then every other live node's "
                          "logged-in sessions (no transfers or channels for those; bytes and last_activity as "
                          "of that node's last sync, every 5 s)."),
    Operation("DELETE", "/api/sessions/{id}", "Close a client connection", "sessions", 200, _ref("Kicked"),
              refusals=(404, 409, 503),
              description="A session of another node (cluster): that node ends it within 0.25 s plus a query; "
                          "the answer waits up to 3 s to see it gone, else says pending. 503: the cluster's "
                          "session table cannot be reached."),
    Operation("GET", "/api/scripts", "Bound scripts: version, bindings, last error", "scripts", 200,
              _array("ScriptInfo")),
    Operation("GET", "/api/events", "The audit trail: events, decisions and script runs, newest first",
              "scripts", 200, _array("AuditEvent"), refusals=(400,),
              query=(SINCE, Param("user", "user name"), Param("path", "virtual path or glob"),
                     Param("event", "event name"), Param("id", "event id"),
                     Param("decision", "allow, veto, error, done or denied"),
                     Param("limit", "1 to 1000 (default 100)"))),
    Operation("GET", "/api/bans", "Banned addresses and locked users", "defender", 200, _array("Ban")),
    Operation("DELETE", "/api/bans/{ip}", "Lift a ban (or user:NAME's password lock)", "defender", 200,
              _ref("Unbanned"), refusals=(400, 404)),
    Operation("POST", "/api/login-link", "A one-time dashboard login URL", "server", 200, _ref("LoginLink")),
)

#: admin_accounts.py: the account database's users, groups, folders and keys
ACCOUNT_OPERATIONS: tuple[Operation, ...] = (
    *_crud("user", "users", "users",
           "The home (and its home_folders) is made when [accounts] create_homes is true."),
    Operation("PUT", "/api/users/{name}/password", "Set a user's password", "users", 204, None,
              body=_ref("PasswordBody"), refusals=(404, 409),
              description="password (hashed here with argon2id) or password_hash, not both. Cached "
                          "verifications of the old password stop working at once."),
    Operation("POST", "/api/users/{name}/disable", "Disable a user", "users", 200, _ref("User"),
              body=_ref("DisableBody"), refusals=(404, 409),
              description="The reason is shown to the client where the protocol carries it. Ends the "
                          "user's open sessions when [accounts] kick_on_disable is true."),
    Operation("POST", "/api/users/{name}/enable", "Enable a user", "users", 200, _ref("User"), refusals=(404, 409)),
    Operation("GET", "/api/users/{name}/keys", "A user's public keys", "users", 200, _array("KeyInfo"),
              refusals=(404,)),
    Operation("POST", "/api/users/{name}/keys", "Add a public key", "users", 201, _ref("KeyInfo"),
              body=_ref("KeyBody"), refusals=(404, 409), created=True),
    Operation("DELETE", "/api/users/{name}/keys/{fingerprint}", "Remove a public key", "users", 204, None,
              refusals=(404, 409),
              description="The fingerprint as ssh-keygen -l prints it (SHA256:…), URL-encoded ('/' as %2F, "
                          "'+' as %2B); the SHA256: prefix may be left out."),
    *_crud("group", "groups", "groups", ""),
    *_crud("folder", "folders", "folders", ""),
)

OPERATIONS = SERVER_OPERATIONS + ACCOUNT_OPERATIONS

#: the one thing every refusal carries
_REFUSAL_TEXT = {
    400: "The request is malformed or a field is invalid (fields: what is wrong, per field)",
    401: "No token, or a wrong one",
    403: "A read-only token on a write operation, or (without tokens) a request from a web page",
    404: "No such account, key, session or ban",
    409: "Exists already, still in use, or defined in the configuration file",
    413: "The body is larger than the API accepts (64 KiB)",
    422: "Refused by validation (reload)",
    503: "Degraded",
}


def _schema_of(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template=REF)
    schema.pop("$defs", None)
    return schema


def field_docs(model: type[BaseModel]) -> dict[str, str]:
    """The docstring under each field of ``model`` and its bases (the config models document
    their keys that way), so the document explains a field as docs/configuration.md does."""
    docs: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or cls is BaseModel:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, after in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[stmt.target.id] = " ".join(after.value.value.split())
    return docs


def _describe_fields(schema: dict[str, Any], model: type[BaseModel]) -> None:
    for name, doc in field_docs(model).items():
        prop = schema.get("properties", {}).get(name)
        if prop is not None and "description" not in prop:
            prop["description"] = doc


def _account_schemas() -> dict[str, Any]:
    """User, Group and Folder in their three forms (create, patch, reply), from the config models."""
    _, top = models_json_schema([(User, "validation"), (Group, "validation"), (Folder, "validation")],
                                ref_template=REF)
    defs: dict[str, Any] = dict(top.get("$defs", {}))
    for model in (User, Group, Folder, Filter):
        _describe_fields(defs[model.__name__], model)
    out: dict[str, Any] = {k: v for k, v in defs.items() if k not in ("User", "Group", "Folder")}
    for model, extra in ((User, M.UserStamps), (Group, M.Stamps), (Folder, M.Stamps)):
        name = model.__name__
        create = copy.deepcopy(defs[name])
        create["title"] = f"{name}Create"
        props = create["properties"]
        for f in FILE_ONLY_USER_FIELDS:
            props.pop(f, None)
        if model is User:
            props["password"] = {"type": "string", "minLength": 1, "maxLength": 1024, "writeOnly": True,
                                 "description": "A password, hashed by the server (argon2id); or give password_hash."}
            props["password_hash"]["writeOnly"] = True
        out[f"{name}Create"] = create
        patch = copy.deepcopy(create)
        patch["title"] = f"{name}Patch"
        patch.pop("required", None)
        out[f"{name}Patch"] = patch
        reply = copy.deepcopy(defs[name])
        reply.pop("additionalProperties", None)
        for f in SECRET_FIELDS:
            reply["properties"].pop(f, None)
        stamps = _schema_of(extra)
        reply["properties"].update(stamps["properties"])
        reply["required"] = sorted(set(reply.get("required", [])) | set(stamps.get("required", [])))
        reply["not"] = {"anyOf": [{"required": [f]} for f in SECRET_FIELDS]}
        reply["description"] = (reply.get("description", "") + " Replies never carry a password or its hash.").strip()
        out[name] = reply
    return out


def _reply_schemas() -> dict[str, Any]:
    _, top = models_json_schema([(m, "validation") for m in M.REPLY_MODELS], ref_template=REF)
    return dict(top.get("$defs", {}))


def _operation(op: Operation) -> dict[str, Any]:
    spec: dict[str, Any] = {"summary": op.summary, "tags": [op.tag],
                            "operationId": _operation_id(op)}
    if op.description:
        spec["description"] = op.description
    params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
              for p in re.findall(r"{(\w+)}", op.path)]
    params += [{"name": q.name, "in": "query", "required": False, "description": q.description, "schema": q.schema}
               for q in op.query]
    if params:
        spec["parameters"] = params
    if op.body is not None:
        spec["requestBody"] = {"required": True, "content": {"application/json": {"schema": op.body}}}
    ok: dict[str, Any] = {"description": "OK" if op.ok < 300 and not op.created else "Created"}
    if op.ok == 204:
        ok["description"] = "Done (no body)"
    if op.reply is not None:
        ok["content"] = {op.media: {"schema": op.reply}}
    if op.created:
        ok["headers"] = {"Location": {"description": "The URL of what was created", "required": True,
                                      "schema": {"type": "string"}}}
    responses: dict[str, Any] = {str(op.ok): ok}
    refusals = set(op.refusals)
    if op.secured:
        refusals |= {401, 403}
    else:
        spec["security"] = []
    if op.body is not None:
        refusals |= {400, 413}
    for status in sorted(refusals):
        if status == 422 and op.path == "/api/reload":
            responses["422"] = {"description": _REFUSAL_TEXT[422],
                                "content": {"application/json": {"schema": _ref("ReloadResult")}}}
        elif status == 503:
            responses["503"] = {"description": _REFUSAL_TEXT[503],
                                "content": {"application/json": {"schema": _ref("Health")}}}
        else:
            responses[str(status)] = {"description": _REFUSAL_TEXT[status],
                                      "content": {"application/json": {"schema": _ref("ErrorReply")}}}
    spec["responses"] = responses
    return spec


def _operation_id(op: Operation) -> str:
    words = [w for w in re.split(r"[/{}._-]+", op.path) if w and w != "api"]
    return op.method.lower() + "".join(w.capitalize() for w in words)


def document(version: str) -> dict[str, Any]:
    """The whole document (a fresh dict: the caller may serialise or change it)."""
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(op)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "scriptsftp admin API",
            "version": version,
            "description": "The admin listener of scriptsftp ([admin] listen): status, sessions, scripts, "
                           "audit events, bans, and the accounts of the account database (users, groups, "
                           "folders, keys). Every call but /healthz needs a bearer token; a token with scope "
                           "\"read\" may only GET. Changes are recorded with the token's name as the actor "
                           "(api:NAME). See docs/admin.md and docs/accounts.md.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "tags": [{"name": t} for t in dict.fromkeys(op.tag for op in OPERATIONS)],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "[admin] token_hash or [[admin.tokens]]"}},
            "schemas": {**_reply_schemas(), **_account_schemas()},
        },
    }


__all__ = ["OPERATIONS", "NOT_DOCUMENTED", "Operation", "document"]
