"""Small data sets in the formats of two tasks lm_eval ships, built here: nothing comes from a hub.

- MMMU (`mmmu_val`): columns `id`, `question`, `options` (a Python list literal, as MMMU stores it), `answer`,
  `question_type` (`multiple-choice` or `open`), `image_1` .. `image_7` (image features; unused ones are None);
  the question names its images `<image 1>` .. `<image 7>`. Questions with one image and with several, some
  naming an image twice, multiple choice and open; at most three images per question as lm_eval sends them.
- ARC (`arc_easy`): `id`, `question`, `choices` ({`text`, `label`}), `answerKey`; a likelihood task.

Each is saved as one parquet file per split in a directory that `datasets.load_dataset(DIR)` reads (the split
comes from the file name), so a task's `dataset_path` can be the directory.
"""

import pathlib

import numpy as np
from PIL import Image, ImageDraw

MMMU_DIR, ARC_DIR = "mmmu", "arc"  # the tasks' dataset_path (bench/accuracy_tasks)
IMAGE_COLUMNS = [f"image_{i}" for i in range(1, 8)]
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 40)}
SHAPES = ("circle", "square", "triangle")
SIZES = ((448, 448), (640, 360), (300, 500), (896, 448))  # 1 tile; 2 + thumbnail; ...


def shapes_image(rng: np.random.Generator, color: str, shape: str, count: int, size: tuple[int, int]) -> Image.Image:
    """`count` shapes of one colour on a noisy background: distinct bytes per image, a known right answer."""
    width, height = size
    background = rng.integers(200, 256, (height, width, 3), dtype=np.uint8)  # [h, w, 3]
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    for i in range(count):
        r = min(width, height) // 10
        x = int((i + 1) * width / (count + 1))
        y = int(rng.integers(r, height - r))
        box = (x - r, y - r, x + r, y + r)
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=COLORS[color])
    return image


def _question(i: int, rng: np.random.Generator) -> dict:
    """Question i: a cycle of four kinds, so that any prefix of the set has each kind."""
    kind = i % 4
    colors = list(COLORS)
    color, shape = colors[int(rng.integers(4))], SHAPES[int(rng.integers(3))]
    count = int(rng.integers(1, 5))
    size = SIZES[i % len(SIZES)]
    images = [shapes_image(rng, color, shape, count, size)]
    row = {"id": f"validation_Tiny_{i + 1}", "question_type": "multiple-choice", "options": str(colors)}
    if kind == 0:  # one image, multiple choice
        row |= {"question": "What colour are the shapes in <image 1>?", "answer": "ABCD"[colors.index(color)]}
    elif kind == 1:  # one image, open
        row |= {"question": f"How many {shape}s are there in <image 1>?", "answer": str(count),
                "question_type": "open", "options": "[]"}
    elif kind == 2:  # two images, multiple choice
        other_count = count + 1 + int(rng.integers(3))
        images.append(shapes_image(rng, color, shape, other_count, SIZES[(i + 1) % len(SIZES)]))
        row |= {"question": f"<image 1> and <image 2> show {shape}s. Which image has more of them?",
                "options": str(["the first", "the second", "both the same"]), "answer": "B"}
    else:  # two images, the first named twice (lm_eval then sends it twice, as for some MMMU questions), open
        images.append(shapes_image(rng, colors[(colors.index(color) + 1) % 4], shape, count, size))
        row |= {"question": f"Look at <image 1> and <image 2>. How many {shape}s does <image 1> have?",
                "answer": str(count), "question_type": "open", "options": "[]"}
    return row | {column: images[j] if j < len(images) else None for j, column in enumerate(IMAGE_COLUMNS)}


def mmmu_rows(count: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [_question(i, rng) for i in range(count)]


def arc_rows(count: int, seed: int = 0) -> list[dict]:
    """Arithmetic questions with four numeric choices."""
    rng = np.random.default_rng(seed + 1)
    rows = []
    for i in range(count):
        a, b = (int(v) for v in rng.integers(2, 50, 2))
        wrong = {a + b + d for d in (-10, -1, 1, 2, 10)} - {a + b}
        choices = [a + b, *list(wrong)[:3]]
        rng.shuffle(choices)
        labels = ["A", "B", "C", "D"]
        rows.append({"id": f"Tiny_{i + 1}", "question": f"What is {a} plus {b}?",
                     "choices": {"text": [str(c) for c in choices], "label": labels},
                     "answerKey": labels[choices.index(a + b)]})
    return rows


def build(directory: pathlib.Path, mmmu_count: int, arc_count: int, seed: int = 0) -> pathlib.Path:
    """Writes `directory`/mmmu and `directory`/arc (the MMMU set as its `validation` split, the ARC set
    as `validation` and `test`) and returns `directory`."""
    import datasets  # lm_eval's dependency: imported only by the bench and the test that run lm_eval

    image_features = {column: datasets.Image() for column in IMAGE_COLUMNS}
    mmmu_features = datasets.Features({"id": datasets.Value("string"), "question": datasets.Value("string"),
                                       "options": datasets.Value("string"), "answer": datasets.Value("string"),
                                       "question_type": datasets.Value("string"), **image_features})
    mmmu = datasets.Dataset.from_list(mmmu_rows(mmmu_count, seed), features=mmmu_features)
    (directory / MMMU_DIR).mkdir(parents=True, exist_ok=True)
    mmmu.to_parquet(directory / MMMU_DIR / "validation-00000-of-00001.parquet")
    arc = datasets.Dataset.from_list(arc_rows(arc_count, seed))
    (directory / ARC_DIR).mkdir(parents=True, exist_ok=True)
    for split in ("validation", "test"):  # arc_easy's config names both; lm_eval evaluates `test`
        arc.to_parquet(directory / ARC_DIR / f"{split}-00000-of-00001.parquet")
    return directory
