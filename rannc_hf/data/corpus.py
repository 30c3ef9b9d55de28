"""An offline default corpus: the English prose every Python installation already carries.

No download, no network: the text comes from the Python language reference shipped with the
interpreter (``pydoc_data.topics``), the docstrings of the standard library, and the documentation
(``.rst``/``.md``/``.txt`` files, package descriptions, docstrings) of the installed packages.
Sources are read as files (``ast.get_docstring`` on the source, never ``import``), filtered to
prose paragraphs, deduplicated, put in a deterministic order and cut to ``max_chars`` characters.

    from rannc_hf.data.corpus import load_default_corpus, default_corpus_texts
    ds = load_default_corpus(max_chars=4_000_000)   # datasets.Dataset with columns text, source
    print(ds, ds[0]["text"][:200])
    texts = default_corpus_texts(max_chars=200_000)  # list[str]; needs no `datasets`

The first call gathers the text (a few seconds) and caches it under
``$RANNC_HF_CACHE/corpus-<hash>`` (default ``~/.cache/rannc_hf``); later calls load the cache.
The hash covers the corpus settings, the Python version and the installed distributions, so a
new package set gives a new corpus rather than a stale one.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Optional

if TYPE_CHECKING:  # pragma: no cover
    import datasets

__all__ = ["CorpusOptions", "DEFAULT_MAX_CHARS", "cache_root", "corpus_cache_dir", "iter_documents",
           "gather_corpus", "default_corpus_texts", "load_default_corpus", "is_prose"]

CORPUS_VERSION = 1
DEFAULT_MAX_CHARS = 4_000_000
CACHE_ENV = "RANNC_HF_CACHE"

_STOPWORDS = frozenset(
    "the a an of to in is are be and or that this it for with as on by from at not if when which "
    "you your we can will may must should was were has have its their they there these those "
    "than then into but so such each any all only also one more other".split())
_SKIP_DIRS = frozenset({"__pycache__", "test", "tests", "testing", "idlelib", "turtledemo", "lib2to3",
                        "ensurepip", "site-packages", "dist-packages", "_vendor", "vendor", "vendored",
                        "third_party", "node_modules", "examples", "benchmarks", "locale", "tzdata"})
_SKIP_FILE_WORDS = ("license", "licence", "copying", "notice", "authors", "contributors", "requirements",
                    "entry_points", "top_level", "sources", "dependency_links", "record", "cmakelists",
                    "changelog", "changes", "news", "history", "wheel", "installer", "requested")
_DOC_EXTS = (".rst", ".md", ".txt")

_RE_ROLE = re.compile(r":[a-zA-Z:]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")
_RE_BACKTICKS = re.compile(r"`{1,2}([^`]*)`{1,2}_?")
_RE_MDLINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_RE_URL = re.compile(r"<?https?://\S+>?")
_RE_HTML = re.compile(r"<[^>\n]{1,200}>")
_RE_WS = re.compile(r"\s+")
_RE_WORD = re.compile(r"[A-Za-z]+")


@dataclass(frozen=True)
class CorpusOptions:
    """What goes into the corpus. Every field is part of the cache key."""

    max_chars: int = DEFAULT_MAX_CHARS      # stop after this many characters of text
    min_paragraph_chars: int = 40           # shorter paragraphs are dropped
    min_document_chars: int = 120           # shorter documents (after filtering) are dropped
    max_document_chars: int = 50_000        # longer documents are cut at a paragraph boundary
    min_letter_ratio: float = 0.80          # letters / non-space characters of a paragraph
    min_stopword_ratio: float = 0.12        # English function words / words of a paragraph
    max_chars_per_package: int = 200_000    # keeps one huge package from filling the corpus
    include_site_packages: bool = True      # False: only the interpreter's own documentation


def cache_root() -> Path:
    """The cache directory: ``$RANNC_HF_CACHE`` or ``~/.cache/rannc_hf``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rannc_hf").expanduser()


# --------------------------------------------------------------------------------------------
# prose filtering
# --------------------------------------------------------------------------------------------

def _clean_markup(text: str) -> str:
    text = _RE_ROLE.sub(r"\1", text)
    text = _RE_MDLINK.sub(r"\1", text)
    text = _RE_URL.sub("", text)
    text = _RE_HTML.sub("", text)
    text = _RE_BACKTICKS.sub(r"\1", text)
    return _RE_WS.sub(" ", text).strip()


def is_prose(paragraph: str, min_chars: int = 40, min_letter_ratio: float = 0.80,
             min_stopword_ratio: float = 0.12) -> bool:
    """True when a (whitespace-collapsed) paragraph looks like English prose rather than code or tables.

    >>> is_prose("Return the number of items in the container, or zero when it is empty.")
    True
    >>> is_prose("x = foo(a, b)[0] + {'k': 1}")
    False
    """
    if len(paragraph) < min_chars:
        return False
    nonspace = len(paragraph) - paragraph.count(" ")
    letters = sum(c.isalpha() for c in paragraph)
    if nonspace == 0 or letters / nonspace < min_letter_ratio:
        return False
    words = _RE_WORD.findall(paragraph)
    if len(words) < 6:
        return False
    stop = sum(w.lower() in _STOPWORDS for w in words)
    if stop / len(words) < min_stopword_ratio:
        return False
    return paragraph[0].isalnum() or paragraph[0] in "\"'(*-"


def _paragraphs(raw: str, markdown: bool = False) -> Iterator[str]:
    """Split raw doc text into paragraphs, dropping code blocks, doctests, headings underlines."""
    in_fence = False
    block: list[str] = []
    prev_colons = False
    for line in raw.splitlines() + [""]:
        stripped = line.strip()
        if markdown and stripped.startswith(("```", "~~~")):
            in_fence = not in_fence
            stripped = ""
        if in_fence:
            continue
        if not stripped:
            if block:
                para = "\n".join(block)
                lines_indented = all(b.startswith(("    ", "\t")) for b in block)
                if not (prev_colons and lines_indented):   # rst literal block after '::'
                    yield para
                prev_colons = para.rstrip().endswith("::")
                block = []
            continue
        if stripped.startswith((">>>", "...", ".. ", "$ ", "%", "|", "+--", "#!", "In [")):
            continue
        if len(set(stripped)) == 1 and stripped[0] in "=-~^*#+_`":   # heading underline
            continue
        if markdown:
            line = line.lstrip("#>").rstrip() if stripped.startswith(("#", ">")) else line
        block.append(line)


def _prose_document(raw: str, opts: CorpusOptions, seen: set, markdown: bool = False) -> str:
    kept: list[str] = []
    total = 0
    for para in _paragraphs(raw, markdown=markdown):
        text = _clean_markup(para)
        if text.endswith("::"):
            text = text[:-1]
        if not is_prose(text, opts.min_paragraph_chars, opts.min_letter_ratio, opts.min_stopword_ratio):
            continue
        key = hashlib.blake2b(text.lower().encode("utf-8", "replace"), digest_size=12).digest()
        if key in seen:
            continue
        seen.add(key)
        if total + len(text) > opts.max_document_chars:
            break
        kept.append(text)
        total += len(text) + 2
    doc = "\n\n".join(kept)
    return doc if len(doc) >= opts.min_document_chars else ""


# --------------------------------------------------------------------------------------------
# sources (each yields (source name, raw text) in a deterministic order)
# --------------------------------------------------------------------------------------------

def _walk(root: Path, exts: tuple[str, ...]) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d.lower() not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(exts):
                yield Path(dirpath) / name


def _read(path: Path, limit: int = 2_000_000) -> Optional[str]:
    try:
        if path.stat().st_size > limit:
            return None
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError):
        return None


_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_STMT_CONTAINERS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef, ast.If, ast.Try, ast.With,
                    ast.For, ast.While, ast.ExceptHandler) + ((ast.TryStar,) if hasattr(ast, "TryStar") else ())


def _docstrings(path: Path) -> Iterator[str]:
    src = _read(path)
    if not src or '"""' not in src and "'''" not in src:
        return
    try:
        tree = ast.parse(src, filename=str(path))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return
    # walk statements only (docstrings never live inside expressions): far cheaper than ast.walk
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, _DOC_NODES):
            name = getattr(node, "name", "")
            if not (name.startswith("_") and name != "__init__"):
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    yield doc
        for attr in ("body", "orelse", "finalbody", "handlers"):
            children = getattr(node, attr, None)
            if isinstance(children, list):
                stack.extend(c for c in reversed(children) if isinstance(c, _STMT_CONTAINERS))


def _language_reference() -> Iterator[tuple[str, str]]:
    """The Python language reference topics that ship with pydoc (a plain dict of strings)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    path = stdlib / "pydoc_data" / "topics.py"
    src = _read(path, limit=20_000_000)
    if not src:
        return
    try:
        tree = ast.parse(src)
        for node in tree.body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
                topics = ast.literal_eval(node.value)
                for key in sorted(topics):
                    if isinstance(topics[key], str):
                        yield f"python-reference:{key}", topics[key]
                return
    except (SyntaxError, ValueError):
        return


def _stdlib_docstrings() -> Iterator[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in _walk(stdlib, (".py",)):
        rel = path.relative_to(stdlib).as_posix()
        if rel.startswith("pydoc_data/"):
            continue
        for doc in _docstrings(path):
            yield f"stdlib:{rel}", doc


def site_package_dirs() -> list[Path]:
    """The installed-package directories (purelib, platlib, site.getsitepackages), de-duplicated."""
    import site

    cands = [sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib")]
    try:
        cands += list(site.getsitepackages())
    except AttributeError:  # some virtualenvs
        pass
    out: list[Path] = []
    for c in cands:
        if c and os.path.isdir(c):
            p = Path(c).resolve()
            if p not in out:
                out.append(p)
    return out


def _skip_doc_file(name: str) -> bool:
    low = name.lower()
    return any(w in low for w in _SKIP_FILE_WORDS)


def _package_sources(opts: CorpusOptions) -> Iterator[tuple[str, str, str]]:
    """Yield (package, source, raw) for every installed package: metadata description, doc files, docstrings."""
    for site_dir in site_package_dirs():
        for entry in sorted(os.listdir(site_dir)):
            path = site_dir / entry
            if entry.startswith((".", "_")) or entry.endswith((".pth", ".egg-link")):
                continue
            if entry.endswith((".dist-info", ".egg-info")):
                meta = path / ("METADATA" if entry.endswith(".dist-info") else "PKG-INFO")
                text = _read(meta)
                if text and "\n\n" in text:
                    pkg = entry.split("-")[0].lower()
                    yield pkg, f"metadata:{entry}", text.split("\n\n", 1)[1]
                continue
            if not path.is_dir() or entry.lower() in _SKIP_DIRS:
                continue
            pkg = entry.lower()
            for f in _walk(path, _DOC_EXTS + (".py",)):
                rel = f"{entry}/{f.relative_to(path).as_posix()}"
                if f.suffix == ".py":
                    for doc in _docstrings(f):
                        yield pkg, f"site:{rel}", doc
                elif not _skip_doc_file(f.name):
                    text = _read(f)
                    if text:
                        yield pkg, f"doc:{rel}", text


# --------------------------------------------------------------------------------------------
# assembling
# --------------------------------------------------------------------------------------------

def iter_documents(options: Optional[CorpusOptions] = None) -> Iterator[dict]:
    """Yield ``{"text", "source"}`` prose documents in a fixed order until ``options.max_chars`` is reached."""
    opts = options or CorpusOptions()
    seen: set = set()
    total = 0

    def emit(source: str, raw: str, markdown: bool) -> Optional[dict]:
        doc = _prose_document(raw, opts, seen, markdown=markdown)
        return {"text": doc, "source": source} if doc else None

    def sources() -> Iterator[tuple[str, str, bool]]:
        for src, raw in _language_reference():
            yield src, raw, False
        for src, raw in _stdlib_docstrings():
            yield src, raw, False
        if not opts.include_site_packages:
            return
        per_pkg: dict[str, int] = {}
        for pkg, src, raw in _package_sources(opts):
            if per_pkg.get(pkg, 0) >= opts.max_chars_per_package:
                continue
            per_pkg[pkg] = per_pkg.get(pkg, 0) + len(raw)
            yield src, raw, src.startswith(("doc:", "metadata:")) and not src.endswith(".rst")

    for src, raw, md in sources():
        rec = emit(src, raw, md)
        if rec is None:
            continue
        room = opts.max_chars - total
        if len(rec["text"]) > room:
            cut = rec["text"].rfind("\n\n", 0, room)
            if cut < opts.min_document_chars:
                return
            rec["text"] = rec["text"][:cut]
        total += len(rec["text"])
        yield rec
        if total >= opts.max_chars - opts.min_document_chars:
            return


def gather_corpus(options: Optional[CorpusOptions] = None) -> list[dict]:
    """All documents of :func:`iter_documents` as a list (no caching)."""
    return list(iter_documents(options))


def _fingerprint(opts: CorpusOptions) -> str:
    from importlib import metadata

    dists = sorted({(d.metadata.get("Name") or "", d.version or "") for d in metadata.distributions()})
    key = {"v": CORPUS_VERSION, "opts": asdict(opts), "py": sys.version.split()[0],
           "stdlib": sysconfig.get_paths()["stdlib"], "dists": dists if opts.include_site_packages else []}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def corpus_cache_dir(options: Optional[CorpusOptions] = None, cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """Where the corpus for ``options`` is (or will be) cached."""
    opts = options or CorpusOptions()
    return Path(cache_dir or cache_root()) / f"corpus-{_fingerprint(opts)}"


def _options(max_chars: Optional[int], options: Optional[CorpusOptions]) -> CorpusOptions:
    opts = options or CorpusOptions()
    if max_chars is not None:
        if int(max_chars) < 1000:
            raise ValueError(f"max_chars={max_chars} is too small for a corpus; use at least 1000")
        opts = CorpusOptions(**{**asdict(opts), "max_chars": int(max_chars)})
    return opts


def _ensure_jsonl(opts: CorpusOptions, cache_dir: Optional[str | os.PathLike], refresh: bool) -> Path:
    """Build (once) and return ``<cache>/corpus-<hash>/texts.jsonl``; safe when several ranks race."""
    final = corpus_cache_dir(opts, cache_dir)
    path = final / "texts.jsonl"
    if refresh and final.exists():
        shutil.rmtree(final, ignore_errors=True)
    if path.exists():
        return path
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        with open(tmp / "texts.jsonl", "w", encoding="utf-8") as f:
            for rec in iter_documents(opts):
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        with open(tmp / "options.json", "w") as f:
            json.dump({"version": CORPUS_VERSION, **asdict(opts)}, f, indent=1)
        try:
            os.rename(tmp, final)
        except OSError:       # another process finished first: use theirs
            if not path.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def default_corpus_texts(max_chars: Optional[int] = None, cache_dir: Optional[str | os.PathLike] = None,
                         options: Optional[CorpusOptions] = None, refresh: bool = False) -> list[str]:
    """The default corpus as a list of documents (cached as JSON lines; does not need ``datasets``)."""
    opts = _options(max_chars, options)
    return [r["text"] for r in _read_jsonl(_ensure_jsonl(opts, cache_dir, refresh))]


def load_default_corpus(max_chars: Optional[int] = None, cache_dir: Optional[str | os.PathLike] = None,
                        options: Optional[CorpusOptions] = None, refresh: bool = False) -> "datasets.Dataset":
    """The default corpus as a ``datasets.Dataset`` (columns ``text``, ``source``), cached with ``save_to_disk``.

    ``max_chars`` defaults to :data:`DEFAULT_MAX_CHARS`; ``cache_dir`` to :func:`cache_root`;
    ``refresh=True`` rebuilds the cache.
    """
    import datasets

    opts = _options(max_chars, options)
    jsonl = _ensure_jsonl(opts, cache_dir, refresh)
    ds_dir = jsonl.parent / "dataset"
    if not (ds_dir / "dataset_info.json").exists():
        recs = _read_jsonl(jsonl)
        ds = datasets.Dataset.from_dict({"text": [r["text"] for r in recs], "source": [r["source"] for r in recs]})
        tmp = jsonl.parent / f".dataset.tmp-{os.getpid()}-{time.monotonic_ns()}"
        ds.save_to_disk(str(tmp))
        try:
            os.rename(tmp, ds_dir)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return datasets.load_from_disk(str(ds_dir))


def corpus_stats(texts: Iterable[str]) -> dict:
    """Documents, characters and words of a corpus (for logs)."""
    docs = chars = words = 0
    for t in texts:
        docs += 1
        chars += len(t)
        words += len(t.split())
    return {"documents": docs, "chars": chars, "words": words}
