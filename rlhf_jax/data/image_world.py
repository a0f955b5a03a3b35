"""The image world: numpy-rendered pictures with questions and a gold checker, like the text world.

No downloads: every image is drawn with numpy on a black SIZE x SIZE RGB canvas (uint8) from a
JSON-serialisable task dict, so `render(task)` redraws a sample exactly and any response to a
stored task can be rescored. Objects are filled shapes (square, circle, triangle) and digits
(a built-in 5x7 bitmap font, scaled) in one of COLOURS.

Families (prompt = IMAGE_TOKEN + a question; answers are a few lower-case words or a number):
  shape      one shape                       "what shape is shown?"                 -> "circle"
  digit      one digit                       "what digit is shown?"                 -> "7"
  count      2-7 shapes, count one colour    "how many red objects are there?"      -> "3"
  relation   two shapes, where is A from B   "where is the red square relative to
                                              the blue circle?"                     -> "left"
  arithmetic two digits, sum or difference   "what is the sum of the two digits?"   -> "12"
  caption    1-2 shapes, left to right       "name the objects from left to right." -> "red circle blue square"

Gold checker `score(task, response) -> [0, 1]`, in the style of `gold.score` (its response cleaning,
word tokens, brevity and LCS helpers; words are compared in lower case):
  * no words -> 0.0; the exact answer -> 1.0
  * the answer inside the response -> penalty(rest)
  * otherwise, number answers (count, arithmetic) -> 0.4 * 0.5**|closest number - answer| * penalty(rest)
  * otherwise, caption -> 0.5 * lcs(R, T) / |T| * penalty(unmatched)
  * at least FORMAT_CREDIT for a response made only of answer vocabulary (answer-shaped but wrong:
    another shape, colour, relation or number); anything else 0.0
  penalty(words) = gold.brevity(#filler words) * 0.5**(#answer-vocabulary words: hedged candidates).
  (digit naming has no numeric partial credit: a 3 drawn is not nearly an 8.)

Input validation, one ValueError each: `check_image` (shape, channels, dtype, range), `load_png`
(unreadable or corrupt files), `check_prompt_images` (more IMAGE_TOKEN markers than images).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rlhf_jax.data import gold

_WHERE = "rlhf_jax/data/image_world.py"
SIZE = 32
CHANNELS = 3
IMAGE_TOKEN = "<image>"
FORMAT_CREDIT = gold.FORMAT_CREDIT

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230),
    "yellow": (230, 210, 40), "white": (240, 240, 240)}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
FAMILIES: tuple[str, ...] = ("shape", "digit", "count", "relation", "arithmetic", "caption")
NUMBER_FAMILIES = ("count", "arithmetic")

# 5x7 bitmap font, rows top to bottom ("#" = ink).
_FONT_ROWS = {
    0: (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    1: ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    2: (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    3: ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    4: ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    5: ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    6: ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    7: ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    8: (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    9: (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
}
FONT: dict[int, np.ndarray] = {d: np.array([[c == "#" for c in row] for row in rows], bool)
                               for d, rows in _FONT_ROWS.items()}

QUESTIONS = {
    "shape": "What shape is shown? Answer with one word.",
    "digit": "What digit is shown? Answer with one number.",
    "count": "How many {colour} objects are there? Answer with one number.",
    "relation": "Where is the {colour_a} {shape_a} relative to the {colour_b} {shape_b}? "
                "Answer left, right, above or below.",
    "arithmetic": {"sum": "What is the sum of the two digits? Answer with one number.",
                   "difference": "What is the larger digit minus the smaller digit? Answer with one number."},
    "caption": "Name the objects from left to right as colour and shape.",
}


# ------------------------------------------------------------------ rendering
def _mask(obj: dict) -> np.ndarray:
  """The object's ink as a bool [h, w] array (its bounding box)."""
  if obj["kind"] == "digit":
    k = int(obj["scale"])
    return np.kron(FONT[int(obj["digit"])], np.ones((k, k), bool))
  s = int(obj["size"])
  i, j = np.mgrid[0:s, 0:s]
  if obj["shape"] == "square":
    return np.ones((s, s), bool)
  if obj["shape"] == "circle":
    c = (s - 1) / 2
    return (i - c) ** 2 + (j - c) ** 2 <= (s / 2) ** 2
  if obj["shape"] == "triangle":   # apex at the top centre, base on the bottom row
    half = (i + 1) / s * (s / 2)
    return np.abs(j - (s - 1) / 2) <= half
  raise ValueError(f"{_WHERE}: unknown shape {obj['shape']!r}; shapes are {SHAPES}")


def render(task: dict) -> np.ndarray:
  """task dict (its "objects": kind, shape/digit, colour, x, y, size/scale) -> uint8 [SIZE,SIZE,3]."""
  img = np.zeros((SIZE, SIZE, CHANNELS), np.uint8)
  for obj in task["objects"]:
    m = _mask(obj)
    y, x = int(obj["y"]), int(obj["x"])
    h, w = m.shape
    if y < 0 or x < 0 or y + h > SIZE or x + w > SIZE:
      raise ValueError(f"{_WHERE}: object {obj} does not fit on the {SIZE}x{SIZE} canvas")
    img[y:y + h, x:x + w][m] = COLOURS[obj["colour"]]
  return img


# ------------------------------------------------------------------ tasks
def _shape(rng, colour, size, x, y) -> dict:
  return {"kind": "shape", "shape": str(rng.choice(SHAPES)), "colour": colour, "size": int(size),
          "x": int(x), "y": int(y)}


def _digit(digit, colour, scale, x, y) -> dict:
  return {"kind": "digit", "digit": int(digit), "colour": colour, "scale": int(scale), "x": int(x), "y": int(y)}


def _colours(rng, n) -> list[str]:
  return [str(c) for c in rng.choice(list(COLOURS), size=n, replace=False)]


def make_task(rng: np.random.Generator, family: str) -> dict:
  """One task dict: {"family", "question", "answer", "objects", ...} (JSON-serialisable)."""
  if family not in FAMILIES:
    raise ValueError(f"{_WHERE}: unknown family {family!r}; families are {FAMILIES}")
  colour = _colours(rng, 1)[0]
  if family == "shape":
    s = int(rng.integers(12, 21))
    obj = _shape(rng, colour, s, rng.integers(0, SIZE - s + 1), rng.integers(0, SIZE - s + 1))
    return {"family": family, "question": QUESTIONS[family], "answer": obj["shape"], "objects": [obj]}
  if family == "digit":
    d = int(rng.integers(0, 10))
    obj = _digit(d, colour, 3, rng.integers(0, SIZE - 15 + 1), rng.integers(0, SIZE - 21 + 1))
    return {"family": family, "question": QUESTIONS[family], "answer": str(d), "objects": [obj]}
  if family == "count":   # objects in distinct cells of a 4x4 grid of 8-pixel cells
    n_target, n_other = int(rng.integers(1, 5)), int(rng.integers(1, 4))
    others = [c for c in COLOURS if c != colour]
    cells = rng.choice(16, size=n_target + n_other, replace=False)
    objs = []
    for k, cell in enumerate(cells):
      c = colour if k < n_target else str(rng.choice(others))
      objs.append(_shape(rng, c, 6, 8 * (cell % 4) + rng.integers(0, 3), 8 * (cell // 4) + rng.integers(0, 3)))
    return {"family": family, "question": QUESTIONS[family].format(colour=colour), "answer": str(n_target),
            "colour": colour, "objects": objs}
  if family == "relation":   # A and B 14+ pixels apart on one axis, at most 4 on the other
    rel = str(rng.choice(RELATIONS))
    ca, cb = _colours(rng, 2)
    low, high = int(rng.integers(0, 3)), int(rng.integers(18, 25))   # along the relation's axis
    cross, offset = int(rng.integers(6, 15)), int(rng.integers(0, 5))  # across it
    a_main, b_main = (low, high) if rel in ("left", "above") else (high, low)
    a_cross, b_cross = cross, cross + offset
    pos = lambda main, cr: (main, cr) if rel in ("left", "right") else (cr, main)   # (x, y)
    a, b = _shape(rng, ca, 8, *pos(a_main, a_cross)), _shape(rng, cb, 8, *pos(b_main, b_cross))
    q = QUESTIONS[family].format(colour_a=ca, shape_a=a["shape"], colour_b=cb, shape_b=b["shape"])
    return {"family": family, "question": q, "answer": rel, "objects": [a, b]}
  if family == "arithmetic":
    x, y = (int(v) for v in rng.integers(0, 10, size=2))
    op = str(rng.choice(["sum", "difference"]))
    objs = [_digit(x, colour, 2, rng.integers(0, 5), rng.integers(2, 17)),
            _digit(y, colour, 2, rng.integers(18, 23), rng.integers(2, 17))]
    answer = x + y if op == "sum" else abs(x - y)
    return {"family": family, "question": QUESTIONS[family][op], "answer": str(answer), "op": op,
            "objects": objs}
  # caption: one or two shapes, the second to the right of the first
  n = int(rng.integers(1, 3))
  cols = _colours(rng, n)
  if n == 1:
    s = int(rng.integers(10, 17))
    objs = [_shape(rng, cols[0], s, rng.integers(0, SIZE - s + 1), rng.integers(0, SIZE - s + 1))]
  else:
    objs = [_shape(rng, cols[0], 12, rng.integers(0, 3), rng.integers(0, 21)),
            _shape(rng, cols[1], 12, rng.integers(17, 21), rng.integers(0, 21))]
  answer = " ".join(f"{o['colour']} {o['shape']}" for o in objs)
  return {"family": family, "question": QUESTIONS[family], "answer": answer, "objects": objs}


def prompt_text(task: dict) -> str:
  """The user text: IMAGE_TOKEN, a newline, the question."""
  return f"{IMAGE_TOKEN}\n{task['question']}"


def sample(rng: np.random.Generator, family: str | None = None) -> dict:
  """One sample {"image": uint8 [SIZE,SIZE,3], "prompt": str, "answer": str, "task": dict};
  family None = uniform over FAMILIES."""
  family = str(rng.choice(FAMILIES)) if family is None else family
  task = make_task(rng, family)
  return {"image": render(task), "prompt": prompt_text(task), "answer": task["answer"], "task": task}


def dataset(n: int, seed: int = 0, families: Sequence[str] = FAMILIES) -> list[dict]:
  """n samples, a pure function of (n, seed, families), cycling through the families."""
  rng = np.random.default_rng([seed, 15])
  return [sample(rng, families[i % len(families)]) for i in range(n)]


# ------------------------------------------------------------------ gold checker
_VOCAB = set(COLOURS) | set(SHAPES) | set(RELATIONS)


def _is_vocab(word: str) -> bool:
  return word in _VOCAB or word.isdigit()


def _penalty(extra: Sequence[str]) -> float:
  filler = sum(1 for w in extra if not _is_vocab(w))
  hedges = sum(1 for w in extra if _is_vocab(w))
  return gold.brevity(filler) * 0.5 ** hedges


def resolve(task_or_sample) -> dict:
  """The task dict from a task dict, a sample, or a record whose "task" is a dict or JSON string."""
  t = task_or_sample
  if isinstance(t, dict) and "task" in t:
    t = t["task"]
  if isinstance(t, str):
    t = json.loads(t)
  if not isinstance(t, dict) or "family" not in t or "answer" not in t:
    raise ValueError(f"{_WHERE}: cannot find an image task (a dict with 'family' and 'answer') in "
                     f"{type(task_or_sample).__name__}")
  if t["family"] not in FAMILIES:
    raise ValueError(f"{_WHERE}: unknown family {t['family']!r}; families are {FAMILIES}")
  return t


def score(task_or_sample, response: str) -> float:
  """Graded gold score in [0, 1]; see the module docstring for the rubric."""
  task = resolve(task_or_sample)
  r = [w.lower() for w in gold._tokens(gold._clean(response))]
  t = str(task["answer"]).lower().split()
  if not r:
    return 0.0
  if r == t:
    return 1.0
  start = gold._contains(r, t)
  if start >= 0:
    return _penalty(r[:start] + r[start + len(t):])
  value = 0.0
  if task["family"] in NUMBER_FAMILIES:
    nums = [i for i, w in enumerate(r) if w.isdigit()]
    if nums:
      best = min(nums, key=lambda i: abs(int(r[i]) - int(t[0])))
      value = 0.4 * 0.5 ** abs(int(r[best]) - int(t[0])) * _penalty(r[:best] + r[best + 1:])
  elif len(t) > 1:
    lcs, used = gold._lcs(r, t)
    used = set(used)
    value = 0.5 * lcs / len(t) * _penalty([w for i, w in enumerate(r) if i not in used])
  if all(_is_vocab(w) for w in r):
    value = max(value, FORMAT_CREDIT)
  return float(value)


# ------------------------------------------------------------------ validation
def check_image(image, size: int | None = SIZE, channels: int = CHANNELS, where: str = _WHERE) -> np.ndarray:
  """Returns the image as a numpy array, or raises one ValueError naming what is wrong.

  Accepted: [H,W,C] with H = W = size (None = any H, W) and C = channels, dtype uint8 (0..255)
  or float32/float64 with values in [0, 1]."""
  a = np.asarray(image)
  if a.ndim != 3:
    raise ValueError(f"{where}: image must be [H,W,C], got shape {a.shape}")
  if a.shape[2] != channels:
    raise ValueError(f"{where}: image must have {channels} channels (RGB), got {a.shape[2]} in shape {a.shape}")
  if size is not None and a.shape[:2] != (size, size):
    raise ValueError(f"{where}: image must be {size}x{size}, got {a.shape[0]}x{a.shape[1]}")
  if a.dtype == np.uint8:
    return a
  if a.dtype in (np.float32, np.float64):
    if a.size and (not np.isfinite(a).all() or a.min() < 0 or a.max() > 1):
      raise ValueError(f"{where}: float image values must lie in [0, 1], got {a.min()}..{a.max()}")
    return a
  raise ValueError(f"{where}: image dtype must be uint8 or float32/float64 in [0, 1], got {a.dtype}")


def to_float(images) -> np.ndarray:
  """uint8 (0..255) or float [0, 1] images [..., H, W, C] -> float32 in [0, 1] (the encoder's input)."""
  a = np.asarray(images)
  return (a.astype(np.float32) / 255.0) if a.dtype == np.uint8 else a.astype(np.float32)


def save_png(path, image) -> None:
  """Writes a checked image (any size; uint8, or float in [0, 1] rounded to uint8) as a PNG."""
  from PIL import Image
  a = check_image(image, size=None, where=f"{_WHERE}:save_png")
  if a.dtype != np.uint8:
    a = (a * 255).round().astype(np.uint8)
  Image.fromarray(a).save(path, format="PNG")


def load_png(path, size: int | None = SIZE) -> np.ndarray:
  """Reads a PNG as uint8 [H,W,3] (greyscale / palette / alpha converted to RGB), checked by
  `check_image`. An unreadable, truncated or non-PNG file raises one ValueError naming the path."""
  from PIL import Image, UnidentifiedImageError
  p = Path(path)
  try:
    with Image.open(p) as im:
      if im.format != "PNG":
        raise ValueError(f"{_WHERE}:load_png: {p} is {im.format}, not a PNG")
      im.load()
      a = np.asarray(im.convert("RGB"))
  except (OSError, UnidentifiedImageError, SyntaxError) as e:   # Pillow's errors for corrupt data
    raise ValueError(f"{_WHERE}:load_png: {p} is not a readable PNG ({type(e).__name__}: {e})") from None
  return check_image(a, size, where=f"{_WHERE}:load_png: {p}")


def check_prompt_images(prompt: str, n_images: int) -> int:
  """The number of IMAGE_TOKEN markers in the prompt; ValueError when it exceeds n_images
  (a marker with no image). Fewer markers than images is allowed: the images are a prefix."""
  if not isinstance(prompt, str):
    raise ValueError(f"{_WHERE}: prompt must be str, got {type(prompt).__name__}")
  n = prompt.count(IMAGE_TOKEN)
  if n > n_images:
    raise ValueError(f"{_WHERE}: the prompt has {n} {IMAGE_TOKEN} marker(s) but only {n_images} image(s) "
                     "were given")
  return n


def stack_images(images: Sequence[Any], size: int = SIZE) -> np.ndarray:
  """A list of checked images -> float32 [B,size,size,3] in [0, 1] for `vlm` / `vit.encode`."""
  return np.stack([to_float(check_image(im, size, where=f"{_WHERE}: image {i}")) for i, im in enumerate(images)])


# ------------------------------------------------------------------ training batches
def sample_at(seed: int, index: int, families: Sequence[str] = FAMILIES) -> dict:
  """Sample `index` of the stream `seed`: family families[index % len], a pure function of
  (seed, index, families) (its own rng), so a batch iterator can render it lazily."""
  return sample(np.random.default_rng([int(seed), 15, int(index)]), families[int(index) % len(families)])


def demonstration(s: dict) -> dict:
  """The sample's text as a pipeline demonstration record: one user turn and the gold answer."""
  return {"messages": [{"role": "user", "content": s["prompt"]}], "response": s["answer"]}


def prompt_record(s: dict) -> dict:
  """The sample as a prompt record {"messages": [user turn], "task": task dict} (no image: it is
  redrawn from the task, `record_image`), e.g. for `pipeline.prompt_batches` and comparisons."""
  return {"messages": [{"role": "user", "content": s["prompt"]}], "task": s["task"]}


def record_image(record) -> dict[str, np.ndarray]:
  """{"images": float32 [SIZE,SIZE,3]} drawn from a record's task: the `extra` of the pipeline's
  prompt and comparison batches for image prompts (a picklable module function)."""
  return {"images": to_float(render(resolve(record)))}


def text_corpus(n: int, seed: int = 0) -> list[str]:
  """Prompts and answers of n samples (e.g. to train a tokenizer on)."""
  return [t for s in dataset(n, seed) for t in (s["prompt"], s["answer"])]


def _left_align(ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A right-padded `pipeline.encode_demonstration` example moved to the end of its row, giving
  `vlm`'s layout [image | left pads | text]; targets/mask move with their tokens."""
  shift = ex["attention_mask"].shape[0] - int(ex["attention_mask"].sum())
  return {k: np.roll(v, shift) for k, v in ex.items()}


class ImageExamples:
  """Picklable map: sample index -> example {"images" float32 [H,W,3], "tokens","targets","mask",
  "attention_mask" int32 [max_len]} (text as `pipeline.encode_demonstration`, left-aligned).
  Raises ValueError naming the sample when its text would be truncated."""

  def __init__(self, tok, max_len: int, seed: int, families: Sequence[str]):
    self.tok, self.max_len, self.seed, self.families = tok, int(max_len), int(seed), tuple(families)

  def __call__(self, index) -> dict[str, np.ndarray]:
    from rlhf_jax.data import pipeline
    s = sample_at(self.seed, int(index), self.families)
    events: list[str] = []
    where = f"{_WHERE}: sample {index} of stream {self.seed} ({s['task']['family']})"
    try:   # encode_demonstration's example, but a cut question or answer is an error here
      ex = pipeline._demonstration_example(self.tok, demonstration(s), self.max_len, where, False, events)
    except pipeline._Skip as e:
      events.append(e.reason)
    if events:
      raise ValueError(f"{where}: does not fit max_len={self.max_len} text tokens ({', '.join(events)}); "
                       "raise max_len")
    return {"images": to_float(s["image"]), **_left_align(ex)}


def image_batches(tok, global_batch_size: int, max_len: int, *, n: int, seed: int, shuffle_seed: int = 0,
                  families: Sequence[str] = FAMILIES, shard_index: int | None = None,
                  shard_count: int | None = None):
  """Shuffled (reshuffled every epoch), endlessly repeated batches of n image-world samples.

  Yields {"images": float32 [B_host,SIZE,SIZE,3], "tokens","targets","mask","attention_mask":
  int32 [B_host,max_len]}: `pipeline.encode_demonstration` of the user turn + gold answer (loss on
  the answer and its EOS only), left-aligned. A grain iterator: get_state()/set_state() resume it
  exactly; `.stats` (pipeline.PipelineStats) has kept = n. Every sample is encoded once up front so
  a max_len that would cut a question or an answer fails here, naming the sample."""
  import grain
  from rlhf_jax.data import pipeline
  shard_index, shard_count = pipeline._resolve_shard(shard_index, shard_count)
  bsz = pipeline.host_batch_size(global_batch_size, shard_count)
  fn = ImageExamples(tok, max_len, seed, families)
  host = np.arange(int(n))[shard_index::shard_count][:int(n) // shard_count]
  if len(host) < bsz:
    raise ValueError(f"{_WHERE}: image_batches: {len(host)} samples on this host, fewer than one batch of {bsz}")
  for i in range(int(n)):
    fn(i)
  stats = pipeline.PipelineStats(f"image_world[{','.join(families)}]", seen=int(n), kept=int(n),
                                 host_records=len(host), unassigned=int(n) - len(host) * shard_count)
  ds = grain.MapDataset.source(host).shuffle(seed=int(shuffle_seed)).repeat(None).map(fn)
  it = iter(ds.batch(bsz, drop_remainder=True).to_iter_dataset(pipeline.READ_OPTIONS))
  it.stats = stats
  return it
