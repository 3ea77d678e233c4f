"""How a synthetic category looks: the taxonomy, its styles and the difficulty knobs."""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

IMAGE_SIZE = 180
# Real Cdiscount mix: 1-4 images per product, mean 1.75.
IMAGES_PER_PRODUCT_P = (0.58, 0.20, 0.11, 0.11)
MIN_PRODUCTS_PER_CATEGORY = 3
_SHAPES = ("ellipse", "rectangle", "triangle", "diamond", "hexagon", "star", "cross",
           "ring", "bottle", "arch", "trapezoid", "pill")
_TEXTURES = ("plain", "stripes", "dots", "checker", "diagonal", "grid")
_MARKS = ("none", "disc", "bar", "corner", "band")

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
