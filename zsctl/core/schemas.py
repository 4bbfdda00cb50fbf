"""Every artifact table's schema, in one place.

Readers check the *required* columns and their types by name, so files written by other tools with
extra columns still load. Field descriptions travel in the Parquet metadata.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1


def _f(name: str, typ: pa.DataType, doc: str, optional: bool = False) -> pa.Field:
    """One documented field; `optional` marks a field added later, which readers do not require
    (artifacts written before it existed still load; the value reads as null)."""
    meta = {"description": doc, **({"optional": "true"} if optional else {})}
    return pa.field(name, typ, metadata=meta)


def _optional(field: pa.Field) -> bool:
    return (field.metadata or {}).get(b"optional") == b"true"


DOC = pa.struct([("title", pa.string()), ("text", pa.string()), ("score", pa.float64())])
# One search call. Its facts are metrics.search_records' (search quality, shown beside EM/F1).
SEARCH = pa.struct([
    ("query", pa.string()),
    ("documents", pa.list_(DOC)),
    _f("degenerate", pa.bool_(), "the query names nothing (metrics.is_degenerate_query)", optional=True),
    _f("has_answer", pa.bool_(), "the documents hold a gold answer; null when the golds are all yes/no", optional=True),
    _f("repeated", pa.bool_(), "the query repeats an earlier one of the same trajectory (metrics.search_records)",
       optional=True),
    _f("grounded", pa.bool_(), "the query names something of the question or of a document shown before it "
       "(metrics.search_records)", optional=True),
])
STR_LIST = pa.list_(pa.string())

QUESTIONS = pa.schema(
    [
        _f("id", pa.string(), "question id, unique within data_source"),
        _f("question", pa.string(), "the question text"),
        _f("golden_answers", STR_LIST, "accepted answers (aliases)"),
        _f("data_source", pa.string(), "benchmark name, e.g. hotpotqa"),
    ]
)
# Added to a questions table only when its file carries prompts (ZeroSearch/Search-R1 parquet).
QUESTION_PROMPT = _f("prompt", pa.string(), "the file's own chat prompt as JSON messages, fed verbatim "
                     "with prompt_from_data", optional=True)

TRAJECTORIES = pa.schema(
    [
        _f("traj_id", pa.string(), "unique trajectory id: question id + sample index"),
        _f("question_id", pa.string(), "id of the question"),
        _f("data_source", pa.string(), "benchmark name"),
        _f("question", pa.string(), "the question text"),
        _f("golden_answers", STR_LIST, "accepted answers"),
        _f("model", pa.string(), "policy model spec that produced it"),
        _f("engine", pa.string(), "search spec of the real engine"),
        _f("searches", pa.list_(SEARCH), "every search call: query and rank-ordered documents"),
        _f("response", pa.string(), "the policy's whole response, information blocks included"),
        _f("prediction", pa.string(), "text of the last <answer> (empty when none)"),
        _f("em", pa.float64(), "exact match of prediction vs golds (0/1)"),
        _f("f1", pa.float64(), "token F1 of prediction vs golds (max over golds)"),
        _f("num_searches", pa.int64(), "number of search calls"),
    ]
)

SIM_SFT = pa.schema(
    [
        _f("id", pa.string(), "row id"),
        _f("prompt", pa.string(), "simulator prompt (query, question, gold answer, mode)"),
        _f("completion", pa.string(), "the real documents in 'Doc i: ...' form"),
        _f("label", pa.string(), "useful | noisy"),
        _f("query", pa.string(), "the search query"),
        _f("question", pa.string(), "the question of the trajectory that issued the query"),
        _f("golden_answer", pa.string(), "its first gold answer"),
        _f("source_traj_id", pa.string(), "trajectory the call came from"),
    ]
)

POLICY_SFT = pa.schema(
    [
        _f("id", pa.string(), "row id"),
        _f("prompt", pa.string(), "the policy prompt (chat-formatted text)"),
        _f("completion", pa.string(), "the policy's turns with <information> blocks in place"),
        _f("question", pa.string(), "the question"),
        _f("golden_answers", STR_LIST, "accepted answers"),
        _f("source_traj_id", pa.string(), "trajectory it came from (templated: question id)"),
    ]
)

ROLLOUTS = pa.schema(
    [
        _f("step", pa.int64(), "trainer step"),
        _f("noise_p", pa.float64(), "curriculum noise probability p_i at this step"),
        _f("question_id", pa.string(), "question id"),
        _f("sample", pa.int64(), "index within the group"),
        _f("response", pa.string(), "the whole response, information blocks included"),
        _f("prediction", pa.string(), "text of the last <answer>"),
        _f("reward", pa.float64(), "reward given"),
        _f("num_searches", pa.int64(), "search calls"),
        _f("sim_labels", STR_LIST, "mode of each simulated search (useful|noisy); empty for real engines"),
        _f("searches", pa.list_(SEARCH), "every search call: query, documents and their search-quality facts",
           optional=True),
    ]
)

PREDICTIONS = pa.schema(
    [
        _f("id", pa.string(), "question id"),
        _f("data_source", pa.string(), "benchmark name"),
        _f("question", pa.string(), "question text"),
        _f("golden_answers", STR_LIST, "accepted answers"),
        _f("prediction", pa.string(), "text of the last <answer> (empty when none)"),
        _f("em", pa.float64(), "exact match 0/1"),
        _f("subem", pa.float64(), "substring exact match 0/1 (what ZeroSearch's tables call EM)"),
        _f("f1", pa.float64(), "token F1, max over golds"),
        _f("num_searches", pa.int64(), "search calls"),
        _f("response", pa.string(), "the whole response"),
        _f("searches", pa.list_(SEARCH), "every search call: query, documents and their search-quality facts",
           optional=True),
        _f("prompt", pa.string(), "the prompt text the policy was given (chat template applied)", optional=True),
    ]
)

CORPUS = pa.schema(
    [
        _f("id", pa.string(), "passage id"),
        _f("title", pa.string(), "passage title"),
        _f("text", pa.string(), "passage text"),
    ]
)

CHECK_SIM = pa.schema(
    [
        _f("id", pa.string(), "query id: trajectory id#search index, or source:question id"),
        _f("question", pa.string(), "the question the query belongs to"),
        _f("golden_answers", STR_LIST, "its accepted answers"),
        _f("query", pa.string(), "the search query"),
        _f(
            "role",
            pa.string(),
            "simulator | probe (leak probe: a query that names nothing, useful mode) | real (the --vs engine)",
        ),
        _f("engine", pa.string(), "search spec"),
        _f("mode", pa.string(), "useful | noisy (simulator) or real"),
        _f("documents", pa.list_(DOC), "the k documents returned"),
        _f("text", pa.string(), "the documents as 'Doc i: (title) text' lines"),
        _f("raw", pa.string(), "the simulator's raw output (empty for the real engine)"),
        _f("well_formed", pa.bool_(), "exactly k numbered documents were written"),
        _f(
            "has_answer", pa.bool_(), "a normalised gold answer (never yes/no) occurs in the documents' titles or texts"
        ),
        _f("tries", pa.int32(), "generations spent on this reply (1 + verification retries; 1 for the real engine)"),
    ]
)

# artifact kind -> (data file name, schema). Model artifacts (simulator, policy) have no table here.
TABLES: dict[str, tuple[str, pa.Schema]] = {
    "questions": ("questions.parquet", QUESTIONS),
    "trajectories": ("trajectories.parquet", TRAJECTORIES),
    "sim_sft": ("sim_sft.parquet", SIM_SFT),
    "policy_sft": ("policy_sft.parquet", POLICY_SFT),
    "rollouts": ("rollouts.parquet", ROLLOUTS),
    "predictions": ("predictions.parquet", PREDICTIONS),
    "corpus": ("corpus.parquet", CORPUS),
    "check_sim": ("check_sim.parquet", CHECK_SIM),
}


def missing_or_mistyped(schema: pa.Schema, required: pa.Schema) -> list[str]:
    """Describe each required column that is absent or has another type ([] when all is well)."""
    problems = []
    for field in required:
        idx = schema.get_field_index(field.name)
        if idx < 0:
            if not _optional(field):
                problems.append(f"missing column '{field.name}'")
        elif not _compatible(schema.field(idx).type, field.type):
            problems.append(f"column '{field.name}' is {schema.field(idx).type}, expected {field.type}")
    return problems


def _compatible(got: pa.DataType, want: pa.DataType) -> bool:
    if got.equals(want):
        return True
    if pa.types.is_string(want):
        return pa.types.is_string(got) or pa.types.is_large_string(got)
    if pa.types.is_floating(want):
        return pa.types.is_floating(got) or pa.types.is_integer(got)
    if pa.types.is_integer(want):
        return pa.types.is_integer(got)
    if pa.types.is_list(want) or pa.types.is_large_list(want):
        return (pa.types.is_list(got) or pa.types.is_large_list(got)) and _compatible(
            got.value_type, want.value_type
        )
    if pa.types.is_struct(want):
        if not pa.types.is_struct(got):
            return False
        names = {got.field(i).name: got.field(i).type for i in range(got.num_fields)}
        return all(
            _compatible(names[f.name], f.type) if f.name in names else _optional(f)
            for f in (want.field(i) for i in range(want.num_fields))
        )
    return False
