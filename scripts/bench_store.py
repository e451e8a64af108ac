"""Storage benchmark: the ContextStore beside the primitive work it is built on.

For N synthetic ~1 KB records it measures single puts, batch puts (the bulk load every
later figure runs on), cache-miss and cache-hit gets, search, reopen and peak RSS. Each
slurp figure is measured in the same run, interleaved where possible, with a baseline of
the bare primitives (pyrage to the same recipients, Ed25519, a raw plyvel DB opened with the
options ``storage.kv.LevelDBKV`` uses, raw tantivy), and the ratio is reported.

Output: a table on stdout and the same as Markdown between ``<!-- bench:store:start -->`` and
``<!-- bench:store:end -->`` in BENCHMARKS.md (the rest of that file is left as it was).
Scratch data goes to ``bench-data/`` (git-ignored) and is deleted unless ``--keep``.

Nothing in the packages imports this script; it only uses their public API (and
``ContextStore.cache``/``.index``/``.keyring`` attributes, to clear and commit).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import platform
import random
import re
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import plyvel
import pyrage
import tantivy
from bench_report import git_revision, write_section  # scripts/, on sys.path
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pyrage import x25519

from crypto.keyring import read_identity_file
from crypto.roles import ADMIN_ROLE, DEFAULT_ROLES
from storage.address import ContextName
from storage.context_store import ContextStore, WriteRequest
from storage.index.base import FIELD_BOOSTS, TEXT_FIELDS
from storage.record import ContextRecord

ROOT = Path(__file__).resolve().parent.parent

START_MARKER = "<!-- bench:store:start -->"
END_MARKER = "<!-- bench:store:end -->"
ROLE = "backend_developer"  # default readers: itself, senior_software_architect, admin
BATCH_SIZE = 500
DEFAULT_RECORDS = 100_000
QUICK_RECORDS = 2_000
LEVELDB_CACHE_BYTES = 32 << 20  # as storage.kv.LevelDBKV opens LevelDB
SEARCH_LIMIT = 10
IDLE_CPU_SHARE = 0.1  # "idle": the process used under 10% of one core over IDLE_PROBE_S
IDLE_PROBE_S = 0.5
IDLE_TIMEOUT_S = 60.0

# -- the synthetic corpus ------------------------------------------------------------------

PROJECTS = ("atlas", "borealis", "cygnus", "draco")
TASKS = ("auth-rewrite", "search-tuning", "billing-v2", "infra-migration", "observability")
AGENTS = ("claude-code", "gpt-coder", "planner-7", "reviewer-2", "builder-3", "triage-1")
AREAS = {"src": ".py", "api": ".py", "docs": ".md", "tests": ".py", "infra": ".tf"}
NOUNS = (
    "request", "cache", "token", "session", "handler", "schema", "query", "index", "worker",
    "queue", "timeout", "retry", "payload", "endpoint", "migration", "replica", "shard",
    "lease", "scheduler", "socket", "buffer", "checksum", "snapshot", "compaction", "ledger",
    "tenant", "quota", "credential", "certificate", "webhook", "pipeline", "artifact",
    "manifest", "deployment", "rollout", "metric", "histogram", "trace", "span", "alert",
    "invoice", "customer", "refund", "subscription", "cursor", "iterator", "transaction",
    "lock", "mutex", "backoff", "heartbeat", "election", "quorum", "partition", "offset",
    "consumer", "producer", "topic", "tokenizer", "embedding", "prompt", "context", "agent",
    "planner", "parser", "validator", "serializer", "middleware", "router", "gateway",
    "resolver", "allocator", "arena", "bitmap", "bloom", "segment", "tombstone", "watermark",
)  # fmt: skip
ADJECTIVES = (
    "stale", "idempotent", "concurrent", "durable", "transient", "partial", "expired",
    "duplicate", "lazy", "eager", "bounded", "unbounded", "sharded", "encrypted", "signed",
    "compressed", "cold", "hot", "flaky", "slow", "noisy", "orphaned", "nested", "legacy",
)  # fmt: skip
VERBS = (
    "validates", "caches", "retries", "serialises", "batches", "streams", "evicts", "rotates",
    "signs", "encrypts", "compresses", "indexes", "migrates", "throttles", "deduplicates",
    "reconciles", "flushes", "replays", "prefetches", "invalidates", "normalises", "merges",
)  # fmt: skip
TECHNOLOGIES = (
    "python", "rust", "go", "typescript", "postgres", "redis", "kafka", "grpc", "fastapi",
    "django", "react", "kubernetes", "terraform", "leveldb", "tantivy", "trio", "nginx",
    "sqlite", "protobuf", "opentelemetry",
)  # fmt: skip
TAGS = (
    "auth", "performance", "bugfix", "refactor", "api", "storage", "security", "testing",
    "docs", "decision", "incident", "design", "tech-debt", "observability", "billing",
)  # fmt: skip
SENTENCES = (
    "The {a} {n} {v} each {n} before the {n} is written to {t}.",
    "When the {n} is {a}, the {n} {v} the {n} and records a {n} for the {n}.",
    "Decision: keep the {n} in {t} because the {a} {n} {v} too many {n} objects under load.",
    "Follow-up: the {n} {v} a {a} {n}; add a {n} test around {n} handling.",
    "Observed {a} {n} latency after the {n} change; the {n} now {v} the {n} in batches.",
    "Open question: should the {n} own the {n}, or should the {t} {n} do it?",
    "Root cause was a {a} {n} in the {n} path, so the {n} {v} twice.",
)
_NOUN_WEIGHTS = tuple(1.0 / (rank + 1) for rank in range(len(NOUNS)))  # Zipf-like
_SLOT = re.compile(r"\{([anvt])\}")
SUMMARY_CHARS = 120
CONTENT_BYTES = 800


@dataclass(frozen=True)
class Item:
    """One synthetic record, its address and the plaintext the baseline encrypts."""

    address: str
    record: ContextRecord
    plaintext: bytes  # the record's secret part as slurp encodes it (~1 KB)

    @property
    def raw_key(self) -> bytes:
        """The baseline's LevelDB key."""
        return b"v/" + self.address.encode()


class Corpus:
    """Deterministic records: record ``i`` depends only on ``(seed, i)``."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def item(self, i: int) -> Item:
        """Record ``i`` (a distinct context for every ``i``)."""
        rng = random.Random(f"{self.seed}:{i}")
        area = rng.choice(tuple(AREAS))
        path = f"{area}/{self._noun(rng)}/{self._noun(rng)}_{i:07d}{AREAS[area]}"
        address = (
            f"ucxl://{rng.choice(AGENTS)}:{ROLE}@{rng.choice(PROJECTS)}:{rng.choice(TASKS)}"
            f"/*^/{path}"
        )
        record = ContextRecord.from_fields(
            {
                "summary": self._summary(rng),
                "content": self._content(rng),
                "tags": rng.sample(TAGS, rng.randint(2, 4)),
                "technologies": rng.sample(TECHNOLOGIES, rng.randint(1, 3)),
            }
        )
        return Item(address, record, record.encode_secret())

    def items(self, start: int, stop: int) -> list[Item]:
        """Records ``start`` to ``stop - 1``."""
        return [self.item(i) for i in range(start, stop)]

    def queries(self, count: int) -> list[str]:
        """One- and two-word queries over words of middling frequency."""
        rng = random.Random(f"{self.seed}:queries")
        words = NOUNS[4:40] + TECHNOLOGIES
        out = []
        for _ in range(count):
            kind = rng.randrange(3)
            if kind == 0:
                out.append(rng.choice(words))
            elif kind == 1:
                out.append(f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS[:40])}")
            else:
                out.append(" ".join(rng.sample(NOUNS[:40], 2)))
        return out

    @staticmethod
    def _noun(rng: random.Random) -> str:
        return rng.choices(NOUNS, weights=_NOUN_WEIGHTS)[0]

    def _sentence(self, rng: random.Random) -> str:
        pick: dict[str, Callable[[], str]] = {
            "a": lambda: rng.choice(ADJECTIVES),
            "n": lambda: self._noun(rng),
            "v": lambda: rng.choice(VERBS),
            "t": lambda: rng.choice(TECHNOLOGIES),
        }
        return _SLOT.sub(lambda m: pick[m.group(1)](), rng.choice(SENTENCES))

    def _summary(self, rng: random.Random) -> str:
        return self._sentence(rng)[:SUMMARY_CHARS]

    def _content(self, rng: random.Random) -> str:
        parts: list[str] = []
        while sum(len(p) + 1 for p in parts) < CONTENT_BYTES - 40:
            parts.append(self._sentence(rng))
        return " ".join(parts)


# -- the primitive baseline ---------------------------------------------------------------


class RawBaseline:
    """What a put or get does at the bottom, with no slurp code in between.

    Put: pyrage encrypt to the same three recipients, in the same order (admin,
    senior_software_architect, backend_developer) + Ed25519 sign + a synced plyvel write.
    Get: plyvel get + Ed25519 verify + pyrage decrypt with the backend_developer identity.
    """

    def __init__(self, path: Path, store: ContextStore) -> None:
        keyring = store.keyring
        names = dict.fromkeys([*keyring.role_set.default_readers(ROLE), ADMIN_ROLE])
        self.recipients = [x25519.Recipient.from_str(keyring.recipient(name)) for name in names]
        self.identity = read_identity_file(keyring.identity_path(ROLE))
        self.signing_key = Ed25519PrivateKey.generate()
        self.verify_key = self.signing_key.public_key()
        self.db = plyvel.DB(
            str(path),
            create_if_missing=True,
            lru_cache_size=LEVELDB_CACHE_BYTES,
            paranoid_checks=True,
        )

    def seal(self, plaintext: bytes) -> bytes:
        """Signature (64 bytes) followed by the age ciphertext."""
        ciphertext = pyrage.encrypt(plaintext, self.recipients)
        return self.signing_key.sign(ciphertext) + ciphertext

    def put(self, item: Item) -> None:
        """One durable put."""
        self.db.put(item.raw_key, self.seal(item.plaintext), sync=True)

    def put_batch(self, items: Sequence[Item]) -> None:
        """One synced write batch."""
        with self.db.write_batch(sync=True) as batch:
            for item in items:
                batch.put(item.raw_key, self.seal(item.plaintext))

    def get(self, key: bytes) -> bytes:
        """Read, verify and decrypt one value."""
        value = self.db.get(key)
        self.verify_key.verify(value[:64], value[64:])
        return bytes(pyrage.decrypt(value[64:], [self.identity]))

    def close(self) -> None:
        """Close the raw DB."""
        self.db.close()


# -- results ------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the result table; ``ratio`` is slurp's cost over the baseline's."""

    metric: str
    slurp: float
    baseline: float | None = None
    target: str = "—"
    check: Callable[[Row], bool] | None = None
    rate: bool = False  # a throughput: the cost ratio is baseline / slurp

    @property
    def ratio(self) -> float | None:
        """Cost ratio (> 1: slurp is slower), or None without a baseline."""
        if not self.baseline or not self.slurp:
            return None
        return self.baseline / self.slurp if self.rate else self.slurp / self.baseline

    @property
    def met(self) -> bool | None:
        """Whether the target is met (None: no target)."""
        return None if self.check is None else self.check(self)

    def cells(self) -> list[str]:
        """The table cells: metric, slurp, baseline, ratio, target, met?."""
        ratio = self.ratio
        met = {None: "—", True: "yes", False: "**no**"}[self.met]
        return [
            self.metric,
            _num(self.slurp),
            "—" if self.baseline is None else _num(self.baseline),
            "—" if ratio is None else f"{ratio:.2f}x",
            self.target,
            met,
        ]


@dataclass
class Results:
    """Everything the report needs."""

    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _num(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def percentile(samples_ns: Sequence[int], pct: float) -> float:
    """Nearest-rank percentile of nanosecond samples, in microseconds."""
    ordered = sorted(samples_ns)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1] / 1000


def timed_ns(fn: Callable[[], object]) -> int:
    """Wall time of one call, in nanoseconds."""
    start = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - start


def log(message: str) -> None:
    """Progress on stderr (stdout carries the table)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def wait_until_idle() -> float:
    """Sleep until this process's background threads (LevelDB compaction, tantivy merges)
    go quiet, or ``IDLE_TIMEOUT_S`` passes; returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < IDLE_TIMEOUT_S:
        before = sum(os.times()[:2])
        time.sleep(IDLE_PROBE_S)
        if sum(os.times()[:2]) - before < IDLE_CPU_SHARE * IDLE_PROBE_S:
            break
    return time.monotonic() - started


def rss_breakdown() -> str:
    """Current resident memory, anonymous vs file-backed (mmapped LevelDB and tantivy files)."""
    try:
        lines = Path("/proc/self/status").read_text(encoding="ascii").splitlines()
    except OSError:
        return "unavailable"
    kib = {
        k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in lines) if k.startswith("Rss")
    }
    return ", ".join(f"{k[3:].lower()} {v / 1024:.0f} MB" for k, v in kib.items())


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the measurements ---------------------------------------------------------------------


@dataclass
class Settings:
    """Sample sizes, scaled down for small N."""

    records: int
    seed: int
    single_puts: int
    gets: int
    search_passes: int = 3
    queries: int = 100
    reopens: int = 3
    warmup: int = 20

    @classmethod
    def for_records(cls, records: int, seed: int, *, quick: bool) -> Settings:
        """Defaults: 500 single puts and 1000 gets (fewer for a quick or a small run)."""
        return cls(
            records=records,
            seed=seed,
            single_puts=100 if quick else 500,
            gets=max(1, min(300 if quick else 1000, records // 3)),
        )


class Bench:
    """One run: a fresh node and a raw baseline DB side by side under ``work``."""

    def __init__(self, work: Path, settings: Settings) -> None:
        self.settings = settings
        self.corpus = Corpus(settings.seed)
        self.rng = random.Random(settings.seed)
        self.node_root = work / "node"
        ContextStore.init(self.node_root, DEFAULT_ROLES)
        self.store = ContextStore.open(self.node_root)
        self.raw = RawBaseline(work / "raw-db", self.store)
        self.results = Results()
        self.next_extra = settings.records  # record numbers past N: warm-ups, single puts

    def close(self) -> None:
        """Close the store and the raw DB."""
        self.store.close()
        self.raw.close()

    def extras(self, count: int) -> list[Item]:
        """Fresh records beyond the bulk load."""
        start, self.next_extra = self.next_extra, self.next_extra + count
        return self.corpus.items(start, start + count)

    def run(self) -> Results:
        """Every measurement, in order (the bulk load first: the rest runs on it)."""
        self.batch_load()
        self.single_puts()
        self.record_crypto()
        self.gets()
        self.search()
        self.reopen()
        self.results.rows.append(
            Row("peak RSS, whole run (MB)", peak_rss_mb(), target="≤ 400 MB", check=_rss_ok)
        )
        self.results.notes.append(
            f"RSS at the end: {rss_breakdown()}. Peak RSS is the whole process: it includes the"
            " baseline's DB and the mmapped LevelDB and tantivy files (page cache, grows with N)."
        )
        return self.results

    def batch_load(self) -> None:
        """store_batch in batches of 500 vs encrypt+sign+one synced write_batch per 500.

        Not interleaved: slurp's background threads (tantivy indexing and merges, LevelDB
        compaction) would run during the baseline's batches and bill it for slurp's work.
        The baseline loads first, then the process waits until it is idle, then slurp.
        """
        n = self.settings.records
        warm = self.extras(100)
        self.raw.put_batch(warm)
        raw_ns = plain_bytes = 0
        for start in range(0, n, BATCH_SIZE):
            items = self.corpus.items(start, min(n, start + BATCH_SIZE))
            plain_bytes += sum(len(it.plaintext) for it in items)
            raw_ns += timed_ns(lambda items=items: self.raw.put_batch(items))
        log(f"baseline bulk load done: {_rate(n, raw_ns)}")
        wait_until_idle()
        self.store.store_batch([WriteRequest(it.address, it.record) for it in warm])
        slurp_ns = 0
        for start in range(0, n, BATCH_SIZE):
            reqs = [
                WriteRequest(it.address, it.record)
                for it in self.corpus.items(start, min(n, start + BATCH_SIZE))
            ]
            slurp_ns += timed_ns(lambda reqs=reqs: self.store.store_batch(reqs))
            if (start // BATCH_SIZE) % max(1, n // BATCH_SIZE // 10) == 0:
                log(f"bulk load {start + len(reqs)}/{n}: {_rate(start + len(reqs), slurp_ns)}")
        slurp_ns += timed_ns(self.store.index.commit)  # searchable: part of the load
        self.results.rows.append(
            Row(
                f"batch put, {BATCH_SIZE}/batch (records/s)",
                n / (slurp_ns / 1e9),
                n / (raw_ns / 1e9),
                target="≥ 2,500/s",
                check=lambda r: r.slurp >= 2500,
                rate=True,
            )
        )
        self.results.notes.append(
            f"Bulk load: {n:,} records in {slurp_ns / 1e9:.1f} s (baseline {raw_ns / 1e9:.1f} s,"
            f" run first, alone); mean plaintext {plain_bytes / n:,.0f} B; peak RSS after it"
            f" {peak_rss_mb():.0f} MB."
        )
        log(f"bulk load done: {_rate(n, slurp_ns)}")
        wait_until_idle()

    def single_puts(self) -> None:
        """ContextStore.store, one durable record per call, vs encrypt+sign+synced put."""
        warm = self.extras(self.settings.warmup)
        for it in warm:
            self.store.store(it.address, it.record)
            self.raw.put(it)
        slurp, raw = [], []
        for it in self.extras(self.settings.single_puts):
            slurp.append(timed_ns(lambda it=it: self.store.store(it.address, it.record)))
            raw.append(timed_ns(lambda it=it: self.raw.put(it)))
        for pct in (50, 99):
            self.results.rows.append(
                Row(f"single put p{pct} (µs)", percentile(slurp, pct), percentile(raw, pct))
            )
        log(f"single puts: slurp p50 {percentile(slurp, 50):.0f} µs")

    def record_crypto(self) -> None:
        """Envelope encryption alone: seal one ~1 KB record under the current data key
        (``Keyring.seal`` + finish) vs pyrage to the same 3 recipients; then the encrypted
        ingest rate of each with one Ed25519 signature a record, samples interleaved."""
        keyring = self.store.keyring
        readers = keyring.role_set.default_readers(ROLE)
        items = self.extras(self.settings.gets)
        digest = hashlib.sha256(b"header").digest()
        sign = self.raw.signing_key.sign
        seal, age, signed = [], [], []

        def sealed_one(it: Item) -> bytes:
            return keyring.seal(it.plaintext, readers).finish(it.address, "v", digest)

        for it in items:
            seal.append(timed_ns(lambda it=it: sealed_one(it)))
            age.append(timed_ns(lambda it=it: pyrage.encrypt(it.plaintext, self.raw.recipients)))
            signed.append(timed_ns(lambda it=it: sign(it.plaintext)))
        seal_us, age_us, sign_us = (percentile(x, 50) for x in (seal, age, signed))
        self.results.rows.append(
            Row("seal one record, envelope vs pyrage p50 (µs)", seal_us, age_us)
        )
        self.results.rows.append(
            Row(
                "encrypt + sign, one core (records/s)",
                1e6 / (seal_us + sign_us),
                1e6 / (age_us + sign_us),
                target="≥ 20,000/s",
                check=lambda r: r.slurp >= 20_000,
                rate=True,
            )
        )
        stats = keyring.sealing_stats()
        self.results.notes.append(
            f"Envelope encryption: seal p50 {seal_us:.1f} µs (ChaCha20-Poly1305 under an"
            f" age-wrapped data key, one age wrap per 4,096 records) vs pyrage to 3 recipients"
            f" {age_us:.0f} µs; Ed25519 sign p50 {sign_us:.1f} µs a record; data keys drawn"
            f" in the whole run: {stats['data_keys_issued']}."
        )
        log(f"record crypto: seal {seal_us:.1f} µs, pyrage {age_us:.0f} µs, sign {sign_us:.1f} µs")

    def gets(self) -> None:
        """Cache miss (records never read) vs get+verify+decrypt; then cache hits."""
        count = self.settings.gets
        chosen = self.rng.sample(range(self.settings.records), count + self.settings.warmup)
        items = [self.corpus.item(i) for i in chosen]
        warm, items = items[: self.settings.warmup], items[self.settings.warmup :]
        for it in warm:
            self.store.retrieve(it.address, as_role=ROLE)
            self.raw.get(it.raw_key)
        self.store.cache.clear()
        hits_before = self.store.cache.stats().hits
        miss, raw = [], []
        for it in items:
            miss.append(timed_ns(lambda it=it: self.store.retrieve(it.address, as_role=ROLE)))
            raw.append(timed_ns(lambda it=it: self.raw.get(it.raw_key)))
        assert self.store.cache.stats().hits == hits_before, "a miss sample hit the cache"
        view = self.store.retrieve(items[0].address, as_role=ROLE)
        assert view.fields["content"] == items[0].record.content
        assert self.raw.get(items[0].raw_key) == items[0].plaintext
        self.results.rows.append(
            Row(
                "get, cache miss p50 (µs)",
                percentile(miss, 50),
                percentile(raw, 50),
                target="≤ 1.3x",
                check=lambda r: (r.ratio or 0) <= 1.3,
            )
        )
        log(f"gets: cache miss p50 {percentile(miss, 50):.0f} µs")
        self._cache_hits(items)

    def _cache_hits(self, items: list[Item]) -> None:
        """retrieve of addresses already cached vs RecordCache.get of the same entries."""
        keys = []
        for it in items:
            view = self.store.retrieve(it.address, as_role=ROLE)
            keys.append((ContextName.from_canonical(view.context).key(), view.version_id))
        cache = self.store.cache
        before = cache.stats()
        hit, raw = [], []
        for it, (ctx_key, vid) in zip(items, keys, strict=True):
            hit.append(timed_ns(lambda it=it: self.store.retrieve(it.address, as_role=ROLE)))
            raw.append(timed_ns(lambda k=ctx_key, v=vid: cache.get(k, v, ROLE)))
        after = cache.stats()
        assert after.misses == before.misses, "a hit sample missed the cache"
        self.results.rows.append(
            Row(
                "get, cache hit p50 (µs)",
                percentile(hit, 50),
                percentile(raw, 50),
                target="≤ 50 µs",
                check=lambda r: r.slurp <= 50,
            )
        )
        log(f"gets: cache hit p50 {percentile(hit, 50):.1f} µs")

    def search(self) -> None:
        """ContextStore.search vs parse_query + searcher.search on the same index."""
        index = tantivy.Index.open(str(self.store.data_dir.index))
        index.reload()

        def raw_search(text: str) -> list[tuple[float, tantivy.DocAddress]]:
            query = index.parse_query(
                text,
                default_field_names=list(TEXT_FIELDS),
                field_boosts=dict(FIELD_BOOSTS),
                conjunction_by_default=True,
            )
            return list(index.searcher().search(query, SEARCH_LIMIT, count=False).hits)

        queries = self.corpus.queries(self.settings.queries)
        full = 0
        for text in queries:  # warm-up: every query once on each side
            full += len(self.store.search(text, limit=SEARCH_LIMIT)) == SEARCH_LIMIT
            raw_search(text)
        slurp, raw = [], []
        for _ in range(self.settings.search_passes):
            for text in queries:
                slurp.append(timed_ns(lambda t=text: self.store.search(t, limit=SEARCH_LIMIT)))
                raw.append(timed_ns(lambda t=text: raw_search(t)))

        self.results.rows.append(
            Row(
                f"search p50, limit {SEARCH_LIMIT} (µs)",
                percentile(slurp, 50),
                percentile(raw, 50),
                target="≤ 1.5x",
                check=lambda r: (r.ratio or 0) <= 1.5,
            )
        )
        self.results.rows.append(Row("search p99 (µs)", percentile(slurp, 99), percentile(raw, 99)))
        self.results.notes.append(
            f"Search: {len(queries)} one- and two-word queries (AND), {full} of them with"
            f" {SEARCH_LIMIT} hits, x{self.settings.search_passes} passes."
        )
        log(f"search: slurp p50 {percentile(slurp, 50):.0f} µs")

    def reopen(self) -> None:
        """close + ContextStore.open vs opening plyvel and tantivy on the same dirs."""
        first_ns = timed_ns(self._close_open)  # the first one replays the bulk load's log
        slurp, raw = [], []
        for _ in range(self.settings.reopens):
            close_ns = timed_ns(self.store.close)
            raw.append(timed_ns(self._raw_open))
            slurp.append(close_ns + timed_ns(self._open))
        self.results.rows.append(
            Row(
                f"reopen: close + open, median of {self.settings.reopens} (ms)",
                percentile(slurp, 50) / 1000,
                percentile(raw, 50) / 1000,
            )
        )
        self.results.rows.append(Row("reopen, first after the bulk load (ms)", first_ns / 1e6))
        log(f"reopen: first {first_ns / 1e6:.0f} ms")

    def _close_open(self) -> None:
        self.store.close()
        self._open()

    def _open(self) -> None:
        self.store = ContextStore.open(self.node_root)

    def _raw_open(self) -> None:
        data_dir = self.store.data_dir
        db = plyvel.DB(str(data_dir.db), lru_cache_size=LEVELDB_CACHE_BYTES, paranoid_checks=True)
        tantivy.Index.open(str(data_dir.index))
        db.close()


def _rate(count: int, elapsed_ns: int) -> str:
    return f"{count / (elapsed_ns / 1e9):,.0f} records/s" if elapsed_ns else "-"


def _rss_ok(row: Row) -> bool:
    return row.slurp <= 400


# -- the report ---------------------------------------------------------------------------

HEADER = ["metric", "slurp", "baseline", "ratio", "target", "met?"]
BASELINES = (
    "single/batch put: pyrage encrypt to the same 3 recipients + Ed25519 sign + plyvel put"
    " (`sync=True`; one synced `write_batch` per batch) on a separate raw DB in the same"
    " filesystem, opened with LevelDBKV's options;",
    "seal one record / encrypt + sign: pyrage encrypt to the same 3 recipients (+ Ed25519 sign);",
    "get, cache miss: plyvel get + Ed25519 verify + pyrage decrypt (backend_developer);",
    "get, cache hit: `RecordCache.get` of the same entry (the lookup alone);",
    "search: `Index.parse_query` (same fields, boosts, AND) + `searcher().search(q, 10)` on the"
    " same index directory, opened with tantivy directly;",
    "reopen: opening plyvel and tantivy on the same directories (and closing plyvel).",
)


def render_text(results: Results) -> str:
    """The table as aligned plain text."""
    rows = [HEADER] + [[c.replace("**", "") for c in r.cells()] for r in results.rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([*lines, "", *results.notes])


def render_markdown(results: Results, settings: Settings, revision: str) -> str:
    """The BENCHMARKS.md section body (without the markers)."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## Storage: ContextStore vs primitive baselines (`scripts/bench`)",
        "",
        f"{when} · commit {revision} · {os.cpu_count()} cores ·"
        f" Python {platform.python_version()} · N = {settings.records:,} records (~1 KB each)"
        f" · seed {settings.seed}",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join(["---", "--:", "--:", "--:", "---", "---"]) + "|",
    ]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in results.rows]
    lines += [
        "",
        "Ratio = slurp's cost / the baseline's (for throughput: baseline rate / slurp rate),"
        " so above 1 means slurp is slower. Both sides run in the same process; samples are"
        " interleaved (one slurp op, one baseline op) except for the bulk load.",
        "Baselines: " + " ".join(BASELINES),
        "",
        *(f"- {note}" for note in results.notes),
    ]
    return "\n".join(lines)


# -- entry point --------------------------------------------------------------------------


def write_report_section(path: Path, body: str) -> None:
    """This benchmark's section of BENCHMARKS.md."""
    write_section(path, body, START_MARKER, END_MARKER)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=DEFAULT_RECORDS, help="N (100000)")
    parser.add_argument("--quick", action="store_true", help=f"N={QUICK_RECORDS}, fewer samples")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="Markdown file")
    parser.add_argument("--seed", type=int, default=1, help="corpus and sampling seed")
    parser.add_argument("--keep", action="store_true", help="keep the scratch data")
    args = parser.parse_args(argv)
    if args.quick:
        args.records = QUICK_RECORDS
    if args.records < 3:
        parser.error("--records must be at least 3")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, update the Markdown file."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    settings = Settings.for_records(args.records, args.seed, quick=args.quick)
    (ROOT / "bench-data").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="store-", dir=ROOT / "bench-data"))
    revision = git_revision()
    log(f"N={settings.records:,} at commit {revision} in {work}")
    started, load_before = time.monotonic(), os.getloadavg()[0]
    try:
        bench = Bench(work, settings)
        try:
            results = bench.run()
        finally:
            bench.close()
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results.notes.append(
        f"Whole run: {time.monotonic() - started:.0f} s; 1-minute load average"
        f" {load_before:.2f} before, {os.getloadavg()[0]:.2f} after (other processes on the"
        " machine skew every figure)."
    )
    print(render_text(results))
    write_report_section(args.out, render_markdown(results, settings, revision))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
