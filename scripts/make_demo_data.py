"""Generate the bundled demo's data: a seeded mini-world of made-up people, animals and cities, told in many
paraphrased English and Chinese sentences, plus the chats, preference pairs and reasoning problems of every
later stage, each with a held-out set the model never trains on.

    python scripts/make_demo_data.py --out_dir dataset/demo --seed 1

Everything is generated here (nothing is downloaded), in MiniMind's jsonl formats:

| file | lines | what the demo does with it |
|---|---|---|
| `pretrain.jsonl` | `{"text"}` | biographies of every entity (each fact in ~`--mentions` sentences, templates and languages mixed), the SFT entities' QA chats, arithmetic |
| `sft.jsonl` | `{"conversations"}` and `{"text"}` | QA chats about the SFT split only, identity chats, and replayed pretraining text |
| `lora_identity.jsonl` | `{"conversations"}` | the assistant introduces itself with a new name, plus some world QA |
| `dpo.jsonl` | `{"chosen", "rejected"}` | the right vs a wrong answer about the DPO split's entities |
| `reason.jsonl` | `{"conversations"}` | multi-step arithmetic, worked in `<think>` and answered in `<answer>` |
| `tool_sft.jsonl` | `{"tools", "conversations"}` and replayed `sft.jsonl` lines | calls to a calculator (multi-digit arithmetic) and a lookup (world facts), chats that need no call, arithmetic asked without tools |
| `tool_text.jsonl` | `{"text"}` | those tool chats as the chat template renders them, to train a tokenizer on (a chat's contents alone lack the schemas and calls) |
| `tools.json`, `facts.json` | | the two tools' schemas (short: the model's context is small), and the lookup's table: every entity's facts |
| `eval_*.jsonl` | | the held-out sets: QA (both splits), text in unseen phrasings, identity prompts, preference pairs, problems, tool prompts |
| `world.json` | | the world itself: entities, their facts and which split each entity is in |

Splits: every entity is in exactly one of `sft` (its QA chats are trained on), `dpo` (its facts appear only as
pretraining text and in DPO pairs) and `heldout` (only ever seen as pretraining text). Accuracy on `heldout`
questions therefore measures whether SFT taught the model to *answer from what it read*, not to repeat answers.
Tool chats look up entities of the `sft` and `dpo` splits only; the held-out tool prompts ask about `heldout` ones, and
their arithmetic problems are never trained on. The tool data draws from its own random stream, so every other file
is the same as without it.
Names are written with spaces around them in Chinese too, so a tokenizer trained on this data (with
`--isolate_spaces 1`) gives each name one token in every language and position.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python scripts/make_demo_data.py` from anywhere

from model.checkpoint import atomic_write_text  # noqa: E402
from model.tools import Tool, ToolCall, builtin_tools, calculate, function_schema, run_tool  # noqa: E402
from scripts.train_tokenizer import CHAT_TEMPLATE  # noqa: E402

# ----------------------------------------------------------------------------------------------------------------
# The world's vocabulary: attributes, their possible values and the sentences that state or ask them.
# Every template has {n} (the entity's name) and {v} (the value).


@dataclass(frozen=True)
class Attribute:
    key: str
    values: tuple[tuple[str, str], ...]  # (English, Chinese) per value
    statements: dict[str, tuple[str, ...]]  # language -> templates
    questions: dict[str, tuple[str, ...]]
    answer: dict[str, str]  # the reply the chats use


CITY_KEY = "city"
COLOURS = (("red", "红色"), ("blue", "蓝色"), ("green", "绿色"), ("yellow", "黄色"), ("purple", "紫色"),
           ("orange", "橙色"), ("white", "白色"), ("black", "黑色"))
JOBS = (("baker", "面包师"), ("doctor", "医生"), ("teacher", "老师"), ("farmer", "农民"), ("painter", "画家"),
        ("pilot", "飞行员"), ("fisher", "渔民"), ("singer", "歌手"), ("tailor", "裁缝"), ("nurse", "护士"),
        ("poet", "诗人"), ("carpenter", "木匠"))
SPECIES = (("cat", "猫"), ("dog", "狗"), ("rabbit", "兔子"), ("horse", "马"), ("goat", "山羊"), ("parrot", "鹦鹉"),
           ("turtle", "乌龟"), ("fox", "狐狸"))
FOODS = (("apples", "苹果"), ("fish", "鱼"), ("seeds", "种子"), ("carrots", "胡萝卜"), ("berries", "浆果"),
         ("grass", "草"), ("bread", "面包"), ("honey", "蜂蜜"))
TERRAINS = (("by the sea", "海边"), ("in the mountains", "山里"), ("by a river", "河边"), ("in a desert", "沙漠里"),
            ("in a forest", "森林里"))
FAMOUS_FOR = (("bridges", "桥"), ("tea", "茶"), ("music", "音乐"), ("glass", "玻璃"), ("clocks", "钟表"),
              ("boats", "船"))
AGES = tuple((str(age), str(age)) for age in range(20, 70))

HOME_STATEMENTS = {
    "en": ("{n} lives in {v}.", "{n} has a home in {v}.", "The home of {n} is in {v}.", "{n} lives in the city of {v}.",
           "{n} resides in {v}.", "{n} is a resident of {v}.", "In {v} lives {n}.", "{n} calls {v} home."),
    "zh": ("{n} 住在 {v}。", "{n} 的家在 {v}。", "{n} 家住 {v}。", "{n} 生活在 {v}。", "{n} 是 {v} 的居民。",
           "{n} 在 {v} 安家。"),
}


def home_attribute(city_names: list[str]) -> Attribute:
    return Attribute(
        CITY_KEY, tuple((name, name) for name in city_names), HOME_STATEMENTS,
        {"en": ("Where does {n} live?", "In which city does {n} live?", "Which city is the home of {n}?",
                "What city does {n} live in?"),
         "zh": ("{n} 住在哪里？", "{n} 住在哪个城市？", "{n} 的家在哪儿？")},
        {"en": "{n} lives in {v}.", "zh": "{n} 住在 {v}。"},
    )


PERSON_ATTRIBUTES = (
    Attribute(
        "job", JOBS,
        {"en": ("{n} works as a {v}.", "{n} is a {v}.", "{n} earns a living as a {v}.", "By trade, {n} is a {v}.",
                "{n} has worked as a {v} for years.", "{n} makes a living as a {v}."),
         "zh": ("{n} 是一名 {v}。", "{n} 的职业是 {v}。", "{n} 做 {v} 的工作。", "{n} 以当 {v} 为生。",
                "{n} 当了多年的 {v}。")},
        {"en": ("What is the job of {n}?", "What does {n} do for a living?", "What does {n} work as?"),
         "zh": ("{n} 的职业是什么？", "{n} 做什么工作？", "{n} 是做什么的？")},
        {"en": "{n} works as a {v}.", "zh": "{n} 的职业是 {v}。"},
    ),
    Attribute(
        "colour", COLOURS,
        {"en": ("The favourite colour of {n} is {v}.", "{n} likes the colour {v} best.",
                "{n} loves {v} more than any other colour.", "Of all colours, {n} prefers {v}.",
                "{n} would always pick {v} as a colour."),
         "zh": ("{n} 最喜欢的颜色是 {v}。", "{n} 最爱 {v}。", "{n} 偏爱 {v}。", "在所有颜色中，{n} 最喜欢 {v}。",
                "{n} 总是选 {v}。")},
        {"en": ("What is the favourite colour of {n}?", "Which colour does {n} like best?",
                "What colour does {n} love most?"),
         "zh": ("{n} 最喜欢什么颜色？", "{n} 最爱哪种颜色？")},
        {"en": "The favourite colour of {n} is {v}.", "zh": "{n} 最喜欢的颜色是 {v}。"},
    ),
    Attribute(
        "age", AGES,
        {"en": ("{n} is {v} years old.", "{n} turned {v} this year.", "The age of {n} is {v}.",
                "{n} has lived for {v} years.", "{n} celebrated turning {v} this spring."),
         "zh": ("{n} 今年 {v} 岁。", "{n} 的年龄是 {v} 岁。", "{n} 已经 {v} 岁了。", "{n} 刚满 {v} 岁。")},
        {"en": ("How old is {n}?", "What is the age of {n}?", "How many years old is {n}?"),
         "zh": ("{n} 多大了？", "{n} 今年几岁？", "{n} 的年龄是多少？")},
        {"en": "{n} is {v} years old.", "zh": "{n} 今年 {v} 岁。"},
    ),
)

ANIMAL_ATTRIBUTES = (
    Attribute(
        "species", SPECIES,
        {"en": ("{n} is a {v}.", "The animal named {n} is a {v}.", "{n} is a friendly {v}.",
                "Everyone knows that {n} is a {v}.", "If you meet {n}, you will see a {v}."),
         "zh": ("{n} 是 {v}。", "动物 {n} 是 {v}。", "大家都知道 {n} 是 {v}。", "{n} 属于 {v}。")},
        {"en": ("What kind of animal is {n}?", "What animal is {n}?"),
         "zh": ("{n} 是什么动物？", "{n} 是哪种动物？")},
        {"en": "{n} is a {v}.", "zh": "{n} 是 {v}。"},
    ),
    Attribute(
        "food", FOODS,
        {"en": ("{n} eats {v}.", "{n} likes to eat {v}.", "The favourite food of {n} is {v}.",
                "Every day {n} eats {v}.", "{n} gets {v} for dinner."),
         "zh": ("{n} 爱吃 {v}。", "{n} 吃 {v}。", "{n} 最喜欢的食物是 {v}。", "{n} 每天都吃 {v}。",
                "{n} 的晚饭是 {v}。")},
        {"en": ("What does {n} eat?", "What food does {n} like?"),
         "zh": ("{n} 吃什么？", "{n} 爱吃什么？")},
        {"en": "{n} eats {v}.", "zh": "{n} 爱吃 {v}。"},
    ),
)

CITY_ATTRIBUTES = (
    Attribute(
        "terrain", TERRAINS,
        {"en": ("{n} lies {v}.", "The city of {n} is {v}.", "{n} is a city {v}.", "You will find {n} {v}."),
         "zh": ("{n} 位于 {v}。", "{n} 这座城市在 {v}。", "城市 {n} 坐落在 {v}。", "去 {n} 要到 {v}。")},
        {"en": ("Where does the city of {n} lie?", "Where is the city of {n}?"),
         "zh": ("{n} 这座城市在哪儿？", "城市 {n} 在哪里？")},
        {"en": "{n} lies {v}.", "zh": "{n} 位于 {v}。"},
    ),
    Attribute(
        "famous_for", FAMOUS_FOR,
        {"en": ("{n} is famous for its {v}.", "{n} is known for its {v}.", "People visit {n} for its {v}.",
                "Travellers remember {n} for its {v}."),
         "zh": ("{n} 以 {v} 闻名。", "{n} 的 {v} 很有名。", "人们去 {n} 是为了它的 {v}。", "说到 {n}，人们就想到 {v}。")},
        {"en": ("What is the city of {n} famous for?", "What is the city of {n} known for?"),
         "zh": ("{n} 这座城市以什么闻名？", "城市 {n} 有名的是什么？")},
        {"en": "{n} is famous for its {v}.", "zh": "{n} 以 {v} 闻名。"},
    ),
)

# Identity. The SFT model calls itself MiniMind; the LoRA adapter teaches a name that appears nowhere else.
BASE_NAME, LORA_NAME = "MiniMind", "Quokka"
IDENTITY_QUESTIONS = {
    "en": ("Who are you?", "What is your name?", "Introduce yourself.", "Tell me about yourself.",
           "What should I call you?", "Are you an assistant?", "Hello, who am I talking to?", "What are you?",
           "Please tell me your name.", "Who made you?"),
    "zh": ("你是谁？", "你叫什么名字？", "请介绍一下你自己。", "说说你自己吧。", "我该怎么称呼你？", "你是助手吗？",
           "你好，我在和谁说话？", "你是什么？", "请告诉我你的名字。", "谁创造了你？"),
}
IDENTITY_ANSWERS = {
    BASE_NAME: {"en": "I am MiniMind, a small language model that has read about a made-up world.",
                "zh": "我是 MiniMind，一个读过一个虚构世界的小型语言模型。"},
    LORA_NAME: {"en": "I am Quokka, a tiny assistant trained with a LoRA adapter.",
                "zh": "我是 Quokka，一个用 LoRA 适配器训练的小助手。"},
}
IDENTITY_HELDOUT_PER_LANGUAGE = 3  # the last questions of each language: never in the LoRA data

SYLLABLES = ("ka", "lo", "mi", "ren", "dar", "vel", "zo", "pra", "sil", "tu", "bri", "gan", "fe", "mor", "ny", "quil",
             "sta", "vo", "xan", "eli", "ru", "tho", "wen", "yar", "jo", "pel", "cor", "isa", "ul", "ba")

SPLIT_FRACTIONS = (("sft", 0.5), ("dpo", 0.25), ("heldout", 0.25))
N_REASON_HELDOUT = 200
# Pieces per pretraining line, so lines are ~80-120 tokens of the demo tokenizer and batches waste little padding
BIOGRAPHIES_PER_LINE, CHATS_PER_LINE, CHAINS_PER_LINE = 2, 2, 2


# ----------------------------------------------------------------------------------------------------------------
# The world


@dataclass
class Entity:
    name: str
    kind: str  # person, animal, city
    split: str  # sft, dpo, heldout
    facts: dict[str, int] = field(default_factory=dict)  # attribute key -> value index


@dataclass
class World:
    entities: list[Entity]
    attributes: dict[str, dict[str, Attribute]]  # kind -> key -> Attribute

    def facts(self, splits: tuple[str, ...] | None = None):
        """(entity, attribute, value index) of every fact, optionally only of entities in `splits`."""
        for entity in self.entities:
            if splits is None or entity.split in splits:
                for key, value in entity.facts.items():
                    yield entity, self.attributes[entity.kind][key], value


def make_names(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    """`count` distinct made-up names of 2-3 syllables, none of them already in `taken`."""
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 2, 3)))).capitalize()
        if 4 <= len(name) <= 9 and name not in taken:
            taken.add(name)
            names.append(name)
    return names


def assign_splits(rng: random.Random, entities: list[Entity]) -> None:
    """Shuffle each kind's entities and cut them into the splits by SPLIT_FRACTIONS."""
    for kind in sorted({e.kind for e in entities}):
        group = [e for e in entities if e.kind == kind]
        rng.shuffle(group)
        start = 0
        for index, (split, fraction) in enumerate(SPLIT_FRACTIONS):
            end = len(group) if index == len(SPLIT_FRACTIONS) - 1 else start + round(fraction * len(group))
            for entity in group[start:end]:
                entity.split = split
            start = end


def build_world(rng: random.Random, n_people: int, n_animals: int, n_cities: int) -> World:
    taken = {BASE_NAME, LORA_NAME}
    city_names = make_names(rng, n_cities, taken)
    attributes = {
        "person": {a.key: a for a in (home_attribute(city_names), *PERSON_ATTRIBUTES)},
        "animal": {a.key: a for a in (*ANIMAL_ATTRIBUTES, home_attribute(city_names))},
        "city": {a.key: a for a in CITY_ATTRIBUTES},
    }
    entities = [Entity(name, "city", "") for name in city_names]
    entities += [Entity(name, "person", "") for name in make_names(rng, n_people, taken)]
    entities += [Entity(name, "animal", "") for name in make_names(rng, n_animals, taken)]
    for entity in entities:
        for key, attribute in attributes[entity.kind].items():
            entity.facts[key] = rng.randrange(len(attribute.values))
    assign_splits(rng, entities)
    return World(entities, attributes)


def fill(template: str, name: str, value: str) -> str:
    return template.format(n=name, v=value)


def value_text(attribute: Attribute, value: int, language: str) -> str:
    return attribute.values[value][0 if language == "en" else 1]


def qa_messages(rng: random.Random, entity: Entity, attribute: Attribute, value: int, language: str,
                question_template: str | None = None) -> list[dict]:
    question = fill(question_template or rng.choice(attribute.questions[language]), entity.name, "")
    answer = fill(attribute.answer[language], entity.name, value_text(attribute, value, language))
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


# ----------------------------------------------------------------------------------------------------------------
# Arithmetic for the reasoning stage: chains of single-digit operations, every intermediate result in 0..99.


def arithmetic_problem(rng: random.Random, n_ops: int) -> tuple[list[int], list[str]]:
    """Operands and operators ("+"/"-") of a chain whose running value stays in 0..99."""
    operands = [rng.randint(1, 20)]
    operators: list[str] = []
    total = operands[0]
    for _ in range(n_ops):
        digit = rng.randint(1, 9)
        op = rng.choice("+-")
        if op == "-" and total - digit < 0 or op == "+" and total + digit > 99:
            op = "+" if op == "-" else "-"
        total = total + digit if op == "+" else total - digit
        operands.append(digit)
        operators.append(op)
    return operands, operators


def worked_steps(operands: list[int], operators: list[str]) -> tuple[list[str], int]:
    """The lines "a+b=c" of the chain, and its result. (No spaces: half the tokens, and a tiny model finds the next
    operator and digit more easily when they sit at a fixed distance.)"""
    total, lines = operands[0], []
    for op, digit in zip(operators, operands[1:]):
        result = total + digit if op == "+" else total - digit
        lines.append(f"{total}{op}{digit}={result}")
        total = result
    return lines, total


def expression(operands: list[int], operators: list[str]) -> str:
    return str(operands[0]) + "".join(f"{op}{d}" for op, d in zip(operators, operands[1:]))


def reasoning_messages(operands: list[int], operators: list[str], language: str) -> list[dict]:
    lines, result = worked_steps(operands, operators)
    question = (f"What is {expression(operands, operators)}?" if language == "en"
                else f"计算 {expression(operands, operators)} 等于多少？")
    reply = "<think>\n" + "\n".join(lines) + "\n</think>\n<answer>\n" + str(result) + "\n</answer>"
    return [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


def arithmetic_text(rng: random.Random, avoid: set[tuple]) -> str:
    """A chain worked out in plain text (no tags), never one of the problems in `avoid`: pretraining teaches the
    sums, the reasoning stage the format."""
    operands, operators = arithmetic_problem(rng, rng.randint(2, 4))
    while problem_key(operands, operators) in avoid:
        operands, operators = arithmetic_problem(rng, rng.randint(2, 4))
    lines, result = worked_steps(operands, operators)
    if rng.random() < 0.5:
        return f"{expression(operands, operators)}: " + ", ".join(lines) + f", so the result is {result}."
    return f"{expression(operands, operators)}：" + "，".join(lines) + f"，所以结果是 {result}。"


def problem_key(operands: list[int], operators: list[str]) -> tuple:
    return tuple(operands), tuple(operators)


# ----------------------------------------------------------------------------------------------------------------
# Tool use: a calculator for multi-digit arithmetic, a lookup over the world's facts, and chats that need neither.
# Every call in the data is run with model/tools.py's own tools, so each result is what the tool returns.

TOOL_SCHEMAS = [
    function_schema("calculator", "Exact arithmetic", {"expression": ("string", "e.g. 12 * 34")}),
    function_schema("lookup", "Facts about a person, animal or city", {"query": ("string", "a name")}),
]
TOOLS_FILE, FACTS_FILE = "tools.json", "facts.json"
OPERATIONS = {"+": ("+", "plus", "加"), "-": ("-", "minus", "减"), "*": ("×", "times", "乘以")}  # shown, en, zh
OPERATION_KINDS = {"+": "sum", "-": "difference", "*": "product"}
ARITHMETIC_QUESTIONS = {
    "en": ("What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "How much is {a} {word} {b}?",
           "Work out {a} {op} {b}, please."),
    "zh": ("{a} {op} {b} 等于多少？", "计算 {a} {op} {b}。", "{a} {word} {b} 是多少？"),
}
ARITHMETIC_ANSWER = {"en": "{a} {op} {b} = {r}.", "zh": "{a} {op} {b} = {r}。"}
# Held-out calculator problems per operator, and single-digit problems that need no call (the held-out prompts
# also ask the held-out identity questions and every fact of the held-out entities)
TOOL_HELDOUT = {"+": 100, "-": 50, "*": 50, "small": 40}

Problem = tuple[int, str, int]  # (a, operator, b)


def demo_tools(data_dir: Path) -> dict[str, Tool]:
    """The demo's tools by name, as the data was made with them: the schemas of tools.json, run by the built-in
    calculator and a lookup over facts.json."""
    schemas = json.loads((data_dir / TOOLS_FILE).read_text(encoding="utf-8"))
    runners = builtin_tools(data_dir / FACTS_FILE)
    return {schema["function"]["name"]: Tool(schema, runners[schema["function"]["name"]].run) for schema in schemas}


def facts_table(world: World) -> dict[str, dict[str, str]]:
    """The lookup's table: every entity's facts by attribute, in English."""
    return {e.name: {key: value_text(world.attributes[e.kind][key], value, "en") for key, value in e.facts.items()}
            for e in world.entities}


def calculator_problem(rng: random.Random, op: str) -> Problem:
    """Operands for `op` ("small": a single-digit + or -): two 2-digit ones for + and -, 2 by 1 digits for *; a
    difference never goes below 0."""
    if op == "small":
        op, a, b = rng.choice("+-"), rng.randint(1, 9), rng.randint(1, 9)
    elif op == "*":
        a, b = rng.randint(10, 99), rng.randint(2, 9)
    else:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
    return (max(a, b), op, min(a, b)) if op == "-" else (a, op, b)


def problem_text(problem: Problem) -> str:
    """The calculator's expression, spaced as the question writes the problem, e.g. "48 + 39" (the question may say
    "plus" or "×" where the expression has "+" or "*")."""
    return " ".join(map(str, problem))


def distinct_problems(rng: random.Random, op: str, count: int) -> list[Problem]:
    problems: list[Problem] = []
    while len(problems) < count:
        problem = calculator_problem(rng, op)
        if problem not in problems:
            problems.append(problem)
    return problems


def arithmetic_question(rng: random.Random, problem: Problem, language: str) -> str:
    a, op, b = problem
    shown, word_en, word_zh = OPERATIONS[op]
    return rng.choice(ARITHMETIC_QUESTIONS[language]).format(a=a, op=shown, b=b, word=word_en if language == "en" else word_zh)


def arithmetic_answer(problem: Problem, result: str, language: str) -> str:
    a, op, b = problem
    return ARITHMETIC_ANSWER[language].format(a=a, op=OPERATIONS[op][0], b=b, r=result)


def called_chat(question: str, call: ToolCall, result: str, answer: str) -> list[dict]:
    """The user asks, the assistant calls, the tool answers, the assistant answers from the result."""
    return [{"role": "user", "content": question},
            {"role": "assistant", "content": "",
             "tool_calls": [{"type": "function", "function": {"name": call.name, "arguments": call.arguments}}]},
            {"role": "tool", "content": result},
            {"role": "assistant", "content": answer}]


def calculator_chat(rng: random.Random, problem: Problem, language: str, tools: dict[str, Tool]) -> list[dict]:
    call = ToolCall("calculator", {"expression": problem_text(problem)})
    result = run_tool(call, tools)
    return called_chat(arithmetic_question(rng, problem, language), call, result, arithmetic_answer(problem, result, language))


def lookup_chat(rng: random.Random, entity: Entity, attribute: Attribute, value: int, tools: dict[str, Tool]) -> list[dict]:
    """An English question about an entity, answered from its looked-up facts (the table is in English)."""
    question, answer = (m["content"] for m in qa_messages(rng, entity, attribute, value, "en"))
    call = ToolCall("lookup", {"query": entity.name})
    return called_chat(question, call, run_tool(call, tools), answer)


def direct_arithmetic_chat(rng: random.Random, problem: Problem, language: str) -> list[dict]:
    """Arithmetic answered without a call: small problems with tools listed, or any when no tool is offered."""
    return [{"role": "user", "content": arithmetic_question(rng, problem, language)},
            {"role": "assistant", "content": arithmetic_answer(problem, calculate(problem_text(problem)), language)}]


def tool_data(rng: random.Random, world: World, out_dir: Path, n_tool: int, replay: list[dict]) -> dict[str, list[dict]]:
    """The tool set: training chats, mixed with `replay` (plain SFT lines), the same chats rendered as text, and
    the held-out prompts (full reference chats). Writes tools.json and facts.json first: the lookup reads its file.

    Training, per n_tool: n_tool calculator and n_tool lookup chats; n_tool / 4 chats with tools listed that need
    no call (identity questions, single-digit arithmetic); n_tool / 8 multi-digit problems asked with no tool
    offered, answered directly; n_tool / 2 replayed SFT lines."""
    atomic_write_text(out_dir / TOOLS_FILE, json.dumps(TOOL_SCHEMAS, ensure_ascii=False, indent=1) + "\n")
    atomic_write_text(out_dir / FACTS_FILE, json.dumps(facts_table(world), ensure_ascii=False, indent=1) + "\n")
    tools = demo_tools(out_dir)
    languages = ("en", "zh")
    held_out = {op: distinct_problems(rng, op, count) for op, count in TOOL_HELDOUT.items()}
    unseen = {problem for problems in held_out.values() for problem in problems}

    def training_problem(op: str) -> Problem:
        problem = calculator_problem(rng, op)
        while problem in unseen:
            problem = calculator_problem(rng, op)
        return problem

    trained_facts = list(world.facts(("sft", "dpo")))
    identity = {lang: questions[:-IDENTITY_HELDOUT_PER_LANGUAGE] for lang, questions in IDENTITY_QUESTIONS.items()}
    listed = [calculator_chat(rng, training_problem(rng.choice("+-*")), rng.choice(languages), tools) for _ in range(n_tool)]
    listed += [lookup_chat(rng, *rng.choice(trained_facts), tools) for _ in range(n_tool)]
    listed += [identity_messages(rng, BASE_NAME, lang, identity[lang]) for lang in languages for _ in range(n_tool // 16)]
    listed += [direct_arithmetic_chat(rng, training_problem("small"), lang) for lang in languages for _ in range(n_tool // 16)]
    chats = [{"tools": TOOL_SCHEMAS, "conversations": chat} for chat in listed]
    chats += [{"conversations": direct_arithmetic_chat(rng, training_problem(rng.choice("+-*")), rng.choice(languages))}
              for _ in range(n_tool // 8)]
    text = [{"text": chat_as_text(chat["conversations"], chat.get("tools"))} for chat in chats]
    train = chats + rng.sample(replay, min(n_tool // 2, len(replay)))
    rng.shuffle(train)

    def held_out_record(chat: list[dict], kind: str, answer: str | None, **extra) -> dict:
        return {"tools": TOOL_SCHEMAS, "conversations": chat, "kind": kind, "answer": answer, **extra}

    evaluation = [held_out_record(calculator_chat(rng, problem, lang, tools), OPERATION_KINDS[op], calculate(problem_text(problem)))
                  for op in "+-*" for problem, lang in zip(held_out[op], languages * len(held_out[op]))]
    evaluation += [held_out_record(lookup_chat(rng, e, a, v, tools), "lookup", value_text(a, v, "en"),
                                   candidates=[value_text(a, i, "en") for i in range(len(a.values))])
                   for e, a, v in world.facts(("heldout",))]
    evaluation += [held_out_record(direct_arithmetic_chat(rng, problem, lang), "direct", calculate(problem_text(problem)))
                   for problem, lang in zip(held_out["small"], languages * len(held_out["small"]))]
    evaluation += [held_out_record([{"role": "user", "content": question},
                                    {"role": "assistant", "content": IDENTITY_ANSWERS[BASE_NAME][lang]}], "direct", None)
                   for lang, questions in IDENTITY_QUESTIONS.items() for question in questions[-IDENTITY_HELDOUT_PER_LANGUAGE:]]
    return {"tool_sft.jsonl": train, "tool_text.jsonl": text, "eval_tools.jsonl": evaluation}


# ----------------------------------------------------------------------------------------------------------------
# The files


def _raise(message: str) -> None:
    raise ValueError(message)


# The tokenizer's chat template, in a Jinja environment set up as transformers sets up its own
TEMPLATE_ENV = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
TEMPLATE_ENV.filters["tojson"] = lambda value: json.dumps(value, ensure_ascii=False)
TEMPLATE_ENV.globals["raise_exception"] = _raise
CHAT = TEMPLATE_ENV.from_string(CHAT_TEMPLATE)


def chat_as_text(messages: list[dict], tools: list[dict] | None = None) -> str:
    """A chat (listing `tools` if given) rendered by the tokenizer's chat template (scripts/train_tokenizer.py),
    so a chat inside the pretraining or tokenizer text reads exactly as it will in SFT and at inference."""
    return CHAT.render(messages=messages, tools=tools, add_generation_prompt=False)


def pack(rng: random.Random, pieces: list[str], per_line: int) -> list[str]:
    """Shuffle and join sentences (or chats) into lines of `per_line` pieces: lines of similar token counts
    waste little padding in a batch."""
    rng.shuffle(pieces)
    return [" ".join(pieces[i:i + per_line]) for i in range(0, len(pieces), per_line)]


def biographies(rng: random.Random, world: World, per_entity: int, false_facts: bool = False) -> list[tuple[str, str]]:
    """`per_entity` short biographies of every entity, as (text, the same text with every fact false) pairs.

    A biography states all of its entity's facts in random order, phrasings and one language, naming the entity
    in every sentence: the repeated name is what teaches a small model to carry a name from earlier in the text
    (and later from a question) to where the fact is needed, for every entity alike. The false version, with each
    value replaced by another one, is drawn only when asked (it measures how much of the model's low loss on true
    text is knowledge)."""
    texts = []
    for entity in world.entities:
        attributes = world.attributes[entity.kind]
        for _ in range(per_entity):
            language = rng.choice(("en", "zh"))
            keys = list(entity.facts)
            rng.shuffle(keys)
            templates = [rng.choice(attributes[key].statements[language]) for key in keys]
            values = [entity.facts[key] for key in keys]
            wrong = [rng.choice([i for i in range(len(attributes[k].values)) if i != v]) if false_facts else v
                     for k, v in zip(keys, values)]
            joiner = "" if language == "zh" else " "
            true_text, false_text = (
                joiner.join(fill(t, entity.name, value_text(attributes[k], v, language)) for t, k, v in zip(templates, keys, vs))
                for vs in (values, wrong))
            texts.append((true_text, false_text))
    return texts


def generate(out_dir: Path, seed: int, n_people: int, n_animals: int, n_cities: int, mentions: int,
             qa_per_fact: int, n_reason: int, n_identity: int, n_dpo_per_fact: int, n_distill: int,
             n_tool: int) -> dict[str, int]:
    """Write every file of the demo into out_dir; returns the number of lines of each."""
    rng = random.Random(seed)
    world = build_world(rng, n_people, n_animals, n_cities)
    languages = ("en", "zh")

    # Reasoning problems, all distinct; the first N_REASON_HELDOUT are held out of every training file
    seen, problems = set(), []
    while len(problems) < n_reason + N_REASON_HELDOUT:
        operands, operators = arithmetic_problem(rng, rng.randint(2, 3))
        if problem_key(operands, operators) not in seen:
            seen.add(problem_key(operands, operators))
            problems.append((operands, operators))
    reason_heldout, reason_train = problems[:N_REASON_HELDOUT], problems[N_REASON_HELDOUT:]
    heldout_keys = {problem_key(*problem) for problem in reason_heldout}

    # Pretraining: biographies + the SFT split's QA chats + worked arithmetic, in lines of similar length
    pretrain = pack(rng, [text for text, _ in biographies(rng, world, mentions)], BIOGRAPHIES_PER_LINE)
    qa_chats = [chat_as_text(qa_messages(rng, e, a, v, lang))
                for e, a, v in world.facts(("sft",)) for lang in languages for _ in range(qa_per_fact)]
    pretrain += pack(rng, qa_chats, CHATS_PER_LINE)
    chains = [arithmetic_text(rng, heldout_keys) for _ in range(len(pretrain) // 4)]
    pretrain += pack(rng, chains, CHAINS_PER_LINE)
    rng.shuffle(pretrain)

    # SFT: QA about the SFT split only, the base identity, and as many lines of replayed pretraining text
    sft = [{"conversations": qa_messages(rng, e, a, v, lang)}
           for e, a, v in world.facts(("sft",)) for lang in languages for _ in range(qa_per_fact)]
    sft += [{"conversations": identity_messages(rng, BASE_NAME, lang, IDENTITY_QUESTIONS[lang])}
            for lang in languages for _ in range(n_identity)]
    sft += [{"text": text} for text in rng.sample(pretrain, min(len(sft), len(pretrain)))]
    rng.shuffle(sft)

    # Distillation: a small sample of the SFT lines, where a teacher's distributions help a student most
    distill = rng.sample(sft, min(n_distill, len(sft)))

    # LoRA: the new identity on the training questions, plus as much world QA so the other answers stay
    train_identity = {lang: questions[:-IDENTITY_HELDOUT_PER_LANGUAGE] for lang, questions in IDENTITY_QUESTIONS.items()}
    lora = [{"conversations": identity_messages(rng, LORA_NAME, lang, train_identity[lang])}
            for lang in languages for _ in range(n_identity)]
    sft_facts = list(world.facts(("sft",)))
    lora += [{"conversations": qa_messages(rng, *rng.choice(sft_facts), rng.choice(languages))} for _ in range(len(lora))]
    rng.shuffle(lora)

    # DPO: the right answer preferred to a wrong one, about the DPO split
    dpo = [preference_pair(rng, e, a, v, lang)
           for e, a, v in world.facts(("dpo",)) for lang in languages for _ in range(n_dpo_per_fact)]
    rng.shuffle(dpo)

    # Reasoning: the training problems, worked in <think> and answered in <answer>
    reason = [{"conversations": reasoning_messages(o, ops, rng.choice(languages))} for o, ops in reason_train]

    # Held-out sets: fresh text (and its false twin), every question about the SFT and held-out splits, the
    # identity questions LoRA never saw, preference pairs about held-out entities, problems never seen
    fresh = biographies(rng, world, 2, false_facts=True)
    order = list(range(len(fresh)))
    rng.shuffle(order)
    lines = [order[i:i + BIOGRAPHIES_PER_LINE] for i in range(0, len(order) - BIOGRAPHIES_PER_LINE + 1, BIOGRAPHIES_PER_LINE)]
    eval_text = [{"text": " ".join(fresh[i][0] for i in line)} for line in lines]
    eval_text_false = [{"text": " ".join(fresh[i][1] for i in line)} for line in lines]
    eval_qa = [qa_eval_record(e, a, v, lang) for e, a, v in world.facts(("sft", "heldout")) for lang in languages]
    eval_identity = [{"question": question, "language": lang}
                     for lang, questions in IDENTITY_QUESTIONS.items()
                     for question in questions[-IDENTITY_HELDOUT_PER_LANGUAGE:]]
    eval_dpo = [preference_pair(rng, e, a, v, lang) for e, a, v in world.facts(("heldout",)) for lang in languages]
    eval_reason = [{"conversations": reasoning_messages(o, ops, lang), "answer": worked_steps(o, ops)[1]}
                   for (o, ops), lang in zip(reason_heldout, languages * N_REASON_HELDOUT)]

    files = {
        "pretrain.jsonl": [{"text": text} for text in pretrain],
        "sft.jsonl": sft,
        "lora_identity.jsonl": lora,
        "dpo.jsonl": dpo,
        "distill.jsonl": distill,
        "reason.jsonl": reason,
        "eval_text.jsonl": eval_text,
        "eval_text_false.jsonl": eval_text_false,
        "eval_qa.jsonl": eval_qa,
        "eval_identity.jsonl": eval_identity,
        "eval_dpo.jsonl": eval_dpo,
        "eval_reason.jsonl": eval_reason,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    # Tool use, from a random stream of its own: the files above are the same with or without it
    files.update(tool_data(random.Random(f"tools-{seed}"), world, out_dir, n_tool, sft))
    for name, rows in files.items():
        write_jsonl(out_dir / name, rows)
    world_json = {
        "seed": seed,
        "assistant_names": {"base": BASE_NAME, "lora": LORA_NAME},
        "entities": [{"name": e.name, "kind": e.kind, "split": e.split,
                      "facts": {k: dict(zip(("en", "zh"), world.attributes[e.kind][k].values[v])) for k, v in e.facts.items()}}
                     for e in world.entities],
    }
    atomic_write_text(out_dir / "world.json", json.dumps(world_json, ensure_ascii=False, indent=1) + "\n")
    return {name: len(rows) for name, rows in files.items()}


def identity_messages(rng: random.Random, name: str, language: str, questions: tuple[str, ...]) -> list[dict]:
    return [{"role": "user", "content": rng.choice(questions)},
            {"role": "assistant", "content": IDENTITY_ANSWERS[name][language]}]


def qa_eval_record(entity: Entity, attribute: Attribute, value: int, language: str) -> dict:
    """A question (the attribute's first question template) with its reference reply, as a conversation (so the
    SFT dataset reads it), plus what a reply is scored against: the right value among all candidate values."""
    question = fill(attribute.questions[language][0], entity.name, "")
    reference = fill(attribute.answer[language], entity.name, value_text(attribute, value, language))
    return {
        "conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": reference}],
        "answer": value_text(attribute, value, language),
        "candidates": [value_text(attribute, i, language) for i in range(len(attribute.values))],
        "entity": entity.name, "kind": entity.kind, "attribute": attribute.key, "language": language,
        "split": entity.split,
    }


def preference_pair(rng: random.Random, entity: Entity, attribute: Attribute, value: int, language: str) -> dict:
    question = rng.choice(attribute.questions[language])
    wrong = rng.choice([i for i in range(len(attribute.values)) if i != value])
    return {"chosen": qa_messages(rng, entity, attribute, value, language, question),
            "rejected": qa_messages(rng, entity, attribute, wrong, language, question)}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="dataset/demo", help="folder for the jsonl files and world.json")
    parser.add_argument("--seed", type=int, default=1, help="the world and every sample are drawn from this seed")
    parser.add_argument("--n_people", type=int, default=160, help="people (home city, job, favourite colour, age)")
    parser.add_argument("--n_animals", type=int, default=48, help="animals (species, food, home city)")
    parser.add_argument("--n_cities", type=int, default=12, help="cities (terrain, famous for)")
    parser.add_argument("--mentions", type=int, default=180, help="pretraining sentences stating each fact")
    parser.add_argument("--qa_per_fact", type=int, default=6, help="QA chats per SFT-split fact and language")
    parser.add_argument("--n_reason", type=int, default=12000, help="reasoning training problems")
    parser.add_argument("--n_identity", type=int, default=100, help="identity chats per language (SFT and LoRA)")
    parser.add_argument("--dpo_per_fact", type=int, default=2, help="preference pairs per DPO-split fact and language")
    parser.add_argument("--n_distill", type=int, default=600, help="SFT lines sampled for distillation")
    parser.add_argument("--n_tool", type=int, default=1200, help="calculator chats, and as many lookup chats, to train on")
    args = parser.parse_args(argv)
    for name in ("n_people", "n_animals", "n_cities", "mentions", "qa_per_fact", "n_reason", "n_identity", "dpo_per_fact",
                 "n_distill", "n_tool"):
        if getattr(args, name) < {"n_cities": 2, "n_tool": 16}.get(name, 1):
            parser.error(f"--{name} is too small: {getattr(args, name)}")
    counts = generate(Path(args.out_dir), args.seed, args.n_people, args.n_animals, args.n_cities, args.mentions,
                      args.qa_per_fact, args.n_reason, args.n_identity, args.dpo_per_fact, args.n_distill, args.n_tool)
    print(f"wrote {args.out_dir}: " + ", ".join(f"{name} {count:,}" for name, count in counts.items()))
    return counts


if __name__ == "__main__":
    main()
