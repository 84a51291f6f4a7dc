"""Generate the sample corpus in ``examples/sample``: realistic text with known bad records.

The demo (``make run``, ``configs/local.yaml``) and the end-to-end tests need a corpus that looks
like real input (several formats, topics, languages, a few long documents) and contains one of
every kind of bad record, with the expected reject reasons written down. Writing it by a seeded
program instead of by hand keeps it reproducible and lets ``README.md`` state exact counts.

Documents of one topic are composed from that topic's vocabulary (canned sentences, and
sentences assembled from subjects, verbs, objects and details), so they are lexically closer to
each other than to other topics: a similarity search over the embedded corpus should return
documents of the query's topic first.

Usage::

    python examples/make_sample_corpus.py [--out DIR]     # default: examples/sample

Re-running it rewrites byte-identical files (fixed seed; gzip without a timestamp), and
``tests/test_local_server.py`` checks that the committed copy is what this script produces.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import random
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

SEED = 20_240_611
DEFAULT_OUT = Path(__file__).resolve().parent / "sample"

N_ARTICLES = 250
N_LONG = 20
N_EMOJI = 6
LONG_WORDS = (3_000, 8_000)
MAX_DOCUMENT_BYTES = 200_000  # validate.max_document_bytes in configs/local.yaml

ARTICLES = "articles.jsonl.gz"
NOTES = "notes.csv"


@dataclass(frozen=True)
class Topic:
    """The vocabulary of one topic: canned sentences and parts to assemble more from."""

    name: str
    subjects: tuple[str, ...]
    verbs: tuple[str, ...]
    objects: tuple[str, ...]
    details: tuple[str, ...]
    sentences: tuple[str, ...]
    emoji: tuple[str, ...]


TOPICS: tuple[Topic, ...] = (
    Topic(
        name="astronomy",
        subjects=("the amateur astronomer", "a small refracting telescope", "the observatory team",
                  "the space telescope", "our astronomy club", "the spectrograph",
                  "a wide-field camera", "the planetarium guide", "the survey telescope",
                  "a patient observer", "the radio dish", "the mission scientists"),
        verbs=("tracked", "photographed", "measured", "mapped", "observed", "catalogued",
               "resolved", "monitored", "detected", "studied"),
        objects=("the rings of Saturn", "the Andromeda galaxy", "a faint comet",
                 "the moons of Jupiter", "a distant quasar", "the Orion Nebula", "a variable star",
                 "the lunar terminator", "an exoplanet transit", "the Milky Way core",
                 "a meteor shower", "the red giant Betelgeuse"),
        details=("through thin cloud", "just after midnight", "during the new moon",
                 "from a dark-sky site", "with a long exposure", "over several clear nights",
                 "at high magnification", "in the infrared", "despite the light pollution",
                 "near the horizon"),
        sentences=(
            ("Light from the nearest stars takes years to reach us, so every observation is a "
             "look into the past."),
            ("A telescope's aperture matters more than its magnification, because it sets how "
             "much light is gathered."),
            ("Galaxies are grouped into clusters, and the clusters into vast filaments separated "
             "by voids."),
            "The spectrum of a star reveals its temperature, composition and radial velocity.",
            "Planets twinkle less than stars because they show a tiny disk rather than a point.",
            ("Redshift measurements showed that distant galaxies are moving away from us, "
             "evidence for an expanding universe."),
            "A solar eclipse happens when the Moon passes between the Earth and the Sun.",
            ("Observers let their eyes adapt to the dark for twenty minutes before looking for "
             "faint nebulae."),
            ("Exoplanets are usually found by the dip in starlight they cause as they cross "
             "their star."),
            ("The orbit of a comet can take it far beyond Neptune before it swings back toward "
             "the Sun."),
            "Neutron stars pack more than the mass of the Sun into a sphere the size of a city.",
            ("Star charts use right ascension and declination, the celestial equivalents of "
             "longitude and latitude."),
        ),
        emoji=("🔭", "🌌", "🪐", "🌠"),
    ),
    Topic(
        name="cooking",
        subjects=("the head chef", "my grandmother", "the pastry cook", "a home baker",
                  "the line cook", "our test kitchen", "the food writer", "a patient cook",
                  "the sous-chef", "the bakery team"),
        verbs=("seared", "braised", "roasted", "simmered", "kneaded", "whisked", "caramelised",
               "folded", "seasoned", "glazed"),
        objects=("the onions", "a shoulder of lamb", "the sourdough starter", "a pot of risotto",
                 "the chicken stock", "a tray of root vegetables", "the custard",
                 "a batch of dumplings", "the tomato sauce", "a loaf of rye bread",
                 "the short ribs", "a lemon tart"),
        details=("over a low flame", "in a cast-iron pan", "for three hours",
                 "with plenty of butter", "until golden brown", "with a pinch of sea salt",
                 "in a hot oven", "the night before", "with fresh thyme and garlic",
                 "until the sauce coated a spoon"),
        sentences=(
            "Salt the pasta water generously; it is the only chance to season the pasta itself.",
            "Resting meat after roasting lets the juices settle back into the fibres.",
            "A sharp knife is safer than a dull one because it goes where you guide it.",
            "Browning comes from the Maillard reaction, which needs a dry surface and high heat.",
            ("Bread dough is ready when it passes the windowpane test and stretches without "
             "tearing."),
            "Deglaze the pan with wine or stock to lift the browned bits into the sauce.",
            "Mayonnaise holds together when the oil is added slowly while whisking.",
            "Weighing flour instead of measuring it by the cup makes baking far more consistent.",
            "Acid from lemon juice or vinegar brightens a dish that tastes flat.",
            ("Blanching green vegetables and plunging them into ice water keeps their colour "
             "vivid."),
            "A good stock starts cold and is never allowed to boil hard.",
            "Caramel turns from amber to burnt in seconds, so keep the pan moving.",
        ),
        emoji=("🍳", "🥖", "🍲", "🍋"),
    ),
    Topic(
        name="football",
        subjects=("the home side", "the young striker", "the veteran goalkeeper",
                  "the head coach", "the visiting team", "the captain", "the left back",
                  "the midfield trio", "the academy graduate", "the new signing"),
        verbs=("pressed", "outplayed", "frustrated", "attacked", "counter-attacked against",
               "scored against", "dominated", "held off", "surprised", "defended against"),
        objects=("the league leaders", "their local rivals", "the defending champions",
                 "a packed defence", "the promoted side", "the cup holders",
                 "a high defensive line", "the opposition full backs", "a tired midfield",
                 "the relegation candidates"),
        details=("in the second half", "in stoppage time", "after a goalless first half",
                 "on a rain-soaked pitch", "with ten men", "from the penalty spot",
                 "with a late header", "in front of a sold-out stadium", "in extra time",
                 "on the counter"),
        sentences=(
            ("A player is offside if he is nearer to the opponents' goal line than both the ball "
             "and the second-last opponent."),
            ("High pressing wins the ball close to goal but leaves space behind the defensive "
             "line."),
            "The goalkeeper organised the wall while the striker lined up the free kick.",
            "Expected goals measures the quality of chances rather than the number of shots.",
            "Set pieces decide a surprising share of tight matches.",
            "The transfer window closed with the club still searching for a centre back.",
            "Full backs now provide much of a team's width, overlapping the wingers.",
            "A yellow card for a tactical foul stopped a dangerous counter-attack.",
            ("The penalty shoot-out went to sudden death after both teams scored their first "
             "five kicks."),
            "Possession without penetration rarely creates clear scoring chances.",
            "The video assistant referee reviewed the handball and the goal was disallowed.",
            "Youth academies develop players who understand the club's style from an early age.",
        ),
        emoji=("⚽", "🥅", "🏟️", "🏆"),
    ),
    Topic(
        name="programming",
        subjects=("the backend team", "a junior developer", "the compiler", "the code reviewer",
                  "our test suite", "the build system", "a background worker",
                  "the type checker", "the profiler", "the platform team"),
        verbs=("refactored", "optimised", "debugged", "deployed", "rewrote", "benchmarked",
               "tested", "documented", "cached", "parallelised"),
        objects=("the request handler", "a slow database query", "the parser module",
                 "the authentication service", "a memory leak", "the message queue consumer",
                 "the API client", "a flaky integration test", "the hash table",
                 "the dependency graph"),
        details=("before the release", "with a few lines of Python", "using a thread pool",
                 "after profiling the hot path", "behind a feature flag", "in a pull request",
                 "without breaking the public interface", "on the staging cluster",
                 "with property-based tests", "in the continuous integration pipeline"),
        sentences=(
            "A function that does one thing is easier to name, test and reuse.",
            ("Premature optimisation wastes effort; measure with a profiler before changing the "
             "code."),
            "Version control lets a team review every change and roll back a bad one.",
            "Unit tests pin down behaviour so that refactoring does not change it by accident.",
            "A race condition appears when two threads update shared state without a lock.",
            "Type hints document intent and let a checker catch mistakes before the code runs.",
            "Idempotent operations can be retried safely after a network failure.",
            "A hash map gives constant-time lookups on average, at the cost of extra memory.",
            "Logging the request id on every line makes distributed failures traceable.",
            "Immutable data structures remove a whole class of aliasing bugs.",
            "Continuous integration runs the test suite on every commit.",
            "Big-O notation describes how running time grows with the size of the input.",
        ),
        emoji=("💻", "🐍", "🐛", "🚀"),
    ),
    Topic(
        name="finance",
        subjects=("the central bank", "the pension fund", "a cautious investor",
                  "the bond market", "the finance minister", "the hedge fund",
                  "the auditor", "the credit rating agency", "a small business owner",
                  "the retail bank"),
        verbs=("raised", "cut", "hedged", "rebalanced", "reviewed", "priced in", "diversified",
               "refinanced", "reported", "forecast"),
        objects=("interest rates", "the bond portfolio", "the quarterly earnings",
                 "the mortgage", "inflation expectations", "the exchange rate", "the dividend",
                 "the index fund", "the government deficit", "the yield curve",
                 "the retirement savings", "the loan book"),
        details=("by a quarter of a percentage point", "ahead of the annual report",
                 "after a volatile quarter", "to reduce currency risk",
                 "over a ten-year horizon", "despite rising inflation",
                 "at the end of the fiscal year", "with low fees", "before the market opened",
                 "in line with analyst estimates"),
        sentences=(
            "Compound interest means that returns themselves start earning returns over time.",
            "Diversification lowers risk because different assets rarely fall at the same time.",
            "When interest rates rise, the price of existing bonds usually falls.",
            "An emergency fund of several months' expenses protects against forced selling.",
            ("Index funds track a market benchmark at a fraction of the cost of active "
             "management."),
            "Inflation erodes the purchasing power of cash held for long periods.",
            "A company's balance sheet lists its assets, liabilities and shareholders' equity.",
            "The price-to-earnings ratio compares a share price with the profit behind it.",
            "Central banks use interest rates to keep inflation close to their target.",
            "Fees that look small compound into large sums over decades of saving.",
            "Cash flow, not reported profit, decides whether a business can pay its bills.",
            "A yield curve that slopes downward has often preceded a recession.",
        ),
        emoji=("📈", "💶", "🏦", "💰"),
    ),
    Topic(
        name="medicine",
        subjects=("the general practitioner", "the clinical trial", "the nurse practitioner",
                  "the cardiology team", "the hospital pharmacist", "the research group",
                  "the emergency physician", "the public health agency", "the surgeon",
                  "the paediatrician"),
        verbs=("diagnosed", "treated", "screened for", "monitored", "prevented", "studied",
               "reduced", "evaluated", "managed", "documented"),
        objects=("high blood pressure", "type 2 diabetes", "the seasonal flu",
                 "a bacterial infection", "chronic back pain", "the patient's asthma",
                 "an irregular heartbeat", "vitamin D deficiency", "the side effects",
                 "childhood measles", "the risk of stroke", "a fractured wrist"),
        details=("with a low-dose regimen", "in a randomised controlled trial",
                 "after a routine blood test", "in older adults",
                 "with regular exercise and diet changes", "within the first hour",
                 "using a simple questionnaire", "over a twelve-week course",
                 "without antibiotics", "in primary care"),
        sentences=(
            "Antibiotics work against bacteria but do nothing against viral infections.",
            ("A randomised controlled trial compares a treatment with a placebo or the current "
             "standard of care."),
            "Blood pressure is recorded as two numbers: systolic over diastolic.",
            "Vaccines train the immune system to recognise a pathogen before a real infection.",
            "Regular physical activity lowers the risk of heart disease and type 2 diabetes.",
            "Doctors weigh the benefits of a drug against its side effects for each patient.",
            "Early diagnosis of sepsis and prompt treatment save lives.",
            "Hand washing remains one of the most effective ways to stop infections spreading.",
            "The placebo effect can be strong, which is why trials are blinded.",
            "Chronic conditions need long-term management rather than a single cure.",
            "Sleep deprivation impairs memory, mood and the immune response.",
            "Dosage for children is often calculated from body weight.",
        ),
        emoji=("🩺", "💊", "🏥", "🧬"),
    ),
    Topic(
        name="music",
        subjects=("the string quartet", "the jazz pianist", "the conductor", "our choir",
                  "the session drummer", "a young violinist", "the producer", "the orchestra",
                  "the songwriter", "the brass section"),
        verbs=("rehearsed", "recorded", "performed", "arranged", "improvised over",
               "transposed", "composed", "tuned", "mixed", "interpreted"),
        objects=("a Beethoven sonata", "the opening chorus", "a twelve-bar blues",
                 "the final movement", "a syncopated groove", "the new album",
                 "a minor-key ballad", "the symphony", "the guitar solo", "a Bach fugue",
                 "the chord progression", "a folk melody"),
        details=("in a single take", "at a slower tempo", "with a muted trumpet",
                 "in front of a small audience", "in the studio", "after weeks of practice",
                 "with a metronome", "in a cathedral acoustic", "by ear", "in a new key"),
        sentences=(
            "A major scale follows the pattern whole, whole, half, whole, whole, whole, half.",
            "Tempo markings such as allegro and adagio tell performers how fast to play.",
            "Equal temperament divides the octave into twelve equal semitones.",
            "Syncopation places accents on beats that are normally weak.",
            "A string quartet combines two violins, a viola and a cello.",
            "Practising slowly with a metronome builds accuracy before speed.",
            "The dominant chord creates tension that resolves to the tonic.",
            "Improvisation in jazz is built on a deep knowledge of harmony.",
            ("Microphone placement shapes the sound of a recording as much as the instrument "
             "does."),
            "A fugue introduces a subject and answers it in imitation across several voices.",
            "Dynamics range from pianissimo to fortissimo and shape the emotion of a phrase.",
            "The circle of fifths shows how keys relate to one another.",
        ),
        emoji=("🎵", "🎻", "🎹", "🎷"),
    ),
    Topic(
        name="gardening",
        subjects=("the allotment holder", "my neighbour", "the head gardener",
                  "a first-time gardener", "the nursery", "our community garden",
                  "the horticulturist", "a keen grower", "the orchard keeper",
                  "the volunteer group"),
        verbs=("pruned", "planted", "mulched", "watered", "sowed", "divided", "staked",
               "harvested", "fed", "grafted"),
        objects=("the tomato plants", "a row of runner beans", "the apple trees",
                 "the rose bushes", "a bed of garlic", "the lavender hedge", "the seedlings",
                 "the potatoes", "the herb border", "a patch of wildflowers",
                 "the raspberry canes", "the lawn"),
        details=("in early spring", "after the last frost", "with well-rotted manure",
                 "before the first frost", "in full sun", "in the cool of the evening",
                 "using rainwater from the butt", "on a dry afternoon", "in heavy clay soil",
                 "under fleece"),
        sentences=(
            "Compost returns nutrients to the soil and improves its structure.",
            "Most vegetables need at least six hours of direct sunlight a day.",
            "Crop rotation reduces the build-up of pests and diseases in the soil.",
            "Water deeply and less often so that roots grow downward.",
            "A layer of mulch keeps moisture in and weeds down.",
            "Hardening off lets seedlings adjust to outdoor conditions over a week or two.",
            "Pollinators such as bees depend on a succession of flowers through the season.",
            "Pruning in late winter encourages strong growth on fruit trees.",
            "Slugs are most active on damp nights, when a torch-lit patrol finds them.",
            "Companion planting pairs crops that help each other, such as carrots and onions.",
            "A soil test shows whether the ground is acidic or alkaline.",
            "Deadheading spent flowers prompts many plants to bloom again.",
        ),
        emoji=("🌱", "🌻", "🍅", "🌿"),
    ),
)
TOPIC_BY_NAME = {topic.name: topic for topic in TOPICS}

# Topic-neutral sentences, mixed in sparingly: real documents share common words across topics.
GENERIC_SENTENCES = (
    "It was not the first time, and it will not be the last.",
    "Everyone agreed afterwards that it had been worth the effort.",
    "The details matter more than most people expect.",
    "A few simple habits made the biggest difference.",
    "Looking back, the early mistakes taught the most.",
    "There is still a lot to learn, which is part of the appeal.",
)

TITLE_OPENERS = (
    "A beginner's guide to", "Notes on", "What we learned from", "Ten questions about",
    "A closer look at", "Field notes on", "Why everyone talks about", "Rethinking",
)


@dataclass(frozen=True)
class CjkSource:
    """Hand-written sentences for the few Chinese and Japanese documents."""

    lang: str
    topic: str
    title: str
    sentences: tuple[str, ...]


CJK_SOURCES: tuple[CjkSource, ...] = (
    CjkSource("zh", "astronomy", "天文观测入门", (
        "天文学是研究恒星、行星和星系的自然科学。", "望远镜的口径越大，能收集的光就越多。",
        "仙女座星系是离银河系最近的大型旋涡星系。", "彗星靠近太阳时会形成明亮的彗尾。",
        "在没有光污染的地方，肉眼就能看到银河。", "天文学家通过光谱分析恒星的温度和化学成分。",
    )),
    CjkSource("zh", "cooking", "家常菜的小窍门", (
        "做红烧肉时，先把五花肉焯水去除血沫。", "炒菜前要把锅烧热，再放油和葱姜蒜。",
        "包饺子的面要提前醒半个小时。", "蒸鱼的时间不宜过长，否则鱼肉会变老。",
        "好的高汤需要用小火慢慢熬几个小时。", "米饭煮好后再焖十分钟，口感会更好。",
    )),
    CjkSource("zh", "programming", "写出可维护的代码", (
        "编写单元测试可以防止重构时引入新的错误。", "多线程程序必须小心处理共享数据的竞争条件。",
        "使用版本控制系统，团队可以审查每一次代码修改。", "在优化之前，应该先用性能分析工具找到瓶颈。",
        "函数应该只做一件事，这样更容易命名和测试。", "缓存可以显著减少数据库查询的次数。",
    )),
    CjkSource("ja", "football", "サッカー観戦ノート", (
        "サッカーの試合は前半と後半の九十分で行われる。", "ゴールキーパーは味方の守備を声で指示した。",
        "高い位置からのプレスでボールを奪い、素早く攻撃した。", "後半のアディショナルタイムに決勝ゴールが生まれた。",
        "フリーキックは壁の上を越えてゴールに吸い込まれた。", "監督は若い選手を積極的に起用している。",
    )),
    CjkSource("ja", "music", "音楽の練習について", (
        "弦楽四重奏は二本のヴァイオリン、ヴィオラ、チェロで構成される。",
        "メトロノームを使ってゆっくり練習すると正確さが身につく。",
        "ジャズの即興演奏には和声の深い理解が必要だ。", "指揮者はテンポを少し落として最終楽章を演奏させた。",
        "合唱団は教会の響きの中でバッハを歌った。", "ピアニストは新しいアルバムを一日で録音した。",
    )),
    CjkSource("ja", "gardening", "家庭菜園のすすめ", (
        "トマトの苗は最後の霜が降りた後に植えるのがよい。", "堆肥は土に栄養を返し、土の構造を良くする。",
        "マルチングをすると土の水分が保たれ、雑草も減る。", "バラは冬の終わりに剪定すると春に元気に育つ。",
        "朝早く水をやると、病気が出にくくなる。", "ミツバチは季節を通じて咲く花を必要としている。",
    )),
)

# Notes that exercise CSV quoting: commas, double quotes and newlines inside fields.
AWKWARD_NOTES: tuple[tuple[str, str], ...] = (
    ("cooking", 'Grandma\'s rule: "salt, then taste, then salt again."'),
    ("cooking", "Shopping list:\n- strong bread flour\n- rye flour, 500 g\n- fresh yeast"),
    ("programming", 'The reviewer said "looks good, but add a test", so I added two.'),
    ("football", "Line-up: 4-3-3, with the captain at right back,\nand the academy kid up front."),
    ("finance", 'Budget, March: rent 950, food 310, transport 85; "savings" 400.'),
    ("gardening", (
        'Sowing plan:\n1. broad beans, outside\n2. tomatoes, indoors\n'
        '3. sweet peas, the "Cupani" variety'
    )),
    ("music", 'Setlist: "Autumn Leaves", "Blue Bossa", then the slow blues in F.'),
    ("astronomy", (
        "Observing log, 02:10 - seeing 3/5, transparency good.\n"
        "Saturn's rings wide open; the Cassini division is visible."
    )),
    ("medicine", 'Dr. Osei: "take with food, twice a day," for ten days.'),
)

# (relative path, topic, markdown?) of the whole-file documents; one sits in a subfolder.
PAGES: tuple[tuple[str, str, bool], ...] = (
    ("solar-system-tour.md", "astronomy", True),
    ("sourdough-basics.txt", "cooking", False),
    ("offside-explained.md", "football", True),
    ("saving-for-retirement.txt", "finance", False),
    ("guides/python-packaging.md", "programming", True),
)


@dataclass(frozen=True)
class BadRecord:
    """A record the pipeline must reject, where it is, and why (listed in README.md).

    ``record_id`` is the id the reject carries: None where the record has none or cannot be
    parsed. ``position`` is the 1-based JSONL line or CSV data row, 0 until it is known.
    """

    file: str
    record_id: str | None
    stage: str
    reason: str
    what: str
    position: int = 0


@dataclass(frozen=True)
class _Line:
    data: bytes
    bad: BadRecord | None = None


# --- composing text ----------------------------------------------------------------------------


def _sentence(rng: random.Random, topic: Topic) -> str:
    roll = rng.random()
    if roll < 0.08:
        return rng.choice(GENERIC_SENTENCES)
    if roll < 0.5:
        return rng.choice(topic.sentences)
    subject = rng.choice(topic.subjects)
    parts = (subject, rng.choice(topic.verbs), rng.choice(topic.objects), rng.choice(topic.details))
    return f"{subject[0].upper()}{subject[1:]} {' '.join(parts[1:])}."


def _paragraph(rng: random.Random, topic: Topic, emoji: bool = False) -> str:
    n = rng.randint(3, 7)
    sentences: list[str] = []
    while len(sentences) < n:  # no sentence twice in a paragraph, as a writer would not
        sentence = _sentence(rng, topic)
        if sentence not in sentences:
            sentences.append(sentence)
    if emoji:
        sentences = [f"{s} {rng.choice(topic.emoji)}" if rng.random() < 0.4 else s
                     for s in sentences]
    return " ".join(sentences)


def _title(rng: random.Random, topic: Topic) -> str:
    return f"{rng.choice(TITLE_OPENERS)} {rng.choice(topic.objects)}"


def _article(rng: random.Random, doc_id: str, topic: Topic, kind: str) -> dict[str, str]:
    title = _title(rng, topic)
    if kind == "long":
        target = rng.randint(*LONG_WORDS)
        paragraphs: list[str] = []
        words = 0
        while words < target:
            paragraphs.append(_paragraph(rng, topic))
            words += len(paragraphs[-1].split())
        title = f"The long read: {title[0].lower()}{title[1:]}"
    else:
        n = rng.choices((1, 2, 3, 4), weights=(3, 4, 3, 2))[0]
        paragraphs = [_paragraph(rng, topic, emoji=kind == "emoji") for _ in range(n)]
        if kind == "emoji":
            title = f"{title} {rng.choice(topic.emoji)}"
    return {"id": doc_id, "title": title, "text": "\n\n".join(paragraphs), "lang": "en",
            "topic": topic.name}


def _cjk_article(rng: random.Random, doc_id: str, source: CjkSource) -> dict[str, str]:
    paragraphs = ["".join(rng.sample(source.sentences, 4)) for _ in range(2)]
    return {"id": doc_id, "title": source.title, "text": "\n\n".join(paragraphs),
            "lang": source.lang, "topic": source.topic}


def _json_line(record: object) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"


# --- the files ---------------------------------------------------------------------------------


def _bad(record_id: str | None, stage: str, reason: str, what: str) -> BadRecord:
    return BadRecord(ARTICLES, record_id, stage, reason, what)


def _article_lines(rng: random.Random) -> list[_Line]:
    """The good articles, with the JSONL bad records spread between them."""
    cjk_ids = rng.sample(range(N_ARTICLES), len(CJK_SOURCES))
    rest = [i for i in range(N_ARTICLES) if i not in cjk_ids]
    special = rng.sample(rest, N_LONG + N_EMOJI)
    kinds = dict.fromkeys(special[:N_LONG], "long") | dict.fromkeys(special[N_LONG:], "emoji")
    topics = [TOPICS[i % len(TOPICS)] for i in range(N_ARTICLES)]
    rng.shuffle(topics)

    articles: list[dict[str, str]] = []
    for i in range(N_ARTICLES):
        doc_id = f"art-{i + 1:04d}"
        if i in cjk_ids:
            articles.append(_cjk_article(rng, doc_id, CJK_SOURCES[cjk_ids.index(i)]))
        else:
            articles.append(_article(rng, doc_id, topics[i], kinds.get(i, "regular")))
    lines = [_Line(_json_line(article)) for article in articles]

    duplicated = articles[41]
    second_version = _article(rng, duplicated["id"], TOPIC_BY_NAME["music"], "regular")
    repeated = "The quarterly statement repeats this sentence to make the record far too large. "
    too_large_text = repeated * (MAX_DOCUMENT_BYTES // len(repeated) + 50)
    filler = _article(rng, "", TOPIC_BY_NAME["cooking"], "regular")  # text for id-less records
    bad_lines = [
        _Line(b'{"id": "art-broken-json", "text": "the closing brace and quote are missing\n',
              _bad(None, "read", "malformed_record", "a line that is not JSON (unterminated)")),
        _Line(_json_line(["art-array", "a JSON array where an object belongs"]),
              _bad(None, "read", "malformed_record", "a JSON line that is an array")),
        _Line(b'{"id": "art-latin1", "text": "Caf\xe9 cr\xe8me br\xfbl\xe9e, written in '
              b'Latin-1 bytes"}\n',
              _bad(None, "read", "invalid_utf8", "a line with invalid UTF-8 bytes (Latin-1)")),
        _Line(_json_line({"title": filler["title"], "text": filler["text"], "lang": "en",
                          "topic": "cooking"}),
              _bad(None, "validate", "missing_id", "a record without an id field")),
        _Line(_json_line({"id": "", "title": "An empty id", "text": filler["text"], "lang": "en",
                          "topic": "cooking"}),
              _bad(None, "validate", "missing_id", 'a record whose id is ""')),
        _Line(_json_line({"id": "art-numeric-text", "title": "A number", "text": 42,
                          "lang": "en", "topic": "finance"}),
              _bad("art-numeric-text", "validate", "not_text", "text is the number 42")),
        _Line(_json_line({"id": "art-null-text", "title": "Null", "text": None, "lang": "en",
                          "topic": "music"}),
              _bad("art-null-text", "validate", "empty_text", "text is null")),
        _Line(_json_line({"id": "art-empty-text", "title": "Empty", "text": "", "lang": "en",
                          "topic": "music"}),
              _bad("art-empty-text", "validate", "empty_text", 'text is ""')),
        _Line(_json_line({"id": "art-blank-text", "title": "Blank", "text": " \n\t  \n",
                          "lang": "en", "topic": "gardening"}),
              _bad("art-blank-text", "validate", "empty_text", "text is whitespace only")),
        _Line(_json_line({"id": "art-too-large", "title": "Too large", "text": too_large_text,
                          "lang": "en", "topic": "finance"}),
              _bad("art-too-large", "validate", "too_large",
                   f"text of {len(too_large_text.encode())} bytes, over {MAX_DOCUMENT_BYTES}")),
        _Line(_json_line(second_version),
              _bad(duplicated["id"], "validate", "duplicate_id",
                   "a second, different record with an id used earlier in the file")),
    ]
    # Spread the bad records evenly; the duplicate goes last, well after the first version.
    stride = N_ARTICLES // len(bad_lines)
    for n, line in reversed(list(enumerate(bad_lines))):
        lines.insert((n + 1) * stride, line)
    return lines


def _notes(rng: random.Random) -> tuple[bytes, int, list[BadRecord]]:
    """notes.csv: short notes, some needing CSV quoting, one row without an id, one blank."""
    notes = list(AWKWARD_NOTES)
    for _ in range(19):
        topic = rng.choice(TOPICS)
        sentences = [_sentence(rng, topic) for _ in range(rng.randint(1, 2))]
        notes.append((topic.name, " ".join(sentences)))
    rng.shuffle(notes)
    rows: list[list[str]] = [[f"note-{i + 1:02d}", text, topic] for i, (topic, text) in
                             enumerate(notes)]
    bad = [
        BadRecord(NOTES, None, "validate", "missing_id", "a row whose id column is empty", 11),
        BadRecord(NOTES, "note-blank", "validate", "empty_text", "text is whitespace only", 23),
    ]
    rows.insert(bad[0].position - 1, ["", "Remember to water the seedlings first.", "gardening"])
    rows.insert(bad[1].position - 1, ["note-blank", "   ", "music"])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["id", "text", "topic"])
    writer.writerows(rows)
    return out.getvalue().encode("utf-8"), len(rows), bad


def _page(rng: random.Random, topic: Topic, markdown: bool) -> str:
    title = _title(rng, topic)
    sections = rng.sample(topic.objects, 3)
    if markdown:
        parts = [f"# {title}"]
        for heading in sections:
            parts += [f"## {heading[0].upper()}{heading[1:]}", _paragraph(rng, topic),
                      _paragraph(rng, topic)]
    else:
        parts = [f"{title}\n{'=' * len(title)}"]
        parts += [_paragraph(rng, topic) for _ in range(5)]
    return "\n\n".join(parts) + "\n"


def build_corpus() -> dict[str, bytes]:
    """Every file of the corpus, README.md included, by path relative to the output directory.

    Everything comes from one RNG in a fixed order, so the output depends on nothing else.
    """
    rng = random.Random(SEED)
    lines = _article_lines(rng)
    bad = [replace(line.bad, position=position)
           for position, line in enumerate(lines, start=1) if line.bad is not None]
    notes, n_notes, notes_bad = _notes(rng)
    bad += notes_bad
    files = {
        ARTICLES: gzip.compress(b"".join(line.data for line in lines), compresslevel=9, mtime=0),
        NOTES: notes,
    }
    for path, topic, markdown in PAGES:
        files[f"pages/{path}"] = _page(rng, TOPIC_BY_NAME[topic], markdown).encode("utf-8")
    records = {ARTICLES: len(lines), NOTES: n_notes, "pages/": len(PAGES)}
    files["README.md"] = _readme(records, bad).encode("utf-8")
    return files


def _readme(records: dict[str, int], bad: list[BadRecord]) -> str:
    total = sum(records.values())
    reasons = Counter(record.reason for record in bad)
    expected = {
        "records": total,
        "records_by_file": records,
        "valid_documents": total - len(bad),
        "rejects": len(bad),
        "rejects_by_reason": dict(sorted(reasons.items())),
        "bad_records": [
            {"file": r.file, "position": r.position, "id": r.record_id, "stage": r.stage,
             "reason": r.reason}
            for r in bad
        ],
    }
    table = "\n".join(
        f"| `{r.file}` | {r.position} | {f'`{r.record_id}`' if r.record_id else '—'} | "
        f"{r.what} | {r.stage} | `{r.reason}` |"
        for r in bad
    )
    return f"""# Sample corpus

Generated by `python examples/make_sample_corpus.py` (fixed seed; do not edit by hand: change the
script and re-run it, and `tests/test_local_server.py` checks that the two agree). It is the
input of `configs/local.yaml`, which sets `validate.max_document_bytes: {MAX_DOCUMENT_BYTES}`.

- `{ARTICLES}`, {records[ARTICLES]} lines: {N_ARTICLES} articles
  `{{"id", "title", "text", "lang", "topic"}}`, mostly 1–4 paragraphs, on {len(TOPICS)} topics:
  {", ".join(t.name for t in TOPICS)}.
  {N_LONG} are long reads of {LONG_WORDS[0]:,}–{LONG_WORDS[1]:,} words (several 512-token chunks
  each), {len(CJK_SOURCES)} are in Chinese or Japanese and {N_EMOJI} carry emoji. Plus the bad
  records below.
- `{NOTES}`, {records[NOTES]} data rows: short notes `id,text,topic`, some with commas, quotes
  and newlines inside quoted fields.
- `pages/`, {records["pages/"]} files: one document per `.md` or `.txt` file, whose id is its
  path below `pages/` (one is in `pages/guides/`).

Documents of one topic are built from that topic's vocabulary, so they are lexically closer to
each other than to other topics, which the local hashing embedder reflects.

## Bad records

Positions are 1-based JSONL lines or CSV data rows (the header is row 0). The duplicate id keeps
its first version (the earlier line); the later one is rejected.

| file | position | id in the reject | record | stage | reason |
| --- | --- | --- | --- | --- | --- |
{table}

## Expected counts

A record is a non-blank JSONL line, a CSV data row or a page file, bad ones included.

```json
{_json_block(expected)}
```
"""


def _json_block(expected: dict[str, object]) -> str:
    """JSON with one top-level key per line and one bad record per line: diffable, readable."""
    lines = []
    for key, value in expected.items():
        if isinstance(value, list):
            items = ",\n".join(f"    {json.dumps(item)}" for item in value)
            lines.append(f'  "{key}": [\n{items}\n  ]')
        else:
            lines.append(f'  "{key}": {json.dumps(value)}')
    return "{\n" + ",\n".join(lines) + "\n}"


def write_corpus(out: Path) -> list[Path]:
    """Write the corpus under ``out`` (created if needed); returns the files written."""
    written = []
    for relative, data in build_corpus().items():
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output directory (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    written = write_corpus(args.out)
    size = sum(path.stat().st_size for path in written)
    print(f"wrote {len(written)} files, {size:,} bytes, under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
