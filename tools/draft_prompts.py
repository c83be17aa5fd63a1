"""Training prompts for the distilled draft: none of them come from a benchmark set.

* code: functions of the Python standard library on this machine, cut to their signature and
  docstring and asked for as "Complete this Python function:" (the form the HumanEval bench
  uses, with other functions);
* chat: instructions built from hand-written templates and subjects, over the kinds of requests
  a chat model gets (writing, role-play, reasoning, arithmetic, coding, extraction, science,
  humanities); MT-Bench questions are not used.

Everything is deterministic for a given seed and Python installation. Two templates came out
close to MT-Bench's first writing questions (a travel blog about Hawaii; an email asking for
feedback on a report); :func:`resembles_benchmark` marks their prompts and every prompt naming
Hawaii, and neither the data generator nor the trainer uses them.
"""

from __future__ import annotations

import ast
import random
import re
import sysconfig
from pathlib import Path

CODE_PREFIX = "Complete this Python function:\n"

SUBJECTS = [
    "photosynthesis", "the French Revolution", "black holes", "machine learning", "volcanoes",
    "the immune system", "climate change", "the Roman Empire", "quantum computing",
    "renewable energy", "the stock market", "jazz music", "coral reefs", "the printing press",
    "vaccines", "plate tectonics", "the water cycle", "inflation", "social media",
    "electric cars", "the human brain", "ancient Egypt", "the Internet", "bees",
    "the Renaissance", "supply and demand", "DNA", "the Moon landing", "earthquakes",
    "public transport", "remote work", "meditation", "chess", "the Olympic Games",
    "coffee", "urban gardening", "blockchain", "the Industrial Revolution", "rainforests",
    "nuclear power", "the Great Wall of China", "antibiotics", "migration of birds",
    "3D printing", "the Cold War", "recycling", "sleep", "tea ceremonies", "robots",
    "the Silk Road", "gravity", "democracy", "the ocean tides", "artificial sweeteners",
    "video games", "museums", "libraries", "mountaineering", "marathon training",
    "the speed of light", "honey", "bridges", "solar eclipses", "password security",
    "open-source software", "the metric system", "glaciers", "friendship", "cooking pasta",
    "learning a language", "budgeting", "time management", "public speaking", "job interviews",
    "electric guitars", "Shakespeare", "impressionist painting", "the periodic table",
    "microplastics", "composting", "wind turbines", "the Amazon river", "desert plants",
    "sharks", "the Mars rovers", "cryptography", "elections", "minimalism", "podcasts",
    "board games", "the history of tea", "batteries", "telescopes", "the Vikings",
    "origami", "fermentation", "compound interest", "first aid", "camping", "volunteering",
]

PLACES = ["Kyoto", "Lisbon", "Iceland", "Peru", "Morocco", "Vancouver", "New Zealand", "Prague",
          "Kenya", "Norway", "Vietnam", "Scotland", "Chile", "Istanbul", "Hawaii", "Seoul"]

ROLES = ["a pirate captain", "a medieval knight", "a detective", "a friendly robot",
         "a museum guide", "a chef", "a space station commander", "a personal trainer",
         "a wise old wizard", "a sports commentator", "a kindergarten teacher", "a tour guide"]

CHAT_TEMPLATES = [
    "Explain {s} to a ten-year-old.",
    "Write a short blog post about {s}.",
    "What are the main advantages and disadvantages of {s}?",
    "Give me five interesting facts about {s}.",
    "Write a haiku about {s}.",
    "Summarize the history of {s} in one paragraph.",
    "How would you explain {s} to someone who has never heard of it?",
    "Write a persuasive paragraph arguing that everyone should learn about {s}.",
    "Compose a short poem about {s}.",
    "What are common misconceptions about {s}?",
    "Describe {s} in three sentences.",
    "Write a catchy slogan for a campaign about {s}.",
    "What questions would a scientist ask about {s}?",
    "Write an email to a friend recommending a book about {s}.",
    "List three key terms related to {s} and define each one.",
    "Create a short quiz with three questions about {s}.",
    "Pretend you are {r}. Tell me about {s}.",
    "As {r}, describe your typical day.",
    "Imagine you are {r}. How would you greet a new visitor?",
    "Write a travel blog post about a trip to {p}, highlighting the culture and food.",
    "Plan a three-day itinerary for a visit to {p}.",
    "What should I pack for a week in {p}?",
    "Write a short story that starts in {p} and involves {s}.",
    "Draft a professional email asking my manager for feedback on my report about {s}.",
    "Rewrite the following sentence to be more formal: 'hey, {s} is kinda cool, right?'",
    "Extract the nouns from this sentence: 'The scientist explained {s} to the curious students "
    "in {p}.'",
    "Write a Python function that computes {c}.",
    "Explain in simple terms how to {h}.",
    "What is the difference between {s} and {t}?",
    "Give step-by-step instructions to {h}.",
]

CODE_TASKS = [
    "the factorial of a number", "the n-th Fibonacci number", "the greatest common divisor of two "
    "integers", "whether a string is a palindrome", "the sum of the digits of an integer",
    "the median of a list", "the number of vowels in a string", "the transpose of a matrix",
    "all prime numbers below n", "the longest word in a sentence", "the mean of a list of numbers",
    "the running maximum of a list", "the frequency of each character in a string",
    "the intersection of two lists", "a binary search over a sorted list",
]

HOWTOS = [
    "bake bread", "change a bicycle tire", "write a resume", "start a vegetable garden",
    "learn to juggle", "make a budget", "train for a 5k run", "set up a home network",
    "brew coffee with a French press", "prepare for an exam", "write a cover letter",
    "fold a paper airplane", "take better photos with a phone", "organize a closet",
]

MATH_TEMPLATES = [
    "If a train travels {a} km in {b} hours, what is its average speed?",
    "What is {a} multiplied by {b}?",
    "A shop sells pens at {b} dollars each. How much do {a} pens cost?",
    "Solve for x: {b}x + {a} = {c}.",
    "The sum of two numbers is {c} and their difference is {b}. What are the numbers?",
    "A rectangle has sides {a} and {b}. What are its area and perimeter?",
    "What is {a} percent of {c}?",
    "Alice has {a} apples and gives {b} to Bob. How many does she have left?",
    "If a recipe needs {b} eggs for {a} people, how many eggs do {c} people need?",
]

REASONING = [
    "If all bloops are razzies and all razzies are lazzies, are all bloops lazzies? Explain.",
    "I have {a} brothers and each brother has {b} sisters. How many sisters do I have at least?",
    "Which is heavier, a kilogram of feathers or a kilogram of iron? Explain your answer.",
    "A farmer has {a} sheep; all but {b} run away. How many are left?",
    "What comes next in the sequence {a}, {c}, {d}, ...? Explain the pattern.",
]


# constraints appended to a chat request (MT-Bench-style multi-part instructions)
CONSTRAINTS = [
    "Keep it under 100 words.", "Use a friendly, informal tone.", "Answer in a numbered list.",
    "Include at least two concrete examples.", "End with a question for the reader.",
    "Write it for a high-school audience.", "Use exactly three paragraphs.",
    "Avoid technical jargon.", "Add a short title first.", "Explain your reasoning step by step.",
    "Then summarize your answer in one sentence.", "Use a formal tone.",
    "Then list two sources of further reading.", "Make it humorous.",
]

DOC_TASKS = [
    "Summarize the following text in two sentences:\n\n{x}",
    "Extract the key terms from this passage and explain each one briefly:\n\n{x}",
    "Rewrite this documentation so that a beginner can understand it:\n\n{x}",
    "Write three questions a student might ask after reading this text:\n\n{x}",
    "What is the main purpose of what is described below? Answer in one paragraph.\n\n{x}",
    "Turn this text into a bulleted list of facts:\n\n{x}",
    "Read the passage and explain when someone would use this:\n\n{x}",
    "Translate this technical description into plain English:\n\n{x}",
]


_BENCHMARK_LIKE = re.compile(r"travel blog|professional email|\bHawaii\b", re.IGNORECASE)


def resembles_benchmark(text: str) -> bool:
    """Whether a prompt is too close to a benchmark question to train on."""
    return bool(_BENCHMARK_LIKE.search(text))


def chat_prompts(n: int, seed: int = 0, constrained: bool = False) -> list[str]:
    """``n`` distinct chat instructions (templates x subjects, arithmetic, puzzles);
    ``constrained``: 40% of them get a second part from :data:`CONSTRAINTS`."""
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    for _ in range(50 * n):
        if len(out) >= n:
            break
        kind = rng.random()
        a, b = rng.randint(2, 60), rng.randint(2, 12)
        nums = dict(a=a, b=b, c=a + b * rng.randint(2, 9), d=a + 2 * (a + b))
        if kind < 0.75:
            s, t = rng.sample(SUBJECTS, 2)
            text = rng.choice(CHAT_TEMPLATES).format(
                s=s, t=t, r=rng.choice(ROLES), p=rng.choice(PLACES), c=rng.choice(CODE_TASKS),
                h=rng.choice(HOWTOS))
        elif kind < 0.9:
            text = rng.choice(MATH_TEMPLATES).format(**nums)
        else:
            text = rng.choice(REASONING).format(**nums)
        if constrained and rng.random() < 0.4:  # a second part, as multi-part requests have
            text += " " + rng.choice(CONSTRAINTS)
        if text not in seen:
            seen.add(text)
            out.append(text)
    if len(out) < n:
        raise ValueError(f"chat_prompts: only {len(out)} distinct prompts, {n} asked for")
    return out


def doc_prompts(n: int, seed: int = 0, root: str | Path | None = None) -> list[str]:
    """``n`` reading tasks (summarise, extract, rewrite, ask) over passages of the docstrings of
    the standard library's modules, classes and functions under ``root``, some with a
    constraint added (:data:`CONSTRAINTS`)."""
    passages: set[str] = set()
    for path in _stdlib_files(root):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in [tree] + [x for x in ast.walk(tree)
                              if isinstance(x, (ast.ClassDef, ast.FunctionDef))]:
            doc = ast.get_docstring(node)
            if not doc:
                continue
            for para in re.split(r"\n\s*\n", doc):
                para = " ".join(para.split())
                if 160 <= len(para) <= 900 and ">>>" not in para:
                    passages.add(para)
    rng = random.Random(seed)
    items = sorted(passages)
    rng.shuffle(items)
    out = []
    for i, x in enumerate(items[:n]):
        text = rng.choice(DOC_TASKS).format(x=x)
        out.append(text + (" " + rng.choice(CONSTRAINTS) if i % 3 == 0 else ""))
    if len(out) < n:
        raise ValueError(f"doc_prompts: only {len(out)} passages, {n} asked for")
    return out


def _stdlib_files(root: str | Path | None):
    """The Python files under ``root`` (default: the standard library), tests left out."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if not any(part in ("test", "tests", "testing", "idlelib", "site-packages", "lib2to3")
                   for part in path.relative_to(root).parts):
            yield path


def _function_stub(src: str, node: ast.FunctionDef) -> str | None:
    doc = ast.get_docstring(node, clean=False)
    if not doc or len(doc) < 40 or len(doc) > 900 or node.name.startswith("_"):
        return None
    lines = src.splitlines()
    body0 = node.body[0]
    head = "\n".join(lines[node.lineno - 1 : body0.end_lineno])
    if "\t" in head or len(head) > 1400:
        return None
    indent = len(lines[node.lineno - 1]) - len(lines[node.lineno - 1].lstrip())
    return "\n".join(line[indent:] for line in head.splitlines()) + "\n"


def code_prompts(n: int, seed: int = 0, root: str | Path | None = None,
                 offset: int = 0, typed: bool = False) -> list[str]:
    """``n`` "Complete this Python function:" prompts cut from the Python files under ``root``
    (default: the standard library), functions ``offset`` to ``offset + n`` of a seeded
    shuffle; ``typed``: only functions with a return annotation that are not methods."""
    stubs: list[str] = []
    for path in _stdlib_files(root):
        try:
            src = path.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                stub = _function_stub(src, node)
                if stub and typed:  # HumanEval's form: a typed function, not a method
                    head = stub.split(":\n", 1)[0]
                    stub = stub if "->" in head and "(self" not in head else None
                if stub:
                    stubs.append(stub)
    stubs = sorted(set(stubs))
    random.Random(seed).shuffle(stubs)
    return [CODE_PREFIX + s for s in stubs[offset : offset + n]]
