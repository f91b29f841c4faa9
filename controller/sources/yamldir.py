"""The YAML directory config source: `*.yaml`/`*.yml` files of Kubernetes objects, watched for changes.

Every file is read whole and judged whole: a file with any error (YAML syntax, unknown kind, schema
violation, an object already defined elsewhere) is reported as `ConfigError`s and its *last good*
version stays in force, so a typo never drops what that file described before, nor touches other
files. Changes are found by level, not by edge: on any filesystem event (and every `resync_interval`
seconds) the directory is rescanned and files whose content changed are parsed again; `on_change`
gets the new `MeshState` when the state or the error list changed. Names starting with "." are
ignored (editor swap files, our own temporary files, a Kubernetes ConfigMap mount's `..data`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from watchfiles import awatch

from api.authz.compile import KIND as AUTHORIZATION_POLICY
from api.resources import resource_version
from controller.registry import (
    SERVICE_IP_CLAIM,
    ConfigObject,
    MeshState,
    build_state,
    parse_config_object,
)
from controller.registry.authz_warnings import ConfigWarning, authz_warnings
from controller.registry.errors import ConfigError, PathPart

log = logging.getLogger("nodemesh.controller.yamldir")

SUFFIXES = (".yaml", ".yml")
MAX_FILE_BYTES = 8 * 1024 * 1024
MAX_DOCUMENT_NODES = 1_000_000
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_MERGE_TAG = "tag:yaml.org,2002:merge"

_BaseLoader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_BaseLoader):  # type: ignore[valid-type,misc]
    """Safe YAML as Kubernetes reads it: timestamps stay strings, duplicate keys are errors."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP_TAG]
        for first, resolvers in _BaseLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key_node.value!r}",
                        key_node.start_mark,
                    )
                seen.add(key)
        result: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return result


@dataclass(frozen=True, slots=True)
class ParsedFile:
    """One file's objects, or the reasons it is invalid (then `objects` must not be used)."""

    objects: tuple[ConfigObject, ...]
    errors: tuple[ConfigError, ...]


def _documents(text: str) -> Iterator[tuple[yaml.Node, Any]]:
    loader = _Loader(text)
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is not None:
                yield node, loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many nodes the document has once aliases are expanded (as JSON conversion will do)."""
    known = memo.get(id(node))
    if known is not None:
        return known
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    memo[id(node)] = size
    return size


def _line_of(node: yaml.Node, path: tuple[PathPart, ...]) -> int:
    """The 1-based line of the field at `path` in a document (of its deepest existing parent)."""
    for part in path:
        nxt: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            nxt = next(
                (v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(part)), None
            )
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            nxt = node.value[part]
        if nxt is None:
            break
        node = nxt
    return int(node.start_mark.line) + 1


def _syntax_error(exc: yaml.YAMLError, file: str) -> ConfigError:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    message = f"YAML: {context}, {problem}" if context else f"YAML: {problem}"
    line = int(mark.line) + 1 if mark is not None else None
    if mark is not None:
        message += f" (column {mark.column + 1})"
    opened = getattr(exc, "context_mark", None)
    if opened is not None and mark is not None and opened.line != mark.line:
        message += f"; the construct started at line {opened.line + 1}, column {opened.column + 1}"
    return ConfigError(message, file=file, line=line)


def parse_text(text: str, file: str) -> ParsedFile:
    """Parse one multi-document YAML file into valid objects, or the errors that make it invalid."""
    objects: list[ConfigObject] = []
    errors: list[ConfigError] = []
    holders: dict[str, ConfigObject] = {}  # claim -> the object of this file that made it first
    try:
        documents = list(_documents(text))
    except yaml.YAMLError as exc:
        return ParsedFile((), (_syntax_error(exc, file),))
    except RecursionError:
        return ParsedFile((), (ConfigError("YAML: nested too deeply", file=file),))
    for node, data in documents:
        line = int(node.start_mark.line) + 1
        if data is None:
            continue  # an empty document (`---` alone)
        try:
            # Aliases are shared in memory but copied by JSON: refuse "billion laughs" documents.
            if _expanded_size(node, {}) > MAX_DOCUMENT_NODES:
                raise ValueError(f"more than {MAX_DOCUMENT_NODES} values once aliases are expanded")
            body = json.loads(json.dumps(data))  # YAML-only values (binary, non-string keys...) → JSON
        except (TypeError, ValueError, RecursionError) as exc:
            errors.append(ConfigError(f"not representable as JSON: {exc!s}", file=file, line=line))
            continue
        obj, problems = parse_config_object(body, file=file, line=line)
        errors.extend(p.located(file, _line_of(node, p.path)) for p in problems)
        if obj is None:
            continue
        # Every claim, not only the key: a token value or clusterIP repeated in one file is as
        # ambiguous as one repeated across files (a second node would authenticate as the first).
        conflict = _conflict(obj, holders, same_file=True)
        if conflict is not None:
            errors.append(conflict)
            continue
        holders.update(dict.fromkeys(obj.claims(), obj))
        objects.append(obj)
    return ParsedFile(tuple(objects), tuple(errors))


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What Admin/Apply reports: the errors (nothing was written), or the warnings of what was."""

    errors: tuple[ConfigError, ...] = ()
    warnings: tuple[ConfigWarning, ...] = ()


@dataclass(slots=True)
class _FileState:
    digest: str
    parsed: ParsedFile
    last_good: tuple[ConfigObject, ...] | None = None  # the version last put in force


ChangeHandler = Callable[[MeshState], None]


class YamlDirectorySource:
    """Watches `config_dir` and keeps the mesh state built from its files (thread-safe)."""

    def __init__(
        self,
        config_dir: Path,
        on_change: ChangeHandler,
        *,
        trust_domain: str = "cluster.local",
        resync_interval: float = 10.0,
    ) -> None:
        self.config_dir = Path(config_dir)
        self._on_change = on_change
        self._trust_domain = trust_domain
        self._resync_ms = max(100, int(resync_interval * 1000))
        self._lock = threading.Lock()
        self._files: dict[str, _FileState] = {}
        self._state = MeshState(trust_domain)
        self._errors: list[ConfigError] = []
        self._read_errors: list[ConfigError] = []
        self._stale = False
        self._warned: dict[str, str] = {}  # object key -> version its warnings were logged for

    # --- public API -------------------------------------------------------------------------

    @property
    def state(self) -> MeshState:
        return self._state

    def load(self) -> MeshState:
        """Read the directory now (without calling `on_change`) and return the state."""
        self._refresh(notify=False)
        return self._state

    def errors(self) -> list[ConfigError]:
        """The problems in the directory right now (invalid files stay at their last good version)."""
        return list(self._errors)

    async def run(self) -> None:
        """Apply changes until cancelled: within ~0.1 s of an event, and on each resync interval."""
        stop = asyncio.Event()
        watcher = asyncio.create_task(self._watch(stop))
        try:
            await asyncio.shield(watcher)
        finally:
            # The watcher thread polls `stop` every step; without it a cancel waits for its timeout.
            stop.set()
            if not watcher.done():
                await asyncio.wait({watcher}, timeout=5)

    def write_objects(self, filename: str, yaml_text: str) -> WriteResult:
        """Validate `yaml_text` as the new content of `filename`; write it atomically only if valid.

        Used by Admin/Apply. Returns the errors (nothing is written then), or the warnings about
        the objects written (`authz_warnings`); on success the state is refreshed at once, so
        `on_change` has run before this returns.
        """
        if (
            not filename
            or "/" in filename
            or os.sep in filename
            or filename.startswith(".")
            or not filename.endswith(SUFFIXES)
            or not filename.isprintable()  # NUL makes the OS calls raise; others only confuse
        ):
            error = ConfigError("want a plain NAME.yaml (or NAME.yml) file name", file=filename)
            return WriteResult((error,))
        if len(yaml_text.encode()) > MAX_FILE_BYTES:
            return WriteResult((ConfigError(f"larger than {MAX_FILE_BYTES} bytes", file=filename),))
        parsed = parse_text(yaml_text, filename)
        if parsed.errors:
            return WriteResult(parsed.errors)
        with self._lock:
            # Judge against the files as they are now, not as last scanned: one written a moment
            # ago may wait for the watcher's debounce, or for the resync where inotify sees nothing.
            rescanned = self._rescan_or_keep()
            taken = {
                claim: obj
                for name, fs in self._files.items()
                if name != filename
                for obj in self._in_force(fs)
                for claim in obj.claims()
            }
            errors = [e for obj in parsed.objects if (e := _conflict(obj, taken)) is not None]
            if not errors:
                try:
                    _atomic_write(self.config_dir / filename, yaml_text)
                except OSError as exc:
                    errors = [ConfigError(f"cannot write: {exc.strerror or exc}", file=filename)]
        if errors:
            if rescanned:  # what that rescan found is news to `on_change` all the same
                self._on_change(self._state)
            return WriteResult(tuple(errors))
        log.info("config.written file=%s objects=%d", filename, len(parsed.objects))
        self._refresh(notify=True)
        return WriteResult(warnings=tuple(w for obj in parsed.objects for w in authz_warnings(obj)))

    # --- internals ----------------------------------------------------------------------------

    async def _watch(self, stop: asyncio.Event) -> None:
        self._refresh(notify=True)  # whatever changed between load() and the watcher's start
        async for changes in awatch(
            self.config_dir,
            watch_filter=None,  # any event → rescan; the scan itself decides what counts
            debounce=400,
            step=30,
            rust_timeout=self._resync_ms,
            yield_on_timeout=True,
            stop_event=stop,
        ):
            log.debug("config.event changes=%d", len(changes))
            await asyncio.to_thread(self._refresh, True)

    @staticmethod
    def _in_force(fs: _FileState) -> tuple[ConfigObject, ...]:
        return fs.parsed.objects if not fs.parsed.errors else (fs.last_good or ())

    def _scan(self) -> tuple[dict[str, Path], dict[str, OSError]]:
        """The YAML files by relative path, and the directories that could not be listed (the root
        as "."): without them a directory we may not list would look empty, its files deleted."""
        found: dict[str, Path] = {}
        unlisted: dict[str, OSError] = {}

        def failed(exc: OSError) -> None:
            where = Path(exc.filename) if exc.filename is not None else self.config_dir
            unlisted[where.relative_to(self.config_dir).as_posix()] = exc

        for dirpath, dirnames, filenames in os.walk(self.config_dir, onerror=failed, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if name.startswith(".") or not name.endswith(SUFFIXES):
                    continue
                path = Path(dirpath) / name
                found[path.relative_to(self.config_dir).as_posix()] = path
        return found, unlisted

    def _refresh(self, notify: bool) -> None:
        with self._lock:
            changed = self._rescan_or_keep()
        if changed and notify:
            self._on_change(self._state)

    def _rescan_or_keep(self) -> bool:
        """`_rescan`, keeping the last state if it fails (a bad directory must never kill the
        watcher). Caller holds the lock."""
        try:
            return self._rescan()
        except Exception as exc:
            log.exception("config.rescan_failed dir=%s", self.config_dir)
            self._errors = [ConfigError(f"internal error while reading the directory: {exc!r}")]
            self._stale = True  # recompute on the next rescan even if no file changed
            return True

    def _keep_state(self, error: ConfigError) -> bool:
        """Report `error` and keep the whole state as it is. Caller holds the lock."""
        changed = self._errors != [error]
        self._errors, self._stale = [error], True
        if changed:
            log.warning("config.error %s kept=previous_state", error)
        return changed

    def _rescan(self) -> bool:
        """Re-read the directory; True when the state or the errors changed. Caller holds the lock."""
        # A missing or unlistable directory (unmounted volume...) is not "delete everything".
        if not self.config_dir.is_dir():
            return self._keep_state(
                ConfigError("config directory is missing or not a directory", file=str(self.config_dir))
            )
        paths, unlisted = self._scan()
        if "." in unlisted:
            reason = unlisted["."].strerror or unlisted["."]
            return self._keep_state(
                ConfigError(f"cannot list the config directory: {reason}", file=str(self.config_dir))
            )
        # An unlistable subdirectory: report it, and keep its known files at their last state.
        read_errors = [
            ConfigError(f"cannot list: {exc.strerror or exc}", file=name)
            for name, exc in sorted(unlisted.items())
        ]
        dirty = {
            name
            for name in self._files
            if name not in paths and not any(name.startswith(f"{d}/") for d in unlisted)
        }
        for name in dirty:
            log.info("config.file_removed file=%s", name)
            del self._files[name]
        for name, path in sorted(paths.items()):
            try:
                data = _read(path)
            except FileNotFoundError:
                self._files.pop(name, None)  # removed between scan and read
                dirty.add(name)
                continue
            except (OSError, ValueError) as exc:
                # Unreadable now: report, and keep what the file said before.
                read_errors.append(ConfigError(f"cannot read: {exc}", file=name))
                continue
            digest = hashlib.sha256(data).hexdigest()
            previous = self._files.get(name)
            if previous is not None and previous.digest == digest:
                continue
            try:
                parsed = parse_text(data.decode(), name)
            except UnicodeDecodeError as exc:
                parsed = ParsedFile((), (ConfigError(f"not UTF-8 text: {exc.reason}", file=name),))
            last_good = previous.last_good if previous is not None else None
            self._files[name] = _FileState(digest, parsed, last_good)
            dirty.add(name)
        if not dirty and read_errors == self._read_errors and not self._stale:
            return False
        self._read_errors, self._stale = read_errors, False
        objects, errors = self._merge()
        errors = read_errors + errors
        state = build_state(objects, self._trust_domain)
        changed = state != self._state or errors != self._errors
        new_errors = [e for e in errors if e not in self._errors]
        for error in new_errors:
            log.warning("config.error %s", error)
        if self._errors and not errors:
            log.info("config.errors_cleared")
        if state != self._state:
            log.info("config.state_changed %s", state.summary())
        self._log_warnings(objects, state)
        self._state, self._errors = state, errors
        return changed

    def _log_warnings(self, objects: list[ConfigObject], state: MeshState) -> None:
        """Log `authz_warnings` of the objects in force, once per object version (the content hash
        of the policy `state` holds for it). Caller holds the lock."""
        warned: dict[str, str] = {}
        for obj in objects:
            policy = state.policies.get(obj.key) if obj.kind == AUTHORIZATION_POLICY else None
            if policy is None:
                continue
            version = resource_version(policy)
            warned[obj.key] = version
            if self._warned.get(obj.key) == version:
                continue
            for warning in authz_warnings(obj):
                log.warning("config.warning %s", warning)
        self._warned = warned  # a removed object is forgotten: re-adding it warns again

    def _merge(self) -> tuple[list[ConfigObject], list[ConfigError]]:
        """Objects in force and errors, file by file in path order; the first definition of a key wins."""
        taken: dict[str, ConfigObject] = {}
        objects: list[ConfigObject] = []
        errors: list[ConfigError] = []

        def take(items: tuple[ConfigObject, ...]) -> None:
            for obj in items:
                if any(c in taken for c in obj.claims()):
                    continue  # a stale last-good object now defined by an earlier file
                taken.update(dict.fromkeys(obj.claims(), obj))
                objects.append(obj)

        for name in sorted(self._files):
            fs = self._files[name]
            errors.extend(fs.parsed.errors)
            if not fs.parsed.errors:
                conflicts = [e for obj in fs.parsed.objects if (e := _conflict(obj, taken)) is not None]
                if not conflicts:
                    fs.last_good = fs.parsed.objects
                    take(fs.parsed.objects)
                    continue
                errors.extend(conflicts)
            take(fs.last_good or ())
        return objects, errors


def _conflict(
    obj: ConfigObject, taken: Mapping[str, ConfigObject], *, same_file: bool = False
) -> ConfigError | None:
    """The error for `obj` when it claims what an earlier object did (`taken`: claim -> holder)."""
    claim = next((c for c in obj.claims() if c in taken), None)
    if claim is None:
        return None
    holder = taken[claim]
    if claim == obj.key:
        what = "object"
    elif claim.startswith(SERVICE_IP_CLAIM):
        what = f"clusterIP {claim.removeprefix(SERVICE_IP_CLAIM)}"
    else:
        what = "node token (the same token value)"  # never the token itself: errors are logged
    if same_file:
        where = f"at line {holder.line} of this file"
        if claim != obj.key:  # a different object: name it (for the same key it is `obj` itself)
            where = f"by {holder.label} {where}"
    else:
        at_line = f":{holder.line}" if holder.line is not None else ""
        where = f"by {holder.label} in {holder.file}{at_line}"
    return ConfigError(
        f"duplicate {what}: already defined {where}",
        file=obj.file,
        line=obj.line,
        obj=obj.label,
    )


def _read(path: Path) -> bytes:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ValueError(f"file is {size} bytes, more than the limit of {MAX_FILE_BYTES}")
    return path.read_bytes()


def _atomic_write(path: Path, text: str) -> None:
    """Write via a hidden temporary file in the same directory + rename, so readers never see half."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
