"""The account routes of the admin API: users, groups, folders and keys in the account database.

Each route reads or changes the :class:`~scriptsftp.server.stores.accounts_db.AccountDb`
the daemon hands over (``AdminPort.accounts``), with the calling token's name as the actor
(``api:NAME``), so the change feed says who did what; the daemon's account watcher applies
the change (kicks, password cache) like any other, whoever made it.

A user created here gets their home and ``home_folders`` at once (``[accounts]
create_homes``), as a login would make them; a failure there is logged and left to the
login, which checks the home again. Bodies are the configuration's own models (``config.User``, ``Group``, ``Folder``), which
reject unknown keys: a 400 names each bad field with the same message ``scriptsftp check``
gives for the file. A password arrives only in a body, is hashed here (argon2id, a few at a
time) and is never logged nor sent back: replies drop ``password_hash``. Database refusals
map to statuses in one place (:func:`_refusal`): no such account 404, name taken or still in
use 409 (a name the configuration file defines is taken there: edit the file), invalid 400.
The database is blocking (SQLite or PostgreSQL), so every call runs off the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Mapping, TypeVar
from urllib.parse import quote

from aiohttp import web
from pydantic import BaseModel, ValidationError

from scriptsftp.server.core.passwords import hash_password
from scriptsftp.server.ops import api_models as M
from scriptsftp.server.ops.admin_tokens import GRANT
from scriptsftp.server.ops.openapi import FILE_ONLY_USER_FIELDS
from scriptsftp.server.stores.accounts_db import (
    AccountDb,
    AccountError,
    AccountInvalid,
    NoSuchAccount,
    StoredFolder,
    StoredGroup,
    StoredUser,
)
from scriptsftp.server.support.config import Folder, Group, User
from scriptsftp.server.support.keys import fingerprint, parse_public_key
from scriptsftp.server.support.tomlpos import format_loc

log = logging.getLogger("scriptsftp.admin")

Blocking = Callable[..., Awaitable[Any]]
Model = TypeVar("Model", bound=BaseModel)

MAX_PARALLEL_HASHES = 2  # argon2id costs ~150 ms and 64 MiB each: a burst of password changes waits its turn
_hashing = ThreadPoolExecutor(MAX_PARALLEL_HASHES, thread_name_prefix="scriptsftp-admin-hash")


class Refusal(Exception):
    """An answer other than success, raised anywhere in a handler and sent by :func:`_answer`."""

    def __init__(self, status: int, message: str, fields: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.fields = status, message, dict(fields or {})


def _refusal(exc: AccountError) -> Refusal:
    """The database's refusals as HTTP statuses: the one place they are mapped."""
    if isinstance(exc, NoSuchAccount):
        return Refusal(404, str(exc))
    if isinstance(exc, AccountInvalid):
        return Refusal(400, str(exc))
    return Refusal(409, str(exc))  # AccountExists, AccountInUse, and any other clash with what is stored


def _reply(status: int, body: Any, location: str | None = None) -> web.Response:
    resp = web.json_response(body, status=status)
    if location is not None:
        resp.headers["Location"] = location
    return resp


def _no_content() -> web.Response:
    return web.Response(status=204)


MAX_BODY = 64 * 1024  # account definitions are far smaller; the listener is built with this limit


async def _body(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    """The request's JSON object; a Refusal for anything else: 413 past MAX_BODY (at once when
    the announced length says so), 400 when the client leaves before its body is complete."""
    too_large = Refusal(413, f"the body is larger than {MAX_BODY} bytes")
    if (request.content_length or 0) > MAX_BODY:
        raise too_large
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    except (ConnectionResetError, asyncio.IncompleteReadError):
        raise Refusal(400, "the connection closed before the body was complete") from None
    if not raw.strip():
        if optional:
            return {}
        raise Refusal(400, "a JSON object is expected as the body")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Refusal(400, f"the body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise Refusal(400, "the body must be a JSON object")
    return data


def validate(model: type[Model], data: Mapping[str, Any], what: str) -> Model:
    """``data`` as ``model`` (JSON rules: "2030-01-01" is a date, "10GiB" a size), or a 400
    naming each bad field as ``scriptsftp check`` names a key of the file."""
    try:
        return model.model_validate_json(json.dumps(data))
    except ValidationError as exc:
        fields: dict[str, str] = {}
        for err in exc.errors():
            loc = _input_loc(err["loc"], data)
            key = format_loc(loc) if loc else "(body)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            fields[key] = f"{fields[key]}; {msg}" if key in fields else msg
        summary = "; ".join(f"{k}: {v}" for k, v in fields.items())
        raise Refusal(400, f"invalid {what}: {summary}", fields) from None


def _input_loc(loc: tuple[int | str, ...], data: Any) -> tuple[int | str, ...]:
    """The part of a pydantic error location that names the body's own keys: the tags pydantic
    adds for each member of a union (``expires.date``, ``expires.datetime``) are dropped, so
    both alternatives' messages land on the field the client sent."""
    out: list[int | str] = []
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        elif isinstance(data, dict):
            data = None  # a key that is missing: name it
        else:
            continue  # a union member's tag under a value, not a key of the input
        out.append(part)
    return tuple(out)


def _stamps(changed: Any) -> dict[str, Any]:
    return {"created_at": changed.created_at, "created_by": changed.created_by,
            "updated_at": changed.updated_at, "updated_by": changed.updated_by}


def user_reply(stored: StoredUser) -> dict[str, Any]:
    """A user as the API shows it: the definition without any secret, and its stamps."""
    body = stored.user.model_dump(mode="json", exclude={"password_hash", *FILE_ONLY_USER_FIELDS})
    body.update(_stamps(stored.changed), password_changed=stored.password_changed, last_login=stored.last_login,
                has_password=bool(stored.user.password_hash))
    return body


def group_reply(stored: StoredGroup) -> dict[str, Any]:
    return {**stored.group.model_dump(mode="json"), **_stamps(stored.changed)}


def folder_reply(stored: StoredFolder) -> dict[str, Any]:
    return {**stored.folder.model_dump(mode="json"), **_stamps(stored.changed)}


def _location(*parts: str) -> str:
    return "/api/" + "/".join(quote(p, safe="") for p in parts)


def key_fingerprint(line: str) -> str:
    try:
        return fingerprint(parse_public_key(line))
    except ValueError:
        return ""  # a key the database holds is valid; nothing to show for one that is not


def _normal_fingerprint(value: str) -> str:
    return value if value.startswith("SHA256:") else f"SHA256:{value}"


class AccountRoutes:
    """The /api/users, /api/groups and /api/folders handlers, bound to the daemon's database."""

    def __init__(self, database: Callable[[], AccountDb], blocking: Blocking,
                 make_home: Callable[[str], None]) -> None:
        self._database = database
        self._blocking = blocking
        self._make_home = make_home

    def add_to(self, router: web.UrlDispatcher) -> None:
        u = self._answer
        router.add_get("/api/users", u(self.list_users))
        router.add_post("/api/users", u(self.add_user))
        router.add_get("/api/users/{name}", u(self.get_user))
        router.add_put("/api/users/{name}", u(self.replace_user))
        router.add_patch("/api/users/{name}", u(self.patch_user))
        router.add_delete("/api/users/{name}", u(self.delete_user))
        router.add_put("/api/users/{name}/password", u(self.set_password))
        router.add_post("/api/users/{name}/disable", u(self.disable_user))
        router.add_post("/api/users/{name}/enable", u(self.enable_user))
        router.add_get("/api/users/{name}/keys", u(self.list_keys))
        router.add_post("/api/users/{name}/keys", u(self.add_key))
        router.add_delete("/api/users/{name}/keys/{fingerprint}", u(self.remove_key))
        for plural, kind in (("groups", "group"), ("folders", "folder")):
            router.add_get(f"/api/{plural}", u(self._list(kind)))
            router.add_post(f"/api/{plural}", u(self._add(kind)))
            router.add_get(f"/api/{plural}/{{name}}", u(self._get(kind)))
            router.add_put(f"/api/{plural}/{{name}}", u(self._replace(kind)))
            router.add_patch(f"/api/{plural}/{{name}}", u(self._patch(kind)))
            router.add_delete(f"/api/{plural}/{{name}}", u(self._delete(kind)))

    # --- one place for errors ---

    def _answer(self, handler: Callable[[web.Request], Awaitable[web.Response]]) \
            -> Callable[[web.Request], Awaitable[web.Response]]:
        async def answer(request: web.Request) -> web.Response:
            try:
                return await handler(request)
            except Refusal as r:
                body: dict[str, Any] = {"error": r.message}
                if r.fields:
                    body["fields"] = r.fields
                return web.json_response(body, status=r.status)
        return answer

    async def _db(self, fn: Callable[..., Any], *args: Any) -> Any:
        """One database call off the event loop, its refusals as :class:`Refusal`."""
        try:
            return await self._blocking(fn, *args)
        except AccountError as exc:
            raise _refusal(exc) from None

    @staticmethod
    def _actor(request: web.Request) -> str:
        return request[GRANT].actor

    def _in_file(self, kind: str, name: str) -> None:
        """A name the configuration file defines is read-only here: 409 naming FILE:LINE."""
        where = self._database().file_names.get(f"{kind}s", {}).get(name)
        if where:
            raise Refusal(409, f"{kind} {name!r} is defined in the configuration file ({where}): "
                               "change it there and reload")

    def _changed(self, request: web.Request, kind: str, name: str, action: str) -> None:
        log.info("%s %s %s through the admin API", kind, name, action, extra={"actor": self._actor(request)})

    # --- users ---

    async def list_users(self, request: web.Request) -> web.Response:
        users = await self._db(self._database().list_users)
        return _reply(200, [user_reply(u) for u in users])

    async def _stored_user(self, name: str) -> StoredUser:
        stored = await self._db(self._database().get_user, name)
        if stored is None:
            where = self._database().file_names.get("users", {}).get(name)
            raise Refusal(404, f"no user {name!r} in the account database"
                               + (f" (it is defined in the configuration file, {where})" if where else ""))
        return stored

    async def get_user(self, request: web.Request) -> web.Response:
        return _reply(200, user_reply(await self._stored_user(request.match_info["name"])))

    async def _user_from(self, data: dict[str, Any], what: str) -> User:
        """A User from a body: ``password`` hashed, the file-only keys refused, validated whole."""
        data = dict(data)
        password = data.pop("password", None)
        fields = {f: "not accepted over the API (it names a file of the server)" for f in FILE_ONLY_USER_FIELDS
                  if f in data}
        if password is not None and data.get("password_hash"):
            fields["password"] = "give password or password_hash, not both"
        if password is not None and not (isinstance(password, str) and 0 < len(password) <= 1024):
            fields["password"] = "a string of 1 to 1024 characters"
        if fields:
            raise Refusal(400, f"invalid {what}: " + "; ".join(f"{k}: {v}" for k, v in fields.items()), fields)
        user = validate(User, data, what)
        if password is not None:
            user = user.model_copy(update={"password_hash": await self._hash(password)})
        return user

    @staticmethod
    async def _hash(password: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(_hashing, hash_password, password)

    async def add_user(self, request: web.Request) -> web.Response:
        user = await self._user_from(await _body(request), "user")
        stored = await self._db(self._database().add_user, user, self._actor(request))
        self._changed(request, "user", user.name, "added")
        try:
            await self._blocking(self._make_home, user.name)
        except Exception as exc:  # noqa: BLE001 - the account stands; each login makes or checks it again
            log.warning("user %s: home %s not made at creation: %s (the login will try again)", user.name,
                        user.home, exc)
        return _reply(201, user_reply(stored), _location("users", user.name))

    def _same_name(self, data: dict[str, Any], name: str, kind: str) -> dict[str, Any]:
        if "name" in data and data["name"] != name:
            raise Refusal(400, f"invalid {kind}: name: {data['name']!r} differs from {name!r} in the URL "
                               "(renaming is not supported: add the new one, delete the old)",
                          {"name": "differs from the name in the URL"})
        return {**data, "name": name}

    async def replace_user(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        data = self._same_name(await _body(request), name, "user")
        self._in_file("user", name)
        current = await self._stored_user(name)
        user = await self._user_from(data, "user")
        if "password" not in data and "password_hash" not in data:
            user = user.model_copy(update={"password_hash": current.user.password_hash})
        stored = await self._db(self._database().update_user, user, self._actor(request))
        self._changed(request, "user", name, "replaced")
        return _reply(200, user_reply(stored))

    async def patch_user(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        data = self._same_name(await _body(request), name, "user")
        self._in_file("user", name)
        current = await self._stored_user(name)
        merged = current.user.model_dump(mode="json", exclude=set(FILE_ONLY_USER_FIELDS))
        if "password" in data:
            merged.pop("password_hash")
        user = await self._user_from({**merged, **data}, "user")
        stored = await self._db(self._database().update_user, user, self._actor(request))
        self._changed(request, "user", name, "changed")
        return _reply(200, user_reply(stored))

    async def delete_user(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self._in_file("user", name)
        await self._db(self._database().delete_user, name, self._actor(request))
        self._changed(request, "user", name, "deleted")
        return _no_content()

    async def set_password(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = validate(M.PasswordBody, await _body(request), "password")
        if (body.password is None) == (body.password_hash is None):
            raise Refusal(400, "invalid password: give password or password_hash (one of them)",
                          {"password": "give password or password_hash (one of them)"})
        if body.password_hash is not None and not body.password_hash.startswith("$argon2id$"):
            raise Refusal(400, "invalid password: password_hash: not an argon2id hash (scriptsftp hash-password)",
                          {"password_hash": "not an argon2id hash (scriptsftp hash-password)"})
        self._in_file("user", name)
        await self._stored_user(name)
        password_hash = body.password_hash if body.password is None else await self._hash(body.password)
        await self._db(self._database().set_password, name, password_hash, self._actor(request))
        self._changed(request, "user", name, "password set")
        return _no_content()

    async def _set_disabled(self, request: web.Request, disabled: bool) -> web.Response:
        name = request.match_info["name"]
        reason = validate(M.DisableBody, await _body(request, optional=True), "disable").reason if disabled else ""
        self._in_file("user", name)
        await self._db(self._database().set_disabled, name, disabled, reason, self._actor(request))
        self._changed(request, "user", name, "disabled" if disabled else "enabled")
        return _reply(200, user_reply(await self._stored_user(name)))

    async def disable_user(self, request: web.Request) -> web.Response:
        return await self._set_disabled(request, True)

    async def enable_user(self, request: web.Request) -> web.Response:
        return await self._set_disabled(request, False)

    async def list_keys(self, request: web.Request) -> web.Response:
        stored = await self._stored_user(request.match_info["name"])
        return _reply(200, [{"fingerprint": key_fingerprint(k), "key": k} for k in stored.user.public_keys])

    async def add_key(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        line = validate(M.KeyBody, await _body(request), "key").key.strip()
        try:
            parse_public_key(line)
        except ValueError as exc:
            raise Refusal(400, f"invalid key: {exc}", {"key": str(exc)}) from None
        self._in_file("user", name)
        fp = await self._db(self._database().add_key, name, line, self._actor(request))
        self._changed(request, "user", name, f"key {fp} added")
        return _reply(201, {"fingerprint": fp, "key": line}, _location("users", name, "keys", fp))

    async def remove_key(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        fp = _normal_fingerprint(request.match_info["fingerprint"])
        self._in_file("user", name)
        await self._db(self._database().remove_key, name, fp, self._actor(request))
        self._changed(request, "user", name, f"key {fp} removed")
        return _no_content()

    # --- groups and folders: the same five, on their own model ---

    def _kind(self, kind: str) -> tuple[type[Group] | type[Folder], Callable[[Any], dict[str, Any]], str]:
        return (Group, group_reply, "groups") if kind == "group" else (Folder, folder_reply, "folders")

    async def _stored(self, kind: str, name: str) -> Any:
        stored = await self._db(getattr(self._database(), f"get_{kind}"), name)
        if stored is None:
            where = self._database().file_names.get(f"{kind}s", {}).get(name)
            raise Refusal(404, f"no {kind} {name!r} in the account database"
                               + (f" (it is defined in the configuration file, {where})" if where else ""))
        return stored

    def _list(self, kind: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        _, reply, _ = self._kind(kind)

        async def handler(request: web.Request) -> web.Response:
            rows = await self._db(getattr(self._database(), f"list_{kind}s"))
            return _reply(200, [reply(r) for r in rows])
        return handler

    def _get(self, kind: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        _, reply, _ = self._kind(kind)

        async def handler(request: web.Request) -> web.Response:
            return _reply(200, reply(await self._stored(kind, request.match_info["name"])))
        return handler

    def _add(self, kind: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        model, reply, plural = self._kind(kind)

        async def handler(request: web.Request) -> web.Response:
            entry = validate(model, await _body(request), kind)
            stored = await self._db(getattr(self._database(), f"add_{kind}"), entry, self._actor(request))
            self._changed(request, kind, entry.name, "added")
            return _reply(201, reply(stored), _location(plural, entry.name))
        return handler

    def _replace(self, kind: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        model, reply, _ = self._kind(kind)

        async def handler(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            entry = validate(model, self._same_name(await _body(request), name, kind), kind)
            self._in_file(kind, name)
            await self._stored(kind, name)
            stored = await self._db(getattr(self._database(), f"update_{kind}"), entry, self._actor(request))
            self._changed(request, kind, name, "replaced")
            return _reply(200, reply(stored))
        return handler

    def _patch(self, kind: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        model, reply, _ = self._kind(kind)

        async def handler(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            data = self._same_name(await _body(request), name, kind)
            self._in_file(kind, name)
            current = await self._stored(kind, name)
            merged = getattr(current, kind).model_dump(mode="json")
            entry = validate(model, {**merged, **data}, kind)
            stored = await self._db(getattr(self._database(), f"update_{kind}"), entry, self._actor(request))
            self._changed(request, kind, name, "changed")
            return _reply(200, reply(stored))
        return handler

    def _delete(self, kind: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            self._in_file(kind, name)
            await self._db(getattr(self._database(), f"delete_{kind}"), name, self._actor(request))
            self._changed(request, kind, name, "deleted")
            return _no_content()
        return handler


__all__ = ["AccountRoutes", "MAX_BODY", "Refusal", "validate", "user_reply"]
