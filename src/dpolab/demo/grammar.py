"""The demo's task: short movie reviews from a seeded grammar, and a programmatic *gold reward*.

The DPO paper's controlled-sentiment experiment needs three things: prompts (prefixes of IMDb
reviews), a reference policy that continues them with a spread of sentiments, and a gold reward (a
sentiment classifier) that says how positive a continuation is. Here the prompts are neutral
openings ("the remake is a thriller about a bank heist ."), the continuation is the verdict, whose
sentiment ranges from clearly negative to clearly positive, and the gold reward is a lexicon
classifier, known exactly, so the experiment measures the optimizer rather than a reward model.

Everything is seeded: the same seed gives the same corpus and the same prompts.

``story_reward`` is the gold reward of the same kind for TinyStories-style stories (happy vs sad
endings), used when the demo runs on a pretrained story model (``--model``); ``story_prompts``
gives story openings for it.
"""

from __future__ import annotations

import math
import random
import re

# ------------------------------------------------------------------------------------------------
# The review grammar
# ------------------------------------------------------------------------------------------------

TITLES = ["the movie", "this film", "the sequel", "the remake", "this show", "the pilot", "the new film",
          "this cartoon", "the musical", "the documentary"]
GENRES = ["comedy", "drama", "thriller", "western", "romance", "mystery", "horror film"]
TOPICS = ["a lost dog", "two brothers", "a small town", "a space trip", "a bank heist", "a cooking contest",
          "an old sailor", "a school band", "a haunted house", "a young doctor", "a stolen car", "a long winter",
          "a chess player", "a farm family", "a secret agent", "a tiny robot"]
WHEN = ["last night", "on sunday", "this week", "at the cinema", "on a plane", "at home"]
PEOPLE = ["friend", "sister", "brother", "dad", "mom", "wife", "husband", "uncle", "aunt", "boss"]
ASPECTS = ["plot", "acting", "music", "ending", "script", "cast", "story", "camera work", "pacing", "dialogue"]

# Sentiment words per level (-2 .. 2) with their gold weight. Distinct weights make ties rare.
ADJECTIVES = {
    2: {"wonderful": 2.0, "brilliant": 2.1, "superb": 2.2, "amazing": 1.9},
    1: {"good": 1.0, "nice": 0.9, "fun": 1.1, "charming": 1.2},
    0: {"okay": 0.0, "average": 0.0, "ordinary": 0.0, "fine": 0.2},
    -1: {"dull": -1.0, "weak": -0.9, "slow": -1.1, "silly": -0.8},
    -2: {"awful": -2.0, "terrible": -2.1, "boring": -1.9, "dreadful": -2.2},
}
VERBS = {2: {"loved": 2.0, "adored": 2.1}, 1: {"liked": 1.0, "enjoyed": 1.1}, 0: {"watched": 0.0},
         -1: {"disliked": -1.0}, -2: {"hated": -2.0, "regretted": -1.9}}
CLOSINGS = {2: ["highly recommended .", "a real gem !"], 1: ["worth a look .", "recommended ."],
            0: ["it is what it is .", "nothing more to say ."], -1: ["not worth it .", "a bit of a mess ."],
            -2: ["skip it .", "a total waste !"]}
REVIEW_LEXICON = {w: v for level in (ADJECTIVES, VERBS) for words in level.values() for w, v in words.items()}
REVIEW_LEXICON.update({"recommended": 1.5, "gem": 1.8, "worth": 0.8, "mess": -1.2, "waste": -2.0, "skip": -1.5})
NEGATIONS = {"not", "never", "no"}


def review_prompt(rng: random.Random) -> str:
    """A neutral opening: says what was watched, not what the reviewer thought of it."""
    kind = rng.randrange(3)
    if kind == 0:
        return f"{rng.choice(TITLES)} is a {rng.choice(GENRES)} about {rng.choice(TOPICS)} ."
    if kind == 1:
        return f"i watched {rng.choice(TITLES)} about {rng.choice(TOPICS)} {rng.choice(WHEN)} ."
    return f"my {rng.choice(PEOPLE)} took me to see {rng.choice(TITLES)} about {rng.choice(TOPICS)} ."


def _level(rng: random.Random, sentiment: int) -> int:
    """The reviewer's mood leaks into each word with noise: mostly the review's level, sometimes a neighbour."""
    return max(-2, min(2, sentiment + rng.choice([0, 0, 0, 0, 1, -1])))


def review_completion(rng: random.Random, sentiment: int) -> str:
    """A verdict of one overall sentiment in -2..2: two short sentences from the grammar."""
    adj = lambda: rng.choice(list(ADJECTIVES[_level(rng, sentiment)]))  # noqa: E731
    a, b = rng.sample(ASPECTS, 2)
    kind = rng.randrange(4)
    if kind == 0:
        first = f"the {a} was {adj()} and the {b} was {adj()} ."
    elif kind == 1:  # a mixed verdict: the contrast word introduces the other side
        other = max(-2, min(2, -sentiment if sentiment else rng.choice([-1, 1])))
        first = f"the {a} was {rng.choice(list(ADJECTIVES[other]))} but the {b} was {adj()} ."
    elif kind == 2:
        first = f"the {a} was not {rng.choice(list(ADJECTIVES[-_level(rng, sentiment)]))} ."
    else:
        first = f"i {rng.choice(list(VERBS[_level(rng, sentiment)]))} it . the {a} was {adj()} ."
    return " " + first + " " + rng.choice(CLOSINGS[_level(rng, sentiment)])


def _alternatives(words) -> str:
    return "(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


def _verdict_pattern() -> re.Pattern:
    """A regular expression for every completion ``review_completion`` can write."""
    adj = _alternatives(w for level in ADJECTIVES.values() for w in level)
    verb = _alternatives(w for level in VERBS.values() for w in level)
    aspect = _alternatives(ASPECTS)
    closing = _alternatives(c for level in CLOSINGS.values() for c in level)
    clause = f"the {aspect} was {adj}"
    first = (f"(?:{clause} (?:and|but) {clause} \\.|the {aspect} was not {adj} \\.|"
             f"i {verb} it \\. {clause} \\.)")
    return re.compile(f" {first} {closing}")


_VERDICT = None


def is_grammatical(completion: str) -> bool:
    """True when the review grammar could have written ``completion``: a fluency check for samples."""
    global _VERDICT
    if _VERDICT is None:
        _VERDICT = _verdict_pattern()
    return _VERDICT.fullmatch(completion) is not None


def review_corpus(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (prompt, completion) reviews with sentiments spread uniformly over -2..2."""
    rng = random.Random(seed)
    return [(review_prompt(rng), review_completion(rng, rng.randint(-2, 2))) for _ in range(n)]


def distinct_prompts(make, n: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    """``n`` distinct prompts from ``make(rng)`` that are not in ``exclude`` (held-out prompts must be
    prompts the policy never trained on)."""
    rng = random.Random(seed)
    out: dict[str, None] = {}
    for _ in range(200 * n + 1000):
        if len(out) == n:
            break
        p = make(rng)
        if p not in exclude:
            out[p] = None
    if len(out) < n:
        from ..errors import ConfigError

        raise ConfigError("train_prompts", f"the grammar has only {len(out)} distinct prompts besides the "
                          f"{len(exclude)} held-in ones, {n} were asked for",
                          "use fewer --train-prompts or --eval-prompts")
    return list(out)


def review_prompts(n: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    return distinct_prompts(review_prompt, n, seed, exclude)


# ------------------------------------------------------------------------------------------------
# Gold rewards
# ------------------------------------------------------------------------------------------------

_WORD = re.compile(r"[a-z']+")


def sentiment_score(text: str, lexicon: dict[str, float]) -> float:
    """Sum of the lexicon weights of the words in ``text``; a negation ("not", "never", "no") up to two
    words before a sentiment word turns its weight into −½ of it ("not good" is mildly negative,
    "not terrible" mildly positive)."""
    words = _WORD.findall(text.lower())
    score = 0.0
    for i, word in enumerate(words):
        weight = lexicon.get(word)
        if weight is None:
            continue
        negated = any(w in NEGATIONS for w in words[max(0, i - 2):i])
        score += -0.5 * weight if negated else weight
    return score


def positivity(score: float) -> float:
    """P(positive) of the lexicon classifier: σ(score / 2), in (0, 1) like the paper's sentiment
    classifier; 0.5 is neutral."""
    return 1.0 / (1.0 + math.exp(-score / 2.0))


def review_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Gold reward of review verdicts: how positive each completion is (the prompt is not judged).

    A judge for ``dpolab eval --judge dpolab.demo.grammar:review_reward``.
    """
    return [positivity(sentiment_score(c, REVIEW_LEXICON)) for c in completions]


# ------------------------------------------------------------------------------------------------
# Stories (for pretrained TinyStories models)
# ------------------------------------------------------------------------------------------------

STORY_LEXICON = {
    "happy": 1.5, "smiled": 1.5, "smile": 1.2, "laughed": 1.5, "love": 1.2, "loved": 1.2, "fun": 1.2,
    "friends": 1.0, "friend": 0.8, "played": 0.8, "nice": 1.0, "kind": 1.0, "good": 0.8, "great": 1.2,
    "hug": 1.2, "hugged": 1.2, "excited": 1.2, "proud": 1.2, "beautiful": 1.0, "best": 1.0, "joy": 1.5,
    "sad": -1.5, "cried": -1.5, "cry": -1.2, "angry": -1.5, "scared": -1.2, "hurt": -1.2, "mad": -1.2,
    "bad": -1.0, "lost": -0.8, "broke": -1.0, "broken": -1.0, "upset": -1.5, "sorry": -0.8, "afraid": -1.2,
    "fell": -0.6, "mean": -1.0, "alone": -1.0, "ouch": -1.0,
}
NAMES = ["Lily", "Tom", "Sue", "Ben", "Mia", "Max", "Anna", "Tim", "Lucy", "Sam", "Jack", "Amy", "Bob", "Zoe",
         "Kim", "Joe", "Ella", "Leo", "Rose", "Dan"]
STORY_PLACES = ["park", "beach", "forest", "garden", "store", "lake", "zoo", "farm"]
STORY_THINGS = ["a red ball", "a big box", "a little bird", "a shiny stone", "a toy car", "a kite"]


def story_prompt(rng: random.Random) -> str:
    """A story opening in TinyStories style that leaves the mood of the story open."""
    name = rng.choice(NAMES)
    kind = rng.randrange(4)
    if kind == 0:
        return f"Once upon a time, there was a little {rng.choice(['girl', 'boy'])} named {name}."
    if kind == 1:
        return f"One day, {name} went to the {rng.choice(STORY_PLACES)}."
    if kind == 2:
        friend = rng.choice([n for n in NAMES if n != name])
        return f"{name} and {friend} were playing in the {rng.choice(STORY_PLACES)}."
    return f"{name} found {rng.choice(STORY_THINGS)} in the {rng.choice(STORY_PLACES)}."


def story_prompts(n: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    return distinct_prompts(story_prompt, n, seed, exclude)


def story_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Gold reward of story continuations: how happy they are (σ of a happy/sad lexicon score / 2).

    A judge for ``dpolab eval --judge dpolab.demo.grammar:story_reward``.
    """
    return [positivity(sentiment_score(c, STORY_LEXICON)) for c in completions]
