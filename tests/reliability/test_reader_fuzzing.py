"""Hostile-input fuzzing of every reader, with hypothesis.

Each test writes generated hostile files (random bytes, truncated or corrupted JSON, wrong types,
huge and empty fields, `../` and absolute image paths, symlinks out of the root, FIFOs, BOMs, NULs,
odd unicode) into a fresh sandbox and calls a reader on them. The reader must either accept the
input, giving data that keeps its invariants (image paths inside the root, spans inside their
sentence, a dataset that writes and reads back unchanged), or refuse it with one of mmel's own
errors (`MmelError`) that names the file, and the record when the problem lies in one. Any other
exception, a hang, or a file under the sandbox's `outside/` folder being opened (an audit hook
watches every open) fails the test, and hypothesis shrinks the input to a minimal example.

`MMEL_FUZZ_EXAMPLES` sets the examples per test (default 40: the whole module runs in seconds).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import sqlite3
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from mmel.core.errors import DataError, MmelError, PathEscapeError
from mmel.core.images import MAX_IMAGE_SIDE, ImageReport, load_image
from mmel.core.types import Dataset, Entity, KnowledgeBase, Mention
from mmel.data import (
    load_dataset,
    prepare_richpediamel,
    prepare_wikimel,
    read_kb_jsonl,
    read_mentions_jsonl,
    read_mimic_layout,
    validate_dataset,
    write_dataset,
)
from mmel.enrich.cache import AnswerCache
from mmel.enrich.provenance import previous_provenance

T = TypeVar("T")

FUZZ = settings(max_examples=int(os.environ.get("MMEL_FUZZ_EXAMPLES", "40")), deadline=None, database=None,
                print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HANG_LIMIT_S = 20       # a reader call that takes longer is reported as a hang
LINE_RECORD = re.compile(r"line \d+")
ANY_RECORD = re.compile(r".*", re.DOTALL)

# --- the sandbox: a data root, and an outside that no reader may open --------------------------------


@dataclass
class Sandbox:
    """`root` is the data root handed to readers; `outside` holds the targets of escape attempts."""

    base: Path
    root: Path = field(init=False)
    outside: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root = self.base / "root"
        self.outside = self.base / "outside"
        self.root.mkdir()
        self.outside.mkdir()
        png_bytes = _encoded(Image.new("RGB", (8, 8), (200, 0, 0)), "PNG")
        (self.outside / "secret.png").write_bytes(png_bytes)
        (self.outside / "secret.jsonl").write_text('{"qid": "Q1", "name": "secret"}\n')
        (self.root / "kb").mkdir()
        (self.root / "kb" / "ok.png").write_bytes(png_bytes)
        os.symlink(self.outside / "secret.png", self.root / "out_link.png")
        os.symlink(self.outside, self.root / "out_dir")
        os.symlink(self.root / "kb" / "ok.png", self.root / "in_link.png")
        os.mkfifo(self.root / "pipe.png")
        (self.root / "folder.png").mkdir()

    def place(self, text: str) -> str:
        """Hostile paths may say {outside}: the absolute path of the outside folder."""
        return text.replace("{outside}", str(self.outside))


@contextlib.contextmanager
def sandbox() -> Iterator[Sandbox]:
    base = Path(tempfile.mkdtemp(prefix="mmel-fuzz-"))
    try:
        yield Sandbox(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


_watched: list[tuple[str, list[str]]] = []   # (forbidden folder, paths opened under it), while a reader runs


def _audit(event: str, args: tuple[Any, ...]) -> None:
    """Record every file opened or listed under a watched folder (audit hooks see every `open` in the process)."""
    if not _watched or event not in ("open", "os.listdir", "os.scandir"):
        return
    target = args[0] if args else None
    if not isinstance(target, (str, bytes, os.PathLike)):
        return
    try:
        resolved = os.path.realpath(os.fsdecode(target))
    except (ValueError, OSError):  # a path the OS refuses anyway (NUL): nothing can be opened through it
        return
    for folder, hits in _watched:
        if resolved == folder or resolved.startswith(folder + os.sep):
            hits.append(resolved)


sys.addaudithook(_audit)


def run_reader(box: Sandbox, call: Callable[[], T]) -> T:
    """`call()` in a thread: fails on a hang, or when anything under `box.outside` was opened or listed."""
    opened: list[str] = []
    watch = (os.path.realpath(box.outside), opened)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as error:  # re-raised in the test's thread below
            outcome["error"] = error

    _watched.append(watch)
    try:
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join(HANG_LIMIT_S)
    finally:
        _watched.remove(watch)
    assert not thread.is_alive(), f"the reader hung for {HANG_LIMIT_S} s"
    assert not opened, f"opened outside the data root: {opened}"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def refusal(box: Sandbox, call: Callable[[], T]) -> tuple[T | None, MmelError | None]:
    """(result, None) when the reader accepts; (None, error) when it refuses with mmel's own error.

    Any other exception propagates: it is a bug, and hypothesis shrinks its input.
    """
    try:
        return run_reader(box, call), None
    except MmelError as error:
        assert str(error).strip(), "a refusal must say what is wrong"
        return None, error


def assert_names(error: MmelError, file: Path, *, record: re.Pattern[str] | None) -> None:
    """A `DataError` names `file` (or its directory for a missing file), and the record when `record` is given."""
    assert isinstance(error, DataError), f"{type(error).__name__} is not a DataError: {error}"
    assert error.path is not None and Path(str(error.path)).name in (file.name, file.parent.name), \
        f"names {error.path!r}, not {file}: {error}"
    if record is not None:
        assert error.record is not None and record.fullmatch(str(error.record)), \
            f"names no record (expected {record.pattern}): {error}"


def test_the_watch_sees_a_file_opened_outside_the_root() -> None:
    """The harness itself: reading through a symlink out of the root is caught (else "nothing read" proves nothing)."""
    with sandbox() as box, pytest.raises(AssertionError, match="opened outside the data root"):
        run_reader(box, lambda: (box.root / "out_link.png").read_bytes())


# --- hostile values -------------------------------------------------------------------------------------

HOSTILE_PATHS = st.sampled_from([
    "../outside/secret.png", "../../outside/secret.png", "kb/../../outside/secret.png", "{outside}/secret.png",
    "/etc/passwd", "out_link.png", "out_dir/secret.png", "in_link.png", "pipe.png", "folder.png", "kb/ok.png",
    "kb/missing.png", "", ".", "..", "kb/", "a\x00b.png", "..\\outside\\secret.png", "C:\\secret.png",
    "%2e%2e/outside/secret.png", "~/secret.png", "x" * 300, "/".join(["deep"] * 80), "kb/ok.png\n", " kb/ok.png",
])
ODD_TEXT = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", " ", "\ufeff", "\u200b\u200b", "\x00", "\x00Mercury", "Mercury\x00", "\u202eyrucreM",
                     "e\u0301", "İstanbul", "ß", "\U0001f600", "\ud800", "x\udfffy", "\r\n", "Zoë 100%25",
                     "%ZZ", "Q" + "9" * 40, "a" * 5000]),
)
HUGE_NUMBERS = st.sampled_from([2**63, -(2**63) - 1, 10**30, float("inf"), float("nan"), 1e308, -0.0])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), HUGE_NUMBERS, st.floats(), ODD_TEXT, HOSTILE_PATHS)
HOSTILE_JSON = st.recursive(SCALARS, lambda children: st.lists(children, max_size=3)
                            | st.dictionaries(ODD_TEXT, children, max_size=3), max_leaves=6)


def records(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects whose known fields are each absent, good or hostile, plus a few unexpected keys."""
    known = st.fixed_dictionaries({}, optional={key: st.one_of(good, good, HOSTILE_JSON)
                                                 for key, good in fields.items()})
    unknown = st.dictionaries(ODD_TEXT, HOSTILE_JSON, max_size=1)
    return st.builds(lambda extra, record: {**extra, **record}, st.one_of(st.just({}), st.just({}), unknown), known)


def _truncate(data: bytes, at: float) -> bytes:
    return data[: int(len(data) * at)]


def _insert(data: bytes, at: float, piece: bytes) -> bytes:
    cut = int(len(data) * at)
    return data[:cut] + piece + data[cut:]


@st.composite
def corrupted(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` as written, or cut short, or with a BOM, NUL, invalid UTF-8 or deep nesting put in, or random bytes."""
    at = draw(st.floats(0, 1))
    kind = draw(st.sampled_from(["none"] * 6 + ["truncate", "bom", "nul", "bad utf-8", "nesting", "digits",
                                                "random"]))
    changes: dict[str, Callable[[], bytes]] = {
        "none": lambda: data,
        "truncate": lambda: _truncate(data, at),
        "bom": lambda: b"\xef\xbb\xbf" + data,
        "nul": lambda: _insert(data, at, b"\x00"),
        "bad utf-8": lambda: _insert(data, at, draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"]))),
        "nesting": lambda: _insert(data, at, b"[" * 3_000),
        "digits": lambda: _insert(data, at, b"9" * 4_400),
        "random": lambda: draw(st.binary(max_size=300)),
    }
    return changes[kind]()


def jsonl_bytes(lines: list[Any]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode("utf-8")


def json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode("utf-8")


def placed(box: Sandbox, data: bytes) -> bytes:
    """Hostile paths that say {outside} get the sandbox's real outside folder (JSON-escaped)."""
    return data.replace(b"{outside}", json.dumps(str(box.outside))[1:-1].encode("utf-8"))


# --- invariants of accepted data -----------------------------------------------------------------------

def assert_inside(root: Path, relative: str) -> None:
    resolved = (root.resolve() / relative).resolve()
    assert resolved == root.resolve() or root.resolve() in resolved.parents, f"{relative!r} leaves {root}"


def assert_usable(box: Sandbox, dataset: Dataset) -> None:
    """Accepted data keeps its promises: paths inside the root, spans on their sentence, a lossless round trip."""
    for entity in dataset.kb:
        for image in entity.images:
            assert_inside(dataset.root, image)
    for mentions in dataset.splits.values():
        assert len({mention.id for mention in mentions}) == len(mentions), "mention ids must be unique"
        for mention in mentions:
            if mention.image is not None:
                assert_inside(dataset.root, mention.image)
            if mention.span is not None:
                start, end = mention.span
                assert 0 <= start < end <= len(mention.sentence)
    copy = write_dataset(dataset, box.base / "round-trip")
    again = load_dataset(copy)
    assert list(again.kb) == list(dataset.kb)
    assert again.splits == dataset.splits


# --- mmel JSONL format -----------------------------------------------------------------------------------

ENTITY_FIELDS = {"qid": st.sampled_from(["Q1", "Q2", "Q90"]), "name": ODD_TEXT, "attributes": ODD_TEXT,
                 "description": ODD_TEXT, "images": st.lists(HOSTILE_PATHS, max_size=2),
                 "extra": st.dictionaries(ODD_TEXT, HOSTILE_JSON, max_size=2)}
MENTION_FIELDS = {"id": st.sampled_from(["m1", "m2", "m1#2"]), "sentence": ODD_TEXT, "surface": ODD_TEXT,
                  "span": st.one_of(st.none(), st.lists(st.integers(-3, 40), min_size=2, max_size=2)),
                  "image": st.one_of(st.none(), HOSTILE_PATHS), "gold_qid": st.one_of(st.none(), ODD_TEXT),
                  "extra": st.dictionaries(ODD_TEXT, HOSTILE_JSON, max_size=2),
                  "caption": st.one_of(st.none(), ODD_TEXT)}
DATASET_FIELDS = {"name": ODD_TEXT, "format_version": st.just(1), "source": ODD_TEXT,
                  "splits": st.lists(st.one_of(st.sampled_from(["train", "test"]), ODD_TEXT), max_size=3)}


@FUZZ
@given(lines=st.lists(st.one_of(records(ENTITY_FIELDS), HOSTILE_JSON), max_size=4), data=st.data())
def test_kb_jsonl_accepts_good_records_and_names_file_and_line_of_bad_ones(lines: list[Any], data) -> None:
    with sandbox() as box:
        path = box.root / "kb.jsonl"
        path.write_bytes(data.draw(corrupted(placed(box, jsonl_bytes(lines)))))
        kb, error = refusal(box, lambda: read_kb_jsonl(path, root=box.root))
        if error is not None:
            assert_names(error, path, record=LINE_RECORD)
        else:
            assert_usable(box, Dataset("fuzz", kb, {}, box.root))


@FUZZ
@given(lines=st.lists(st.one_of(records(MENTION_FIELDS), HOSTILE_JSON), max_size=4), data=st.data())
def test_mentions_jsonl_accepts_good_records_and_names_file_and_line_of_bad_ones(lines: list[Any], data) -> None:
    with sandbox() as box:
        path = box.root / "mentions.jsonl"
        path.write_bytes(data.draw(corrupted(placed(box, jsonl_bytes(lines)))))
        mentions, error = refusal(box, lambda: read_mentions_jsonl(path, root=box.root))
        if error is not None:
            assert_names(error, path, record=LINE_RECORD)
        else:
            assert_usable(box, Dataset("fuzz", KnowledgeBase([]), {"test": mentions}, box.root))


@FUZZ
@given(info=st.one_of(records(DATASET_FIELDS), HOSTILE_JSON), data=st.data())
def test_dataset_json_is_checked_before_any_split_file_is_opened(info: Any, data) -> None:
    with sandbox() as box:
        (box.root / "dataset.json").write_bytes(data.draw(corrupted(json_bytes(info))))
        (box.root / "kb.jsonl").write_text('{"qid": "Q1", "name": "One"}\n')
        (box.root / "mentions").mkdir()
        for split in ("train", "test"):
            (box.root / "mentions" / f"{split}.jsonl").write_text('{"id": "m", "sentence": "One", "surface": "One"}\n')
        dataset, error = refusal(box, lambda: load_dataset(box.root))
        if error is None:
            assert_usable(box, dataset)
        elif Path(str(error.path)).parent.name == "mentions":   # a split it lists has no (readable) file
            assert "file not found" in str(error) or "cannot read" in str(error), error
        else:
            assert_names(error, box.root / "dataset.json", record=None)


# --- the MIMIC layout -------------------------------------------------------------------------------------

ROW_FIELDS = {"id": st.integers(0, 3), "qid": st.sampled_from(["Q1", "Q2", ""]), "entity_name": ODD_TEXT,
              "attr": ODD_TEXT, "desc": ODD_TEXT, "type": st.just("entity"),
              "image_list": st.lists(HOSTILE_PATHS, max_size=2)}
MIMIC_MENTION_FIELDS = {"id": st.one_of(st.integers(), ODD_TEXT), "mentions": ODD_TEXT, "sentence": ODD_TEXT,
                        "imgPath": st.one_of(st.just(""), HOSTILE_PATHS), "answer": st.sampled_from(["Q1", "nil", ""])}
MIMIC_RECORDS = {  # file -> (the JSON type that holds its records, how a record is named)
    "kb_entity.json": (list, re.compile(r"#\d+|id -?\d+")), "WIKIMEL_train.json": (list, re.compile(r"#\d+")),
    "qid2id.json": (dict, ANY_RECORD)}
# Problems that lie between records, not in one: the message names the records instead.
MIMIC_CROSS_RECORD = ("duplicate row id",)


@FUZZ
@given(rows=st.one_of(st.lists(st.one_of(records(ROW_FIELDS), HOSTILE_JSON), max_size=4), HOSTILE_JSON),
       qid2id=st.one_of(st.none(), st.dictionaries(ODD_TEXT, st.one_of(st.integers(0, 4), HOSTILE_JSON), max_size=3)),
       mentions=st.one_of(st.lists(st.one_of(records(MIMIC_MENTION_FIELDS), HOSTILE_JSON), max_size=4), HOSTILE_JSON),
       data=st.data())
def test_mimic_layout_names_file_and_record(rows: Any, qid2id: Any, mentions: Any, data) -> None:
    with sandbox() as box:
        files = {"kb_entity.json": rows, "WIKIMEL_train.json": mentions}
        if qid2id is not None:
            files["qid2id.json"] = qid2id
        for name, value in files.items():
            (box.root / name).write_bytes(data.draw(corrupted(placed(box, json_bytes(value)))))
        (box.root / "kb_image").mkdir()
        dataset, error = refusal(box, lambda: read_mimic_layout(box.root))
        if error is None:
            assert_usable(box, dataset)
            return
        named = Path(str(error.path)).name
        assert named in files, f"names {error.path!r}, none of the layout's files: {error}"
        container, record = MIMIC_RECORDS[named]
        whole_file = not _holds_records(box.root / named, container) or _cross_record(error, MIMIC_CROSS_RECORD)
        assert_names(error, box.root / named, record=None if whole_file else record)


def _holds_records(path: Path, container: type) -> bool:
    """Whether the file parses as the JSON list or object that holds its records (else a problem is file-wide)."""
    try:
        value = json.loads(path.read_bytes().removeprefix(b"\xef\xbb\xbf").decode("utf-8"))
    except (ValueError, RecursionError):   # UnicodeDecodeError is a ValueError
        return False
    return isinstance(value, container)


def _cross_record(error: MmelError, problems: tuple[str, ...]) -> bool:
    """Whether `error` is one of the problems that lie between records (its message names them)."""
    return str(error).split(": ", 1)[-1].startswith(problems)


# --- the raw WikiMEL and RichpediaMEL releases ----------------------------------------------------------

WIKIMEL_SAMPLE_FIELDS = {"sentence": ODD_TEXT, "mentions": st.lists(ODD_TEXT, max_size=2),
                         "entities": st.lists(ODD_TEXT, max_size=2),
                         "answer": st.lists(st.sampled_from(["Q1", "nil", ""]), max_size=2)}
RICHPEDIA_RECORD_FIELDS = {"sentence": ODD_TEXT, "mentions": ODD_TEXT, "entities": ODD_TEXT,
                           "answer": st.sampled_from(["Q1", "nil"])}
SAMPLE_IDS = st.sampled_from(["1", "2", "../outside/secret", "a\x00", ""])
STR_MAPS = st.one_of(st.dictionaries(ODD_TEXT, st.one_of(st.sampled_from(["Q1", "Q2"]), ODD_TEXT), max_size=3),
                     HOSTILE_JSON)
# Problems between records of one file or between files (overlapping splits): the message names them.
RELEASE_CROSS_RECORD = ("samples are in both", "sample ")


@FUZZ
@given(samples=st.one_of(st.dictionaries(SAMPLE_IDS, st.one_of(records(WIKIMEL_SAMPLE_FIELDS), HOSTILE_JSON),
                                         max_size=3), HOSTILE_JSON),
       splits=st.one_of(st.dictionaries(st.sampled_from(["train", "dev", "test", "../x", "a\x00"]),
                                        st.one_of(st.lists(SAMPLE_IDS, max_size=3), HOSTILE_JSON), max_size=3),
                        HOSTILE_JSON),
       ne2qid=STR_MAPS, qid2abs=STR_MAPS, data=st.data())
def test_raw_wikimel_release_is_prepared_or_refused_by_name(samples: Any, splits: Any, ne2qid: Any, qid2abs: Any,
                                                            data) -> None:
    with sandbox() as box:
        files = {"Wikidata-MEL.json": samples, "splits.json": splits, "ne2qid.json": ne2qid, "qid2abs.json": qid2abs}
        for name, value in files.items():
            (box.root / name).write_bytes(data.draw(corrupted(json_bytes(value))))
        dataset, error = refusal(box, lambda: prepare_wikimel(box.root, box.base / "prepared"))
        _check_prepared(box, files, dataset, error)


@FUZZ
@given(train=st.one_of(st.dictionaries(SAMPLE_IDS, st.one_of(records(RICHPEDIA_RECORD_FIELDS), HOSTILE_JSON),
                                       max_size=3), HOSTILE_JSON),
       test=st.dictionaries(st.sampled_from(["7", "8"]), records(RICHPEDIA_RECORD_FIELDS), max_size=2),
       ne2qid=STR_MAPS, qid2abs=STR_MAPS, qid2abs_long=STR_MAPS,
       img_list=st.one_of(st.lists(st.one_of(st.sampled_from(["raw/imgs/1.jpg", "../outside/secret.png"]), ODD_TEXT),
                                   max_size=3), HOSTILE_JSON),
       data=st.data())
def test_raw_richpediamel_release_is_prepared_or_refused_by_name(train: Any, test: Any, ne2qid: Any, qid2abs: Any,
                                                                 qid2abs_long: Any, img_list: Any, data) -> None:
    with sandbox() as box:
        files = {"train.json": train, "test.json": test, "ne2qid.json": ne2qid, "qid2abs.json": qid2abs,
                 "qid2abs_long.json": qid2abs_long, "img_list.json": img_list}
        for name, value in files.items():
            (box.root / name).write_bytes(data.draw(corrupted(json_bytes(value))))
        images = box.root / "images"
        images.mkdir()
        (images / "1.jpg").write_bytes((box.root / "kb" / "ok.png").read_bytes())
        dataset, error = refusal(box, lambda: prepare_richpediamel(box.root, box.base / "prepared", images_dir=images))
        _check_prepared(box, files, dataset, error)


def _check_prepared(box: Sandbox, files: dict[str, Any], dataset: Dataset | None, error: MmelError | None) -> None:
    if error is None:
        assert dataset is not None
        assert_usable(box, dataset)
        return
    named = Path(str(error.path)).name
    if named == box.root.name:     # a problem between files (train and test overlap): the folder is named
        assert_names(error, box.root / "any", record=None)
        assert _cross_record(error, RELEASE_CROSS_RECORD), error
        return
    assert named in files, f"names {error.path!r}, none of the release's files: {error}"
    container = list if named == "img_list.json" else dict
    whole_file = not _holds_records(box.root / named, container) or _cross_record(error, RELEASE_CROSS_RECORD)
    assert_names(error, box.root / named, record=None if whole_file else ANY_RECORD)


# --- images -----------------------------------------------------------------------------------------------

def _encoded(image: Image.Image, image_format: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


def _seed_images() -> list[bytes]:
    """One small valid file per format PIL reads, for mutation: a JPEG with an EXIF rotation among them."""
    picture = Image.new("RGB", (24, 16), (30, 140, 220))
    exif = Image.Exif()
    exif[0x0112] = 6    # orientation: rotate 90 degrees
    return [_encoded(picture, "PNG"), _encoded(picture, "JPEG", exif=exif), _encoded(picture, "GIF"),
            _encoded(picture, "BMP"), _encoded(picture, "TIFF"), _encoded(picture, "WEBP"), _encoded(picture, "ICO"),
            _encoded(picture, "PPM"), _encoded(picture.convert("P"), "PNG"), _encoded(picture.convert("CMYK"), "JPEG")]


SEED_IMAGES = _seed_images()


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid image with a few bytes flipped, cut short, or grown; or plain random bytes."""
    if draw(st.booleans()) and draw(st.booleans()):
        return draw(st.binary(max_size=500))
    data = bytearray(draw(st.sampled_from(SEED_IMAGES)))
    for _ in range(draw(st.integers(0, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.sampled_from([len(data), len(data) // 2, 40, 12]))
    return bytes(data[:cut]) + draw(st.sampled_from([b"", b"\x00" * 64, b"\xff" * 64]))


@pytest.mark.filterwarnings("ignore:.*:UserWarning:PIL")   # PIL warns of the corrupt EXIF it skips
@FUZZ
@given(content=mutated_images())
def test_a_broken_image_is_counted_as_no_image(content: bytes) -> None:
    with sandbox() as box:
        (box.root / "kb" / "fuzzed.img").write_bytes(content)
        report = ImageReport()
        image = run_reader(box, lambda: load_image(box.root, "kb/fuzzed.img", report))
        if image is None:
            assert report.failed == 1 and report.examples, "an unusable image is counted with its path"
        else:
            assert image.mode == "RGB" and max(image.size) <= MAX_IMAGE_SIDE and report.loaded == 1


@FUZZ
@given(relative=HOSTILE_PATHS)
def test_image_paths_never_leave_the_root(relative: str) -> None:
    with sandbox() as box:
        report = ImageReport()
        image, error = refusal(box, lambda: load_image(box.root, box.place(relative), report))
        if error is not None:
            assert isinstance(error, PathEscapeError), error
        elif image is None:
            assert report.failed == 1 or not relative, "an image path that gives no image is counted"
        else:
            assert_inside(box.root, relative)


# --- validation reports ---------------------------------------------------------------------------------

STEPS = st.lists(st.one_of(records({"step": ODD_TEXT, "model": ODD_TEXT, "date": ODD_TEXT,
                                    "counts": st.dictionaries(st.sampled_from(["answered", "cached", "failed"]),
                                                              st.integers(0, 10**6))}), HOSTILE_JSON), max_size=2)


@FUZZ
@given(entity_images=st.lists(HOSTILE_PATHS, max_size=3), mention_images=st.lists(HOSTILE_PATHS, max_size=3),
       enrichment=st.one_of(st.none(), st.builds(lambda steps: {"steps": steps}, STEPS), HOSTILE_JSON),
       decode=st.booleans(), data=st.data())
def test_validation_reports_bad_content_and_never_raises(entity_images: list[str], mention_images: list[str],
                                                         enrichment: Any, decode: bool, data) -> None:
    """`validate_dataset` counts problems in a dataset however it was made (readers, code, another tool)."""
    with sandbox() as box:
        if enrichment is not None:
            (box.root / "enrichment.json").write_bytes(data.draw(corrupted(json_bytes(enrichment))))
        kb = KnowledgeBase([Entity(f"Q{i}", "name", images=(box.place(image),))
                            for i, image in enumerate(entity_images)])
        mentions = [Mention(f"m{i}", "A sentence.", "sentence", image=box.place(image) or None)
                    for i, image in enumerate(mention_images)]
        report = run_reader(box, lambda: validate_dataset(Dataset("fuzz", kb, {"test": mentions}, box.root),
                                                          decode_images=decode))
        counted = report.mention_images.loaded + report.mention_images.failed
        assert counted == len({m.image for m in mentions if m.image})
        assert isinstance(report.to_markdown(), str) and json.dumps(report.to_dict())


# --- enrichment caches and provenance -----------------------------------------------------------------------

@FUZZ
@given(content=st.one_of(st.binary(max_size=300), st.sampled_from(["sqlite-other-schema", "sqlite-truncated"])))
def test_an_unusable_answer_cache_is_named(content: bytes | str) -> None:
    with sandbox() as box:
        path = box.root / "enrich.sqlite"
        _write_cache_file(path, content)

        def read() -> dict[str, str]:
            with AnswerCache(path) as cache:
                return cache.get_many("caption", ["k"])

        found, error = refusal(box, read)
        if error is not None:
            assert_names(error, path, record=None)
        else:
            assert found == {}


def _write_cache_file(path: Path, content: bytes | str) -> None:
    if isinstance(content, bytes):
        path.write_bytes(content)
        return
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute("CREATE TABLE answers (question TEXT)")
        connection.execute("INSERT INTO answers VALUES ('x')")
        connection.commit()
    if content == "sqlite-truncated":
        path.write_bytes(path.read_bytes()[:700])


@FUZZ
@given(provenance=st.one_of(st.builds(lambda steps: {"steps": steps}, STEPS), HOSTILE_JSON), data=st.data())
def test_enrichment_provenance_is_read_or_refused_by_name(provenance: Any, data) -> None:
    with sandbox() as box:
        path = box.root / "enrichment.json"
        path.write_bytes(data.draw(corrupted(json_bytes(provenance))))
        record, error = refusal(box, lambda: previous_provenance(box.root))
        if error is not None:
            assert_names(error, path, record=None)
        else:
            assert isinstance(record, dict) and isinstance(record["steps"], list)


# --- files that are not regular files --------------------------------------------------------------------

@FUZZ
@given(kind=st.sampled_from(["fifo", "directory", "missing", "dangling symlink"]),
       file=st.sampled_from(["kb.jsonl", "dataset.json", "mentions/test.jsonl", "kb_entity.json"]))
def test_a_data_file_that_is_no_regular_file_is_named_not_waited_on(kind: str, file: str) -> None:
    assume(file != "dataset.json" or kind not in ("missing", "dangling symlink"))  # read as kb.jsonl + mentions/
    with sandbox() as box:
        layout = {"kb_entity.json": "[]"} if file == "kb_entity.json" else {
            "dataset.json": '{"name": "x", "format_version": 1, "splits": ["test"]}',
            "kb.jsonl": '{"qid": "Q1", "name": "One"}\n', "mentions/test.jsonl": ""}
        for name, text in layout.items():
            (box.root / name).parent.mkdir(exist_ok=True)
            (box.root / name).write_text(text)
        target = box.root / file
        target.unlink()
        if kind == "fifo":
            os.mkfifo(target)
        elif kind == "directory":
            target.mkdir()
        elif kind == "dangling symlink":
            os.symlink(box.root / "nowhere", target)
        _, error = refusal(box, lambda: load_dataset(box.root))
        assert error is not None, f"a {kind} as {file} was read as data"
        assert_names(error, target, record=None)


# --- the hand-written corpus: each bug the fuzzing found, and the earlier fixes of issue 13, kept fixed -------

def _line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record) + "\n").encode("utf-8")


KB_LINE = _line({"qid": "Q1", "name": "One"})
DATASET_INFO = b'{"name": "x", "format_version": 1, "splits": ["test"]}'
MENTION_LINE = _line({"id": "m", "sentence": "One here", "surface": "One"})
WIKIMEL_FILES = {"Wikidata-MEL.json": b"{}", "splits.json": b'{"train": []}', "ne2qid.json": b"{}",
                 "qid2abs.json": b'{"Q1": "x"}'}
RICHPEDIA_FILES = {"train.json": b"{}", "test.json": b"{}", "ne2qid.json": b"{}", "qid2abs.json": b'{"Q1": "x"}',
                   "qid2abs_long.json": b"{}"}
READERS: dict[str, Callable[[Sandbox], Any]] = {
    "kb.jsonl": lambda box: read_kb_jsonl(box.root / "kb.jsonl", root=box.root),
    "mentions.jsonl": lambda box: read_mentions_jsonl(box.root / "mentions.jsonl", root=box.root),
    "dataset": lambda box: load_dataset(box.root),
    "mimic": lambda box: read_mimic_layout(box.root),
    "wikimel": lambda box: prepare_wikimel(box.root, box.base / "prepared"),
    "richpediamel": lambda box: prepare_richpediamel(box.root, box.base / "prepared"),
    "validate": lambda box: validate_dataset(load_dataset(box.root)),
    "cache": lambda box: AnswerCache(box.root / "enrich.sqlite").get_many("caption", ["k"]),
}


@dataclass(frozen=True)
class HostileFiles:
    """Files put in the data root, the reader given them, and the refusal it must give (None: it must accept)."""

    name: str
    files: dict[str, bytes]
    reader: str
    refusal: str | None = None       # a fragment of the message
    record: str | None = None        # the record the refusal must name


READER_CORPUS = [
    # found by the fuzzing above
    HostileFiles("integer of 4,400 digits", {"kb.jsonl": b'{"qid": "Q1", "name": "x", "extra": {"n": '
                                                         + b"9" * 4_400 + b"}}\n"}, "kb.jsonl", "digits", "line 1"),
    HostileFiles("nesting 3,000 deep", {"kb.jsonl": KB_LINE + b"[" * 3_000 + b"\n"}, "kb.jsonl", "nested", "line 2"),
    HostileFiles("nesting in a whole-file JSON", {"kb_entity.json": b"[" * 3_000}, "mimic", "nested"),
    HostileFiles("lone surrogate escape", {"kb.jsonl": b'{"qid": "Q1", "name": "\\ud800"}\n'}, "kb.jsonl", "surrogate",
                 "line 1"),
    HostileFiles("lone surrogate in a list file", {"kb_entity.json": b'[{"id": 0, "entity_name": "a"}, {"id": 1, '
                                                                     b'"entity_name": "\\udc00 b"}]'},
                 "mimic", "surrogate", "#1"),
    HostileFiles("surrogate pair escape (an emoji)", {"kb.jsonl": b'{"qid": "Q1", "name": "\\ud83d\\ude00"}\n'},
                 "kb.jsonl"),
    HostileFiles("NUL in an image path", {"kb.jsonl": _line({"qid": "Q1", "name": "x", "images": ["a\x00.png"]})},
                 "kb.jsonl", "NUL", "line 1"),
    HostileFiles("NUL in a split name", {"dataset.json": b'{"name": "x", "format_version": 1, "splits": ["a\\u0000"]}',
                                         "kb.jsonl": KB_LINE}, "dataset", "control characters"),
    HostileFiles("split name of 300 bytes", {"dataset.json": b'{"name": "x", "format_version": 1, "splits": ["'
                                                             + b"a" * 300 + b'"]}', "kb.jsonl": KB_LINE},
                 "dataset", "at most 100 bytes"),
    HostileFiles("empty QID in qid2abs.json", {**WIKIMEL_FILES, "qid2abs.json": b'{"": "x"}'}, "wikimel", "empty QID",
                 "''"),
    HostileFiles("split of splits.json that is no list", {**WIKIMEL_FILES, "splits.json": b'{"train": null}'},
                 "wikimel", "list of sample ids", "train"),
    HostileFiles("split of splits.json that is no file name", {**WIKIMEL_FILES, "splits.json": b'{"../x": []}'},
                 "wikimel", "plain file name", "../x"),
    HostileFiles("img_list.json entry that is no path", {**RICHPEDIA_FILES, "img_list.json": b'["a/1.jpg", null]'},
                 "richpediamel", "expected an image path", "#1"),
    HostileFiles("SQLite file of another program as the cache", {"enrich.sqlite": b"sqlite-other-schema"}, "cache",
                 "not an enrichment cache"),
    # fixed earlier in issue 13
    HostileFiles("image path out of the root", {"kb.jsonl": _line({"qid": "Q1", "name": "x",
                                                                    "images": ["../outside/secret.png"]})},
                 "kb.jsonl", "escapes", "line 1"),
    HostileFiles("image symlink out of the root", {"kb.jsonl": _line({"qid": "Q1", "name": "x",
                                                                      "images": ["out_link.png"]})},
                 "kb.jsonl", "escapes", "line 1"),
    HostileFiles("invalid UTF-8", {"kb.jsonl": KB_LINE + b'{"qid": "Q2", "name": "\xff"}\n'}, "kb.jsonl", "UTF-8",
                 "line 2"),
    HostileFiles("UTF-8 BOM", {"kb.jsonl": b"\xef\xbb\xbf" + KB_LINE}, "kb.jsonl"),
    HostileFiles("repeated mention ids", {"mentions.jsonl": MENTION_LINE * 3}, "mentions.jsonl"),
    HostileFiles("mention image that is a FIFO", {"dataset.json": DATASET_INFO, "kb.jsonl": KB_LINE,
                                                  "mentions/test.jsonl": _line({"id": "m", "sentence": "One", "surface":
                                                                                "One", "image": "pipe.png"})},
                 "validate"),
    HostileFiles("span on a sentence that lower() lengthens", {
        "kb_entity.json": b'[{"id": 0, "entity_name": "Mercury"}]',
        "WIKIMEL_test.json": json.dumps([{"id": "s", "mentions": "mercury", "sentence": "İİ Mercury sang.",
                                          "imgPath": "", "answer": "nil"}]).encode()}, "mimic"),
]


@pytest.mark.parametrize("case", READER_CORPUS, ids=[case.name for case in READER_CORPUS])
def test_reader_corpus(case: HostileFiles) -> None:
    with sandbox() as box:
        for relative, content in case.files.items():
            (box.root / relative).parent.mkdir(parents=True, exist_ok=True)
            if content == b"sqlite-other-schema":
                _write_cache_file(box.root / relative, "sqlite-other-schema")
            else:
                (box.root / relative).write_bytes(content)
        result, error = refusal(box, lambda: READERS[case.reader](box))
        if case.refusal is None:
            assert error is None, f"refused: {error}"
            _check_accepted(box, case.reader, result)
            return
        assert error is not None, "accepted"
        assert isinstance(error, DataError) and case.refusal in str(error), error
        if case.record is not None:
            assert str(error.record) == case.record, error


def _check_accepted(box: Sandbox, reader: str, result: Any) -> None:
    """What each accepted corpus case must give: usable data, with ids made unique and spans on the original text."""
    if reader == "mentions.jsonl":
        assert [mention.id for mention in result] == ["m", "m#2", "m#3"]   # unique, so a resumed run skips none
    elif reader == "mimic":
        mention = result.split("test")[0]
        assert mention.sentence[mention.span[0]:mention.span[1]] == "Mercury"
    elif reader == "validate":
        assert result.mention_images.problems == {"not a regular file": 1}
    elif reader == "kb.jsonl":
        assert len(result) == 1 and result[0].qid == "Q1"
