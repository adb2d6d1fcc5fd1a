"""Virtual API keys: each maps to an attribution (org, division, team, ...). Only sha256 hashes are stored.

A keys file is a YAML/JSON list (or ``{keys: [...]}``) of entries such as::

    - sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
      name: support-chatbot
      team: support
      feature: ai_chatbot
      allow_header_attribution: true   # X-Spendstream-User etc. may refine the attribution

``spendstream gateway keygen --team marketing`` mints a key and adds its entry to the keys file. A running gateway
reloads the file when it changes (``KeysFile``) and on SIGHUP, so keys are added and revoked without a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import ConfigDict, Field, ValidationError

from spendstream.core.attribution import ATTRIBUTION_FIELDS, Attribution
from spendstream.core.config import ConfigError
from spendstream.core.events import MAX_TAG_VALUE_CHARS, MAX_TAGS, Name

KEY_PREFIX = "sk-ss-"
# Attribution headers a key may allow, and the attribution field each sets.
HEADER_FIELDS = {f"X-Spendstream-{name.capitalize()}": name for name in ATTRIBUTION_FIELDS}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class VirtualKey(Attribution):
    """A key's fixed attribution (the eight fields, at the top level of its entry) and what else it carries."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="Hex sha256 of the key; the key itself is never stored.")
    name: str = ""
    # at most half of an event's tags: the gateway adds its own (endpoint, key, upstream, routing) to each event
    tags: dict[Name, Annotated[str, Field(max_length=MAX_TAG_VALUE_CHARS)]] = Field(
        default_factory=dict, max_length=MAX_TAGS // 2
    )
    allow_header_attribution: bool = False


class KeyStore:
    """Look up a presented key by its hash; the final comparison is constant-time."""

    def __init__(self, keys: Iterable[VirtualKey]) -> None:
        self._by_hash: dict[str, VirtualKey] = {}
        for key in keys:
            if key.sha256 in self._by_hash:
                raise ConfigError(f"virtual key {key.name or key.sha256[:12]} is listed twice")
            self._by_hash[key.sha256] = key

    def __len__(self) -> int:
        return len(self._by_hash)

    def __iter__(self) -> Iterator[VirtualKey]:
        return iter(self._by_hash.values())

    def lookup(self, presented: str) -> VirtualKey | None:
        digest = hash_key(presented)
        key = self._by_hash.get(digest)
        if key is None or not hmac.compare_digest(key.sha256, digest):
            return None
        return key

    @classmethod
    def load(cls, path: Path, inline: Iterable[VirtualKey] = ()) -> KeyStore:
        try:
            data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"keys file {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"keys file {path}: not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"keys file {path}: not valid YAML/JSON: {exc}") from None
        if isinstance(data, dict):
            data = data.get("keys")
        if data is None:  # an empty file (or only comments): no keys yet, or all of them revoked
            data = []
        if not isinstance(data, list):
            raise ConfigError(f"keys file {path}: expected a list of keys (or a mapping with 'keys')")
        keys = list(inline)
        for i, entry in enumerate(data):
            try:
                keys.append(VirtualKey.model_validate(entry))
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                raise ConfigError(f"keys file {path}: entry {i}: {problems}") from None
        return cls(keys)


def data_dir_keys_file(data_dir: Path) -> Path:
    """The keys file a ``spendstream dev`` gateway watches, and where ``gateway keygen`` writes by default."""
    return data_dir.resolve() / "keys.yaml"


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class KeysFile:
    """A keys file and what was last loaded from it: ``changed()`` is a ``stat`` (modification time, size and
    inode, so an editor's write-and-rename is seen too)."""

    def __init__(self, path: Path, inline: Iterable[VirtualKey] = ()) -> None:
        self.path = path
        self.inline = tuple(inline)
        self._seen: tuple[int, int, int] | None = None

    def load(self, missing_ok: bool = False) -> KeyStore:
        """The keys now in the file (and the inline ones); raises ``ConfigError`` naming the problem.

        ``missing_ok``: a file that is not there holds no keys (a running gateway's file was deleted).
        """
        self._seen = _signature(self.path)  # before reading: a write during the read is seen next time
        if missing_ok and self._seen is None:
            return KeyStore(self.inline)
        return KeyStore.load(self.path, self.inline)

    def changed(self) -> bool:
        return _signature(self.path) != self._seen

    def still_listed(self, keys: KeyStore) -> KeyStore:
        """Of ``keys``, the inline ones and those whose hash the file still holds: what a file that cannot be
        loaded leaves in force, so a key deleted in the same edit as a bad entry is revoked all the same."""
        try:
            text = self.path.read_bytes().decode("utf-8", "replace")  # the hashes are ASCII whatever else is not
        except OSError:
            return keys
        inline, listed = {key.sha256 for key in self.inline}, uncommented(text)
        return KeyStore(key for key in keys if key.sha256 in inline or key.sha256 in listed)


def uncommented(text: str) -> str:
    """A YAML file's text without its comments: a hash left in a comment (a key commented out) is not listed."""
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def _replace_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` in one rename, checked as the gateway will read it, so a gateway never reads half
    of it and never a file it would refuse."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        KeyStore.load(Path(temporary))  # refuses a file the gateway could not load (e.g. a key listed twice)
        os.chmod(temporary, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def key_selector_matches(key: VirtualKey, selector: str) -> bool:
    """Whether ``selector`` names ``key``: the key itself, its name, or a prefix of 8 or more of its sha256."""
    if selector.startswith(KEY_PREFIX):
        return hmac.compare_digest(key.sha256, hash_key(selector))
    if len(selector) >= 8 and all(c in "0123456789abcdef" for c in selector) and key.sha256.startswith(selector):
        return True
    return bool(key.name) and key.name == selector


def remove_keys(path: Path, sha256s: set[str]) -> None:
    """Take the keys with these hashes out of a keys file (the rest, and their order, stay; comments do not)."""
    data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    entries = data.get("keys") if isinstance(data, dict) else data
    kept = [entry for entry in entries or [] if not (isinstance(entry, dict) and entry.get("sha256") in sha256s)]
    body = {**data, "keys": kept} if isinstance(data, dict) else kept
    _replace_file(path, yaml.safe_dump(body, sort_keys=False) if kept or isinstance(data, dict) else "[]\n")


def add_key(path: Path, entry: dict[str, Any]) -> None:
    """Add a key's entry to a keys file (created if missing), checked as the gateway will read it.

    A file that is a YAML list gets one line appended, so its comments stay; another shape (``keys:``) is
    rewritten. The new file replaces the old one in one rename, so a gateway never reads half of it.
    """
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    before = KeyStore.load(path) if text else KeyStore([])
    if text and not text.endswith("\n"):
        text += "\n"
    text += "- " + json.dumps(entry) + "\n"
    try:
        appended = yaml.safe_load(text)
    except yaml.YAMLError:
        appended = None
    if not (isinstance(appended, list) and len(appended) == len(before) + 1):
        data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
        keys = data.get("keys") if isinstance(data, dict) else data
        keys = [*(keys or []), entry]
        text = yaml.safe_dump({**data, "keys": keys} if isinstance(data, dict) else keys, sort_keys=False)
    _replace_file(path, text)
