"""Session fixtures for the linker, server and web-page tests: a real index over a small hand-made KB.

The MIMIC head is trained for a few seconds on the very sentences the tests link, on features of
the offline MiniLM + EfficientNet backbone, so that every test can expect a specific top entity
from the real pipeline (query encoding, first stage, reranking). Nothing here reads /work/shared.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mmel.backbones import load_backbone
from mmel.core.features import FeatureBatch
from mmel.core.types import Dataset, Entity, KnowledgeBase, Mention
from mmel.features.store import build_features
from mmel.features.views import DatasetFeatures
from mmel.models.mimic import MIMICConfig, MIMICModel
from mmel.retrieval.index_build import build_index
from mmel.retrieval.linker import Linker

TRAIN_STEPS = 30
ENTITIES = [
    Entity("Q532915", "Noel Harrison", "Sex: male. Birth: 1934, London. Occupation: singer, actor, Olympic skier."),
    Entity("Q256474", "Stefanie Powers", "Sex: female. Birth: 1942, Hollywood. Occupation: actress."),
    Entity("Q90", "Paris", "Capital and largest city of France, on the Seine."),
    Entity("Q47899", "Paris Hilton", "Sex: female. Birth: 1981, New York City. Occupation: media personality, "
                                     "socialite, businesswoman."),
    Entity("Q830149", "Paris, Texas", "City in Lamar County, Texas, United States."),
    Entity("Q308", "Mercury (planet)", "Smallest planet of the Solar System and closest to the Sun.",
           images=("kb/mercury_planet.png",)),
    Entity("Q15869", "Freddie Mercury", "Sex: male. Birth: 1946, Zanzibar. Occupation: singer of Queen, songwriter.",
           images=("kb/freddie.png",)),
    Entity("Q925", "Mercury (element)", "Chemical element with symbol Hg, a liquid metal at room temperature."),
]
# (sentence, mention, gold QID): the head is trained on these, and the tests link them.
QUERIES = [
    ("Powers with Noel Harrison in The Girl from U.N.C.L.E.", "Noel Harrison", "Q532915"),
    ("Noel Harrison sang The Windmills of Your Mind.", "Noel Harrison", "Q532915"),
    ("Stefanie Powers starred in Hart to Hart.", "Stefanie Powers", "Q256474"),
    ("We flew to Paris to see the Eiffel Tower.", "Paris", "Q90"),
    ("Paris posted a selfie from the hotel party.", "Paris", "Q47899"),
    ("Paris, Texas is a small city in Lamar County.", "Paris, Texas", "Q830149"),
    ("Mercury is the closest planet to the Sun.", "Mercury", "Q308"),
    ("Mercury sang Bohemian Rhapsody with Queen.", "Mercury", "Q15869"),
    ("Mercury is a toxic liquid metal used in thermometers.", "Mercury", "Q925"),
]


@dataclass(frozen=True)
class TinyIndex:
    """A built index and everything it came from."""

    root: Path             # dataset root (entity images under kb/)
    dataset: Dataset
    checkpoint: Path       # the trained MIMIC head
    index_dir: Path        # the index (do not change it: copy it with `copy_index` first)
    queries: list[tuple[str, str, str]]

    def copy_index(self, target: Path) -> Path:
        shutil.copytree(self.index_dir, target)
        return target


def draw_entity_images(root: Path) -> None:
    planet = Image.new("RGB", (96, 96), (10, 10, 30))
    ImageDraw.Draw(planet).ellipse((18, 18, 78, 78), fill=(150, 150, 160))
    singer = Image.new("RGB", (96, 96), (240, 210, 40))
    ImageDraw.Draw(singer).rectangle((38, 20, 58, 90), fill=(30, 30, 30))
    (root / "kb").mkdir(parents=True, exist_ok=True)
    planet.save(root / "kb" / "mercury_planet.png")
    singer.save(root / "kb" / "freddie.png")


def train_head(features: DatasetFeatures, dataset: Dataset) -> MIMICModel:
    """A few Adam steps of MIMIC's unit-consistency loss: each query against all entities."""
    entities = _trainable(features.entities.gather(np.arange(len(dataset.kb))))
    mentions = _trainable(features.mentions["train"].gather(np.arange(len(dataset.split("train")))))
    labels = torch.tensor([dataset.kb.row_of(mention.gold_qid) for mention in dataset.split("train")])
    torch.manual_seed(0)
    dims = entities.dims
    model = MIMICModel(MIMICConfig(text_dim=dims["text_dim"], image_global_dim=dims["image_global_dim"],
                                   image_patch_dim=dims["image_patch_dim"]))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(TRAIN_STEPS):
        optimizer.zero_grad()
        model(mentions, entities, labels).loss.backward()
        optimizer.step()
    return model.eval()


def _trainable(batch: FeatureBatch) -> FeatureBatch:
    """A copy made outside inference mode, so autograd may use it."""
    return batch.map_tensors(torch.clone)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One thread per test process: with pytest-xdist workers sharing two cores, OpenMP's spinning
    threads stall each other (measured: 100x slower small ops when the machine is oversubscribed)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def linker_backbone():
    """The offline backbone, with one intra-op thread.

    `pytest -n 2` puts two workers on two cores: with torch's default two threads each, OpenMP
    oversubscription makes one MiniLM sentence take 0.5 s instead of 20 ms on such a machine.
    """
    torch.set_num_threads(1)
    return load_backbone("minilm_effnet")


@pytest.fixture(scope="session")
def tiny_index(tmp_path_factory, linker_backbone) -> TinyIndex:
    base = tmp_path_factory.mktemp("tiny-index")
    root = base / "data"
    draw_entity_images(root)
    mentions = [Mention(id=f"q{i}", sentence=sentence, surface=surface, gold_qid=qid)
                for i, (sentence, surface, qid) in enumerate(QUERIES)]
    dataset = Dataset(name="tiny", kb=KnowledgeBase(ENTITIES), splits={"train": mentions}, root=root)
    store = base / "features"
    model = train_head(build_features(dataset, linker_backbone, store, progress=False), dataset)
    checkpoint = base / "mimic-tiny"
    model.save_pretrained(checkpoint, metadata={
        "backbone": {"name": linker_backbone.name, "fingerprint": linker_backbone.fingerprint},
        "preprocess": {"template": "mimic", "max_text_length": 40}})
    index_dir = base / "index"
    build_index(dataset, checkpoint, index_dir, features_store=store, backbone=linker_backbone, progress=False)
    return TinyIndex(root=root, dataset=dataset, checkpoint=checkpoint, index_dir=index_dir, queries=list(QUERIES))


@pytest.fixture(scope="session")
def shared_linker(tiny_index, linker_backbone) -> Iterator[Linker]:
    """One loaded Linker over the tiny index, for tests that only read."""
    with Linker.load(tiny_index.index_dir, backbone=linker_backbone) as linker:
        yield linker


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """Run `app` under a real uvicorn server on 127.0.0.1 (free port) in a thread; yields its base URL.

    The server is configured as `mmel serve` configures it (`uvicorn_config` with the app's settings).
    """
    import uvicorn

    from mmel.server.running import uvicorn_config

    port = free_port()
    settings = app.state.settings.model_copy(update={"host": "127.0.0.1", "port": port})
    server = uvicorn.Server(uvicorn_config(app, settings, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def serve_app():
    """`serving`, for tests that need a server with their own settings."""
    return serving


@pytest.fixture(scope="module")
def running_server(shared_linker, tiny_index) -> Iterator[str]:
    """A real uvicorn server serving the shared linker with default settings; yields its base URL."""
    from mmel.server.app import create_app
    from mmel.server.settings import ServerSettings

    with serving(create_app(ServerSettings(index_dir=tiny_index.index_dir), linker=shared_linker)) as url:
        yield url
