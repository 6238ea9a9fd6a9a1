# zip_guard.py: refuse ZIP archives that are corrupt, encrypted, would write
# outside the folder they are extracted to, or expand far beyond their size
# (zip bombs).
#
# Scripts cannot import zipfile, so this reads the archive's own index (the
# central directory at its end) with api.file.read() and checks every entry:
#   - the index and each entry's local header must be where they claim, with
#     the same name in both (a mismatch is a classic trick to fool scanners);
#   - no encrypted entry (traditional ZipCrypto flag or WinZip AES);
#   - no absolute name ("/etc/x", "C:\x"), no ".." component, no symlink;
#   - no two entries sharing their data (overlapping "better zip bombs");
#   - total declared uncompressed size <= MAX_RATIO x the archive's size and
#     <= MAX_TOTAL; at most MAX_ENTRIES entries.
# Sizes are the ones the archive declares: checking them needs no
# decompression; the tool that extracts the archive later must still enforce
# them (unzip, Python's zipfile and 7-Zip do).
#
# Bind it (scriptsftp.toml):
#
#   [[bindings]]
#   event  = "pre-publish"
#   script = "zip_guard.py"
#   paths  = ["/inbox/**/*.zip"]
#   allow  = ["read"]               # api.file
#
# Try it:  scriptsftp script test zip_guard.py --event pre-publish \
#              --path /inbox/a.zip --file ./a.zip

MAX_RATIO = 100                  # uncompressed bytes per archive byte
MAX_TOTAL = 4 * 1024**3          # 4 GiB uncompressed in all
MAX_ENTRIES = 10_000

EOCD, EOCD64, LOCATOR64 = b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07"
CENTRAL, LOCAL = b"PK\x01\x02", b"PK\x03\x04"


def u16(b, at):
    return int.from_bytes(b[at:at + 2], "little")


def u32(b, at):
    return int.from_bytes(b[at:at + 4], "little")


def u64(b, at):
    return int.from_bytes(b[at:at + 8], "little")


def find_index(api, size):
    """(number of entries, central directory offset, its size), or a problem (str)."""
    tail_len = min(size, 22 + 65535)          # the index trailer + longest comment
    tail = api.file.read(tail_len, size - tail_len)
    at = tail.rfind(EOCD)
    if at < 0 or len(tail) - at < 22:
        return "it is not a ZIP archive or it is truncated (no end-of-archive record)"
    count, cd_size, cd_offset = u16(tail, at + 10), u32(tail, at + 12), u32(tail, at + 16)
    if count == 0xFFFF or cd_size == 0xFFFFFFFF or cd_offset == 0xFFFFFFFF:   # ZIP64
        loc = tail[at - 20:at] if at >= 20 else b""
        if not loc.startswith(LOCATOR64):
            return "its ZIP64 end-of-archive record is missing"
        rec = api.file.read(56, u64(loc, 8))
        if not rec.startswith(EOCD64) or len(rec) < 56:
            return "its ZIP64 end-of-archive record is damaged"
        count, cd_size, cd_offset = u64(rec, 32), u64(rec, 40), u64(rec, 48)
    if cd_offset + cd_size > size:
        return "it is truncated (its index points past the end of the file)"
    return count, cd_offset, cd_size


def zip64_sizes(extra, comp, uncomp, offset):
    """Apply a ZIP64 extra field (id 1) to the 32-bit values it overrides."""
    at = 0
    while at + 4 <= len(extra):
        kind, length = u16(extra, at), u16(extra, at + 2)
        if kind == 1:
            values, pos = [], at + 4
            for v in (uncomp, comp, offset):
                if v == 0xFFFFFFFF and pos + 8 <= at + 4 + length:
                    v = u64(extra, pos)
                    pos += 8
                values.append(v)
            return values[1], values[0], values[2]
        at += 4 + length
    return comp, uncomp, offset


def unsafe_name(name):
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    if ".." in name.replace("\\", "/").split("/"):
        return "a '..' component"
    return None


def problem(event, api):
    size = api.file.size
    if size < 22:
        return "it is not a ZIP archive (too small)"
    found = find_index(api, size)
    if isinstance(found, str):
        return found
    count, cd_offset, cd_size = found
    if count > MAX_ENTRIES:
        return f"it has {count} entries (at most {MAX_ENTRIES} are accepted)"
    if cd_size > 16 * 1024 * 1024:
        return "its index is too large"
    cd = api.file.read(cd_size, cd_offset)
    total, at, seen = 0, 0, set()
    for _ in range(count):
        if cd[at:at + 4] != CENTRAL or at + 46 > len(cd):
            return "it is corrupt (damaged index)"
        host, flags, method = cd[at + 5], u16(cd, at + 8), u16(cd, at + 10)
        comp, uncomp = u32(cd, at + 20), u32(cd, at + 24)
        name_len, extra_len, comment_len = u16(cd, at + 28), u16(cd, at + 30), u16(cd, at + 32)
        mode, offset = u32(cd, at + 38) >> 16, u32(cd, at + 42)
        raw_name = cd[at + 46:at + 46 + name_len]
        extra = cd[at + 46 + name_len:at + 46 + name_len + extra_len]
        at += 46 + name_len + extra_len + comment_len
        comp, uncomp, offset = zip64_sizes(extra, comp, uncomp, offset)
        name = raw_name.decode("utf-8", "replace")
        if flags & 1 or method == 99:
            return f"{name!r} is encrypted (password-protected archives are not accepted)"
        why = unsafe_name(name)
        if why:
            return f"entry {name!r} has {why}"
        if host == 3 and mode & 0o170000 == 0o120000:
            return f"entry {name!r} is a symbolic link"
        if offset in seen:
            return f"entries share their data at offset {offset} (overlapping entries: a zip bomb)"
        seen.add(offset)
        local = api.file.read(30 + name_len, offset)
        if not local.startswith(LOCAL) or local[30:] != raw_name:
            return f"it is corrupt (entry {name!r} is not where the index says)"
        if offset + 30 + comp > size:
            return f"it is truncated (entry {name!r} runs past the end of the file)"
        total += uncomp
    if total > MAX_TOTAL or total > MAX_RATIO * size:
        return (f"it would expand to {total} bytes from {size} "
                f"(more than {MAX_RATIO} times its size or {MAX_TOTAL} bytes: a zip bomb?)")
    api.log("zip checked", path=event.path, entries=count, uncompressed=total)
    return None


def on_pre_publish(event, api):
    why = problem(event, api)
    if why:
        api.veto(f"{event.path.rsplit('/', 1)[-1]} refused: {why}")
