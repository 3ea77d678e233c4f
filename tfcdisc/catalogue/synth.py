"""Synthetic Cdiscount-format catalogues for the demo, the tests and the benchmarks.

The real data can no longer be downloaded, so this writes a folder in exactly the
Kaggle layout (``train.bson``, ``test.bson``, ``category_names.csv``,
``sample_submission.csv``) plus ``test_labels.csv`` to score the test set.

The images are learnable through the hierarchy: the level-1 category decides the
coarse look (background tint and gradient, the object's hue band), level 2 the shape
family, level 3 the detail (exact hue, texture, mark). A product's 1-4 images are
views of one item (position, scale, rotation, lighting, noise). Category sizes are
long-tailed, and train.bson is in no category order, as the real file is (its first
five products are in four categories).

The command is `tfcdisc.synth`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import multiprocessing
import sys
import time
import zlib
from typing import Iterator, Sequence

import bson
import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 180
# Real Cdiscount mix: 1-4 images per product, mean 1.75.
IMAGES_PER_PRODUCT_P = (0.58, 0.20, 0.11, 0.11)
MIN_PRODUCTS_PER_CATEGORY = 3
_SHAPES = ("ellipse", "rectangle", "triangle", "diamond", "hexagon", "star", "cross",
           "ring", "bottle", "arch", "trapezoid", "pill")
_TEXTURES = ("plain", "stripes", "dots", "checker", "diagonal", "grid")
_MARKS = ("none", "disc", "bar", "corner", "band")
_CHUNK = 128  # products per worker task

_BUILTIN = {
    "AUTO - MOTO": ["ACCESSOIRES AUTO", "PIECES MOTO", "ENTRETIEN", "EQUIPEMENT PILOTE"],
    "BRICOLAGE - OUTILLAGE": ["OUTIL A MAIN", "ELECTRICITE", "QUINCAILLERIE", "PLOMBERIE"],
    "JARDIN - PISCINE": ["MOBILIER DE JARDIN", "ARROSAGE", "PISCINE", "BARBECUE"],
    "MAISON - DECORATION": ["LUMINAIRE", "LINGE DE MAISON", "DECORATION MURALE", "RANGEMENT"],
    "INFORMATIQUE": ["STOCKAGE", "PERIPHERIQUE", "CABLE - CONNECTIQUE", "COMPOSANT"],
    "JEUX - JOUETS": ["POUPEE", "JEU DE SOCIETE", "CONSTRUCTION", "PELUCHE"],
    "SPORT": ["FITNESS", "CYCLISME", "RANDONNEE", "SPORTS COLLECTIFS"],
    "BEAUTE - SANTE": ["SOIN DU VISAGE", "PARFUM", "MAQUILLAGE", "HYGIENE"],
    "TELEPHONIE - GPS": ["COQUE - HOUSSE", "CHARGEUR", "ECOUTEUR", "SUPPORT"],
    "LIBRAIRIE": ["ROMAN", "BANDE DESSINEE", "SCOLAIRE", "BEAUX LIVRES"],
}
_LEAF_STYLES = ("CLASSIQUE", "PRO", "MINI", "ENFANT", "PREMIUM")
_NOISE_POOL = 64  # images that belong to no category, shared by every category


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """How far a catalogue is from the easy, clean default.

    Attributes:
      shared_look: categories of one level-1 branch share shapes and palettes; only
        texture and mark (and a small hue shift) tell the leaves apart.
      noise_images: share of images that belong to no category's style (a pool shared
        by all categories: the same noise image recurs across categories).
      stock_images: share of images drawn from a small pool of stock photos per
        category, reused byte for byte by other products, in train and in test. Half of
        a category's stock photos do not look like it (a packaging shot, a logo): only
        having seen those exact bytes tells their category.
      stock_pool: stock photos per category.
      wrong_labels: share of training products labelled with another category (test
        labels stay true).
    """

    shared_look: bool = False
    noise_images: float = 0.0
    stock_images: float = 0.0
    stock_pool: int = 4
    wrong_labels: float = 0.0


# "hard": about 38% of training images are byte-identical copies of another, as in the
# real train.bson (7.7M unique of 12.4M); the generator reports the rates it produced.
DIFFICULTIES = {"easy": Difficulty(),
                "hard": Difficulty(shared_look=True, noise_images=0.08, stock_images=0.30,
                                   stock_pool=4, wrong_labels=0.05)}


@dataclasses.dataclass(frozen=True)
class CategoryStyle:
    """What every image of a category shares; derived from the hierarchy."""

    bg_hue: float
    bg_gradient: int
    shape: int
    hue: float
    saturation: float
    texture: int
    mark: int


# --------------------------------------------------------------------------- taxonomy


def builtin_taxonomy_frame():
    """The invented 200-category taxonomy used when no category_names.csv is given."""
    import pandas as pd
    rows = []
    cid = 1000000100
    for l1, l2s in _BUILTIN.items():
        for l2 in l2s:
            for style in _LEAF_STYLES:
                rows.append((cid, l1, l2, f"{l2} {style}"))
                cid += 37
    return pd.DataFrame(rows, columns=["category_id", "category_level1", "category_level2",
                                       "category_level3"])


def sample_categories(taxonomy, k: int, rng: np.random.Generator) -> np.ndarray:
    """Chooses k class indices spread across levels: a few level-2 nodes under each of
    several level-1 nodes, a few leaves under each, so the hierarchy has structure."""
    if k > taxonomy.num_classes:
        raise ValueError(f"--num_categories={k} exceeds the {taxonomy.num_classes} "
                         "categories of the taxonomy")
    l2_of = taxonomy.class_to_level2
    l1_of = taxonomy.level2_to_level1
    chosen: list[int] = []
    for l1 in rng.permutation(taxonomy.num_level1):
        for l2 in [n for n in rng.permutation(taxonomy.num_level2) if l1_of[n] == l1][:3]:
            leaves = rng.permutation(np.flatnonzero(l2_of == l2))[:3]
            chosen.extend(int(c) for c in leaves[:k - len(chosen)])
            if len(chosen) == k:
                return np.sort(np.array(chosen))
    rest = np.setdiff1d(np.arange(taxonomy.num_classes), chosen)
    chosen.extend(rng.choice(rest, k - len(chosen), replace=False).tolist())
    return np.sort(np.array(chosen))


def category_styles(taxonomy, shared_look: bool = False) -> list[CategoryStyle]:
    """One style per class. Stable per category id, whatever subset a catalogue uses.

    With ``shared_look`` the leaves of a level-1 branch share two shapes and one narrow
    palette; texture, mark and a small hue shift still tell them apart.
    """
    styles = []
    l2_rank = {}  # rank of each level-2 node among its level-1 siblings
    for l1 in range(taxonomy.num_level1):
        for j, n in enumerate(np.flatnonzero(taxonomy.level2_to_level1 == l1)):
            l2_rank[int(n)] = j
    leaf_rank = {}
    for n in range(taxonomy.num_level2):
        for j, c in enumerate(np.flatnonzero(taxonomy.class_to_level2 == n)):
            leaf_rank[int(c)] = j
    for c in range(taxonomy.num_classes):
        l2 = int(taxonomy.class_to_level2[c])
        l1 = int(taxonomy.level2_to_level1[l2])
        h1 = zlib.crc32(taxonomy.level1_names[l1].encode()) / 2**32
        h2 = zlib.crc32(taxonomy.level2_names[l2].encode())
        k = leaf_rank[c]
        if shared_look:
            shape = (int(h1 * 2**32) + 5 * (l2_rank[l2] % 2)) % len(_SHAPES)
            hue = (h1 + 0.5 + 0.05 * ((k * 0.618) % 1.0 - 0.5)) % 1.0
            saturation = 0.6 + 0.1 * ((k * 0.382) % 1.0)
        else:  # siblings step through the shapes (5 is prime to 12), so they all differ
            shape = (int(h1 * 2**32) + 5 * l2_rank[l2]) % len(_SHAPES)
            hue = (h1 + 0.5 + 0.22 * ((k * 0.618) % 1.0 - 0.5)) % 1.0
            saturation = 0.45 + 0.45 * ((k * 0.382) % 1.0)
        styles.append(CategoryStyle(
            bg_hue=h1, bg_gradient=int(h1 * 1000) % 3, shape=shape, hue=hue,
            saturation=saturation, texture=k % len(_TEXTURES),
            mark=(k // len(_TEXTURES) + h2) % len(_MARKS)))
    return styles


# --------------------------------------------------------------------------- images


def _hsv(h: float, s: float, v: float) -> tuple[int, int, int]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return int(r * 255), int(g * 255), int(b * 255)


def _shape_mask(shape: int, size: int) -> Image.Image:
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    s, c = size, size / 2
    name = _SHAPES[shape]
    if name == "ellipse":
        d.ellipse((4, s * 0.18, s - 4, s * 0.82), fill=255)
    elif name == "rectangle":
        d.rectangle((s * 0.12, s * 0.2, s * 0.88, s * 0.8), fill=255)
    elif name == "triangle":
        d.polygon([(c, 4), (s - 4, s - 8), (4, s - 8)], fill=255)
    elif name == "diamond":
        d.polygon([(c, 2), (s - 2, c), (c, s - 2), (2, c)], fill=255)
    elif name in ("hexagon", "star"):
        n = 6 if name == "hexagon" else 10
        pts = []
        for i in range(n):
            r = c - 4 if name == "hexagon" or i % 2 == 0 else c * 0.45
            a = math.pi * 2 * i / n
            pts.append((c + r * math.cos(a), c + r * math.sin(a)))
        d.polygon(pts, fill=255)
    elif name == "cross":
        d.rectangle((s * 0.36, 4, s * 0.64, s - 4), fill=255)
        d.rectangle((4, s * 0.36, s - 4, s * 0.64), fill=255)
    elif name == "ring":
        d.ellipse((4, 4, s - 4, s - 4), fill=255)
        d.ellipse((s * 0.3, s * 0.3, s * 0.7, s * 0.7), fill=0)
    elif name == "bottle":
        d.rounded_rectangle((s * 0.25, s * 0.35, s * 0.75, s - 4), radius=10, fill=255)
        d.rectangle((s * 0.42, 4, s * 0.58, s * 0.4), fill=255)
    elif name == "arch":
        d.pieslice((4, 4, s - 4, s * 1.4), 180, 360, fill=255)
    elif name == "trapezoid":
        d.polygon([(s * 0.3, s * 0.15), (s * 0.7, s * 0.15), (s - 4, s * 0.85),
                   (4, s * 0.85)], fill=255)
    else:  # pill
        d.rounded_rectangle((4, s * 0.3, s - 4, s * 0.7), radius=int(s * 0.2), fill=255)
    return m


def _item(style: CategoryStyle, rng: np.random.Generator) -> Image.Image:
    """Renders one product (an RGBA object); its views transform this same item."""
    size = 128
    hue = (style.hue + rng.normal(0, 0.015)) % 1.0
    sat = float(np.clip(style.saturation + rng.normal(0, 0.04), 0.2, 1.0))
    base = _hsv(hue, sat, 0.55 + 0.35 * rng.random())
    dark = tuple(int(v * 0.55) for v in base)
    layer = Image.new("RGBA", (size, size), base + (255,))
    d = ImageDraw.Draw(layer)
    step = int(rng.integers(9, 14))
    phase = int(rng.integers(0, step))
    texture = _TEXTURES[style.texture]
    if texture == "stripes":
        for x in range(phase, size, step):
            d.line((x, 0, x, size), fill=dark, width=3)
    elif texture == "dots":
        for y in range(phase, size, step):
            for x in range(phase, size, step):
                d.ellipse((x - 2, y - 2, x + 2, y + 2), fill=dark)
    elif texture == "checker":
        for y in range(0, size, step):
            for x in range((y // step) % 2 * step, size, 2 * step):
                d.rectangle((x, y, x + step - 1, y + step - 1), fill=dark)
    elif texture == "diagonal":
        for x in range(-size + phase, size, step):
            d.line((x, 0, x + size, size), fill=dark, width=3)
    elif texture == "grid":
        for v in range(phase, size, step):
            d.line((v, 0, v, size), fill=dark, width=1)
            d.line((0, v, size, v), fill=dark, width=1)
    light = (250, 250, 245)
    mark = _MARKS[style.mark]
    if mark == "disc":
        d.ellipse((48, 48, 80, 80), fill=light)
    elif mark == "bar":
        d.rectangle((24, 56, 104, 70), fill=light)
    elif mark == "corner":
        d.rectangle((30, 30, 56, 56), fill=(30, 30, 30))
    elif mark == "band":
        d.rectangle((0, 88, size, 100), fill=(20, 20, 60))
    layer.putalpha(_shape_mask(style.shape, size))
    return layer


def _background(style: CategoryStyle, rng: np.random.Generator) -> np.ndarray:
    tint = np.array(_hsv(style.bg_hue, 0.08 + 0.06 * rng.random(), 0.9 + 0.1 * rng.random()),
                    np.float32)
    ramp = np.linspace(-10, 10, IMAGE_SIZE, dtype=np.float32)
    bg = np.broadcast_to(tint, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    if style.bg_gradient == 1:
        bg += ramp[:, None, None]
    elif style.bg_gradient == 2:
        bg += ramp[None, :, None]
    return bg


def _view(item: Image.Image, style: CategoryStyle, rng: np.random.Generator) -> bytes:
    """One photo of the item: a new pose, light and noise, JPEG at quality 70-95."""
    scale = rng.uniform(0.75, 1.15)
    side = int(item.width * scale)
    obj = item.resize((side, side), Image.BILINEAR).rotate(
        float(rng.uniform(-25, 25)), resample=Image.BILINEAR, expand=True)
    canvas = Image.fromarray(np.clip(_background(style, rng), 0, 255).astype(np.uint8))
    x = (IMAGE_SIZE - obj.width) // 2 + int(rng.integers(-18, 19))
    y = (IMAGE_SIZE - obj.height) // 2 + int(rng.integers(-18, 19))
    canvas.paste(obj, (x, y), obj)
    pixels = np.asarray(canvas, np.int16) * rng.uniform(0.9, 1.05)
    pixels += rng.integers(-3, 4, pixels.shape, dtype=np.int16)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        out, "JPEG", quality=int(rng.integers(70, 96)))
    return out.getvalue()


def render_product(style: CategoryStyle, num_images: int, seed: Sequence[int]) -> list[bytes]:
    rng = np.random.default_rng(list(seed))
    item = _item(style, rng)
    return [_view(item, style, rng) for _ in range(num_images)]


def _noise_style(seed: Sequence[int]) -> CategoryStyle:
    """A look that belongs to no category: any shape, hue and texture, together."""
    rng = np.random.default_rng(list(seed))
    return CategoryStyle(bg_hue=float(rng.random()), bg_gradient=int(rng.integers(3)),
                         shape=int(rng.integers(len(_SHAPES))), hue=float(rng.random()),
                         saturation=float(rng.uniform(0.2, 0.9)),
                         texture=int(rng.integers(len(_TEXTURES))),
                         mark=int(rng.integers(len(_MARKS))))


# --------------------------------------------------------------------------- catalogue plan


@dataclasses.dataclass
class Plan:
    """Which products go where, decided before any image is drawn."""

    product_ids: np.ndarray
    classes: np.ndarray  # the true class: what the images show
    num_images: np.ndarray
    labels: np.ndarray | None = None  # the class written in the file, if it differs


def plan_catalogue(num_classes: int, num_train: int, num_test: int, rng: np.random.Generator,
                   wrong_labels: float = 0.0) -> tuple[Plan, Plan]:
    """Long-tailed category sizes, train in no category order, ids increasing with gaps."""
    if num_train < MIN_PRODUCTS_PER_CATEGORY * num_classes:
        raise ValueError(f"--num_train_products={num_train} is too few for {num_classes} "
                         f"categories: every category gets at least "
                         f"{MIN_PRODUCTS_PER_CATEGORY}; lower --num_categories")
    weights = 1.0 / (np.arange(num_classes) + 2.0) ** 1.1  # Zipf-like, like the real data
    weights = rng.permutation(weights / weights.sum())
    sizes = MIN_PRODUCTS_PER_CATEGORY + rng.multinomial(
        num_train - MIN_PRODUCTS_PER_CATEGORY * num_classes, weights)
    train_classes = rng.permutation(np.repeat(np.arange(num_classes), sizes))
    test_classes = rng.choice(num_classes, size=num_test, p=weights)
    # One increasing id sequence with gaps; a random part of it becomes the test ids.
    ids = np.cumsum(rng.integers(1, 4, size=num_train + num_test)).astype(np.int64)
    is_test = np.zeros(len(ids), bool)
    is_test[rng.choice(len(ids), num_test, replace=False)] = True
    counts = lambda n: rng.choice(4, size=n, p=IMAGES_PER_PRODUCT_P) + 1  # noqa: E731
    train = Plan(ids[~is_test], train_classes, counts(num_train))
    if wrong_labels:  # a separate stream: the easy catalogue is the same with or without
        noisy = np.random.default_rng([int(rng.integers(2**31)), 5])
        wrong = noisy.random(num_train) < wrong_labels
        shift = noisy.integers(1, max(num_classes, 2), size=num_train)
        train.labels = np.where(wrong, (train_classes + shift) % num_classes, train_classes)
    return train, Plan(ids[is_test], test_classes, counts(num_test))


# --------------------------------------------------------------------------- writing

_WORKER_STYLES: list[CategoryStyle] = []
_WORKER_DIFFICULTY = Difficulty()
_POOL: dict = {}  # pooled images (stock photos, noise), rendered once per worker


def _init_worker(styles: list[CategoryStyle], difficulty: Difficulty) -> None:
    global _WORKER_STYLES, _WORKER_DIFFICULTY
    _WORKER_STYLES, _WORKER_DIFFICULTY = styles, difficulty
    _POOL.clear()


def _pooled(seed: int, key: tuple) -> bytes:
    """A pooled image, the same bytes wherever it is used."""
    if key not in _POOL:
        if key[0] == "noise":
            style = _noise_style((seed, 98, key[1]))
        elif key[2] % 2:  # a stock photo that does not look like its category
            style = _noise_style((seed, 97, key[1], key[2]))
        else:
            style = _WORKER_STYLES[key[1]]
        _POOL[key] = render_product(style, 1, (seed, 99, *key[1:]))[0]
    return _POOL[key]


def _pictures(seed: int, split: int, pid: int, cls: int, n: int) -> list[bytes]:
    """A product's images: views of its item, some replaced by pooled images when hard."""
    pictures = render_product(_WORKER_STYLES[cls], n, (seed, split, pid))
    d = _WORKER_DIFFICULTY
    if not (d.noise_images or d.stock_images):
        return pictures
    for j in range(n):
        u = np.random.default_rng([seed, split, pid, j, 11]).random(2)
        if u[0] < d.noise_images:
            pictures[j] = _pooled(seed, ("noise", int(u[1] * _NOISE_POOL)))
        elif u[0] < d.noise_images + d.stock_images:
            pictures[j] = _pooled(seed, ("stock", cls, int(u[1] * d.stock_pool)))
    return pictures


def _encode_chunk(task) -> tuple[bytes, int, np.ndarray]:
    """Renders and BSON-encodes a run of products (runs in a worker process).

    Returns the documents, the number of JPEG bytes among them, and (fingerprint, written
    class) per image, to count duplicates.
    """
    seed, split, ids, classes, counts, labels, category_ids = task
    out, seen = [], []
    jpeg_bytes = 0
    for pid, cls, n, label, cid in zip(ids, classes, counts, labels, category_ids):
        pictures = _pictures(seed, split, int(pid), int(cls), int(n))
        jpeg_bytes += sum(map(len, pictures))
        seen.extend((int.from_bytes(hashlib.blake2b(p, digest_size=8).digest(), "little"),
                     int(label)) for p in pictures)
        doc = {"_id": int(pid), "imgs": [{"picture": p} for p in pictures]}
        if cid is not None:
            doc["category_id"] = int(cid)
        out.append(bson.encode(doc))
    return b"".join(out), jpeg_bytes, np.array(seen, np.uint64).reshape(-1, 2)


def _tasks(plan: Plan, split: int, seed: int, category_ids, labeled: bool) -> Iterator:
    labels = plan.classes if plan.labels is None else plan.labels
    for i in range(0, len(plan.product_ids), _CHUNK):
        sl = slice(i, i + _CHUNK)
        cids = category_ids[labels[sl]] if labeled else [None] * len(plan.product_ids[sl])
        yield (seed, split, plan.product_ids[sl], plan.classes[sl], plan.num_images[sl],
               labels[sl], cids)


def _write_atomic(path: str, chunks, progress=None) -> int:
    """Streams chunks into ``path``, replaced whole (`tfcdisc.catalogue.atomic`); returns the bytes."""
    from tfcdisc.catalogue import atomic
    total = 0
    with atomic.writing(path) as f:
        for chunk in chunks:
            f.write(chunk)
            total += len(chunk)
            if progress:
                progress(chunk)
    return total


def generate(output_dir: str, num_train_products: int, num_test_products: int, *,
             num_categories: int | None = None, category_names: str | None = None,
             seed: int = 0, workers: int | None = None, verbose: bool = False,
             difficulty: str = "easy") -> dict:
    """Writes a synthetic catalogue in the Kaggle layout; returns a summary dict.

    Args:
      output_dir: local or gs:// folder (created if missing).
      num_train_products, num_test_products: products in train.bson / test.bson.
      num_categories: categories actually used (default: 40, or all of a small file).
      category_names: a category_names.csv to sample real categories from; it is
        copied whole into the output, as a user's folder would have it.
      seed: the catalogue is a deterministic function of its arguments and seed.
      workers: processes rendering images (default: every core).
      difficulty: "easy" (clean, distinct looks) or "hard" (`DIFFICULTIES`: shared looks
        within a level-1 branch, noise images, stock photos reused across products and
        between train and test, wrong training labels).
    """
    import pandas as pd
    import tensorflow as tf
    from tfcdisc.catalogue import taxonomy as taxonomy_lib

    if difficulty not in DIFFICULTIES:
        raise ValueError(f"--difficulty={difficulty}: choose from {', '.join(DIFFICULTIES)}")
    hard = DIFFICULTIES[difficulty]
    rng = np.random.default_rng(seed)
    if category_names:
        full = taxonomy_lib.load(category_names)
    else:
        full = taxonomy_lib.from_frame(builtin_taxonomy_frame(), "built-in taxonomy")
    k = num_categories or min(40, full.num_classes)
    used = sample_categories(full, k, rng)
    styles_all = category_styles(full, hard.shared_look)
    styles = [styles_all[c] for c in used]
    category_ids = full.category_ids[used]
    train, test = plan_catalogue(k, num_train_products, num_test_products, rng,
                                 hard.wrong_labels)

    tf.io.gfile.makedirs(output_dir)
    join = lambda name: output_dir.rstrip("/") + "/" + name  # noqa: E731
    if category_names:
        tf.io.gfile.copy(category_names, join("category_names.csv"), overwrite=True)
    else:
        sub = taxonomy_lib.from_frame(builtin_taxonomy_frame().iloc[np.sort(used)], "built-in")
        _write_text(join("category_names.csv"), sub.to_frame().to_csv(index=False))

    workers = workers or multiprocessing.cpu_count()
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    ctx = multiprocessing.get_context(method)
    start = time.perf_counter()
    sizes = {}
    jpeg_bytes = 0

    seen: dict[str, list] = {"train.bson": [], "test.bson": []}

    def documents(results, name):
        nonlocal jpeg_bytes
        for blob, n, images in results:
            jpeg_bytes += n
            seen[name].append(images)
            yield blob

    with ctx.Pool(workers, initializer=_init_worker, initargs=(styles, hard)) as pool:
        for name, plan, split, labeled in (("train.bson", train, 0, True),
                                           ("test.bson", test, 1, False)):
            tasks = _tasks(plan, split, seed, category_ids, labeled)
            bar = _progress(len(plan.product_ids), f"{name}", verbose)
            sizes[name] = _write_atomic(join(name),
                                        documents(pool.imap(_encode_chunk, tasks), name),
                                        lambda _: bar.update(min(_CHUNK, bar.total - bar.n)))
            bar.close()
    elapsed = time.perf_counter() - start

    test_cids = category_ids[test.classes]
    _write_text(join("test_labels.csv"), pd.DataFrame(
        {"_id": test.product_ids, "category_id": test_cids}).to_csv(index=False))
    most_frequent = int(category_ids[np.bincount(train.classes, minlength=k).argmax()])
    _write_text(join("sample_submission.csv"), pd.DataFrame(
        {"_id": test.product_ids, "category_id": most_frequent}).to_csv(index=False))
    total_products = num_train_products + num_test_products
    images = int(train.num_images.sum() + test.num_images.sum())
    return {
        "output_dir": output_dir,
        "train_products": num_train_products,
        "test_products": num_test_products,
        "categories": k,
        "images": images,
        "bytes": sizes,
        "seconds": round(elapsed, 2),
        "products_per_second": round(total_products / max(elapsed, 1e-9), 1),
        "mean_jpeg_bytes": round(jpeg_bytes / max(images, 1), 1),
        "difficulty": difficulty,
        "wrong_training_labels": int((train.labels != train.classes).sum())
        if train.labels is not None else 0,
        "duplicates": duplicate_rates(np.concatenate(seen["train.bson"]),
                                      np.concatenate(seen["test.bson"] or [np.zeros((0, 2))])),
    }


def replicate(source_dir: str, output_dir: str, copies: int) -> int:
    """A catalogue ``copies`` times larger, in seconds instead of hours: every training
    product of ``source_dir`` again ``copies`` times, with new ``_id``s and its rendered
    JPEGs reused byte for byte (test.bson and category_names.csv are copied).

    For measuring conversion at a size where start-up is amortised (`benchmarks`): the
    documents keep the real files' layout (``_id`` first, as BSON int32, then ``imgs``,
    ``category_id``), and only the 4 bytes of each ``_id`` are rewritten. Returns the
    number of training products written.
    """
    import tensorflow as tf
    from tfcdisc.catalogue import atomic, index as index_lib
    src = source_dir.rstrip("/") + "/train.bson"
    idx = index_lib.load_or_build(src)
    stride = int(idx.product_ids.max()) + 1
    if stride * copies >= 2**31:
        raise ValueError(f"{src}: _ids up to {stride - 1} times {copies} copies overflow int32")
    head = b"\x10_id\x00"
    ends = idx.offsets + idx.lengths
    groups = np.searchsorted(idx.offsets, np.arange(0, int(ends[-1]), 64 << 20))
    groups = [*groups.tolist(), len(idx)]
    with atomic.writing(output_dir.rstrip("/") + "/train.bson") as out, tf.io.gfile.GFile(
            src, "rb") as f:
        for k in range(copies):
            for at, last in zip(groups[:-1], groups[1:]):
                if last <= at:
                    continue
                base = int(idx.offsets[at])
                f.seek(base)
                buf = bytearray(f.read(int(ends[last - 1]) - base))
                for j in range(at, last):
                    o = int(idx.offsets[j]) - base
                    if buf[o + 4:o + 9] != head:
                        raise ValueError(f"{src}: byte offset {idx.offsets[j]}: _id is not "
                                         "the first element, as an int32")
                    buf[o + 9:o + 13] = (int(idx.product_ids[j]) + k * stride).to_bytes(
                        4, "little")
                out.write(bytes(buf))
    for name in ("test.bson", "category_names.csv"):
        tf.io.gfile.copy(source_dir.rstrip("/") + "/" + name,
                         output_dir.rstrip("/") + "/" + name, overwrite=True)
    return len(idx) * copies


def duplicate_rates(train: np.ndarray, test: np.ndarray) -> dict:
    """From (fingerprint, class) per image: how much of the catalogue is exact copies."""
    keys, inverse, counts = np.unique(train[:, 0], return_inverse=True, return_counts=True)
    pairs = np.unique(train[counts[inverse] > 1], axis=0)  # (image, class) among copies
    pair_keys, spread = np.unique(pairs[:, 0], return_counts=True)
    multi = pair_keys[spread > 1]  # images seen under more than one category
    return {
        # like the real train.bson's 38%: images whose bytes also occur elsewhere in it,
        # beyond the first occurrence
        "train_images_that_copy_another": round(1 - len(keys) / max(len(train), 1), 3),
        "train_images_with_a_copy_in_another_category": round(
            float(np.isin(train[:, 0], multi).mean()) if len(train) else 0.0, 3),
        "test_images_seen_in_train": round(
            float(np.isin(test[:, 0], keys).mean()) if len(test) else 0.0, 3),
    }


def _write_text(path: str, text: str) -> None:
    _write_atomic(path, [text.encode("utf-8")])


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="product", disable=not enabled, file=sys.stderr,
                mininterval=1.0)
