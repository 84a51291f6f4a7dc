"""The vocabulary of the sample corpus: the data tables ``make_sample_corpus.py`` composes from.

Kept apart from the program so each file stays readable: this one is only data (topics with
their canned sentences and sentence parts, the Chinese and Japanese sentences, the CSV notes that
need quoting, the whole-file pages). Changing anything here changes the generated corpus: re-run
``python examples/make_sample_corpus.py`` and commit ``examples/sample`` with it.
"""

from __future__ import annotations

from dataclasses import dataclass


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
        "使用版本控制系统，团队可以审查每一次代码修改。",
        "在优化之前，应该先用性能分析工具找到瓶颈。",
        "函数应该只做一件事，这样更容易命名和测试。", "缓存可以显著减少数据库查询的次数。",
    )),
    CjkSource("ja", "football", "サッカー観戦ノート", (
        "サッカーの試合は前半と後半の九十分で行われる。",
        "ゴールキーパーは味方の守備を声で指示した。",
        "高い位置からのプレスでボールを奪い、素早く攻撃した。",
        "後半のアディショナルタイムに決勝ゴールが生まれた。",
        "フリーキックは壁の上を越えてゴールに吸い込まれた。",
        "監督は若い選手を積極的に起用している。",
    )),
    CjkSource("ja", "music", "音楽の練習について", (
        "弦楽四重奏は二本のヴァイオリン、ヴィオラ、チェロで構成される。",
        "メトロノームを使ってゆっくり練習すると正確さが身につく。",
        "ジャズの即興演奏には和声の深い理解が必要だ。",
        "指揮者はテンポを少し落として最終楽章を演奏させた。",
        "合唱団は教会の響きの中でバッハを歌った。", "ピアニストは新しいアルバムを一日で録音した。",
    )),
    CjkSource("ja", "gardening", "家庭菜園のすすめ", (
        "トマトの苗は最後の霜が降りた後に植えるのがよい。",
        "堆肥は土に栄養を返し、土の構造を良くする。",
        "マルチングをすると土の水分が保たれ、雑草も減る。",
        "バラは冬の終わりに剪定すると春に元気に育つ。",
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
