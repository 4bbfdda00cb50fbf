"""Every prompt template and tag parser, in one place.

The policy protocol (Search-R1 / ZeroSearch): the policy thinks in <think>, searches with
<search>query</search>, the environment inserts <information>...</information>, and it ends with
<answer>...</answer>. The wording below is ours; templates can be replaced by files
(`load_template`) so users can plug in released simulators that expect other wording.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from zsctl.core.errors import BadInput

# --- policy ------------------------------------------------------------------------------------

# Kept short on purpose: a 135M model on 2 CPU cores pays for every prompt token in RL. No tag pair
# here encloses anything: a small model copies what stands between the tags of its instruction
# ("your query" became its most common query; with "for example <answer> Paris </answer>" the demo's
# warm start answered "Paris" to 4 of 40 held-apart questions, a variant to 14).
POLICY_INSTRUCTION = (
    "Answer the question. Think briefly between <think> and </think>. "
    "To look something up, write the name or question to search for between <search> and </search>; "
    "the results come back between <information> and </information>. Search as often as you need. "
    "Then give only the answer, in a few words, between <answer> and </answer>.\n"
    "Question: {question}"
)

# A short system message: without one SmolLM2's chat template inserts its own default.
POLICY_SYSTEM = "You are a helpful assistant that uses a search engine."

INFORMATION_BLOCK = "\n\n<information>{documents}</information>\n\n"
INVALID_ACTION = (
    "\nThat was not a valid action. Put what to look up between <search> and </search>, "
    "or the final answer between <answer> and </answer>.\n"
)
FINAL_TURN = "\nNo more searches are allowed. Give your answer now inside <answer> </answer>.\n"

STOP_STRINGS = ["</search>", "</answer>"]

_SEARCH_RE = re.compile(r"<search>(.*?)</search>", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def policy_messages(question: str, template: str | None = None, style: str = "zsctl") -> list[dict]:
    return style_of(style).messages(question, template)


def render_policy_prompt(tokenizer, question: str, template: str | None = None, style: str = "zsctl") -> str:
    """The prompt text the policy sees; plain text for tokenizers without a chat template."""
    st = style_of(style)
    messages = st.messages(question, template)
    if st.system is not None and not getattr(tokenizer, "chat_template", None):
        return messages[0]["content"] + "\n\n" + messages[1]["content"] + "\n"
    return render_chat(tokenizer, messages)


def parse_action(text: str) -> tuple[str, str]:
    """Classify one generated turn: ("answer", text) | ("search", query) | ("invalid", "").

    Only the LAST complete tag of the turn counts; a turn that stopped at </search> ends with it.
    """
    answers = _ANSWER_RE.findall(text)
    searches = _SEARCH_RE.findall(text)
    last_answer = text.rfind("</answer>")
    last_search = text.rfind("</search>")
    if answers and last_answer > last_search:
        return "answer", answers[-1].strip()
    if searches:
        return "search", searches[-1].strip()
    return "invalid", ""


def format_documents(docs) -> str:
    """Documents as the policy sees them inside <information> (zsctl style), and as simulators trained
    by train-sim write them."""
    return STYLES["zsctl"].format_documents(docs)


def _doc_text(d) -> str:
    title = d.title if hasattr(d, "title") else d.get("title", "")
    text = d.text if hasattr(d, "text") else d.get("text", "")
    text = " ".join(str(text).split())
    return f"({title}) {text}" if title else text


def information_block(docs) -> str:
    return STYLES["zsctl"].information_block(docs)


# --- prompt styles ------------------------------------------------------------------------------
# A released Search-R1 or ZeroSearch policy was trained on its project's conventions: the tag
# protocol (the same as ours), one user message with no system message, a question ending in '?',
# and its own way of writing documents inside <information>. A style bundles those conventions; the
# instruction prose is ours in every style (for the exact upstream wording, evaluate on the project's
# own parquet with `prompt_from_data`, which feeds each row's `prompt` column verbatim).

PROMPT_STYLES = ("zsctl", "search-r1", "zerosearch")

# For the upstream styles: the same protocol and the same answer example as their prompts, in our words.
UPSTREAM_INSTRUCTION = (
    "Answer the question below. Every time you receive new information, reason about it first inside "
    "<think> and </think>. If you find that you are missing some knowledge, you can query a search engine "
    "by writing <search> query </search>; its top results will be returned between <information> and "
    "</information>. You may search as many times as you like. Once you need nothing more, give the "
    "answer inside <answer> and </answer> with no further explanation, for example <answer> Beijing "
    "</answer>. Question: {question}\n"
)
UPSTREAM_INVALID_ACTION = (
    "\nMy last step was not a valid action. To search, I must write the query between <search> and "
    "</search>; to finish, I must write the answer between <answer> and </answer>. I will try again.\n"
)


def _doc_fields(d) -> tuple[str, str]:
    title = d.title if hasattr(d, "title") else d.get("title", "")
    text = d.text if hasattr(d, "text") else d.get("text", "")
    return str(title or ""), str(text or "")


def _zsctl_doc(i: int, d) -> str:
    return f"Doc {i}: {_doc_text(d)}"


def _search_r1_doc(i: int, d) -> str:
    # Search-R1 writes the first line of FlashRAG `contents` (the title in double quotes) after
    # "Title: " and the passage after it, untouched
    title, text = _doc_fields(d)
    return f'Doc {i}(Title: "{title}") {text}'


def _zerosearch_doc(i: int, d) -> str:
    # ZeroSearch shows a retrieved passage's text alone (its wiki client reads only `text`), and a
    # simulator's documents as written: "Doc i: ..." lines without titles
    return f"Doc {i}: {_doc_fields(d)[1]}"


@dataclass(frozen=True)
class PromptStyle:
    """The conventions a policy is prompted and answered with (see PROMPT_STYLES)."""

    name: str
    instruction: str  # the user message; {question} is filled in
    system: str | None  # None: the user message alone, as the upstream projects send it
    doc_line: Callable[[int, object], str]  # (1-based rank, document) -> its line inside <information>
    doc_words: int  # documents cut to this many words before insertion; 0 = whole documents
    no_results: str  # what <information> holds when a search returned nothing
    invalid_action: str  # note after a turn that neither searched nor answered
    final_turn: str  # note before the last round (the upstream loops give none)
    question_mark: bool  # end every question with '?' (the upstream data preparation does)
    reported: str  # the score the project's own tables headline (all three are computed anyway)

    def format_documents(self, docs) -> str:
        return "\n".join(self.doc_line(i + 1, d) for i, d in enumerate(docs))

    def information_block(self, docs) -> str:
        body = self.format_documents(docs).strip() if docs else self.no_results
        return INFORMATION_BLOCK.format(documents=body)

    def question(self, question: str) -> str:
        q = question.strip()
        return q + "?" if self.question_mark and q and not q.endswith("?") else q

    def messages(self, question: str, template: str | None = None) -> list[dict]:
        user = {"role": "user", "content": (template or self.instruction).format(question=self.question(question))}
        return ([{"role": "system", "content": self.system}] if self.system is not None else []) + [user]

    def as_dict(self) -> dict:
        """What a manifest records about the style."""
        return {"name": self.name, "system": self.system, "doc_words": self.doc_words,
                "example_documents": self.format_documents([{"title": "T", "text": "text"}]),
                "reported": self.reported}


STYLES: dict[str, PromptStyle] = {
    "zsctl": PromptStyle("zsctl", POLICY_INSTRUCTION, POLICY_SYSTEM, _zsctl_doc, 80, "No results.",
                         INVALID_ACTION, FINAL_TURN, False, "em"),
    # Search-R1 reports exact match
    "search-r1": PromptStyle("search-r1", UPSTREAM_INSTRUCTION, None, _search_r1_doc, 0, "",
                             UPSTREAM_INVALID_ACTION, "", True, "em"),
    # ZeroSearch's tables count an answer as right when a gold answer is contained in it (our SubEM)
    "zerosearch": PromptStyle("zerosearch", UPSTREAM_INSTRUCTION, None, _zerosearch_doc, 0,
                              "No information available", UPSTREAM_INVALID_ACTION, "", True, "subem"),
}


def style_of(name: str | PromptStyle) -> PromptStyle:
    if isinstance(name, PromptStyle):
        return name
    if name not in STYLES:
        raise BadInput(f"prompt style '{name}' is not one of {', '.join(PROMPT_STYLES)}")
    return STYLES[name]


def chats_from_data(rows: list[dict], source: str) -> list[list[dict]]:
    """Each question row's own chat prompt (`prompt_from_data`); BadInput when the file has none."""
    missing = sum(1 for r in rows if not r.get("prompt"))
    if missing:
        raise BadInput(f"{source}: {missing} of {len(rows)} questions have no 'prompt' column value, which "
                       "--prompt-from-data needs; pass a ZeroSearch/Search-R1 parquet or drop --prompt-from-data")
    return [json.loads(r["prompt"]) for r in rows]


def render_chat(tokenizer, messages: list[dict], who: str = "") -> str:
    """Chat messages as the model reads them: through its chat template (generation prompt added),
    or, for a tokenizer without one, the messages' non-empty texts one after another (base models).
    `who` names a model that was meant to get its chat template: its absence is then warned about."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if who:
        warn_once(f"{who} has no chat template, so its prompts go as plain text; results may be far off "
                  "what it was trained on")
    return "\n\n".join(str(m.get("content", "")) for m in messages if m.get("content"))


_warned: set[str] = set()


def warn_once(message: str) -> None:
    """One line on stderr, once per process: a prompt the model was not trained on is easy to miss."""
    import sys

    if message not in _warned:
        _warned.add(message)
        print(f"warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


# --- simulator ---------------------------------------------------------------------------------

# The mode keyword is one word (useful | noisy) so one fine-tuned model serves both.
SIM_MODES = ("useful", "noisy")

# One text per mode. Only the useful prompt carries the gold answer: a 135M simulator given the answer in
# both modes copies it into either about half the time whatever the mode says (useful/noisy replies held a
# gold answer 52.5/48.3 % after 200 LoRA steps), while "copy the Answer line when there is one" is a rule
# it learns. The mode word still comes last, just before the documents are written.
_SIM_HEAD = "You are a search engine. Write {k} short documents for the query, as 'Doc 1: ...', 'Doc 2: ...'. "
SIMULATOR_USEFUL = (_SIM_HEAD + "Useful mode: the documents help answer the question, and one of them states "
                    "the answer.\nQuestion: {question}\nAnswer: {answer}\nQuery: {query}\nMode: useful.\n")
SIMULATOR_NOISY = (_SIM_HEAD + "Noisy mode: the documents look relevant to the query but do not answer the question.\n"
                   "Question: {question}\nQuery: {query}\nMode: noisy.\n")

# For an untuned instruct model (the paper's prompt-based baseline): one example per mode.
SIMULATOR_FEWSHOT_TEMPLATE = (
    "You are a search engine. Given a query, write {k} short Wikipedia-style documents, "
    "one per line, as 'Doc 1: ...', 'Doc 2: ...'.\n"
    "Mode useful: the documents contain the correct answer. "
    "Mode noisy: the documents are on topic but do not give the correct answer.\n\n"
    "Example (mode useful)\nQuestion: What is the capital of France?\nAnswer: Paris\n"
    "Query: capital of France\nDoc 1: (France) Paris is the capital and largest city of France.\n\n"
    "Example (mode noisy)\nQuestion: What is the capital of France?\nAnswer: Paris\n"
    "Query: capital of France\nDoc 1: (Lyon) Lyon is the third-largest city of France.\n\n"
    "Now (mode {mode})\nQuestion: {question}\nAnswer: {answer}\nQuery: {query}\n"
)

# Queries that name nothing (metrics.is_degenerate_query holds for each): a small policy copies such
# words from its instruction. `build-sft --label docs` pairs some of its training questions with one
# of DEGENERATE_QUERIES and answer-free documents in BOTH modes, so the simulator learns that a bad
# query gets no answer even in useful mode. check-sim's leak probe asks with LEAK_PROBES: the words
# small policies really wrote (also trained on) and others the corpus never shows.
DEGENERATE_QUERIES = (
    "query", "search", "your query", "my query", "search query", "I need a fact",
    "I need a fact I do not know", "I need a fact, so I search.", "information", "the answer",
)
LEAK_PROBES = (
    "query", "search", "I need a fact", "I need a fact I do not know",
    "search for information", "what I need to know", "facts", "find the answer",
)

# {Mode} is the mode with a capital letter ("Useful Output:"), as released simulators were trained on.
_TEMPLATE_FIELDS = {"query", "question", "answer", "mode", "Mode", "k"}
_TEMPLATE_KEYS = {"template", "useful", "noisy", "system"}


@dataclass(frozen=True)
class SimTemplate:
    """A simulator prompt: one text per mode (often the same text with {mode} in it), and optionally
    a system message: then the text is sent as a chat user turn after it, through the model's chat
    template (how released simulators are served; the system message may be empty)."""

    useful: str
    noisy: str
    system: str | None = None
    source: str = "built-in"

    def for_mode(self, mode: str) -> str:
        return self.useful if mode == "useful" else self.noisy

    def messages(self, prompt: str) -> list[dict]:
        return [{"role": "system", "content": self.system or ""}, {"role": "user", "content": prompt}]

    def as_dict(self) -> dict:
        """The texts, as build-sft and train-sim record them in their manifests (see `recorded`)."""
        return {"useful": self.useful, "noisy": self.noisy, "system": self.system, "source": self.source}

    @classmethod
    def recorded(cls, manifest: dict) -> SimTemplate | None:
        """The template a build-sft or train-sim manifest recorded, if any (older ones recorded none)."""
        t = manifest.get("sim_template")
        if t is None:
            return None
        if not (isinstance(t, dict) and isinstance(t.get("useful"), str) and isinstance(t.get("noisy"), str)):
            raise BadInput(f"a {manifest.get('kind', 'zsctl')} manifest records a sim_template without its useful "
                           "and noisy texts; rebuild that artifact (zsctl build-sft / train-sim)")
        return cls(t["useful"], t["noisy"], t.get("system"), t.get("source", "recorded"))


SIMULATOR_TEMPLATE = SimTemplate(SIMULATOR_USEFUL, SIMULATOR_NOISY)

# Template files shipped with zsctl, by name (`--sim-template NAME`).
BUILTIN_TEMPLATES = {"zerosearch-sft": "zerosearch_sft.yaml"}


# --sim-template, on every stage that renders simulator prompts
SIM_TEMPLATE_HELP = ("Simulator prompt template: a file (fields {query} {question} {answer} {mode} {Mode} {k}; YAML "
                     "for one text per mode and a system message) or zerosearch-sft.")


def load_template(path: str | SimTemplate | None, default: str | SimTemplate) -> SimTemplate:
    """The simulator template of `path`, or `default`.

    A .yaml/.yml/.json file is a mapping: `template` (both modes) or `useful` and `noisy`, and
    optionally `system`; any other file is one template text for both modes. Texts use str.format
    fields: query, question, answer, mode, Mode (capitalised), k. A name of BUILTIN_TEMPLATES loads
    the file shipped with zsctl.
    """
    if isinstance(path, SimTemplate):
        return path
    if not path:
        return default if isinstance(default, SimTemplate) else SimTemplate(default, default)
    if path in BUILTIN_TEMPLATES:
        path = str(Path(__file__).parents[1] / "templates" / BUILTIN_TEMPLATES[path])
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise BadInput(f"template file '{path}' cannot be read ({e.strerror}); pass an existing file or one of "
                       f"{', '.join(BUILTIN_TEMPLATES)}") from e
    if p.suffix.lower() in (".yaml", ".yml", ".json"):
        spec = _template_mapping(path, text)
        both = spec.get("template")
        useful, noisy = spec.get("useful", both), spec.get("noisy", both)
        if useful is None or noisy is None:
            raise BadInput(f"template file '{path}' needs 'template' (both modes) or both 'useful' and 'noisy'")
        tpl = SimTemplate(useful, noisy, spec.get("system"), str(path))
    else:
        tpl = SimTemplate(text, text, None, str(path))
    unknown = set(re.findall(r"{(\w+)}", tpl.useful + tpl.noisy)) - _TEMPLATE_FIELDS
    if unknown:
        raise BadInput(
            f"template file '{path}' uses unknown field(s) {sorted(unknown)}; "
            f"allowed: {sorted(_TEMPLATE_FIELDS)}"
        )
    return tpl


def _template_mapping(path: str, text: str) -> dict:
    import yaml

    try:
        spec = json.loads(text) if path.lower().endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise BadInput(f"template file '{path}' cannot be parsed ({' '.join(str(e).split())[:160]})") from None
    if not isinstance(spec, dict):
        raise BadInput(f"template file '{path}' must hold a mapping with 'template' or 'useful'/'noisy'")
    unknown = set(spec) - _TEMPLATE_KEYS
    if unknown:
        raise BadInput(
            f"template file '{path}' has unknown key(s) {sorted(unknown)}; allowed: {sorted(_TEMPLATE_KEYS)}"
        )
    bad = [k for k, v in spec.items() if not isinstance(v, str)]
    if bad:
        raise BadInput(f"template file '{path}': {', '.join(sorted(bad))} must be text")
    return spec


def render_simulator_prompt(
    query: str, question: str, answer: str, mode: str, k: int = 3, template: str | SimTemplate = SIMULATOR_TEMPLATE
) -> str:
    if mode not in SIM_MODES:
        raise ValueError(f"simulator mode must be one of {SIM_MODES}, got {mode!r}")
    text = template.for_mode(mode) if isinstance(template, SimTemplate) else template
    return text.format(query=query.strip(), question=question.strip(), answer=answer, mode=mode,
                       Mode=mode.capitalize(), k=k)


_DOC_RE = re.compile(r"^\s*Doc\s*(\d+)\s*[:.)-]\s*(.*)$", re.IGNORECASE)
_TITLE_RE = re.compile(r"^\((.*?)\)\s*(.*)$")


def parse_documents(text: str, k: int) -> tuple[list[dict], bool]:
    """Parse 'Doc i: ...' lines of simulator output into exactly k documents.

    Returns (docs, well_formed): well_formed is True when the output held exactly k numbered docs in
    order. Odd output never raises: missing docs are padded with empty ones, extras trimmed, and
    text without any 'Doc' line becomes the first document.
    """
    docs: list[dict] = []
    numbers: list[int] = []
    for line in text.splitlines():
        m = _DOC_RE.match(line)
        if m:
            numbers.append(int(m.group(1)))
            docs.append(_split_title(m.group(2)))
        elif docs and line.strip():
            docs[-1]["text"] = (docs[-1]["text"] + " " + line.strip()).strip()
    well_formed = numbers == list(range(1, k + 1)) and all(d["text"] for d in docs)
    if not docs and text.strip():
        docs = [_split_title(" ".join(text.split()))]
    docs = docs[:k]
    while len(docs) < k:
        docs.append({"title": "", "text": "", "score": 0.0})
    return docs, well_formed


def _line_text(line: str) -> tuple[str, str]:
    """A reply line split into (its "Doc i: (title)" head, its document text); a line whose title is
    still open is all head."""
    line = line.rstrip()
    m = _DOC_RE.match(line)
    body = m.group(2) if m else line
    t = _TITLE_RE.match(body.strip())
    text = t.group(2) if t else ("" if body.lstrip().startswith("(") else body)
    return line[:len(line) - len(text)], text


def line_words(line: str) -> int:
    """Words of document text on one line of a simulator's reply (its head not counted)."""
    return len(_line_text(line)[1].split())


def cut_document_lines(text: str, words: int) -> str:
    """A reply with each line's document text cut to its first `words` words (the agent's rule)."""
    from zsctl.search.base import cut_words

    out = []
    for line in text.split("\n"):
        head, body = _line_text(line)
        out.append(head + cut_words(body, words) if len(body.split()) > words else line)
    return "\n".join(out)


def _split_title(body: str) -> dict:
    m = _TITLE_RE.match(body.strip())
    if m:
        return {"title": m.group(1).strip(), "text": m.group(2).strip(), "score": 0.0}
    return {"title": "", "text": body.strip(), "score": 0.0}


# --- build-sft -----------------------------------------------------------------------------------

# `--label judge`: an LLM decides whether a real search call's documents suffice. It is shown the
# gold answer (as the simulator is) so that even a small judge checks support rather than recalls.
JUDGE_TEMPLATE = (
    "Question: {question}\nCorrect answer: {answer}\nSearch results:\n{documents}\n\n"
    "Do these search results contain what is needed to give the correct answer? Reply yes or no."
)


def judge_messages(question: str, answer: str, documents: str, template: str = JUDGE_TEMPLATE) -> list[dict]:
    return [{"role": "user", "content": template.format(question=question.strip(), answer=answer, documents=documents)}]


# `build-sft --for policy --templated`: answer-grounded demonstrations written around real search
# calls: one or two search turns, each followed by the agent loop's own information block (so the
# demonstration has the token stream the policy sees at inference), then an answer turn. The thinking
# varies, one phrasing per turn picked by a stable hash of the question: when every demonstration
# thought the same sentence, a small model learned that sentence and searched for its words.
DEMO_SEARCH_TURN = "<think> {think} </think>\n<search> {query} </search>"
DEMO_ANSWER_TURN = "<think> {think} </think>\n<answer> {answer} </answer>"
# before searching with the question itself ({topic} is the question). Each thought ends with what
# it searches for: a warm start copied a generic last sentence ("I will look it up.") into 6-9 % of
# its queries, so whatever it copies now names something.
DEMO_THINK_QUESTION = (
    "I am not sure of this, so I search for: {topic}",
    "I do not remember this. Let me check: {topic}",
    "I should check this before answering: {topic}",
    "I cannot answer this from memory. I look up: {topic}",
)
# before searching for a named thing ({topic} is the query)
DEMO_THINK_TOPIC = (
    "This is about {topic}. Let me look it up.",
    "First I need to know more about {topic}.",
    "I should find out about {topic}.",
    "The key here is {topic}.",
)
# After an information block a thought's FIRST word is its decision, "Next" (search again) or "So"
# (answer); the wording varies only after it. A greedy decoder follows the likeliest first word, so
# when both decisions had several openings ("The" began answers and searches alike), a warm start
# that searched again in 31 % of its samples never did so greedily. A search-again thought ends
# with its query and holds no general noun: "Next I check the results." became a query.
# before a further search, for another name the question gives (comparisons)
DEMO_THINK_ALSO = (
    "Next I look up {topic}.",
    "Next I need to know about {topic}.",
    "Next I also check {topic}.",
)
# before a further search, for a name the earlier results gave
DEMO_THINK_NEXT = (
    "Next I look into {topic}.",
    "Next I need more on {topic}.",
    "Next comes {topic}.",
)
DEMO_THINK_ANSWER = (
    "So the results say it is {answer}.",
    "So, according to the documents, it is {answer}.",
    "So the answer is {answer}.",
    "So the information shows it is {answer}.",
)
